//! Admission control: which new connections a server takes, and which it
//! drops, so one host cannot lock everyone else out.
//!
//! Modelled on OpenSSH's `MaxStartups`, `PerSourceMaxStartups` and
//! `PerSourcePenalties`:
//! * Connections that have not authenticated yet are limited per source (an
//!   IPv4 address, an IPv6 /64 by default) and in total. When the total is
//!   reached, the *oldest* unauthenticated connection is dropped to make room:
//!   a flood of idle connections cannot keep a fresh client out.
//! * Authenticated connections are counted separately, under their own (larger)
//!   limit, and are never dropped to make room for unauthenticated ones.
//! * A source earns a penalty each time it is refused at its limit or fails
//!   authentication; penalties decay with time, and while a source's penalty
//!   is above a grace allowance every new connection from it is refused. A
//!   source that keeps at it keeps earning, so it stays refused for as long as
//!   it goes on (and up to [`AdmissionConfig::penalty_max`] after).
//!
//! [`Admission`] is sans-IO: it takes the peer's address and `now`, keeps the
//! books, and answers; the server drops refused connections and stops evicted
//! ones. Calling order for one connection: [`Admission::admit`], then at most
//! one [`Admission::authenticate`] (or [`Admission::auth_failed`]), and always
//! [`Admission::close`] when it ends.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Limits and penalties; every field is a knob of `ferry serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Unauthenticated connections one source may hold at once (ferry's own
    /// client opens up to 16 at a time for one large file).
    pub per_source: usize,
    /// Unauthenticated connections in all; a new one past this drops the oldest.
    pub unauthenticated: usize,
    /// Authenticated connections in all; past this, a client is told to retry later.
    pub authenticated: usize,
    /// Penalty earned by a connection refused at its source's limit (or
    /// while the source is penalised).
    pub penalty_refused: Duration,
    /// Penalty earned by a failed authentication.
    pub penalty_auth: Duration,
    /// A source is refused only while its penalty exceeds this: an occasional
    /// refusal or mistyped token costs nothing.
    pub penalty_grace: Duration,
    /// The longest a source is refused for its penalty, past the grace
    /// allowance (0 turns penalties off).
    pub penalty_max: Duration,
    /// Sources whose penalties are remembered at once (the smallest is
    /// forgotten first when more come).
    pub max_tracked_sources: usize,
    /// Prefix lengths that make one source: 32 for IPv4 and 64 for IPv6 by
    /// default (a host usually gets a whole /64).
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            per_source: 16,
            unauthenticated: 64,
            authenticated: 256,
            penalty_refused: Duration::from_secs(1),
            penalty_auth: Duration::from_secs(5),
            penalty_grace: Duration::from_secs(15),
            penalty_max: Duration::from_secs(600),
            max_tracked_sources: 8192,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
        }
    }
}

/// The network block a peer is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// `ip` masked to its block (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn of(ip: IpAddr, cfg: &AdmissionConfig) -> Self {
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            },
            v4 => v4,
        };
        Source(match ip {
            IpAddr::V4(a) => {
                let bits = u32::from(a) & mask_u32(cfg.ipv4_prefix);
                IpAddr::V4(Ipv4Addr::from(bits))
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a) & mask_u128(cfg.ipv6_prefix);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        })
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

fn mask_u32(prefix: u8) -> u32 {
    match prefix.min(32) {
        0 => 0,
        p => u32::MAX << (32 - p),
    }
}

fn mask_u128(prefix: u8) -> u128 {
    match prefix.min(128) {
        0 => 0,
        p => u128::MAX << (128 - p),
    }
}

/// One admitted connection, as the books know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

/// What [`Admission::admit`] decided.
#[derive(Debug)]
pub enum Admit<T> {
    /// Take it; `evicted` is the handle of the oldest unauthenticated
    /// connection, dropped to make room: stop it.
    Accept { id: ConnId, evicted: Option<T> },
    /// Drop it.
    Refuse(Refusal),
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source holds its limit of unauthenticated connections.
    SourceFull {
        /// This refusal pushed the source over its grace allowance: it is
        /// penalised from now on (log it once, not every refusal).
        now_penalised: bool,
    },
    /// Its source is penalised for this long still.
    Penalised { remaining: Duration },
}

/// Why [`Admission::authenticate`] did not count a connection in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAdmitted {
    /// It was dropped to make room (or is unknown): close it.
    Evicted,
    /// The authenticated limit is reached: tell the client to retry later.
    Full,
}

/// A source's penalty: `debt` as of `at`, decaying one second per second.
#[derive(Debug, Clone, Copy)]
struct Penalty {
    debt: Duration,
    at: Instant,
}

impl Penalty {
    fn remaining(&self, now: Instant) -> Duration {
        self.debt
            .saturating_sub(now.saturating_duration_since(self.at))
    }
}

/// The books: connections by state, counts per source, penalties.
#[derive(Debug)]
pub struct Admission<T> {
    cfg: AdmissionConfig,
    next: u64,
    /// Unauthenticated connections, oldest first (ids only grow), each with
    /// its source and the caller's handle to stop it.
    pending: BTreeMap<ConnId, (Source, T)>,
    per_source: HashMap<Source, usize>,
    authenticated: HashSet<ConnId>,
    penalties: HashMap<Source, Penalty>,
}

impl<T> Admission<T> {
    pub fn new(cfg: AdmissionConfig) -> Self {
        Self {
            cfg,
            next: 0,
            pending: BTreeMap::new(),
            per_source: HashMap::new(),
            authenticated: HashSet::new(),
            penalties: HashMap::new(),
        }
    }

    pub fn config(&self) -> &AdmissionConfig {
        &self.cfg
    }

    /// Unauthenticated connections held now.
    pub fn unauthenticated(&self) -> usize {
        self.pending.len()
    }

    /// Authenticated connections held now.
    pub fn authenticated(&self) -> usize {
        self.authenticated.len()
    }

    /// How much longer `ip`'s source is refused (zero if it is not).
    pub fn penalised_for(&self, ip: IpAddr, now: Instant) -> Duration {
        let src = Source::of(ip, &self.cfg);
        self.penalties
            .get(&src)
            .map(|p| p.remaining(now).saturating_sub(self.cfg.penalty_grace))
            .unwrap_or_default()
    }

    /// A new connection from `ip`: take it (maybe dropping the oldest
    /// unauthenticated one) or refuse it. `handle` comes back as `evicted`
    /// if this connection is later dropped to make room.
    pub fn admit(&mut self, ip: IpAddr, now: Instant, handle: T) -> Admit<T> {
        let src = Source::of(ip, &self.cfg);
        let remaining = self.penalised_for(ip, now);
        if !remaining.is_zero() {
            self.penalise(src, self.cfg.penalty_refused, now);
            return Admit::Refuse(Refusal::Penalised { remaining });
        }
        if self.per_source.get(&src).copied().unwrap_or(0) >= self.cfg.per_source.max(1) {
            self.penalise(src, self.cfg.penalty_refused, now);
            let now_penalised = !self.penalised_for(ip, now).is_zero();
            return Admit::Refuse(Refusal::SourceFull { now_penalised });
        }
        let mut evicted = None;
        if self.pending.len() >= self.cfg.unauthenticated.max(1) {
            if let Some((&oldest, _)) = self.pending.first_key_value() {
                evicted = self.take_pending(oldest).map(|(_, h)| h);
            }
        }
        let id = ConnId(self.next);
        self.next += 1;
        self.pending.insert(id, (src, handle));
        *self.per_source.entry(src).or_insert(0) += 1;
        Admit::Accept { id, evicted }
    }

    /// Connection `id` passed authentication: it moves to the authenticated
    /// count, unless it was dropped meanwhile or that count is full (then it
    /// stays unauthenticated until [`Admission::close`]).
    pub fn authenticate(&mut self, id: ConnId) -> Result<(), NotAdmitted> {
        if !self.pending.contains_key(&id) {
            return Err(NotAdmitted::Evicted);
        }
        if self.authenticated.len() >= self.cfg.authenticated.max(1) {
            return Err(NotAdmitted::Full);
        }
        self.take_pending(id);
        self.authenticated.insert(id);
        Ok(())
    }

    /// Connection `id` failed authentication: its source earns a penalty.
    pub fn auth_failed(&mut self, id: ConnId, now: Instant) {
        if let Some(&(src, _)) = self.pending.get(&id) {
            self.penalise(src, self.cfg.penalty_auth, now);
        }
    }

    /// Connection `id` ended (whatever its state; twice is harmless).
    pub fn close(&mut self, id: ConnId) {
        if !self.authenticated.remove(&id) {
            self.take_pending(id);
        }
    }

    fn take_pending(&mut self, id: ConnId) -> Option<(Source, T)> {
        let (src, h) = self.pending.remove(&id)?;
        if let Some(n) = self.per_source.get_mut(&src) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_source.remove(&src);
            }
        }
        Some((src, h))
    }

    fn penalise(&mut self, src: Source, cost: Duration, now: Instant) {
        if self.cfg.penalty_max.is_zero() {
            return;
        }
        if !self.penalties.contains_key(&src)
            && self.penalties.len() >= self.cfg.max_tracked_sources
        {
            self.penalties.retain(|_, p| !p.remaining(now).is_zero());
            if self.penalties.len() >= self.cfg.max_tracked_sources.max(1) {
                let smallest = self
                    .penalties
                    .iter()
                    .min_by_key(|(_, p)| p.remaining(now))
                    .map(|(s, _)| *s);
                if let Some(s) = smallest {
                    self.penalties.remove(&s);
                }
            }
        }
        let p = self.penalties.entry(src).or_insert(Penalty {
            debt: Duration::ZERO,
            at: now,
        });
        let cap = self.cfg.penalty_grace.saturating_add(self.cfg.penalty_max);
        p.debt = p.remaining(now).saturating_add(cost).min(cap);
        p.at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn small() -> AdmissionConfig {
        AdmissionConfig {
            per_source: 2,
            unauthenticated: 4,
            authenticated: 3,
            ..Default::default()
        }
    }

    fn accept<T: std::fmt::Debug>(a: Admit<T>) -> (ConnId, Option<T>) {
        match a {
            Admit::Accept { id, evicted } => (id, evicted),
            other => panic!("refused: {other:?}"),
        }
    }

    #[test]
    fn sources_are_v4_addresses_and_v6_64s() {
        let cfg = AdmissionConfig::default();
        assert_eq!(
            Source::of(ip("2001:db8:1:2::5"), &cfg),
            Source::of(ip("2001:db8:1:2:ffff::9"), &cfg)
        );
        assert_ne!(
            Source::of(ip("2001:db8:1:2::5"), &cfg),
            Source::of(ip("2001:db8:1:3::5"), &cfg)
        );
        assert_ne!(
            Source::of(ip("127.0.0.1"), &cfg),
            Source::of(ip("127.0.0.2"), &cfg)
        );
        assert_eq!(
            Source::of(ip("::ffff:10.0.0.1"), &cfg),
            Source::of(ip("10.0.0.1"), &cfg)
        );
        let wide = AdmissionConfig {
            ipv4_prefix: 24,
            ..cfg
        };
        assert_eq!(
            Source::of(ip("10.0.0.1"), &wide),
            Source::of(ip("10.0.0.200"), &wide)
        );
    }

    #[test]
    fn one_source_is_held_to_its_limit_and_others_still_get_in() {
        let t = Instant::now();
        let mut a = Admission::new(small());
        accept(a.admit(ip("10.0.0.2"), t, ()));
        accept(a.admit(ip("10.0.0.2"), t, ()));
        assert!(matches!(
            a.admit(ip("10.0.0.2"), t, ()),
            Admit::Refuse(Refusal::SourceFull { .. })
        ));
        accept(a.admit(ip("10.0.0.1"), t, ()));
        assert_eq!(a.unauthenticated(), 3);
    }

    #[test]
    fn the_oldest_unauthenticated_is_dropped_for_a_new_one() {
        let t = Instant::now();
        let mut a = Admission::new(small());
        let (first, _) = accept(a.admit(ip("10.0.0.1"), t, "first"));
        for (i, host) in ["10.0.0.2", "10.0.0.3", "10.0.0.4"].iter().enumerate() {
            assert_eq!(accept(a.admit(ip(host), t, "later")).1, None, "{i}");
        }
        let (_, evicted) = accept(a.admit(ip("10.0.0.5"), t, "new"));
        assert_eq!(evicted, Some("first"));
        assert_eq!(a.unauthenticated(), 4);
        // The dropped one may not authenticate any more.
        assert_eq!(a.authenticate(first), Err(NotAdmitted::Evicted));
        a.close(first);
        assert_eq!(a.unauthenticated(), 4);
    }

    #[test]
    fn authenticated_connections_are_never_evicted_and_have_their_own_limit() {
        let t = Instant::now();
        let mut a = Admission::new(small());
        let mut authed = Vec::new();
        for h in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            let (id, _) = accept(a.admit(ip(h), t, h));
            a.authenticate(id).unwrap();
            authed.push(id);
        }
        // A flood of unauthenticated connections evicts only its own kind.
        for i in 0..20 {
            let (_, evicted) = accept(a.admit(ip(&format!("10.1.0.{i}")), t, "flood"));
            assert!(evicted.is_none() || evicted == Some("flood"));
        }
        assert_eq!(a.authenticated(), 3);
        assert_eq!(a.unauthenticated(), 4);
        let (late, _) = accept(a.admit(ip("10.0.0.9"), t, "late"));
        assert_eq!(a.authenticate(late), Err(NotAdmitted::Full));
        a.close(authed[0]);
        assert_eq!(a.authenticate(late), Ok(()));
        assert_eq!(a.authenticated(), 3);
    }

    #[test]
    fn a_source_that_keeps_hitting_its_limit_is_refused_for_a_growing_time() {
        let t = Instant::now();
        let mut a = Admission::new(small());
        let host = ip("10.0.0.2");
        let held = [
            accept(a.admit(host, t, ())).0,
            accept(a.admit(host, t, ())).0,
        ];
        // Up to the grace allowance, refusals are only at the limit.
        let grace = small().penalty_grace.as_secs();
        let mut started = None;
        for i in 0..grace + 1 {
            match a.admit(host, t, ()) {
                Admit::Refuse(Refusal::SourceFull { now_penalised }) => {
                    if now_penalised {
                        started = Some(i);
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(started, Some(grace));
        // Penalised now: refused even with its slots free.
        for id in held {
            a.close(id);
        }
        let Admit::Refuse(Refusal::Penalised { remaining: r1 }) = a.admit(host, t, ()) else {
            panic!("not penalised");
        };
        // Each refused attempt adds to it.
        for _ in 0..10 {
            let _ = a.admit(host, t, ());
        }
        let r2 = a.penalised_for(host, t);
        assert!(r2 > r1, "{r2:?} > {r1:?}");
        // Another host is untouched.
        accept(a.admit(ip("10.0.0.1"), t, ()));
        // It decays: after the penalty (and with no new attempts) it is let in.
        let later = t + r2 + Duration::from_millis(1);
        assert!(a.penalised_for(host, later).is_zero());
        accept(a.admit(host, later, ()));
        // Never past the maximum.
        for _ in 0..10_000 {
            let _ = a.admit(host, later, ());
        }
        assert!(a.penalised_for(host, later) <= small().penalty_max);
    }

    #[test]
    fn failed_authentication_is_penalised_and_penalties_can_be_off() {
        let t = Instant::now();
        let mut a = Admission::new(small());
        let host = ip("10.0.0.7");
        for _ in 0..4 {
            let (id, _) = accept(a.admit(host, t, ()));
            a.auth_failed(id, t);
            a.close(id);
        }
        assert!(matches!(
            a.admit(host, t, ()),
            Admit::Refuse(Refusal::Penalised { .. })
        ));
        let mut off = Admission::new(AdmissionConfig {
            penalty_max: Duration::ZERO,
            ..small()
        });
        for _ in 0..100 {
            let (id, _) = accept(off.admit(host, t, ()));
            off.auth_failed(id, t);
            off.close(id);
        }
        assert!(off.penalised_for(host, t).is_zero());
    }

    #[test]
    fn the_penalty_table_is_bounded() {
        let t = Instant::now();
        let mut a = Admission::new(AdmissionConfig {
            per_source: 1,
            max_tracked_sources: 8,
            ..small()
        });
        for i in 0..100u32 {
            let host = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let (id, _) = accept(a.admit(host, t, ()));
            a.auth_failed(id, t);
            a.close(id);
        }
        assert!(a.penalties.len() <= 8);
    }
}
