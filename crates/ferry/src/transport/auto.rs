//! `--transport auto`: QUIC when UDP gets through, TCP otherwise.
//!
//! QUIC and TCP race, QUIC with a head start ("happy eyeballs", RFC 8305's
//! idea applied to transports). QUIC is dialed first; if it has not connected
//! within [`QUIC_HEAD_START`], TCP is dialed beside it and the first to connect
//! carries the session. A working QUIC path needs one round trip to TCP+TLS's
//! two, so it wins whenever UDP gets through; blocked UDP shows up as silence,
//! not as an error, and then costs only the head start instead of a whole
//! handshake timeout.
//!
//! When QUIC fails outright, or has still not connected [`QUIC_PROBE`] after
//! it started while TCP did connect, UDP is taken to be blocked and QUIC is
//! skipped for [`QUIC_RETRY_AFTER`], so reconnects after a drop and the other
//! lanes of a copy go straight to TCP. A QUIC that merely lost the race (it
//! connects later) is closed and tried again next time. A TLS refusal over QUIC
//! (a changed server key) is returned as it is: TCP would meet the same key.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::quic::QuicDialer;
use super::tcp::TcpDialer;
use super::{BoxFuture, DialTarget, Dialer, TransportConfig};
use crate::conn::BoxStream;
use crate::error::{Error, Result};

/// How long QUIC has on its own before TCP is dialed beside it.
pub const QUIC_HEAD_START: Duration = Duration::from_millis(250);
/// How long QUIC gets to complete its handshake at all.
pub const QUIC_PROBE: Duration = Duration::from_secs(3);
/// How long a failed QUIC probe sends connections to TCP.
pub const QUIC_RETRY_AFTER: Duration = Duration::from_secs(300);

#[derive(Debug)]
pub struct AutoDialer {
    quic: Arc<dyn Dialer>,
    tcp: Arc<dyn Dialer>,
    /// Until when QUIC is skipped, after a failed probe (shared with the
    /// task that sees a QUIC attempt out after TCP won).
    quic_off_until: Arc<Mutex<Option<Instant>>>,
}

impl Default for AutoDialer {
    fn default() -> Self {
        Self::with_config(&TransportConfig::default())
    }
}

/// Marks QUIC as skipped for a while (`off`) or as usable again.
fn set_quic_off(state: &Mutex<Option<Instant>>, off: bool) {
    if let Ok(mut g) = state.lock() {
        *g = off.then(|| Instant::now() + QUIC_RETRY_AFTER);
    }
}

impl AutoDialer {
    /// Races ferry's QUIC and TCP dialers, both tuned by `cfg`.
    pub fn with_config(cfg: &TransportConfig) -> Self {
        Self::new(
            Arc::new(QuicDialer::new(cfg)),
            Arc::new(TcpDialer::new(cfg)),
        )
    }

    /// Races `quic` against `tcp` (tests plug in their own dialers).
    pub fn new(quic: Arc<dyn Dialer>, tcp: Arc<dyn Dialer>) -> Self {
        Self {
            quic,
            tcp,
            quic_off_until: Arc::default(),
        }
    }

    fn quic_allowed(&self) -> bool {
        match self.quic_off_until.lock() {
            Ok(g) => g.is_none_or(|t| Instant::now() >= t),
            Err(_) => true,
        }
    }

    fn quic_won(&self, s: BoxStream, t: &DialTarget<'_>) -> BoxStream {
        set_quic_off(&self.quic_off_until, false);
        tracing::debug!(peer = t.addr, "transport auto: QUIC");
        s
    }

    /// QUIC failed outright and TCP was dialed: QUIC is skipped for a while
    /// only when TCP got through (else the whole network is down, not UDP).
    fn tcp_after_quic_failed(&self, t: &DialTarget<'_>, quic_err: &Error, tcp: &Result<BoxStream>) {
        if tcp.is_ok() {
            tracing::info!(peer = t.addr, error = %quic_err, "QUIC did not connect but TCP did; using TCP");
            set_quic_off(&self.quic_off_until, true);
        }
    }
}

/// The QUIC side of the race, running as its own task so that it can be
/// seen out after TCP wins. Dropped unfinished, it is aborted.
struct QuicAttempt(Option<tokio::task::JoinHandle<Result<BoxStream>>>);

impl QuicAttempt {
    fn start(quic: Arc<dyn Dialer>, t: &DialTarget<'_>) -> Self {
        let addr = t.addr.to_string();
        let (server_name, tls) = (t.server_name.clone(), t.tls.clone());
        let timeout = t.timeout.min(QUIC_PROBE);
        QuicAttempt(Some(tokio::spawn(async move {
            let target = DialTarget {
                addr: &addr,
                server_name,
                tls,
                timeout,
            };
            // The dialer bounds its handshake; this bounds the address
            // lookup and everything else as well.
            tokio::time::timeout(timeout, quic.dial(target))
                .await
                .unwrap_or_else(|_| Err(Error::Timeout("QUIC handshake".into())))
        })))
    }

    /// Waits for the attempt's outcome (cancel-safe: dropped, it keeps the task).
    async fn outcome(&mut self) -> Result<BoxStream> {
        let Some(task) = self.0.as_mut() else {
            return Err(Error::Timeout("QUIC attempt already over".into()));
        };
        let r = task
            .await
            .unwrap_or_else(|e| Err(Error::Timeout(format!("QUIC attempt: {e}"))));
        self.0 = None;
        r
    }

    /// TCP won: lets the attempt finish in the background, and if it never
    /// connects, UDP is blocked and QUIC is skipped for a while. One that
    /// connects late is closed at once.
    fn see_out(mut self, quic_off_until: Arc<Mutex<Option<Instant>>>) {
        if let Some(task) = self.0.take() {
            tokio::spawn(async move {
                if !matches!(task.await, Ok(Ok(_))) {
                    set_quic_off(&quic_off_until, true);
                }
            });
        }
    }
}

impl Drop for QuicAttempt {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

impl Dialer for AutoDialer {
    fn dial<'a>(&'a self, t: DialTarget<'a>) -> BoxFuture<'a, Result<BoxStream>> {
        Box::pin(async move {
            if !self.quic_allowed() {
                return self.tcp.dial(t).await;
            }
            let mut quic = QuicAttempt::start(self.quic.clone(), &t);
            let alone = tokio::select! {
                r = quic.outcome() => Some(r),
                () = tokio::time::sleep(QUIC_HEAD_START) => None,
            };
            let quic_err = match alone {
                Some(Ok(s)) => return Ok(self.quic_won(s, &t)),
                Some(Err(e @ Error::Tls(_))) => return Err(e),
                Some(Err(e)) => e,
                None => {
                    // QUIC is slow or UDP is blocked: TCP joins the race.
                    let tcp = self.tcp.dial(t.clone());
                    tokio::pin!(tcp);
                    tokio::select! {
                        biased;
                        r = quic.outcome() => match r {
                            Ok(s) => return Ok(self.quic_won(s, &t)),
                            Err(e @ Error::Tls(_)) => return Err(e),
                            Err(e) => {
                                let tcp = tcp.await;
                                self.tcp_after_quic_failed(&t, &e, &tcp);
                                return tcp;
                            }
                        },
                        r = &mut tcp => match r {
                            Ok(s) => {
                                tracing::debug!(peer = t.addr, "transport auto: TCP (QUIC had not connected yet)");
                                quic.see_out(self.quic_off_until.clone());
                                return Ok(s);
                            }
                            // TCP failed: what QUIC brings decides.
                            Err(tcp_err) => match quic.outcome().await {
                                Ok(s) => return Ok(self.quic_won(s, &t)),
                                Err(e @ Error::Tls(_)) => return Err(e),
                                Err(_) => return Err(tcp_err),
                            },
                        },
                    }
                }
            };
            let tcp = self.tcp.dial(t.clone()).await;
            self.tcp_after_quic_failed(&t, &quic_err, &tcp);
            tcp
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// What a fake dialer does after its delay.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Then {
        Connect,
        Refuse,
        RefuseTls,
        /// Never answers (blocked UDP); only a timeout ends it.
        Silence,
    }

    #[derive(Debug)]
    struct Fake {
        after: Duration,
        then: Then,
        calls: AtomicU32,
        connected: AtomicU32,
    }

    fn fake(after_ms: u64, then: Then) -> Arc<Fake> {
        Arc::new(Fake {
            after: Duration::from_millis(after_ms),
            then,
            calls: AtomicU32::new(0),
            connected: AtomicU32::new(0),
        })
    }

    impl Dialer for Fake {
        fn dial<'a>(&'a self, _t: DialTarget<'a>) -> BoxFuture<'a, Result<BoxStream>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.after).await;
                match self.then {
                    Then::Connect => {
                        self.connected.fetch_add(1, Ordering::SeqCst);
                        Ok(Box::new(tokio::io::duplex(64).0) as BoxStream)
                    }
                    Then::Refuse => Err(Error::Connect {
                        addr: "fake".into(),
                        source: std::io::ErrorKind::ConnectionRefused.into(),
                    }),
                    Then::RefuseTls => Err(Error::Tls("changed key".into())),
                    Then::Silence => std::future::pending().await,
                }
            })
        }
    }

    fn target() -> DialTarget<'static> {
        let (tls, _seen) = crate::tls::client_config(None).unwrap();
        DialTarget {
            addr: "127.0.0.1:1",
            server_name: super::super::server_name("127.0.0.1:1"),
            tls: Arc::new(tls),
            timeout: Duration::from_secs(10),
        }
    }

    /// Dials once; returns how long it took and whether it connected.
    async fn dial(auto: &AutoDialer) -> (Duration, Result<BoxStream>) {
        let t0 = Instant::now();
        let r = auto.dial(target()).await;
        (t0.elapsed(), r)
    }

    /// An auto dialer racing these two.
    fn race(quic: Arc<Fake>, tcp: Arc<Fake>) -> (Arc<Fake>, Arc<Fake>, AutoDialer) {
        let auto = AutoDialer::new(quic.clone(), tcp.clone());
        (quic, tcp, auto)
    }

    /// Dials once, which must connect; returns how long it took.
    async fn connects(auto: &AutoDialer) -> Duration {
        let (took, r) = dial(auto).await;
        assert!(r.is_ok(), "{:?}", r.err());
        took
    }

    fn calls(f: &Fake) -> u32 {
        f.calls.load(Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn quic_that_connects_within_its_head_start_is_used_and_tcp_is_never_dialed() {
        let (quic, tcp, auto) = race(fake(30, Then::Connect), fake(5, Then::Connect));
        let took = connects(&auto).await;
        assert_eq!(took, Duration::from_millis(30));
        assert_eq!((calls(&quic), calls(&tcp)), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn blocked_udp_costs_the_head_start_and_then_quic_is_skipped() {
        let (quic, tcp, auto) = race(fake(0, Then::Silence), fake(10, Then::Connect));
        let took = connects(&auto).await;
        assert_eq!(took, QUIC_HEAD_START + Duration::from_millis(10));
        // Until the probe runs out, QUIC might still be slow, not blocked.
        assert!(auto.quic_allowed());
        tokio::time::sleep(QUIC_PROBE).await;
        assert!(!auto.quic_allowed());
        let took = connects(&auto).await;
        assert_eq!(took, Duration::from_millis(10), "straight to TCP");
        assert_eq!((calls(&quic), calls(&tcp)), (1, 2));
        // After a while QUIC is tried again.
        tokio::time::sleep(QUIC_RETRY_AFTER).await;
        let _ = dial(&auto).await;
        assert_eq!(calls(&quic), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn quic_that_loses_the_race_but_connects_is_tried_again_next_time() {
        // A high-latency path: TCP wins once, QUIC connects later.
        let (quic, _, auto) = race(fake(400, Then::Connect), fake(100, Then::Connect));
        let took = connects(&auto).await;
        assert_eq!(took, QUIC_HEAD_START + Duration::from_millis(100));
        tokio::time::sleep(QUIC_PROBE).await;
        assert_eq!(quic.connected.load(Ordering::SeqCst), 1, "seen out");
        assert!(auto.quic_allowed());
        let _ = dial(&auto).await;
        assert_eq!(calls(&quic), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quic_refusal_goes_to_tcp_at_once_and_skips_quic_if_tcp_connects() {
        let (_, _, auto) = race(fake(5, Then::Refuse), fake(10, Then::Connect));
        let took = connects(&auto).await;
        assert_eq!(took, Duration::from_millis(15));
        assert!(!auto.quic_allowed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quic_refusal_after_tcp_joined_keeps_that_tcp_attempt() {
        let (_, tcp, auto) = race(fake(300, Then::Refuse), fake(200, Then::Connect));
        let took = connects(&auto).await;
        assert_eq!(took, QUIC_HEAD_START + Duration::from_millis(200));
        assert_eq!(
            calls(&tcp),
            1,
            "one TCP attempt, not a second after QUIC failed"
        );
        assert!(!auto.quic_allowed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_tls_refusal_over_quic_is_returned_not_hidden_by_tcp() {
        for after in [10, 400] {
            let (_, _, auto) = race(fake(after, Then::RefuseTls), fake(300, Then::Refuse));
            let (_, r) = dial(&auto).await;
            assert!(matches!(r, Err(Error::Tls(_))), "after {after} ms");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn when_tcp_fails_a_slower_quic_still_carries_the_session() {
        let (_, _, auto) = race(fake(800, Then::Connect), fake(0, Then::Refuse));
        let took = connects(&auto).await;
        assert_eq!(took, Duration::from_millis(800));
        assert!(auto.quic_allowed());
    }

    #[tokio::test(start_paused = true)]
    async fn when_both_fail_the_tcp_error_is_returned_and_quic_is_not_skipped() {
        let (_, _, auto) = race(fake(0, Then::Silence), fake(0, Then::Refuse));
        let (took, r) = dial(&auto).await;
        assert!(matches!(r, Err(Error::Connect { .. })), "{:?}", r.err());
        assert_eq!(took, QUIC_PROBE);
        assert!(auto.quic_allowed(), "the network is down, not only UDP");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dial_dropped_midway_aborts_its_quic_attempt() {
        let (quic, _, auto) = race(fake(1000, Then::Connect), fake(5000, Then::Connect));
        let cut = tokio::time::timeout(Duration::from_millis(500), auto.dial(target())).await;
        assert!(cut.is_err());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(quic.connected.load(Ordering::SeqCst), 0);
    }
}
