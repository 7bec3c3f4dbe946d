//! The server guarding itself and what it serves: one host flooding it with
//! idle connections does not lock others out (on every transport), `Mkdir`
//! changes only what it creates, and what a client is told never shows where
//! the root is.

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ferry::admission::AdmissionConfig;
use ferry::client::{BatchItem, ClientConfig, Session};
use ferry::copy::{copy, CopyOptions, CopySummary};
use ferry::progress::Progress;
use ferry::retry::RetryPolicy;
use ferry::server::{Server, ServerConfig};
use ferry::tls::KnownServers;
use ferry::transport::quic::{QuicDialer, QuicListener};
use ferry::transport::tcp::{TcpDialer, TcpTlsListener};
use ferry::transport::ws::{WsDialer, WsListener};
use ferry::transport::TransportConfig;
use ferry::transport::{Dialer, Listener};
use ferry::{Error, ErrorClass};
use ferry_proto::message::BatchFile;
use ferry_proto::HashAlg;
use rand::{RngCore, SeedableRng};
use tempfile::TempDir;
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

const TOKEN: &[u8] = b"test-token";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Quic,
    Ws,
}

struct TestServer {
    /// TCP and QUIC (same port number).
    addr: SocketAddr,
    ws_addr: SocketAddr,
    root: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// A server on TCP, QUIC and WebSocket with these admission limits.
    async fn start(dir: &Path, admission: AdmissionConfig) -> TestServer {
        let root = dir.join("root");
        std::fs::create_dir_all(&root).unwrap();
        let mut server = Server::new(ServerConfig {
            root: root.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: dir.join("server-state"),
            token: Some(TOKEN.to_vec()),
            receiver: Default::default(),
            faults: None,
            timeouts: ferry::conn::Timeouts::with_stall(Duration::from_secs(5)),
            min_free_bytes: 0,
            admission,
            direct_io: true,
        })
        .unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let tcp = TcpTlsListener::bind(any, server.tls_config(), &TransportConfig::default())
            .await
            .unwrap();
        let addr = tcp.local_addr().unwrap();
        let quic =
            QuicListener::bind(addr, server.tls_config(), &TransportConfig::default()).unwrap();
        let ws = WsListener::bind(any, server.tls_config(), false, &TransportConfig::default())
            .await
            .unwrap();
        let ws_addr = ws.local_addr().unwrap();
        server.add_listener(Box::new(tcp));
        server.add_listener(Box::new(quic));
        server.add_listener(Box::new(ws));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        TestServer {
            addr,
            ws_addr,
            root: std::fs::canonicalize(root).unwrap(),
            stop: Some(tx),
            task,
        }
    }

    fn addr_for(&self, kind: Kind) -> SocketAddr {
        match kind {
            Kind::Tcp | Kind::Quic => self.addr,
            Kind::Ws => self.ws_addr,
        }
    }

    fn url(&self, kind: Kind, path: &str) -> String {
        format!("ferry://{}/{}", self.addr_for(kind), path)
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }
}

fn dialer(kind: Kind) -> Arc<dyn Dialer> {
    match kind {
        Kind::Tcp => Arc::new(TcpDialer::default()),
        Kind::Quic => Arc::new(QuicDialer::default()),
        Kind::Ws => Arc::new(WsDialer::new(false, &TransportConfig::default())),
    }
}

fn client(dir: &Path, kind: Kind) -> ClientConfig {
    ClientConfig {
        token: Some(TOKEN.to_vec()),
        connect_timeout: Duration::from_secs(5),
        dialer: dialer(kind),
        ..ClientConfig::new(KnownServers::new(dir.join("client-state/known_servers")))
    }
}

fn opts(dir: &Path, kind: Kind) -> CopyOptions {
    CopyOptions {
        recursive: true,
        state_dir: dir.join("client-state"),
        client: client(dir, kind),
        retry: RetryPolicy {
            initial: Duration::from_millis(10),
            multiplier: 2.0,
            max_delay: Duration::from_millis(100),
            max_attempts: 30,
            budget: None,
        },
        alg: HashAlg::Blake3,
        seed: None,
        sftp: Default::default(),
        follow_links: false,
    }
}

fn random_file(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, &data).unwrap();
    data
}

async fn cp(srcs: &[String], dst: &str, opts: &CopyOptions) -> Result<CopySummary, Error> {
    copy(srcs, dst, opts, Arc::new(Progress::default())).await
}

/// Floods put real load on two shared cores: one at a time.
static FLOODS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How hard the flooding host pushes (more than the 256 connections the
/// server once took in all), and for how long at most.
const FLOOD_CONNECTIONS: usize = 300;
const FLOOD_FOR: Duration = Duration::from_secs(25);
/// Connection attempts in all, whatever happens.
const FLOOD_BUDGET: usize = 30_000;
/// Pause before re-opening a connection the server closed or refused.
const REOPEN_AFTER: Duration = Duration::from_millis(100);

/// Opens `connections` idle connections from 127.0.0.2 to `target` over
/// `kind`, each re-opened as soon as the server closes it; bounded in time
/// and attempts. Dropping the set stops it.
async fn flood(
    kind: Kind,
    target: SocketAddr,
    connections: usize,
) -> (JoinSet<()>, Arc<AtomicUsize>) {
    let budget = Arc::new(AtomicUsize::new(FLOOD_BUDGET));
    let opened = Arc::new(AtomicUsize::new(0));
    let deadline = tokio::time::Instant::now() + FLOOD_FOR;
    let mut set = JoinSet::new();
    let quic = (kind == Kind::Quic).then(quic_flood_endpoint);
    for _ in 0..connections {
        let budget = budget.clone();
        let opened = opened.clone();
        let quic = quic.clone();
        set.spawn(async move {
            while tokio::time::Instant::now() < deadline
                && budget
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                let hold = async {
                    match &quic {
                        Some((endpoint, cfg)) => {
                            let Ok(connecting) =
                                endpoint.connect_with(cfg.clone(), target, "ferry")
                            else {
                                return;
                            };
                            if let Ok(Ok(conn)) =
                                tokio::time::timeout(Duration::from_secs(2), connecting).await
                            {
                                opened.fetch_add(1, Ordering::SeqCst);
                                // Idle: no stream, no Hello, until the server closes it.
                                conn.closed().await;
                            }
                        }
                        None => {
                            let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
                                return;
                            };
                            if sock.bind("127.0.0.2:0".parse().unwrap()).is_err() {
                                return;
                            }
                            if let Ok(Ok(mut s)) =
                                tokio::time::timeout(Duration::from_secs(2), sock.connect(target))
                                    .await
                            {
                                opened.fetch_add(1, Ordering::SeqCst);
                                let mut buf = [0u8; 256];
                                // Idle until the server closes it.
                                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                            }
                        }
                    }
                };
                if tokio::time::timeout_at(deadline, hold).await.is_err() {
                    return;
                }
                tokio::time::sleep(REOPEN_AFTER).await;
            }
        });
    }
    // Let it take hold before the legitimate client comes: every connection
    // open (or refused and re-opened), and time for the server to accept
    // them all (a few hundred per second on a busy machine).
    let start = Instant::now();
    while opened.load(Ordering::SeqCst) < connections && start.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    (set, opened)
}

/// A QUIC endpoint on 127.0.0.2 that trusts the server on first use.
fn quic_flood_endpoint() -> (quinn::Endpoint, quinn::ClientConfig) {
    let (mut tls, _) = ferry::tls::client_config(None).unwrap();
    tls.alpn_protocols = vec![ferry::transport::quic::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.2:0".parse().unwrap()).unwrap();
    (endpoint, quinn::ClientConfig::new(Arc::new(crypto)))
}

/// While one host floods the server over `kind`, a client from another
/// address copies a file over `kind`, authenticated, within a few seconds.
async fn flood_does_not_lock_out(kind: Kind, admission: AdmissionConfig, connections: usize) {
    let _one_at_a_time = FLOODS.lock().await;
    ferry::fsutil::raise_fd_limit();
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path(), admission).await;
    let (flooding, opened) = flood(kind, server.addr_for(kind), connections).await;
    assert!(
        opened.load(Ordering::SeqCst) >= 16,
        "the flood did not get going"
    );
    let data = random_file(&dir.path().join("src/f.bin"), 1 << 20, 7);
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        cp(
            &[dir.path().join("src/f.bin").display().to_string()],
            &server.url(kind, "f.bin"),
            &opts(dir.path(), kind),
        ),
    )
    .await;
    let took = started.elapsed();
    let opened = opened.load(Ordering::SeqCst);
    drop(flooding);
    match r {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("{kind:?}: the copy failed under the flood: {e}"),
        Err(_) => panic!("{kind:?}: the copy was locked out for 15 s by the flood"),
    }
    assert!(
        took < Duration::from_secs(8),
        "{kind:?}: the copy took {took:?} under the flood"
    );
    assert_eq!(std::fs::read(server.root.join("f.bin")).unwrap(), data);
    eprintln!("{kind:?}: copied in {took:?} while the flood opened {opened} connections");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_flood_from_one_host_does_not_lock_others_out() {
    flood_does_not_lock_out(Kind::Tcp, AdmissionConfig::default(), FLOOD_CONNECTIONS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_flood_from_one_host_does_not_lock_others_out() {
    flood_does_not_lock_out(Kind::Quic, AdmissionConfig::default(), FLOOD_CONNECTIONS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_flood_from_one_host_does_not_lock_others_out() {
    flood_does_not_lock_out(Kind::Ws, AdmissionConfig::default(), FLOOD_CONNECTIONS).await;
}

/// With no useful per-source limit, the total limit and dropping the oldest
/// unauthenticated connection are what let the client in. (The flood is
/// smaller here: each new connection drops the oldest, and its slot must
/// live long enough for the client's handshake on a busy machine.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_oldest_unauthenticated_connection_lets_a_new_client_in() {
    flood_does_not_lock_out(
        Kind::Tcp,
        AdmissionConfig {
            per_source: 10_000,
            penalty_max: Duration::ZERO,
            ..AdmissionConfig::default()
        },
        120,
    )
    .await;
}

/// Past the authenticated limit a client is told to come back later (a
/// retryable refusal), and gets in once a place frees.
#[tokio::test]
async fn past_the_authenticated_limit_a_client_is_told_to_retry() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(
        dir.path(),
        AdmissionConfig {
            authenticated: 2,
            ..AdmissionConfig::default()
        },
    )
    .await;
    let addr = server.addr.to_string();
    let cfg = client(dir.path(), Kind::Tcp);
    let a = Session::connect(&addr, &cfg).await.unwrap();
    let b = Session::connect(&addr, &cfg).await.unwrap();
    let e = Session::connect(&addr, &cfg).await.err().unwrap();
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("try again later"), "{e}");
    drop(a);
    let start = Instant::now();
    let mut c = loop {
        match Session::connect(&addr, &cfg).await {
            Ok(c) => break c,
            Err(e) if start.elapsed() < Duration::from_secs(5) => {
                assert!(e.is_retryable(), "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no place freed: {e}"),
        }
    };
    c.stat("").await.unwrap();
    drop((b, c));
    server.stop().await;
}

/// A host that keeps failing authentication is refused for a while; another
/// host is not.
#[tokio::test]
async fn a_host_failing_authentication_again_and_again_is_refused_for_a_while() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path(), AdmissionConfig::default()).await;
    let addr = server.addr.to_string();
    let bad = ClientConfig {
        token: Some(b"wrong".to_vec()),
        ..client(dir.path(), Kind::Tcp)
    };
    // A wrong token from 127.0.0.1: refused, as authentication failures.
    for _ in 0..4 {
        let e = Session::connect(&addr, &bad).await.err().unwrap();
        assert_eq!(e.class(), ErrorClass::Auth, "{e}");
    }
    // Now even the right token from that host is turned away at once.
    let good = client(dir.path(), Kind::Tcp);
    let e = Session::connect(&addr, &good).await.err().unwrap();
    assert_ne!(e.class(), ErrorClass::Auth, "{e}");
    // From 127.0.0.2 the server still answers (the TLS handshake completes).
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let s = sock.connect(server.addr).await.unwrap();
    let (tls, _) = ferry::tls::client_config(None).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let name = rustls::pki_types::ServerName::try_from("ferry").unwrap();
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, s))
        .await
        .unwrap()
        .unwrap();
    server.stop().await;
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

fn set_mode_and_mtime(p: &Path, m: u32, t: SystemTime) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    std::fs::File::open(p).unwrap().set_modified(t).unwrap();
}

const LONG_AGO: Duration = Duration::from_secs(1_000_000_000);

#[tokio::test]
async fn mkdir_sets_metadata_only_on_what_it_creates() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path(), AdmissionConfig::default()).await;
    let root = server.root.clone();
    let then = SystemTime::UNIX_EPOCH + LONG_AGO;
    set_mode_and_mtime(&root, 0o755, then);
    std::fs::create_dir(root.join("old")).unwrap();
    set_mode_and_mtime(&root.join("old"), 0o700, then);
    std::fs::write(root.join("file"), b"keep me").unwrap();
    set_mode_and_mtime(&root.join("file"), 0o600, then);
    // The root's own mtime moved when those were made.
    set_mode_and_mtime(&root, 0o755, then);
    let mut s = Session::connect(&server.addr.to_string(), &client(dir.path(), Kind::Tcp))
        .await
        .unwrap();
    let wanted = 1_500_000_000_000_000_000i64;
    for root_name in ["", "."] {
        s.mkdir(root_name, 0o777, wanted).await.unwrap();
    }
    s.mkdir("old", 0o777, wanted).await.unwrap();
    let e = s.mkdir("file", 0o777, wanted).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Usage, "{e}");
    assert!(
        e.to_string().contains("file exists and is not a directory"),
        "{e}"
    );
    s.mkdir_many(&[
        ("new".into(), 0o750, wanted),
        ("new/sub".into(), 0o710, wanted),
    ])
    .await
    .unwrap();
    assert_eq!(mode(&root.join("new/sub")), 0o710);
    assert_eq!(mode(&root.join("new")), 0o750);
    let want_t = SystemTime::UNIX_EPOCH + Duration::from_nanos(wanted as u64);
    assert_eq!(mtime(&root.join("new/sub")), want_t);
    assert_eq!(mode(&root.join("old")), 0o700, "an existing directory");
    assert_eq!(mtime(&root.join("old")), then);
    assert_eq!(mode(&root.join("file")), 0o600, "an existing file");
    assert_eq!(mtime(&root.join("file")), then);
    assert_eq!(std::fs::read(root.join("file")).unwrap(), b"keep me");
    assert_eq!(mode(&root), 0o755, "the root");
    drop(s);
    // cp -r DIR ferry://host/EXISTING-FILE fails and leaves the file alone.
    random_file(&dir.path().join("tree/a.txt"), 10, 1);
    std::fs::set_permissions(
        dir.path().join("tree"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let e = cp(
        &[dir.path().join("tree").display().to_string()],
        &server.url(Kind::Tcp, "file"),
        &opts(dir.path(), Kind::Tcp),
    )
    .await
    .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Usage, "{e}");
    assert_eq!(mode(&root.join("file")), 0o600);
    assert_eq!(std::fs::read(root.join("file")).unwrap(), b"keep me");
    server.stop().await;
}

#[tokio::test]
async fn a_tree_download_sets_metadata_only_on_directories_it_creates() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path(), AdmissionConfig::default()).await;
    random_file(&server.root.join("t/sub/f.txt"), 100, 2);
    std::fs::set_permissions(
        server.root.join("t/sub"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    let o = opts(dir.path(), Kind::Tcp);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    cp(
        &[server.url(Kind::Tcp, "t")],
        &out.display().to_string(),
        &o,
    )
    .await
    .unwrap();
    let sub = out.join("t/sub");
    assert_eq!(mode(&sub), 0o750, "a new directory takes the source's mode");
    // Made different here, then downloaded again: it keeps what it has.
    let then = SystemTime::UNIX_EPOCH + LONG_AGO;
    set_mode_and_mtime(&sub, 0o700, then);
    std::fs::remove_file(sub.join("f.txt")).unwrap();
    set_mode_and_mtime(&sub, 0o700, then);
    cp(
        &[server.url(Kind::Tcp, "t")],
        &out.display().to_string(),
        &o,
    )
    .await
    .unwrap();
    assert!(sub.join("f.txt").is_file());
    assert_eq!(mode(&sub), 0o700, "an existing directory keeps its mode");
    server.stop().await;
}

/// Every failure the server builds names paths relative to its root.
#[tokio::test]
async fn failures_never_show_the_servers_root() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path(), AdmissionConfig::default()).await;
    let root = server.root.display().to_string();
    std::fs::write(server.root.join("afile"), b"x").unwrap();
    let mut texts = Vec::new();
    let cfg = client(dir.path(), Kind::Tcp);
    let mut s = Session::connect(&server.addr.to_string(), &cfg)
        .await
        .unwrap();
    for p in ["afile", "afile/sub"] {
        texts.push(s.mkdir(p, 0o755, 0).await.unwrap_err().to_string());
    }
    texts.push(s.list("missing").await.unwrap_err().to_string());
    let data = bytes::Bytes::from_static(b"small file");
    let item = |path: &str| BatchItem {
        file: BatchFile {
            path: path.into(),
            size: data.len() as u64,
            mtime_ns: 1,
            mode: 0o644,
            digest: ferry_proto::hash::small_file_digest(HashAlg::Blake3, &data),
        },
        data: data.clone(),
    };
    let out = s
        .put_batch(HashAlg::Blake3, &[item("afile/y"), item("ok/z")])
        .await
        .unwrap();
    assert_eq!(out.failures.len(), 1, "{:?}", out.failures);
    texts.extend(out.failures.iter().map(|f| f.failure.message.clone()));
    let got = s
        .get_batch(
            HashAlg::Blake3,
            &[BatchFile {
                path: "afile/nope".into(),
                ..item("").file
            }],
        )
        .await
        .unwrap();
    texts.extend(got.failures.iter().map(|f| f.failure.message.clone()));
    drop(s);
    // A large upload under a file (PutOpen) and a download of a directory.
    random_file(&dir.path().join("big.bin"), 300 << 10, 3);
    let o = CopyOptions {
        retry: RetryPolicy {
            max_attempts: 2,
            ..opts(dir.path(), Kind::Tcp).retry
        },
        ..opts(dir.path(), Kind::Tcp)
    };
    let e = cp(
        &[dir.path().join("big.bin").display().to_string()],
        &server.url(Kind::Tcp, "afile/big.bin"),
        &o,
    )
    .await
    .unwrap_err();
    texts.push(e.to_string());
    std::fs::create_dir(server.root.join("d")).unwrap();
    let e = cp(
        &[server.url(Kind::Tcp, "d")],
        &dir.path().join("d").display().to_string(),
        &CopyOptions {
            recursive: false,
            ..o.clone()
        },
    )
    .await
    .unwrap_err();
    texts.push(e.to_string());
    assert!(texts.len() >= 7);
    for t in &texts {
        eprintln!("{t}");
        assert!(!t.contains(&root), "the root shows in {t:?}");
        assert!(!t.is_empty());
    }
    assert!(
        texts.iter().filter(|t| t.contains("afile")).count() >= 3,
        "{texts:#?}"
    );
    server.stop().await;
}
