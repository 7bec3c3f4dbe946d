//! Deterministic network simulation (turmoil): the real server and `ferry cp`
//! run on simulated hosts joined by a simulated network, in virtual time. The
//! tests partition the link mid-transfer (for a minute or three), hold and
//! release it, break connections at random, and crash and restart the server
//! host, then check that the file lands byte-identical, that little more than
//! what was in flight is sent again, that the circuit breaker opened and
//! closed, and that the client did not spin while the peer was unreachable.
//!
//! Each test prints its seed. `FERRY_SIM_SEED=N` replays one seed; seeds that
//! once failed are pinned in the tests' seed lists.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry::client::ClientConfig;
use ferry::conn::{BoxStream, Timeouts};
use ferry::copy::{copy, CopyOptions, CopySummary};
use ferry::progress::Progress;
use ferry::retry::RetryPolicy;
use ferry::server::{Server, ServerConfig};
use ferry::tls::KnownServers;
use ferry::transfer::FaultPlan;
use ferry::transport::{
    tls_accept, tls_connect, BoxFuture, DialTarget, Dialer, Incoming, Listener,
};
use ferry::Error;
use ferry_proto::HashAlg;
use rand::{RngCore, SeedableRng};
use tokio_rustls::TlsAcceptor;
use turmoil::Sim;

const PORT: u16 = 7787;
const TOKEN: &[u8] = b"sim-token";
const MIB: u64 = 1024 * 1024;
/// The client's bandwidth limit: spreads the upload over simulated seconds so
/// faults land mid-transfer.
const RATE: u64 = 2 * MIB;

/// The simulated TCP listener, with TLS on top as in production.
struct SimListener {
    inner: turmoil::net::TcpListener,
    acceptor: TlsAcceptor,
}

impl Listener for SimListener {
    fn accept(&mut self) -> BoxFuture<'_, std::io::Result<(Incoming, String)>> {
        Box::pin(async move {
            let (tcp, peer) = self.inner.accept().await?;
            let acceptor = self.acceptor.clone();
            let incoming: Incoming = Box::pin(tls_accept(tcp, acceptor));
            Ok((incoming, peer.to_string()))
        })
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn name(&self) -> &'static str {
        "sim-tcp"
    }
}

/// Dials simulated TCP and counts (and times) every attempt.
#[derive(Debug, Default)]
struct SimDialer {
    /// Virtual time of each dial, since the client started.
    dials: Mutex<Vec<Duration>>,
    epoch: Mutex<Option<tokio::time::Instant>>,
}

impl SimDialer {
    fn dial_times(&self) -> Vec<Duration> {
        self.dials.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

impl Dialer for SimDialer {
    fn dial<'a>(&'a self, t: DialTarget<'a>) -> BoxFuture<'a, ferry::Result<BoxStream>> {
        Box::pin(async move {
            let now = tokio::time::Instant::now();
            if let (Ok(mut e), Ok(mut d)) = (self.epoch.lock(), self.dials.lock()) {
                let epoch = *e.get_or_insert(now);
                d.push(now - epoch);
            }
            let connect_err = |e: std::io::Error| Error::Connect {
                addr: t.addr.to_string(),
                source: e,
            };
            let tcp = tokio::time::timeout(t.timeout, turmoil::net::TcpStream::connect(t.addr))
                .await
                .map_err(|_| {
                    connect_err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    ))
                })?
                .map_err(connect_err)?;
            tls_connect(tcp, t.tls, t.server_name, t.timeout).await
        })
    }
}

struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
    server_state: PathBuf,
    client_state: PathBuf,
    src: PathBuf,
    data: Vec<u8>,
}

impl World {
    fn new(size: u64, seed: u64) -> World {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; size as usize];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
        let src = dir.path().join("src.bin");
        std::fs::write(&src, &data).unwrap();
        World {
            root: dir.path().join("root"),
            server_state: dir.path().join("server-state"),
            client_state: dir.path().join("client-state"),
            src,
            data,
            _dir: dir,
        }
    }

    fn landed(&self) -> Option<Vec<u8>> {
        std::fs::read(self.root.join("dst.bin")).ok()
    }
}

fn stall() -> Timeouts {
    Timeouts::with_stall(Duration::from_secs(10))
}

fn add_server(sim: &mut Sim<'_>, w: &World) {
    add_server_with(sim, w, None)
}

fn add_server_with(sim: &mut Sim<'_>, w: &World, faults: Option<Arc<FaultPlan>>) {
    let (root, state) = (w.root.clone(), w.server_state.clone());
    sim.host("server", move || {
        let (root, state, faults) = (root.clone(), state.clone(), faults.clone());
        async move {
            let mut server = Server::new(ServerConfig {
                root,
                listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT),
                state_dir: state,
                token: Some(TOKEN.to_vec()),
                receiver: Default::default(),
                faults,
                timeouts: stall(),
                min_free_bytes: 0,
                admission: Default::default(),
                direct_io: true,
            })?;
            let inner =
                turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT)).await?;
            let acceptor = TlsAcceptor::from(server.tls_config());
            server.add_listener(Box::new(SimListener { inner, acceptor }));
            server.run(std::future::pending::<()>()).await?;
            Ok(())
        }
    });
}

struct Client {
    progress: Arc<Progress>,
    dialer: Arc<SimDialer>,
    summary: Arc<Mutex<Option<CopySummary>>>,
}

fn add_client(sim: &mut Sim<'_>, w: &World, seed: u64) -> Client {
    let progress = Arc::new(Progress::default());
    let dialer = Arc::new(SimDialer::default());
    let summary = Arc::new(Mutex::new(None));
    let mut client = ClientConfig::new(KnownServers::new(w.client_state.join("known_servers")));
    client.token = Some(TOKEN.to_vec());
    client.connect_timeout = Duration::from_secs(3);
    client.bwlimit = RATE;
    client.timeouts = stall();
    client.dialer = dialer.clone();
    let opts = CopyOptions {
        recursive: false,
        follow_links: false,
        state_dir: w.client_state.clone(),
        client,
        retry: RetryPolicy {
            initial: Duration::from_millis(250),
            multiplier: 2.0,
            max_delay: Duration::from_secs(5),
            max_attempts: 10_000,
            budget: None,
        },
        alg: HashAlg::Blake3,
        seed: Some(seed),
        sftp: Default::default(),
    };
    let src = w.src.display().to_string();
    let (p, s) = (progress.clone(), summary.clone());
    sim.client("client", async move {
        let got = copy(&[src], &format!("ferry://server:{PORT}/dst.bin"), &opts, p).await?;
        if let Ok(mut slot) = s.lock() {
            *slot = Some(got);
        }
        Ok(())
    });
    Client {
        progress,
        dialer,
        summary,
    }
}

fn sim_for(seed: u64) -> Sim<'static> {
    turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(1800))
        .min_message_latency(Duration::from_millis(5))
        .max_message_latency(Duration::from_millis(25))
        .build()
}

/// Seeds to run: the pinned list, or the one in `FERRY_SIM_SEED`.
fn seeds(pinned: &[u64]) -> Vec<u64> {
    match std::env::var("FERRY_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => vec![s],
        None => pinned.to_vec(),
    }
}

fn done_fraction(p: &Progress, size: u64) -> f64 {
    Progress::get(&p.bytes_done) as f64 / size as f64
}

/// What a finished run looked like.
struct Outcome {
    summary: CopySummary,
    progress: Arc<Progress>,
    dials: Vec<Duration>,
}

/// Steps the simulation to the end, calling `on_step` between steps.
fn run(mut sim: Sim<'_>, c: Client, mut on_step: impl FnMut(&mut Sim<'_>, &Progress)) -> Outcome {
    loop {
        match sim.step() {
            Ok(true) => break,
            Ok(false) => on_step(&mut sim, &c.progress),
            Err(e) => panic!("simulation failed: {e}"),
        }
    }
    let summary = c
        .summary
        .lock()
        .unwrap()
        .clone()
        .expect("client finished without a summary");
    Outcome {
        summary,
        progress: c.progress,
        dials: c.dialer.dial_times(),
    }
}

fn assert_landed(w: &World, o: &Outcome, seed: u64) {
    let got = w.landed().expect("destination missing");
    assert!(got == w.data, "seed {seed}: content differs");
    let part = w.root.join(".dst.bin.ferry.part");
    assert!(!part.exists(), "seed {seed}: .part left behind");
    assert_eq!(
        o.summary.bytes_total,
        w.data.len() as u64,
        "seed {seed}: size"
    );
}

/// Bytes sent beyond the file size.
fn resent(o: &Outcome, size: u64) -> u64 {
    o.summary.bytes_sent.saturating_sub(size)
}

/// Partitions the link for `secs` of virtual time once `at` of the file is
/// verified, then heals it.
fn partition_test(pinned: &[u64], secs: u64) {
    let size = 12 * MIB;
    for seed in seeds(pinned) {
        eprintln!("sim seed {seed} (FERRY_SIM_SEED={seed} to replay), partition {secs}s");
        let w = World::new(size, seed);
        let mut sim = sim_for(seed);
        add_server(&mut sim, &w);
        let c = add_client(&mut sim, &w, seed);
        let mut window: Option<(Duration, Duration)> = None;
        let o = run(sim, c, |sim, p| {
            let now = sim.elapsed();
            match window {
                None if done_fraction(p, size) >= 0.3 => {
                    sim.partition("client", "server");
                    window = Some((now, now + Duration::from_secs(secs)));
                }
                Some((_, end)) if now >= end && now < end + Duration::from_millis(2) => {
                    sim.repair("client", "server");
                }
                _ => {}
            }
        });
        assert_landed(&w, &o, seed);
        let (start, end) = window.expect("the partition never started");
        // What can be in flight when the link goes: up to one checkpoint's
        // worth (8 MiB or 250 ms of data) plus what is on the wire. Anything
        // beyond a few MiB means verified data went again.
        let bound = 4 * MIB;
        assert!(
            resent(&o, size) <= bound,
            "seed {seed}: re-sent {} bytes, bound {bound}",
            resent(&o, size)
        );
        assert!(o.summary.retries >= 1, "seed {seed}: no retry recorded");
        // The breaker opened while the peer was unreachable and closed after.
        assert!(
            Progress::get(&o.progress.breaker_opens) >= 1,
            "seed {seed}: breaker never opened during a {secs}s partition"
        );
        assert!(
            Progress::get(&o.progress.breaker_closes) >= 1,
            "seed {seed}: breaker never closed again"
        );
        // No busy loop: with backoff capped at 5 s and the breaker's cool-down
        // there are at most a handful of attempts per 10 s of partition.
        let during = o
            .dials
            .iter()
            .filter(|t| **t >= start.saturating_sub(Duration::from_secs(1)) && **t <= end)
            .count() as u64;
        assert!(
            during <= 2 + secs / 2,
            "seed {seed}: {during} connection attempts in a {secs}s partition: {:?}",
            o.dials
        );
        // Recovery is prompt once the link is back: within the breaker's
        // longest cool-down (30 s) plus the rest of the transfer.
        let finish_bound = end.as_secs_f64() + 30.0 + (size as f64 * 0.7) / RATE as f64 + 5.0;
        assert!(
            o.summary.duration_s <= finish_bound,
            "seed {seed}: finished at {:.1}s, the link healed at {:.1}s",
            o.summary.duration_s,
            end.as_secs_f64()
        );
        assert!(
            during >= 2,
            "seed {seed}: only {during} attempts in {secs}s"
        );
        eprintln!(
            "seed {seed}: done at {:.1}s virtual, re-sent {} KiB, {} dials ({} in the partition), breaker opened {}x",
            o.summary.duration_s,
            resent(&o, size) / 1024,
            o.dials.len(),
            during,
            Progress::get(&o.progress.breaker_opens)
        );
    }
}

#[test]
fn partition_of_a_minute_mid_transfer_heals_and_completes() {
    partition_test(&[1, 2, 3], 60);
}

#[test]
fn partition_of_three_minutes_mid_transfer_heals_and_completes() {
    partition_test(&[7], 180);
}

/// A hold shorter than the stall watchdog delays messages but loses nothing:
/// the transfer rides it out on the same connection and re-sends nothing.
#[test]
fn short_hold_then_release_keeps_the_connection() {
    let size = 8 * MIB;
    for seed in seeds(&[11, 12]) {
        eprintln!("sim seed {seed} (FERRY_SIM_SEED={seed} to replay), hold 4s");
        let w = World::new(size, seed);
        let mut sim = sim_for(seed);
        add_server(&mut sim, &w);
        let c = add_client(&mut sim, &w, seed);
        let mut held: Option<Duration> = None;
        let o = run(sim, c, |sim, p| match held {
            None if done_fraction(p, size) >= 0.4 => {
                sim.hold("client", "server");
                held = Some(sim.elapsed());
            }
            Some(t)
                if sim.elapsed() >= t + Duration::from_secs(4)
                    && sim.elapsed() < t + Duration::from_secs(4) + Duration::from_millis(2) =>
            {
                sim.release("client", "server");
            }
            _ => {}
        });
        assert_landed(&w, &o, seed);
        assert!(held.is_some());
        assert_eq!(o.summary.retries, 0, "seed {seed}: the hold caused a retry");
        assert_eq!(
            o.dials.len(),
            1,
            "seed {seed}: reconnected during a short hold"
        );
        assert_eq!(resent(&o, size), 0, "seed {seed}: re-sent data");
    }
}

/// A hold longer than the stall watchdog: the silent connection is torn down
/// and the transfer resumes on a new one once messages flow again.
#[test]
fn long_hold_trips_the_stall_watchdog_and_resumes() {
    let size = 8 * MIB;
    for seed in seeds(&[21, 22]) {
        eprintln!("sim seed {seed} (FERRY_SIM_SEED={seed} to replay), hold 25s");
        let w = World::new(size, seed);
        let mut sim = sim_for(seed);
        add_server(&mut sim, &w);
        let c = add_client(&mut sim, &w, seed);
        let mut held: Option<Duration> = None;
        let o = run(sim, c, |sim, p| match held {
            None if done_fraction(p, size) >= 0.4 => {
                sim.hold("client", "server");
                held = Some(sim.elapsed());
            }
            Some(t)
                if sim.elapsed() >= t + Duration::from_secs(25)
                    && sim.elapsed() < t + Duration::from_secs(25) + Duration::from_millis(2) =>
            {
                sim.release("client", "server");
            }
            _ => {}
        });
        assert_landed(&w, &o, seed);
        assert!(
            o.summary.retries >= 1,
            "seed {seed}: the watchdog never fired"
        );
        assert!(o.dials.len() >= 2, "seed {seed}: never reconnected");
        assert!(
            resent(&o, size) <= 4 * MIB,
            "seed {seed}: re-sent {}",
            resent(&o, size)
        );
    }
}

/// Links that break at random, many times over one transfer: turmoil drops
/// messages at a random rate, which breaks the simulated TCP connection (it
/// has no retransmission), and repairs the link at random.
#[test]
fn random_connection_failures_still_complete() {
    let size = 8 * MIB;
    for seed in seeds(&[31, 32, 33]) {
        eprintln!("sim seed {seed} (FERRY_SIM_SEED={seed} to replay), random link failures");
        let w = World::new(size, seed);
        let mut sim = turmoil::Builder::new()
            .rng_seed(seed)
            .simulation_duration(Duration::from_secs(1800))
            .min_message_latency(Duration::from_millis(5))
            .max_message_latency(Duration::from_millis(25))
            .fail_rate(0.002)
            .repair_rate(0.05)
            .build();
        add_server(&mut sim, &w);
        let c = add_client(&mut sim, &w, seed);
        let o = run(sim, c, |_, _| {});
        assert_landed(&w, &o, seed);
        let breaks = o.summary.retries.max(1);
        assert!(
            resent(&o, size) <= breaks * 4 * MIB,
            "seed {seed}: re-sent {} over {breaks} retries",
            resent(&o, size)
        );
        eprintln!(
            "seed {seed}: {} retries, {} dials, re-sent {} KiB",
            o.summary.retries,
            o.dials.len(),
            resent(&o, size) / 1024
        );
    }
}

/// The server host crashes (its processes die, its disk stays) and comes back,
/// three times during one upload.
#[test]
fn server_crash_and_bounce_repeatedly() {
    let size = 12 * MIB;
    for seed in seeds(&[41, 42]) {
        eprintln!("sim seed {seed} (FERRY_SIM_SEED={seed} to replay), 3 server crashes");
        let w = World::new(size, seed);
        let mut sim = sim_for(seed);
        add_server(&mut sim, &w);
        let c = add_client(&mut sim, &w, seed);
        let marks = [0.2, 0.45, 0.7];
        let mut crashed: Option<Duration> = None;
        let mut next = 0usize;
        let o = run(sim, c, |sim, p| match crashed {
            None if next < marks.len() && done_fraction(p, size) >= marks[next] => {
                sim.crash("server");
                crashed = Some(sim.elapsed());
                next += 1;
            }
            Some(t) if sim.elapsed() >= t + Duration::from_secs(8) => {
                sim.bounce("server");
                crashed = None;
            }
            _ => {}
        });
        assert_landed(&w, &o, seed);
        assert_eq!(next, 3, "seed {seed}: not every crash happened");
        assert!(
            o.summary.retries >= 3,
            "seed {seed}: retries {}",
            o.summary.retries
        );
        assert!(
            resent(&o, size) <= 3 * 4 * MIB,
            "seed {seed}: re-sent {}",
            resent(&o, size)
        );
        eprintln!(
            "seed {seed}: re-sent {} KiB over 3 crashes, {} dials",
            resent(&o, size) / 1024,
            o.dials.len()
        );
    }
}

/// A receiver that stays connected and answers keepalives but stops
/// acknowledging: the sender's ack watchdog (twice the stall limit) gives up on
/// that connection and resumes on a new one, which takes the transfer over.
#[test]
fn stuck_receiver_trips_the_ack_watchdog() {
    let size = 12 * MIB;
    for seed in seeds(&[51]) {
        eprintln!("sim seed {seed} (FERRY_SIM_SEED={seed} to replay), stuck receiver");
        let w = World::new(size, seed);
        let mut sim = sim_for(seed);
        let faults = Arc::new(FaultPlan::default());
        faults
            .withhold_checkpoints
            .store(1, std::sync::atomic::Ordering::SeqCst);
        add_server_with(&mut sim, &w, Some(faults.clone()));
        let c = add_client(&mut sim, &w, seed);
        let o = run(sim, c, |_, _| {});
        assert_landed(&w, &o, seed);
        assert_eq!(
            faults
                .withhold_checkpoints
                .load(std::sync::atomic::Ordering::SeqCst),
            0,
            "the fault never fired"
        );
        assert!(
            o.summary.retries >= 1,
            "seed {seed}: never gave up on the stuck receiver"
        );
        assert!(o.dials.len() >= 2, "seed {seed}: never reconnected");
        // The watchdog fires after 20 s (twice the 10 s stall limit), not never.
        assert!(
            o.summary.duration_s < 60.0,
            "seed {seed}: took {:.1}s",
            o.summary.duration_s
        );
        eprintln!(
            "seed {seed}: done at {:.1}s virtual, re-sent {} KiB",
            o.summary.duration_s,
            resent(&o, size) / 1024
        );
    }
}
