//! The transport conformance suite: every transport runs the same tests as
//! TCP (fresh transfers, a cut then resume, corruption, auth failures) and a
//! transfer interrupted on one transport resumes on another with nothing
//! verified sent twice. Links are cut on the client side by a dialer wrapper,
//! so the same fault works whatever carries the session.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ferry::client::{ClientConfig, Session};
use ferry::conn::BoxStream;
use ferry::copy::{copy, CopyOptions, CopySummary};
use ferry::lanes::Streams;
use ferry::progress::Progress;
use ferry::retry::RetryPolicy;
use ferry::server::{Server, ServerConfig};
use ferry::tls::KnownServers;
use ferry::transfer::FaultPlan;
use ferry::transport::quic::{QuicDialer, QuicListener};
use ferry::transport::tcp::{TcpDialer, TcpTlsListener};
use ferry::transport::ws::{WsDialer, WsListener};
use ferry::transport::{auto::AutoDialer, BoxFuture, DialTarget, Dialer, TransportConfig};
use ferry::{Error, ErrorClass};
use ferry_proto::HashAlg;
use rand::{RngCore, SeedableRng};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const CHUNK: u64 = 256 * 1024;
const TOKEN: &[u8] = b"test-token";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Quic,
    Auto,
    Ws,
    Wss,
}

impl Kind {
    fn dialer(self) -> Arc<dyn Dialer> {
        match self {
            Kind::Tcp => Arc::new(TcpDialer::default()),
            Kind::Quic => Arc::new(QuicDialer::default()),
            Kind::Auto => Arc::new(AutoDialer::default()),
            Kind::Ws => Arc::new(WsDialer::new(false, &TransportConfig::default())),
            Kind::Wss => Arc::new(WsDialer::new(true, &TransportConfig::default())),
        }
    }
}

struct TestServer {
    addr: SocketAddr,
    ws_addr: SocketAddr,
    wss_addr: SocketAddr,
    root: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    faults: Arc<FaultPlan>,
}

impl TestServer {
    /// A server on TCP and, unless `quic` is false, QUIC on the same port.
    async fn start(dir: &Path, quic: bool) -> TestServer {
        Self::start_with(dir, true, quic).await
    }

    /// A server on TCP, QUIC or both (same port number).
    async fn start_with(dir: &Path, tcp: bool, quic: bool) -> TestServer {
        let faults = Arc::new(FaultPlan::default());
        let root = dir.join("root");
        let mut server = Server::new(ServerConfig {
            root: root.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: dir.join("server-state"),
            token: Some(TOKEN.to_vec()),
            receiver: Default::default(),
            faults: Some(faults.clone()),
            timeouts: ferry::conn::Timeouts::with_stall(Duration::from_secs(2)),
            min_free_bytes: 0,
            admission: Default::default(),
            direct_io: true,
        })
        .unwrap();
        let mut addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        if tcp {
            let l = TcpTlsListener::bind(addr, server.tls_config(), &TransportConfig::default())
                .await
                .unwrap();
            addr = ferry::transport::Listener::local_addr(&l).unwrap();
            server.add_listener(Box::new(l));
        }
        if quic {
            let q =
                QuicListener::bind(addr, server.tls_config(), &TransportConfig::default()).unwrap();
            addr = ferry::transport::Listener::local_addr(&q).unwrap();
            server.add_listener(Box::new(q));
        }
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let ws = WsListener::bind(any, server.tls_config(), false, &TransportConfig::default())
            .await
            .unwrap();
        let wss = WsListener::bind(any, server.tls_config(), true, &TransportConfig::default())
            .await
            .unwrap();
        let ws_addr = ferry::transport::Listener::local_addr(&ws).unwrap();
        let wss_addr = ferry::transport::Listener::local_addr(&wss).unwrap();
        server.add_listener(Box::new(ws));
        server.add_listener(Box::new(wss));
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
            wss_addr,
            root: std::fs::canonicalize(root).unwrap(),
            stop: Some(tx),
            task,
            faults,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("ferry://{}/{}", self.addr, path)
    }

    /// Where `kind` reaches this server.
    fn addr_for(&self, kind: Kind) -> SocketAddr {
        match kind {
            Kind::Tcp | Kind::Quic | Kind::Auto => self.addr,
            Kind::Ws => self.ws_addr,
            Kind::Wss => self.wss_addr,
        }
    }

    fn url_for(&self, kind: Kind, path: &str) -> String {
        format!("ferry://{}/{}", self.addr_for(kind), path)
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }
}

fn opts(dir: &Path, dialer: Arc<dyn Dialer>) -> CopyOptions {
    CopyOptions {
        recursive: true,
        follow_links: false,
        state_dir: dir.join("client-state"),
        client: ClientConfig {
            transport: Default::default(),
            direct_io: true,
            streams: ferry::lanes::Streams::Auto,
            token: Some(TOKEN.to_vec()),
            fingerprint: None,
            known_servers: KnownServers::new(dir.join("client-state/known_servers")),
            connect_timeout: Duration::from_secs(5),
            via: None,
            bwlimit: 0,
            timeouts: Default::default(),
            dialer,
        },
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
    }
}

fn random_file(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
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

/// Logs (filtered by `RUST_LOG`, `info` by default) go to the test's output,
/// shown when it fails.
fn log_to_test_output() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A dialer that breaks one connection (the first unless told otherwise)
/// after `cut_at` bytes have crossed it (either way), as a dropped link or a
/// killed peer would.
#[derive(Debug)]
struct CuttingDialer {
    inner: Arc<dyn Dialer>,
    cut_at: u64,
    cut_dial: u32,
    dials: AtomicU32,
    switch: Option<Arc<CutSwitch>>,
}

/// Cuts a connection when the test says so rather than after a byte count,
/// for cuts that must come after something happened (bytes counted on the
/// sending side may still sit in socket buffers, unread, when the link drops).
#[derive(Debug, Default)]
struct CutSwitch {
    fired: std::sync::atomic::AtomicBool,
    wakers: std::sync::Mutex<Vec<std::task::Waker>>,
}

impl CutSwitch {
    fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        for w in self.wakers.lock().unwrap().drain(..) {
            w.wake();
        }
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    fn wake_on_fire(&self, cx: &Context<'_>) {
        self.wakers.lock().unwrap().push(cx.waker().clone());
    }
}

impl Dialer for CuttingDialer {
    fn dial<'a>(&'a self, t: DialTarget<'a>) -> BoxFuture<'a, ferry::Result<BoxStream>> {
        Box::pin(async move {
            let s = self.inner.dial(t).await?;
            if self.dials.fetch_add(1, Ordering::SeqCst) == self.cut_dial {
                Ok(Box::new(Cut {
                    inner: Some(s),
                    left: self.cut_at,
                    switch: self.switch.clone(),
                }) as BoxStream)
            } else {
                Ok(s)
            }
        })
    }
}

struct Cut {
    inner: Option<BoxStream>,
    left: u64,
    switch: Option<Arc<CutSwitch>>,
}

impl Cut {
    /// The inner stream, unless the switch fired (then the link is cut);
    /// registers to be woken when it fires.
    fn live(&mut self, cx: &Context<'_>) -> Option<&mut BoxStream> {
        if let Some(sw) = &self.switch {
            if sw.fired() {
                self.inner = None;
            } else {
                sw.wake_on_fire(cx);
            }
        }
        self.inner.as_mut()
    }

    fn spend(&mut self, n: usize) {
        self.left = self.left.saturating_sub(n as u64);
        if self.left == 0 {
            // Dropping the stream tears the connection down.
            self.inner = None;
        }
    }
}

fn broken() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "link cut by test")
}

impl AsyncRead for Cut {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let Some(s) = self.live(cx) else {
            return Poll::Ready(Err(broken()));
        };
        let before = buf.filled().len();
        let r = Pin::new(s).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.spend(n);
        r
    }
}

impl AsyncWrite for Cut {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let Some(s) = self.live(cx) else {
            return Poll::Ready(Err(broken()));
        };
        let r = Pin::new(s).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.spend(n);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.live(cx) {
            Some(s) => Pin::new(s).poll_flush(cx),
            None => Poll::Ready(Err(broken())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.inner.as_mut() {
            Some(s) => Pin::new(s).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

fn cutting(kind: Kind, cut_at: u64) -> Arc<dyn Dialer> {
    cutting_nth(kind, 0, cut_at)
}

/// Cuts the `n`th connection dialed (counting from 0).
fn cutting_nth(kind: Kind, n: u32, cut_at: u64) -> Arc<dyn Dialer> {
    Arc::new(CuttingDialer {
        inner: kind.dialer(),
        cut_at,
        cut_dial: n,
        dials: AtomicU32::new(0),
        switch: None,
    })
}

/// Cuts the first connection dialed when `switch` fires.
fn cutting_on(kind: Kind, switch: Arc<CutSwitch>) -> Arc<dyn Dialer> {
    Arc::new(CuttingDialer {
        inner: kind.dialer(),
        cut_at: u64::MAX,
        cut_dial: 0,
        dials: AtomicU32::new(0),
        switch: Some(switch),
    })
}

/// One large file on four connections (a control connection and three data
/// lanes), up and down: a lane cut mid-transfer fails the attempt, the next
/// run (on lanes again) sends only what was not verified, and chunks
/// corrupted on arrival are asked for again.
async fn lanes(kind: Kind) {
    log_to_test_output();
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path(), true).await;
    let size = 48 << 20;
    let src = dir.path().join("l.bin");
    let data = random_file(&src, size, 11);
    let four = |d: Arc<dyn Dialer>| {
        let mut o = opts(dir.path(), d);
        o.client.streams = Streams::Fixed(4);
        o
    };
    // The third connection dialed is a lane: cut it inside its first chunk.
    let mut o = four(cutting_nth(kind, 2, 64 * 1024));
    o.retry.max_attempts = 1;
    let e = cp(
        &[src.display().to_string()],
        &srv.url_for(kind, "l.bin"),
        &o,
    )
    .await
    .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unreachable, "{e}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!srv.root.join("l.bin").exists(), "no final file yet");
    let s = cp(
        &[src.display().to_string()],
        &srv.url_for(kind, "l.bin"),
        &four(kind.dialer()),
    )
    .await
    .unwrap();
    // Three lanes per attempt (a slow machine may need more than one).
    assert!(
        s.data_lanes >= 3 && s.data_lanes % 3 == 0,
        "three lanes beside the control connection: {}",
        s.data_lanes
    );
    assert!(s.bytes_resumed > 0, "upload resumed nothing after {e}");
    assert_eq!(s.bytes_sent + s.bytes_resumed, size, "nothing sent twice");
    assert_eq!(std::fs::read(srv.root.join("l.bin")).unwrap(), data);

    let local = dir.path().join("l-down.bin");
    let mut o = four(cutting_nth(kind, 2, 64 * 1024));
    o.retry.max_attempts = 1;
    let e = cp(
        &[srv.url_for(kind, "l.bin")],
        &local.display().to_string(),
        &o,
    )
    .await
    .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unreachable, "{e}");
    assert!(!local.exists(), "no final file yet");
    let s = cp(
        &[srv.url_for(kind, "l.bin")],
        &local.display().to_string(),
        &four(kind.dialer()),
    )
    .await
    .unwrap();
    assert!(
        s.data_lanes >= 3 && s.data_lanes % 3 == 0,
        "{}",
        s.data_lanes
    );
    assert!(s.bytes_resumed > 0, "download resumed nothing after {e}");
    assert_eq!(s.bytes_sent + s.bytes_resumed, size, "nothing sent twice");
    assert_eq!(std::fs::read(&local).unwrap(), data);

    // The control connection cut while the lanes are busy (all three joined,
    // something already verified and acknowledged): the same.
    let switch = Arc::new(CutSwitch::default());
    let mut o = four(cutting_on(kind, switch.clone()));
    o.retry.max_attempts = 1;
    let progress = Arc::new(Progress::default());
    let (srcs, dst) = ([src.display().to_string()], srv.url_for(kind, "l3.bin"));
    let run = copy(&srcs, &dst, &o, progress.clone());
    let cut = async {
        while progress.lanes.load(Ordering::SeqCst) < 3
            || progress.bytes_done.load(Ordering::SeqCst) == 0
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        switch.fire();
    };
    let (r, ()) = tokio::join!(run, cut);
    let e = r.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unreachable, "{e}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = cp(
        &[src.display().to_string()],
        &srv.url_for(kind, "l3.bin"),
        &four(kind.dialer()),
    )
    .await
    .unwrap();
    assert!(s.bytes_resumed > 0, "upload resumed nothing after {e}");
    assert_eq!(s.bytes_sent + s.bytes_resumed, size, "nothing sent twice");
    assert_eq!(std::fs::read(srv.root.join("l3.bin")).unwrap(), data);

    srv.faults.corrupt_chunks.store(4, Ordering::SeqCst);
    let s = cp(
        &[src.display().to_string()],
        &srv.url_for(kind, "l2.bin"),
        &four(kind.dialer()),
    )
    .await
    .unwrap();
    assert_eq!(srv.faults.corrupt_chunks.load(Ordering::SeqCst), 0);
    // Each corrupt chunk is sent once more; a retry (a slow machine may hit
    // the 2 s stall limit) also re-sends what was in flight, never less.
    if s.retries == 0 {
        assert_eq!(
            s.bytes_sent,
            size + 4 * CHUNK,
            "each corrupt chunk sent once more"
        );
    } else {
        assert!(s.bytes_sent >= size + 4 * CHUNK, "{}", s.bytes_sent);
    }
    assert_eq!(std::fs::read(srv.root.join("l2.bin")).unwrap(), data);
    srv.stop().await;
}

/// Idle data lanes are kept alive at the pace the *receiver's* stall limit
/// needs, not the sender's own: the client here keeps its 10 s keepalive and
/// the server's stall limit is 2 s. The server withholds a checkpoint, so the
/// client's window fills and its lanes sit idle; the attempt must end on the
/// client's ack watchdog (5 s), never on the server taking idle lanes for
/// stalled (which under a loaded machine's slow fsyncs failed attempts).
#[tokio::test]
async fn idle_lanes_are_kept_alive_for_the_peers_stall_limit() {
    log_to_test_output();
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path(), false).await;
    let size = 48 << 20;
    let src = dir.path().join("idle.bin");
    let data = random_file(&src, size, 5);
    srv.faults.withhold_checkpoints.store(1, Ordering::SeqCst);
    let mut o = opts(dir.path(), Kind::Tcp.dialer());
    o.client.streams = Streams::Fixed(4);
    o.client.timeouts = ferry::conn::Timeouts {
        stall: Duration::from_secs(30),
        keepalive: Duration::from_secs(10),
        ack: Duration::from_secs(5),
    };
    o.retry.max_attempts = 1;
    let e = cp(
        &[src.display().to_string()],
        &srv.url_for(Kind::Tcp, "idle.bin"),
        &o,
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("no chunk acknowledged"),
        "the attempt ended some other way: {e}"
    );
    assert_eq!(srv.faults.withhold_checkpoints.load(Ordering::SeqCst), 0);
    o.retry.max_attempts = 30;
    let s = cp(
        &[src.display().to_string()],
        &srv.url_for(Kind::Tcp, "idle.bin"),
        &o,
    )
    .await
    .unwrap();
    assert!(s.data_lanes >= 3, "{}", s.data_lanes);
    assert_eq!(std::fs::read(srv.root.join("idle.bin")).unwrap(), data);
    srv.stop().await;
}

/// A proxy that passes client-to-server bytes at `rate` bytes per second and
/// the other direction as fast as it can.
async fn slow_proxy(target: SocketAddr, rate: usize) -> SocketAddr {
    slow_proxy_first(target, rate, rate).await
}

/// [`slow_proxy`] that passes the first connection at `first` bytes per second.
async fn slow_proxy_first(target: SocketAddr, first: usize, rate: usize) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A small receive buffer keeps the sender from parking megabytes in
    // socket buffers, as a real slow link's window would.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(64 * 1024).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(64).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((c, _)) = l.accept().await {
            accepted += 1;
            let rate = if accepted == 1 { first } else { rate };
            tokio::spawn(async move {
                let Ok(s) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (mut cr, mut cw) = c.into_split();
                let (mut sr, mut sw) = s.into_split();
                let up = async move {
                    let mut buf = vec![0u8; rate / 20];
                    loop {
                        let t = tokio::time::Instant::now();
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep_until(
                            t + Duration::from_secs_f64(n as f64 / rate as f64),
                        )
                        .await;
                    }
                    let _ = sw.shutdown().await;
                };
                let down = async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    addr
}

/// A link too slow to carry one chunk within the stall limit still moves the
/// file, as a small-file batch and as a chunked transfer: the stall watchdogs
/// count bytes arriving, not whole frames (data lanes use the same
/// `next_within`). At 100 KiB/s a 256 KiB chunk takes ~2.6 s against the
/// server's 2 s limit (a 16 GiB file has 8 MiB chunks, which at the default
/// 30 s limit is the same as any link under ~280 KB/s).
#[tokio::test]
async fn a_chunk_slower_than_the_stall_limit_is_not_a_stall() {
    log_to_test_output();
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path(), false).await;
    let proxy = slow_proxy(srv.addr, 100 * 1024).await;
    // One chunk goes in a batch (small files), three as a chunked transfer.
    for (name, chunks, streams) in [("one.bin", 1, 1), ("three.bin", 3, 1)] {
        let src = dir.path().join(name);
        random_file(&src, chunks * CHUNK, chunks);
        let mut o = opts(dir.path(), Kind::Tcp.dialer());
        o.client.streams = Streams::Fixed(streams);
        o.retry.max_attempts = 1;
        let s = upload_on_first_attempt(&srv, proxy, &src, name, &o).await;
        assert_eq!(s.data_lanes as usize, streams - 1, "{name}");
    }
    srv.stop().await;
}

/// Uploads `src` as `name` through `proxy` and checks that it landed byte
/// for byte on the first attempt.
async fn upload_on_first_attempt(
    srv: &TestServer,
    proxy: SocketAddr,
    src: &Path,
    name: &str,
    o: &CopyOptions,
) -> CopySummary {
    let s = cp(
        &[src.display().to_string()],
        &format!("ferry://{proxy}/{name}"),
        o,
    )
    .await
    .unwrap();
    assert_eq!(s.retries, 0, "{name}");
    assert_eq!(
        std::fs::read(srv.root.join(name)).unwrap(),
        std::fs::read(src).unwrap(),
        "{name}"
    );
    s
}

/// The sender's acknowledgement watchdog (twice its stall limit: here 2 s)
/// tears down a connection that is alive but acknowledges nothing. On a link
/// too slow to carry one chunk within that limit (100 KiB/s, 256 KiB chunks:
/// ~2.6 s each) the receiver's keepalives say how much has arrived, and that
/// counts as progress: the copy ends on its first attempt.
#[tokio::test]
async fn a_chunk_slower_than_the_senders_ack_limit_is_not_a_stuck_receiver() {
    log_to_test_output();
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path(), false).await;
    let proxy = slow_proxy(srv.addr, 100 * 1024).await;
    let src = dir.path().join("three.bin");
    random_file(&src, 3 * CHUNK, 3);
    let mut o = opts(dir.path(), Kind::Tcp.dialer());
    o.client.streams = Streams::Fixed(1);
    o.client.timeouts = ferry::conn::Timeouts::with_stall(Duration::from_secs(1));
    o.retry.max_attempts = 1;
    upload_on_first_attempt(&srv, proxy, &src, "three.bin", &o).await;
    // Small files go in one batch (600 KiB, ~6 s on this link): the client
    // is done writing long before the result comes, and waits on the
    // server's keepalives, which say the batch is still arriving.
    let tree = dir.path().join("tree");
    let files: Vec<Vec<u8>> = (0..3)
        .map(|i| random_file(&tree.join(format!("f{i}")), 200 * 1024, 10 + i))
        .collect();
    let s = cp(
        &[tree.display().to_string()],
        &format!("ferry://{proxy}/tree"),
        &o,
    )
    .await
    .unwrap();
    assert_eq!(s.retries, 0);
    for (i, f) in files.iter().enumerate() {
        assert_eq!(
            &std::fs::read(srv.root.join(format!("tree/f{i}"))).unwrap(),
            f
        );
    }
    srv.stop().await;
}

/// The same on data lanes: the control connection runs at 1 MiB/s, its three
/// lanes as slow as the link above, each carrying 256 KiB chunks that take
/// ~2.6 s against the sender's 2 s acknowledgement limit. Once the control
/// connection has sent its share, only the lanes move data: what they have
/// read counts as progress too (the receiver's keepalives add it), so the
/// copy ends on its first attempt.
#[tokio::test]
async fn chunks_on_lanes_slower_than_the_ack_limit_are_not_a_stuck_receiver() {
    log_to_test_output();
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path(), false).await;
    let proxy = slow_proxy_first(srv.addr, 2048 * 1024, 50 * 1024).await;
    let src = dir.path().join("lanes.bin");
    random_file(&src, 64 * CHUNK, 8);
    let mut o = opts(dir.path(), Kind::Tcp.dialer());
    o.client.streams = Streams::Fixed(4);
    o.client.timeouts = ferry::conn::Timeouts::with_stall(Duration::from_secs(2));
    o.retry.max_attempts = 1;
    let s = upload_on_first_attempt(&srv, proxy, &src, "lanes.bin", &o).await;
    assert_eq!(s.data_lanes, 3);
    srv.stop().await;
}

/// A writer waiting on a full TCP send buffer is woken only once a third of
/// it has left: with autotuning's 4 MiB, ~1.3 MiB, which at 1 MiB/s takes
/// longer than the 1 s read stall limit here. A blocked write is therefore
/// given the acknowledgement limit (3 s here; 2 x stall by default), and a
/// slow but moving link is no stall (with a 1 s write limit this failed).
#[tokio::test]
async fn a_full_send_buffer_on_a_moving_link_is_not_a_stall() {
    log_to_test_output();
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path(), false).await;
    let proxy = slow_proxy(srv.addr, 1024 * 1024).await;
    let src = dir.path().join("full.bin");
    random_file(&src, 48 * CHUNK, 9);
    let mut o = opts(dir.path(), Kind::Tcp.dialer());
    o.client.streams = Streams::Fixed(1);
    o.client.timeouts = ferry::conn::Timeouts {
        stall: Duration::from_secs(1),
        keepalive: Duration::from_millis(300),
        ack: Duration::from_secs(3),
    };
    o.retry.max_attempts = 1;
    upload_on_first_attempt(&srv, proxy, &src, "full.bin", &o).await;
    srv.stop().await;
}

async fn fresh_transfers(kind: Kind) {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path(), true).await;
    let o = opts(dir.path(), kind.dialer());
    let src = dir.path().join("src");
    let sizes = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 13 * CHUNK + 7, 20 << 20];
    let mut want = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        want.push(random_file(&src.join(format!("f{i}")), *size, i as u64));
    }
    cp(&[src.display().to_string()], &srv.url_for(kind, "up"), &o)
        .await
        .unwrap();
    for (i, data) in want.iter().enumerate() {
        assert_eq!(
            &std::fs::read(srv.root.join(format!("up/f{i}"))).unwrap(),
            data
        );
    }
    let back = dir.path().join("back");
    cp(&[srv.url_for(kind, "up")], &back.display().to_string(), &o)
        .await
        .unwrap();
    for (i, data) in want.iter().enumerate() {
        assert_eq!(&std::fs::read(back.join(format!("f{i}"))).unwrap(), data);
    }
    srv.stop().await;
}

/// Cuts an upload on `first`, then resumes it on `second`: the file is whole
/// and no verified byte was sent twice.
async fn cut_then_resume(first: Kind, second: Kind) {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path(), true).await;
    let size = 40 << 20;
    let src = dir.path().join("r.bin");
    let data = random_file(&src, size, 3);
    let mut o = opts(dir.path(), cutting(first, size * 3 / 4));
    o.retry.max_attempts = 1;
    let e = cp(
        &[src.display().to_string()],
        &srv.url_for(first, "r.bin"),
        &o,
    )
    .await
    .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unreachable, "{e}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!srv.root.join("r.bin").exists(), "no final file yet");
    let s = cp(
        &[src.display().to_string()],
        &srv.url_for(second, "r.bin"),
        &opts(dir.path(), second.dialer()),
    )
    .await
    .unwrap();
    assert!(s.bytes_resumed >= size / 4, "resumed {}", s.bytes_resumed);
    assert_eq!(s.bytes_sent + s.bytes_resumed, size, "nothing sent twice");
    assert_eq!(std::fs::read(srv.root.join("r.bin")).unwrap(), data);

    // The same for a download, cut on `first` and resumed on `second`.
    let local = dir.path().join("down.bin");
    let mut o = opts(dir.path(), cutting(first, size / 2));
    o.retry.max_attempts = 1;
    let e = cp(
        &[srv.url_for(first, "r.bin")],
        &local.display().to_string(),
        &o,
    )
    .await
    .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unreachable, "{e}");
    assert!(!local.exists(), "no final file yet");
    let s = cp(
        &[srv.url_for(second, "r.bin")],
        &local.display().to_string(),
        &opts(dir.path(), second.dialer()),
    )
    .await
    .unwrap();
    assert!(s.bytes_resumed > 0, "download resumed nothing after {e}");
    assert_eq!(s.bytes_sent + s.bytes_resumed, size, "nothing sent twice");
    assert_eq!(std::fs::read(&local).unwrap(), data);
    srv.stop().await;
}

/// Cuts during the transfer with retries on: the copy carries on by itself.
async fn cuts_and_corruption(kind: Kind) {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path(), true).await;
    srv.faults.corrupt_chunks.store(2, Ordering::SeqCst);
    let size = 24 << 20;
    let src = dir.path().join("c.bin");
    let data = random_file(&src, size, 5);
    let s = cp(
        &[src.display().to_string()],
        &srv.url_for(kind, "c.bin"),
        &opts(dir.path(), cutting(kind, size / 2)),
    )
    .await
    .unwrap();
    assert_eq!(srv.faults.corrupt_chunks.load(Ordering::SeqCst), 0);
    assert!(s.retries >= 1);
    assert_eq!(std::fs::read(srv.root.join("c.bin")).unwrap(), data);
    srv.stop().await;
}

async fn auth_failures(kind: Kind) {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path(), true).await;
    let mut cfg = opts(dir.path(), kind.dialer()).client;
    cfg.token = Some(b"nope".to_vec());
    let e = Session::connect(&srv.addr_for(kind).to_string(), &cfg)
        .await
        .err()
        .unwrap();
    assert_eq!(e.class(), ErrorClass::Auth, "{e}");
    assert!(!e.is_retryable());
    let mut cfg = opts(dir.path(), kind.dialer()).client;
    cfg.fingerprint = Some(format!("SHA256:{}", "ab".repeat(32)));
    let e = Session::connect(&srv.addr_for(kind).to_string(), &cfg)
        .await
        .err()
        .unwrap();
    assert!(matches!(e, Error::FingerprintMismatch { .. }), "{e}");
    assert_eq!(e.class(), ErrorClass::Auth);
    srv.stop().await;
}

/// Links planted at partial names (chunked and batched files, both ways)
/// are never written through, and a partial grown past its file's size is
/// cut back before the resume: storage behaves the same on every transport.
async fn hostile_partials(kind: Kind) {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path(), true).await;
    let o = opts(dir.path(), kind.dialer());
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"not yours").unwrap();
    let regular = |p: &Path, data: &[u8]| {
        let md = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(md.file_type().is_file(), "{}", p.display());
        assert_eq!(std::fs::read(p).unwrap(), data, "{}", p.display());
    };
    // Upload of a tree: a chunked file and a batched one, links planted.
    let src = dir.path().join("src");
    let big = random_file(&src.join("p.bin"), 3 << 20, 40);
    let small = random_file(&src.join("t.txt"), 100, 41);
    let up = srv.root.join("up");
    std::fs::create_dir_all(&up).unwrap();
    for name in [".p.bin.ferry.part", ".t.txt.ferry.part"] {
        std::os::unix::fs::symlink(&victim, up.join(name)).unwrap();
    }
    let files = ["p.bin", "t.txt"].map(|n| src.join(n).display().to_string());
    cp(&files, &srv.url_for(kind, "up/"), &o).await.unwrap();
    regular(&up.join("p.bin"), &big);
    regular(&up.join("t.txt"), &small);
    // Download into a directory with a link planted at the part's name.
    let down = dir.path().join("down");
    std::fs::create_dir_all(&down).unwrap();
    std::os::unix::fs::symlink(&victim, down.join(".p.bin.ferry.part")).unwrap();
    cp(
        &[srv.url_for(kind, "up/p.bin")],
        &format!("{}/", down.display()),
        &o,
    )
    .await
    .unwrap();
    regular(&down.join("p.bin"), &big);
    assert_eq!(std::fs::read(&victim).unwrap(), b"not yours");
    // A cut upload whose partial then grows past the file's size.
    let size = 20 << 20;
    let g = dir.path().join("g.bin");
    let data = random_file(&g, size, 42);
    let mut cut = opts(dir.path(), cutting(kind, size * 3 / 4));
    cut.retry.max_attempts = 1;
    cp(
        &[g.display().to_string()],
        &srv.url_for(kind, "g.bin"),
        &cut,
    )
    .await
    .unwrap_err();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut part = std::fs::OpenOptions::new()
        .append(true)
        .open(srv.root.join(".g.bin.ferry.part"))
        .unwrap();
    std::io::Write::write_all(&mut part, b"junk after the end").unwrap();
    cp(&[g.display().to_string()], &srv.url_for(kind, "g.bin"), &o)
        .await
        .unwrap();
    regular(&srv.root.join("g.bin"), &data);
    srv.stop().await;
}

macro_rules! conformance {
    ($($name:ident: $kind:expr;)*) => {$(
        mod $name {
            use super::*;
            #[tokio::test]
            async fn fresh_transfers_up_and_down() { super::fresh_transfers($kind).await }
            #[tokio::test]
            async fn cut_then_resume_sends_only_the_rest() { super::cut_then_resume($kind, $kind).await }
            #[tokio::test]
            async fn cuts_and_corruption_are_survived() { super::cuts_and_corruption($kind).await }
            #[tokio::test]
            async fn wrong_token_and_wrong_key_are_refused() { super::auth_failures($kind).await }
            #[tokio::test]
            async fn one_file_on_four_connections() { super::lanes($kind).await }
            #[tokio::test]
            async fn planted_links_and_grown_partials_are_not_trusted() { super::hostile_partials($kind).await }
        }
    )*};
}

conformance! {
    tcp: Kind::Tcp;
    quic: Kind::Quic;
    auto: Kind::Auto;
    ws: Kind::Ws;
    wss: Kind::Wss;
}

#[tokio::test]
async fn switch_tcp_to_quic() {
    cut_then_resume(Kind::Tcp, Kind::Quic).await
}

#[tokio::test]
async fn switch_quic_to_tcp() {
    cut_then_resume(Kind::Quic, Kind::Tcp).await
}

#[tokio::test]
async fn switch_tcp_to_ws() {
    cut_then_resume(Kind::Tcp, Kind::Ws).await
}

#[tokio::test]
async fn switch_wss_to_quic() {
    cut_then_resume(Kind::Wss, Kind::Quic).await
}

/// `auto` against a server whose UDP port swallows everything (a firewall
/// that drops UDP): TCP joins after QUIC's head start and carries the copy
/// well within QUIC's handshake limit; so does the next copy. (That QUIC is
/// then skipped for a while is tested in `transport::auto` on a paused clock.)
#[tokio::test]
async fn auto_falls_back_to_tcp_when_udp_is_blocked() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path(), false).await;
    // Hold the UDP port so nothing answers on it; packets are dropped unread.
    let _blackhole = std::net::UdpSocket::bind(srv.addr).unwrap();
    let src = dir.path().join("a.bin");
    let data = random_file(&src, 3 << 20, 11);
    let dialer: Arc<dyn Dialer> = Arc::new(AutoDialer::default());
    let o = opts(dir.path(), dialer.clone());
    let t0 = Instant::now();
    cp(&[src.display().to_string()], &srv.url("a.bin"), &o)
        .await
        .unwrap();
    // TCP joined the race after QUIC's head start: the copy did not wait for
    // QUIC's whole handshake limit.
    let first = t0.elapsed();
    assert!(
        first < ferry::transport::auto::QUIC_PROBE,
        "fallback took {first:?}"
    );
    assert_eq!(std::fs::read(srv.root.join("a.bin")).unwrap(), data);
    // Nor does the next one.
    let t1 = Instant::now();
    cp(&[src.display().to_string()], &srv.url("b.bin"), &o)
        .await
        .unwrap();
    assert!(
        t1.elapsed() < Duration::from_secs(2),
        "second copy took {:?}",
        t1.elapsed()
    );
    srv.stop().await;
}

/// A URL scheme chooses the transport for one copy: `ferry+quic://` reaches
/// a QUIC-only server, where plain `ferry://` (TCP) cannot.
#[tokio::test]
async fn url_scheme_chooses_the_transport() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start_with(dir.path(), false, true).await;
    let src = dir.path().join("s.bin");
    let data = random_file(&src, 1 << 20, 12);
    let mut o = opts(dir.path(), Arc::new(TcpDialer::default()));
    o.retry.max_attempts = 1;
    let e = cp(&[src.display().to_string()], &srv.url("s.bin"), &o)
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unreachable, "{e}");
    let url = format!("ferry+quic://{}/s.bin", srv.addr);
    cp(&[src.display().to_string()], &url, &o).await.unwrap();
    assert_eq!(std::fs::read(srv.root.join("s.bin")).unwrap(), data);
    let e = cp(
        &[src.display().to_string()],
        &format!("ferry+carrier-pigeon://{}/s.bin", srv.addr),
        &o,
    )
    .await
    .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Usage, "{e}");
    srv.stop().await;
}

/// Garbage datagrams, a truncated QUIC Initial and a QUIC client that speaks
/// another ALPN all fail on their own; the server keeps serving QUIC.
#[tokio::test]
async fn hostile_udp_does_not_take_the_quic_server_down() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path(), true).await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for len in [0usize, 1, 20, 1200, 1500, 9000] {
        let mut junk = vec![0u8; len];
        rng.fill_bytes(&mut junk);
        if len > 0 {
            junk[0] |= 0xc0; // long-header form: parsed as a QUIC packet
        }
        let _ = sock.send_to(&junk, srv.addr).await;
    }
    // A real QUIC handshake with the wrong ALPN is refused by TLS.
    let (mut tls, _) = ferry::tls::client_config(None).unwrap();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(
            quinn::ClientConfig::new(Arc::new(crypto)),
            srv.addr,
            "localhost",
        )
        .unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .unwrap()
        .is_err());
    // Still serving.
    let src = dir.path().join("after.bin");
    let data = random_file(&src, 2 << 20, 8);
    cp(
        &[src.display().to_string()],
        &srv.url("after.bin"),
        &opts(dir.path(), Kind::Quic.dialer()),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(srv.root.join("after.bin")).unwrap(), data);
    srv.stop().await;
}

/// A plain HTTP reverse proxy, as nginx with `proxy_pass` and the Upgrade
/// headers would be: it reads the request head, rewrites the path prefix,
/// adds X-Forwarded-For, and then relays bytes both ways.
async fn http_proxy(upstream: SocketAddr) -> (SocketAddr, Arc<AtomicU32>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let relayed = Arc::new(AtomicU32::new(0));
    let count = relayed.clone();
    tokio::spawn(async move {
        while let Ok((mut down, peer)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                    if down.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).replace(" /public/", " /");
                let text = text.replacen(
                    "\r\n",
                    &format!("\r\nX-Forwarded-For: {}\r\n", peer.ip()),
                    1,
                );
                let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                if up.write_all(text.as_bytes()).await.is_err() {
                    return;
                }
                count.fetch_add(1, Ordering::SeqCst);
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            });
        }
    });
    (addr, relayed)
}

#[tokio::test]
async fn ws_through_a_plain_http_reverse_proxy() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path(), true).await;
    let (proxy, relayed) = http_proxy(srv.ws_addr).await;
    let dialer: Arc<dyn Dialer> = Arc::new(WsDialer::new(
        false,
        &TransportConfig {
            ws_path: "public/ferry".into(),
            ..TransportConfig::default()
        },
    ));
    let o = opts(dir.path(), dialer);
    let src = dir.path().join("p.bin");
    let data = random_file(&src, 9 << 20, 13);
    let url = format!("ferry://{proxy}/p.bin");
    cp(&[src.display().to_string()], &url, &o).await.unwrap();
    assert_eq!(std::fs::read(srv.root.join("p.bin")).unwrap(), data);
    let back = dir.path().join("p.back");
    cp(&[url], &back.display().to_string(), &o).await.unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), data);
    assert!(
        relayed.load(Ordering::SeqCst) >= 2,
        "went through the proxy"
    );
    srv.stop().await;
}

/// Requests that are not WebSocket upgrades, raw garbage and a TLS hello to
/// the plain ws port are closed; the server keeps serving.
#[tokio::test]
async fn hostile_http_does_not_take_the_ws_server_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path(), true).await;
    let probes: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\x01\x02 not http at all \xff\xfe\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET /ferry HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nnot TLS inside",
    ];
    for p in probes {
        let mut s = tokio::net::TcpStream::connect(srv.ws_addr).await.unwrap();
        s.write_all(p).await.unwrap();
        let mut sink = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "connection left open for {:?}", p);
    }
    let src = dir.path().join("ok.bin");
    let data = random_file(&src, 1 << 20, 14);
    cp(
        &[src.display().to_string()],
        &srv.url_for(Kind::Ws, "ok.bin"),
        &opts(dir.path(), Kind::Ws.dialer()),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(srv.root.join("ok.bin")).unwrap(), data);
    srv.stop().await;
}
