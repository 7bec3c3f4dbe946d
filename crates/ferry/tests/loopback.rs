//! Integration tests over real loopback TCP+TLS: an in-process server and the
//! client library, with a fault-injecting proxy where links must break.

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry::client::{ClientConfig, Session};
use ferry::copy::{copy, CopyOptions, CopySummary};
use ferry::demo::FaultProxy;
use ferry::progress::Progress;
use ferry::retry::RetryPolicy;
use ferry::server::{Server, ServerConfig};
use ferry::tls::KnownServers;
use ferry::transfer::FaultPlan;
use ferry::{Error, ErrorClass};
use ferry_proto::{HashAlg, Message};
use rand::{RngCore, SeedableRng};
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;

const CHUNK: u64 = 256 * 1024;
const INTERESTING_SIZES: &[u64] = &[0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 13 * CHUNK + 7];
const TOKEN: &[u8] = b"test-token";

struct TestServer {
    addr: SocketAddr,
    root: PathBuf,
    state: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    faults: Arc<FaultPlan>,
}

impl TestServer {
    async fn start(dir: &Path) -> TestServer {
        Self::start_at(dir, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_at(dir: &Path, listen: SocketAddr) -> TestServer {
        Self::start_full(dir, listen, 0).await
    }

    async fn start_full(dir: &Path, listen: SocketAddr, min_free_bytes: u64) -> TestServer {
        let faults = Arc::new(FaultPlan::default());
        let root = dir.join("root");
        let state = dir.join("server-state");
        let server = Server::bind(ServerConfig {
            root: root.clone(),
            listen,
            state_dir: state.clone(),
            token: Some(TOKEN.to_vec()),
            receiver: Default::default(),
            faults: Some(faults.clone()),
            timeouts: ferry::conn::Timeouts::with_stall(Duration::from_secs(2)),
            min_free_bytes,
            admission: Default::default(),
            direct_io: true,
        })
        .await
        .unwrap();
        let addr = server.local_addr().unwrap();
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
            root: std::fs::canonicalize(root).unwrap(),
            state,
            stop: Some(tx),
            task,
            faults,
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }

    fn url(&self, path: &str) -> String {
        format!("ferry://{}/{}", self.addr, path)
    }
}

fn client_opts(dir: &Path, via: Option<String>) -> CopyOptions {
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
            via,
            bwlimit: 0,
            timeouts: Default::default(),
            dialer: std::sync::Arc::new(ferry::transport::tcp::TcpDialer::default()),
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

fn no_partials(dir: &Path) {
    for e in walk(dir) {
        let name = e.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.ends_with(".ferry.part"),
            "left a partial: {}",
            e.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn upload_and_download_interesting_sizes_keep_content_mode_and_mtime() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let opts = client_opts(dir.path(), None);
    for (k, &size) in INTERESTING_SIZES.iter().enumerate() {
        let src = dir.path().join(format!("src/f{k}"));
        let data = random_file(&src, size, k as u64);
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o640)).unwrap();
        let mtime = std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000 + k as u64);
        std::fs::File::options()
            .write(true)
            .open(&src)
            .unwrap()
            .set_modified(mtime)
            .unwrap();

        let s = cp(
            &[src.display().to_string()],
            &srv.url(&format!("up/f{k}")),
            &opts,
        )
        .await
        .unwrap();
        assert_eq!(s.bytes_total, size);
        assert_eq!(s.bytes_sent, size, "each byte sent exactly once");
        let up = srv.root.join(format!("up/f{k}"));
        assert_eq!(std::fs::read(&up).unwrap(), data, "size {size}");
        let md = std::fs::metadata(&up).unwrap();
        assert_eq!(md.mode() & 0o777, 0o640);
        assert_eq!(md.modified().unwrap(), mtime);

        let back = dir.path().join(format!("down/f{k}"));
        let s2 = cp(
            &[srv.url(&format!("up/f{k}"))],
            &back.display().to_string(),
            &opts,
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), data);
        assert_eq!(s2.digest, s.digest, "both directions agree on the digest");
        assert_eq!(std::fs::metadata(&back).unwrap().modified().unwrap(), mtime);
    }
    no_partials(&srv.root);
    no_partials(&dir.path().join("down"));
    srv.stop().await;
}

#[tokio::test]
async fn recursive_tree_up_and_down_with_cp_semantics() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let opts = client_opts(dir.path(), None);
    let tree = dir.path().join("tree");
    let a = random_file(&tree.join("a.bin"), 1000, 1);
    let b = random_file(&tree.join("sub/deeper/b.bin"), 3 * CHUNK, 2);
    std::fs::create_dir_all(tree.join("empty")).unwrap();
    // Destination does not exist: it becomes the copy of the tree.
    cp(&[tree.display().to_string()], &srv.url("copy1"), &opts)
        .await
        .unwrap();
    assert_eq!(std::fs::read(srv.root.join("copy1/a.bin")).unwrap(), a);
    assert_eq!(
        std::fs::read(srv.root.join("copy1/sub/deeper/b.bin")).unwrap(),
        b
    );
    assert!(srv.root.join("copy1/empty").is_dir());
    // Destination exists: the tree goes inside it.
    cp(&[tree.display().to_string()], &srv.url("copy1"), &opts)
        .await
        .unwrap();
    assert_eq!(std::fs::read(srv.root.join("copy1/tree/a.bin")).unwrap(), a);
    // Trailing slash: inside, created if missing.
    cp(
        &[tree.join("a.bin").display().to_string()],
        &srv.url("newdir/"),
        &opts,
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(srv.root.join("newdir/a.bin")).unwrap(), a);
    // Without -r a directory is refused.
    let mut no_r = opts.clone();
    no_r.recursive = false;
    let e = cp(&[tree.display().to_string()], &srv.url("x"), &no_r)
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Usage);
    // Download the tree.
    let down = dir.path().join("down");
    cp(&[srv.url("copy1")], &down.display().to_string(), &opts)
        .await
        .unwrap();
    assert_eq!(std::fs::read(down.join("sub/deeper/b.bin")).unwrap(), b);
    assert!(down.join("empty").is_dir());
    srv.stop().await;
}

/// A file where the destination needs a directory is no link trouble: the
/// copy fails at once with a usage error, in the chunked and the batch path
/// alike, instead of retrying until its attempts run out.
#[tokio::test]
async fn a_file_in_the_way_of_a_directory_fails_at_once() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let mut opts = client_opts(dir.path(), None);
    // One retry would wait 5 s: an answer well within that means none happened.
    opts.retry.initial = Duration::from_secs(5);
    opts.retry.max_delay = Duration::from_secs(5);
    std::fs::write(srv.root.join("blocker"), b"a file, not a directory").unwrap();
    let small = dir.path().join("small.bin");
    let large = dir.path().join("large.bin");
    random_file(&small, 1000, 1);
    random_file(&large, 3 * CHUNK, 2);
    for src in [&small, &large] {
        let t0 = std::time::Instant::now();
        let e = cp(
            &[src.display().to_string()],
            &srv.url("blocker/sub/x.bin"),
            &opts,
        )
        .await
        .unwrap_err();
        assert!(!matches!(e, Error::RetriesExhausted { .. }), "{e}");
        assert_eq!(e.class(), ErrorClass::Usage, "{e}");
        assert!(e.to_string().contains("Not a directory"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    }
    // The same for a tree whose small files go in a batch.
    let tree = dir.path().join("tree");
    random_file(&tree.join("a.bin"), 1000, 3);
    random_file(&tree.join("b.bin"), 2000, 4);
    let t0 = std::time::Instant::now();
    let e = cp(
        &[tree.display().to_string()],
        &srv.url("blocker/tree"),
        &opts,
    )
    .await
    .unwrap_err();
    assert!(!matches!(e, Error::RetriesExhausted { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert_eq!(
        std::fs::read(srv.root.join("blocker")).unwrap(),
        b"a file, not a directory"
    );
    srv.stop().await;
}

#[tokio::test]
async fn cuts_and_corruption_are_survived_with_little_resent() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    srv.faults.corrupt_chunks.store(2, Ordering::SeqCst);
    let size = 48 * 1024 * 1024;
    let src = dir.path().join("big.bin");
    let data = random_file(&src, size, 9);
    let proxy = FaultProxy::start(srv.addr, vec![size / 5, size / 2, size * 4 / 5])
        .await
        .unwrap();
    let opts = client_opts(dir.path(), Some(proxy.addr().to_string()));
    let s = cp(&[src.display().to_string()], &srv.url("big.bin"), &opts)
        .await
        .unwrap();
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 3);
    assert_eq!(
        srv.faults.corrupt_chunks.load(Ordering::SeqCst),
        0,
        "both corruptions were injected"
    );
    assert!(s.retries >= 3);
    assert_eq!(std::fs::read(srv.root.join("big.bin")).unwrap(), data);
    // Per cut, at most the unacknowledged window goes again; plus the corrupt chunks.
    let bound = size + 3 * 40 * 1024 * 1024 + 2 * CHUNK;
    assert!(
        s.bytes_sent <= bound,
        "sent {} for {} bytes",
        s.bytes_sent,
        size
    );
    assert!(s.bytes_resumed > 0);
    srv.stop().await;
}

/// Starts an upload through a proxy that cuts it once, with no retries, so a
/// partial file is left on the server.
async fn interrupted_upload(dir: &Path, srv: &TestServer, src: &Path, name: &str, cut_at: u64) {
    let proxy = FaultProxy::start(srv.addr, vec![cut_at]).await.unwrap();
    let mut opts = client_opts(dir, Some(proxy.addr().to_string()));
    opts.retry.max_attempts = 1;
    let e = cp(&[src.display().to_string()], &srv.url(name), &opts)
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unreachable, "{e}");
    // The server notices the cut and checkpoints what it has.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !srv.root.join(name).exists(),
        "no final file before verification"
    );
}

#[tokio::test]
async fn resume_after_interruption_sends_only_the_rest() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let size = 40 * 1024 * 1024;
    let src = dir.path().join("r.bin");
    let data = random_file(&src, size, 3);
    interrupted_upload(dir.path(), &srv, &src, "r.bin", size * 3 / 4).await;
    let s = cp(
        &[src.display().to_string()],
        &srv.url("r.bin"),
        &client_opts(dir.path(), None),
    )
    .await
    .unwrap();
    assert!(
        s.bytes_resumed >= size / 4,
        "resumed only {}",
        s.bytes_resumed
    );
    assert_eq!(
        s.bytes_sent + s.bytes_resumed,
        size,
        "nothing verified is sent twice"
    );
    assert_eq!(std::fs::read(srv.root.join("r.bin")).unwrap(), data);
    srv.stop().await;
}

#[tokio::test]
async fn damaged_partial_is_repaired_chunk_by_chunk() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let size = 40 * 1024 * 1024;
    let src = dir.path().join("d.bin");
    let data = random_file(&src, size, 4);
    interrupted_upload(dir.path(), &srv, &src, "d.bin", size * 3 / 4).await;
    // Flip bits in the partial while nothing runs, in two distant chunks.
    let part = srv.root.join(".d.bin.ferry.part");
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[100] ^= 0xff;
    bytes[(5 * CHUNK + 17) as usize] ^= 0x01;
    std::fs::write(&part, &bytes).unwrap();
    let s = cp(
        &[src.display().to_string()],
        &srv.url("d.bin"),
        &client_opts(dir.path(), None),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(srv.root.join("d.bin")).unwrap(), data);
    // Only the missing tail and the two damaged chunks travel.
    assert_eq!(
        s.bytes_sent,
        size - s.bytes_resumed + 2 * CHUNK,
        "resumed {}",
        s.bytes_resumed
    );
    srv.stop().await;
}

#[tokio::test]
async fn truncated_partial_is_detected() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let size = 20 * 1024 * 1024;
    let src = dir.path().join("t.bin");
    let data = random_file(&src, size, 5);
    interrupted_upload(dir.path(), &srv, &src, "t.bin", size * 3 / 4).await;
    let part = srv.root.join(".t.bin.ferry.part");
    std::fs::File::options()
        .write(true)
        .open(&part)
        .unwrap()
        .set_len(CHUNK + 5)
        .unwrap();
    cp(
        &[src.display().to_string()],
        &srv.url("t.bin"),
        &client_opts(dir.path(), None),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(srv.root.join("t.bin")).unwrap(), data);
    srv.stop().await;
}

#[tokio::test]
async fn source_changed_between_runs_restarts_cleanly() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let size = 20 * 1024 * 1024;
    let src = dir.path().join("c.bin");
    random_file(&src, size, 6);
    interrupted_upload(dir.path(), &srv, &src, "c.bin", size / 2).await;
    // Same size, new content, mtime put back: the ctime still tells.
    let old_mtime = std::fs::metadata(&src).unwrap().modified().unwrap();
    let new = random_file(&src, size, 7);
    std::fs::File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .set_modified(old_mtime)
        .unwrap();
    let s = cp(
        &[src.display().to_string()],
        &srv.url("c.bin"),
        &client_opts(dir.path(), None),
    )
    .await
    .unwrap();
    assert_eq!(
        s.bytes_resumed, 0,
        "nothing of the old version may be reused"
    );
    assert_eq!(std::fs::read(srv.root.join("c.bin")).unwrap(), new);
    srv.stop().await;
}

#[tokio::test]
async fn download_resumes_after_interruption() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let size = 24 * 1024 * 1024;
    let data = random_file(&srv.root.join("dl.bin"), size, 8);
    let local = dir.path().join("dl.bin");
    // Cut the download: the proxy counts client->server bytes, which are small
    // for a download, so cut on the first Ack frames instead.
    let proxy = FaultProxy::start(srv.addr, vec![600]).await.unwrap();
    let mut opts = client_opts(dir.path(), Some(proxy.addr().to_string()));
    opts.retry.max_attempts = 1;
    let _ = cp(&[srv.url("dl.bin")], &local.display().to_string(), &opts).await;
    let s = cp(
        &[srv.url("dl.bin")],
        &local.display().to_string(),
        &client_opts(dir.path(), None),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&local).unwrap(), data);
    assert_eq!(s.bytes_sent + s.bytes_resumed, size);
    no_partials(dir.path());
    srv.stop().await;
}

#[tokio::test]
async fn wrong_token_is_refused_as_auth() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let mut cfg = client_opts(dir.path(), None).client;
    cfg.token = Some(b"nope".to_vec());
    let e = Session::connect(&srv.addr.to_string(), &cfg)
        .await
        .err()
        .unwrap();
    assert_eq!(e.class(), ErrorClass::Auth, "{e}");
    cfg.token = None;
    let e = Session::connect(&srv.addr.to_string(), &cfg)
        .await
        .err()
        .unwrap();
    assert_eq!(e.class(), ErrorClass::Auth, "{e}");
    srv.stop().await;
}

#[tokio::test]
async fn changed_server_key_is_refused_and_given_fingerprint_is_enforced() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let cfg = client_opts(dir.path(), None).client;
    Session::connect(&srv.addr.to_string(), &cfg).await.unwrap();
    let pinned = cfg.known_servers.lookup(&srv.addr.to_string()).unwrap();
    assert!(pinned.starts_with("SHA256:"));
    // Same address, new identity.
    let addr = srv.addr;
    srv.stop().await;
    let other = TempDir::new().unwrap();
    let srv2 = TestServer::start_at(other.path(), addr).await;
    let e = Session::connect(&addr.to_string(), &cfg)
        .await
        .err()
        .unwrap();
    assert!(matches!(e, Error::FingerprintMismatch { .. }), "{e}");
    assert!(!e.is_retryable());
    assert_eq!(e.class(), ErrorClass::Auth);
    // An explicit fingerprint overrides the file.
    let real = ferry::tls::ServerIdentity::load_or_create(&srv2.state)
        .unwrap()
        .fingerprint();
    let mut cfg2 = cfg.clone();
    cfg2.fingerprint = Some(real.to_uppercase().replace("SHA256:", "sha256:"));
    Session::connect(&addr.to_string(), &cfg2).await.unwrap();
    srv2.stop().await;
}

#[tokio::test]
async fn paths_outside_the_root_are_refused_and_server_stays_up() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let outside = TempDir::new().unwrap();
    std::os::unix::fs::symlink(outside.path(), srv.root.join("escape")).unwrap();
    let opts = client_opts(dir.path(), None);
    let src = dir.path().join("p.bin");
    random_file(&src, 10, 1);
    let mut s = Session::connect(&srv.addr.to_string(), &opts.client)
        .await
        .unwrap();
    for bad in ["../x", "a/../../x", "escape/x", "/etc/x", "nul"] {
        let e = s
            .stat(bad)
            .await
            .err()
            .unwrap_or_else(|| panic!("{bad} accepted"));
        assert_eq!(e.class(), ErrorClass::Auth, "{bad}: {e}");
    }
    // The same connection still works.
    assert_eq!(
        s.stat("").await.unwrap().kind,
        ferry_proto::message::EntryKind::Dir
    );
    let e = cp(
        &[src.display().to_string()],
        &srv.url("escape/p.bin"),
        &opts,
    )
    .await
    .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Auth);
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "nothing written outside the root"
    );
    cp(&[src.display().to_string()], &srv.url("ok.bin"), &opts)
        .await
        .unwrap();
    srv.stop().await;
}

#[tokio::test]
async fn a_pipelined_run_of_directories_is_answered_one_by_one_in_order() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let outside = TempDir::new().unwrap();
    std::os::unix::fs::symlink(outside.path(), srv.root.join("escape")).unwrap();
    std::fs::write(srv.root.join("blocker"), b"a file").unwrap();
    let opts = client_opts(dir.path(), None);
    let mut s = Session::connect(&srv.addr.to_string(), &opts.client)
        .await
        .unwrap();
    // Made together on the server (one run), refused ones in the middle.
    let mut dirs: Vec<(String, u32, i64)> = vec![
        ("t".into(), 0o755, 0),
        ("escape/x".into(), 0o755, 0),
        ("blocker/y".into(), 0o755, 0),
    ];
    dirs.extend((0..300).map(|i| (format!("t/d{i:03}/e"), 0o750, 0)));
    let e = s.mkdir_many(&dirs).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Auth, "the first refusal: {e}");
    for i in 0..300 {
        let d = srv.root.join(format!("t/d{i:03}/e"));
        let md = std::fs::metadata(&d).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o750, "{}", d.display());
    }
    assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    // One answer per request: the next reply on this connection is the
    // next request's, not a late answer to a directory.
    let entry = s.stat("t/d299/e").await.unwrap();
    assert_eq!(entry.kind, ferry_proto::message::EntryKind::Dir);
    assert_eq!(entry.mode, 0o750);
    srv.stop().await;
}

#[tokio::test]
async fn garbage_and_hostile_frames_close_only_that_connection() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let opts = client_opts(dir.path(), None);
    // Not TLS at all.
    let mut raw = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff garbage")
        .await
        .unwrap();
    // TLS, then hostile frames after a good hello.
    for evil in [
        vec![0xff, 0xff, 0xff, 0xff, 25],                // 4 GiB frame
        vec![0, 0, 0, 0],                                // empty frame
        vec![0, 0, 0, 3, 0x70, 1, 2],                    // unknown required type
        vec![0, 0, 0, 6, 10, 1, 0xff, 0xff, 0xff, 0xff], // field runs past end
    ] {
        let mut s = Session::connect(&srv.addr.to_string(), &opts.client)
            .await
            .unwrap();
        s.raw_write(&evil).await.unwrap();
        assert!(
            s.stat("").await.is_err(),
            "connection must be closed after {evil:?}"
        );
    }
    let src = dir.path().join("g.bin");
    let data = random_file(&src, 5000, 2);
    cp(&[src.display().to_string()], &srv.url("g.bin"), &opts)
        .await
        .unwrap();
    assert_eq!(std::fs::read(srv.root.join("g.bin")).unwrap(), data);
    srv.stop().await;
}

#[tokio::test]
async fn a_second_writer_to_the_same_file_is_told_busy() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let size = 16 * 1024 * 1024;
    let src = dir.path().join("b.bin");
    let data = random_file(&src, size, 11);
    let mut slow = client_opts(dir.path(), None);
    slow.client.bwlimit = 8 * 1024 * 1024;
    let first = tokio::spawn({
        let (src, url, slow) = (src.display().to_string(), srv.url("b.bin"), slow.clone());
        async move { cp(&[src], &url, &slow).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = TempDir::new().unwrap();
    let mut second = client_opts(other.path(), None);
    second.retry.max_attempts = 1;
    let e = cp(&[src.display().to_string()], &srv.url("b.bin"), &second)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("being written"), "{e}");
    first.await.unwrap().unwrap();
    assert_eq!(std::fs::read(srv.root.join("b.bin")).unwrap(), data);
    srv.stop().await;
}

#[tokio::test]
async fn crash_between_rename_and_journal_is_confirmed_without_resending() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let size = 6 * CHUNK + 3;
    let src = dir.path().join("k.bin");
    let data = random_file(&src, size, 12);
    let opts = client_opts(dir.path(), None);
    cp(&[src.display().to_string()], &srv.url("k.bin"), &opts)
        .await
        .unwrap();
    let (root, state) = (srv.root.clone(), srv.state.clone());
    srv.stop().await;
    // As if killed after the rename but before the journal recorded it.
    {
        let store = ferry::store::Store::open(&state).unwrap();
        let key = root.join("k.bin").display().to_string();
        let (mut rec, chunks) = store.partial(&key).unwrap().unwrap();
        assert!(rec.finalized);
        assert_eq!(chunks.len(), 7);
        rec.finalized = false;
        store.update_partial(&key, &rec).unwrap();
    }
    let srv = TestServer::start(dir.path()).await;
    let s = cp(&[src.display().to_string()], &srv.url("k.bin"), &opts)
        .await
        .unwrap();
    assert_eq!(
        s.bytes_sent, 0,
        "the file in place verifies: nothing to send"
    );
    assert_eq!(s.bytes_resumed, size);
    assert_eq!(std::fs::read(srv.root.join("k.bin")).unwrap(), data);
    srv.stop().await;
}

#[tokio::test]
async fn source_changing_during_the_transfer_never_produces_a_mix() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let size = 12 * 1024 * 1024;
    let src = dir.path().join("m.bin");
    random_file(&src, size, 13);
    let mut opts = client_opts(dir.path(), None);
    opts.client.bwlimit = 8 * 1024 * 1024;
    let progress = Arc::new(Progress::default());
    let job = tokio::spawn({
        let (s, u, o) = (src.display().to_string(), srv.url("m.bin"), opts.clone());
        let p = progress.clone();
        async move { copy(&[s], &u, &o, p).await }
    });
    // Rewrite the source in place while it is being sent (once the first
    // MiB left: 11 more take ~1.4 s at the limit).
    while progress.bytes_sent.load(Ordering::SeqCst) < 1 << 20 {
        assert!(
            !job.is_finished(),
            "the copy ended before the first MiB was sent"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let new = random_file(&src, size, 14);
    let s = job.await.unwrap().unwrap();
    assert!(s.retries >= 1, "the change must have been noticed");
    assert_eq!(std::fs::read(srv.root.join("m.bin")).unwrap(), new);
    srv.stop().await;
}

#[tokio::test]
async fn unknown_major_version_is_refused_with_a_clear_error() {
    use ferry_proto::message::Version;
    use ferry_proto::{FailureCode, Message};
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let (cfg, _) = ferry::tls::client_config(None).unwrap();
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("ferry").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut conn = ferry::conn::Conn::new(Box::new(tls), "test".into());
    let hello = Message::Hello {
        versions: vec![Version { major: 9, minor: 0 }],
        caps: vec!["hash:blake3".into(), "teleport:v2".into()],
        token: bytes::Bytes::from_static(TOKEN),
        agent: "future".into(),
        stall_ms: None,
    };
    conn.send(&hello).await.unwrap();
    match conn.rd.expect().await.unwrap() {
        Message::Failure(f) => {
            assert_eq!(f.code, FailureCode::VersionRefused);
            assert!(f.message.contains("9.0"), "{}", f.message);
        }
        m => panic!("expected a refusal, got {m:?}"),
    }
    srv.stop().await;
}

#[tokio::test]
async fn a_link_that_goes_dark_is_detected_by_the_stall_watchdog() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let size = 24 * 1024 * 1024;
    let src = dir.path().join("s.bin");
    let data = random_file(&src, size, 15);
    let proxy = FaultProxy::start_blackholing(srv.addr, vec![size / 3, size * 2 / 3])
        .await
        .unwrap();
    let mut opts = client_opts(dir.path(), Some(proxy.addr().to_string()));
    opts.client.timeouts = ferry::conn::Timeouts::with_stall(Duration::from_millis(1500));
    let t = std::time::Instant::now();
    let s = cp(&[src.display().to_string()], &srv.url("s.bin"), &opts)
        .await
        .unwrap();
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 2);
    assert!(s.retries >= 2, "{s:?}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(std::fs::read(srv.root.join("s.bin")).unwrap(), data);
    srv.stop().await;
}

#[tokio::test]
async fn breaker_opens_while_the_server_is_down_and_the_copy_finishes_when_it_returns() {
    let dir = TempDir::new().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let src = dir.path().join("late.bin");
    let data = random_file(&src, 3 * CHUNK, 16);
    let mut opts = client_opts(dir.path(), None);
    opts.retry.max_attempts = 0;
    let job = tokio::spawn({
        let (s, o) = (src.display().to_string(), opts.clone());
        async move { cp(&[s], &format!("ferry://{addr}/late.bin"), &o).await }
    });
    let peers = ferry::status::PeerStatus::new(&opts.state_dir);
    let mut saw_open = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if peers.list().iter().any(|p| p.breaker == "open") {
            saw_open = true;
            break;
        }
    }
    assert!(
        saw_open,
        "the breaker must open after repeated connection failures"
    );
    let srv = TestServer::start_at(dir.path(), addr).await;
    let s = job.await.unwrap().unwrap();
    assert!(s.retries >= 5);
    assert_eq!(std::fs::read(srv.root.join("late.bin")).unwrap(), data);
    assert_eq!(peers.list()[0].breaker, "closed");
    srv.stop().await;
}

#[tokio::test]
async fn nearly_full_disk_refuses_new_uploads_but_serves_resumes_and_downloads() {
    let dir = TempDir::new().unwrap();
    let size = 20 * 1024 * 1024;
    let src = dir.path().join("n.bin");
    let data = random_file(&src, size, 17);
    // A partial exists from before the disk filled up.
    let srv = TestServer::start(dir.path()).await;
    interrupted_upload(dir.path(), &srv, &src, "n.bin", size / 2).await;
    random_file(&srv.root.join("served.bin"), 1000, 18);
    let addr = srv.addr;
    srv.stop().await;
    // Same server, now with a reserve no disk can satisfy.
    let srv = TestServer::start_full(dir.path(), addr, u64::MAX / 4).await;
    let mut opts = client_opts(dir.path(), None);
    opts.retry.max_attempts = 1;
    let other = dir.path().join("other.bin");
    random_file(&other, 1000, 19);
    let e = cp(&[other.display().to_string()], &srv.url("other.bin"), &opts)
        .await
        .unwrap_err();
    assert!(
        e.is_retryable() || matches!(e, Error::RetriesExhausted { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("nearly full"), "{e}");
    assert!(
        e.retry_after().is_some(),
        "the server says when to come back"
    );
    // The resume goes on, and downloads still work.
    cp(&[src.display().to_string()], &srv.url("n.bin"), &opts)
        .await
        .unwrap();
    assert_eq!(std::fs::read(srv.root.join("n.bin")).unwrap(), data);
    let back = dir.path().join("served.bin");
    cp(&[srv.url("served.bin")], &back.display().to_string(), &opts)
        .await
        .unwrap();
    srv.stop().await;
}

/// Many small files go in batches: all land verified with their metadata, a
/// second run sends none of them again, a changed one is replaced, and a file
/// corrupted in flight is refused by the batch and sent again on its own.
#[tokio::test]
async fn small_files_go_in_batches_idempotently() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let opts = client_opts(dir.path(), None);
    let tree = dir.path().join("many");
    let mut files = Vec::new();
    for i in 0..1500u64 {
        // Sizes include 0, 1, a whole chunk and the largest batch file.
        let size = match i {
            0 => 0,
            1 => 1,
            2 => CHUNK,
            _ => 100 + (i * 37) % 9000,
        };
        let rel = format!("d{}/f{i:04}", i % 7);
        let data = random_file(&tree.join(&rel), size, i);
        std::fs::set_permissions(
            tree.join(&rel),
            std::fs::Permissions::from_mode(if i % 2 == 0 { 0o640 } else { 0o604 }),
        )
        .unwrap();
        files.push((rel, data));
    }
    let big = random_file(&tree.join("big.bin"), 3 * CHUNK + 5, 99);
    let total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum::<u64>() + big.len() as u64;
    srv.faults.corrupt_chunks.store(1, Ordering::SeqCst);
    let s = cp(&[tree.display().to_string()], &srv.url("many"), &opts)
        .await
        .unwrap();
    assert_eq!(srv.faults.corrupt_chunks.load(Ordering::SeqCst), 0);
    assert_eq!(s.files, 1501);
    for (rel, data) in &files {
        let p = srv.root.join("many").join(rel);
        assert_eq!(&std::fs::read(&p).unwrap(), data, "{rel}");
        let src_md = std::fs::metadata(tree.join(rel)).unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.mode() & 0o777, src_md.mode() & 0o777, "{rel}");
        assert_eq!(md.mtime(), src_md.mtime(), "{rel}");
    }
    assert_eq!(std::fs::read(srv.root.join("many/big.bin")).unwrap(), big);
    let parts = walk(&srv.root)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".ferry.part"))
        .count();
    assert_eq!(parts, 0, "no partial files left behind");
    // The corrupt one was sent twice; nothing else.
    assert!(
        s.bytes_sent >= total && s.bytes_sent <= total + 9000,
        "sent {}",
        s.bytes_sent
    );
    // Same copy again, into the same place: nothing is sent.
    let again = cp(
        &[tree.join("d3").display().to_string()],
        &srv.url("many/"),
        &opts,
    )
    .await
    .unwrap();
    assert_eq!(again.bytes_sent, 0, "already there: nothing sent again");
    assert!(again.bytes_resumed > 0);
    // A destination file changed at the same size is replaced.
    let victim = srv.root.join("many/d3/f0003");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();
    let fix = cp(
        &[tree.join("d3").display().to_string()],
        &srv.url("many/"),
        &opts,
    )
    .await
    .unwrap();
    assert_eq!(fix.bytes_sent, files[3].1.len() as u64);
    assert_eq!(std::fs::read(&victim).unwrap(), files[3].1);
    srv.stop().await;
}

/// Hostile batches: a path that leaves the root or a digest that does not
/// match fails that file only; data for a file that was not asked for closes
/// the connection; the server stays up.
#[tokio::test]
async fn hostile_batches_are_refused_and_the_server_stays_up() {
    use ferry::client::BatchItem;
    use ferry_proto::message::BatchFile;
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let opts = client_opts(dir.path(), None);
    let item = |path: &str, data: &'static [u8]| BatchItem {
        file: BatchFile {
            path: path.into(),
            size: data.len() as u64,
            mtime_ns: 0,
            mode: 0o644,
            digest: ferry_proto::hash::small_file_digest(HashAlg::Blake3, data),
        },
        data: bytes::Bytes::from_static(data),
    };
    let mut s = Session::connect(&srv.addr.to_string(), &opts.client)
        .await
        .unwrap();
    assert!(s.supports_batch());
    // An escaping path fails alone; the good file lands.
    let out = s
        .put_batch(
            HashAlg::Blake3,
            &[item("../escape", b"x"), item("ok.txt", b"fine")],
        )
        .await
        .unwrap();
    assert_eq!(out.done.iter().collect::<Vec<_>>(), vec![1]);
    assert_eq!(out.failures.len(), 1);
    assert_eq!(out.failures[0].index, 0);
    assert!(!dir.path().join("escape").exists());
    assert_eq!(std::fs::read(srv.root.join("ok.txt")).unwrap(), b"fine");
    // A digest that does not match the content: refused, nothing written.
    let mut bad = item("bad.txt", b"content");
    bad.file.digest = ferry_proto::hash::small_file_digest(HashAlg::Blake3, b"other!!");
    let out = s.put_batch(HashAlg::Blake3, &[bad]).await.unwrap();
    assert!(out.done.is_empty());
    assert_eq!(
        out.failures[0].failure.code,
        ferry_proto::FailureCode::Integrity
    );
    assert!(!srv.root.join("bad.txt").exists());
    assert!(!srv.root.join(".bad.txt.ferry.part").exists());
    // Data for a file the server did not ask for closes the connection.
    let mut frame = Message::BatchPut {
        alg: "blake3".into(),
        files: vec![item("ok.txt", b"fine").file],
    }
    .encode()
    .to_vec();
    frame.extend_from_slice(
        &Message::BatchData {
            index: 5,
            payload: bytes::Bytes::from_static(b"zzz"),
        }
        .encode(),
    );
    s.raw_write(&frame).await.unwrap();
    assert!(s.stat("").await.is_err(), "connection must be closed");
    // The server is still up.
    let mut s2 = Session::connect(&srv.addr.to_string(), &opts.client)
        .await
        .unwrap();
    s2.stat("ok.txt").await.unwrap();
    srv.stop().await;
}

/// Downloading many files over one connection, one transfer each: each
/// file's `Complete` is followed at once by the next request, and the server
/// must not read that request as part of the finished transfer (it used to,
/// and every file cost a reconnect).
#[tokio::test]
async fn many_chunked_downloads_in_a_row_on_one_connection() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let opts = client_opts(dir.path(), None);
    let store = Arc::new(ferry::store::Store::open(&dir.path().join("cs")).unwrap());
    let mut s = Session::connect(&srv.addr.to_string(), &opts.client)
        .await
        .unwrap();
    let progress = ferry::progress::FileProgress::detached(Arc::new(Progress::default()));
    for i in 0..300u64 {
        let rel = format!("f{i:03}");
        let data = random_file(&srv.root.join(&rel), 1 + i * 7, i);
        let local = dir.path().join("down").join(&rel);
        std::fs::create_dir_all(local.parent().unwrap()).unwrap();
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&i.to_be_bytes());
        s.get(
            ferry_proto::TransferId(id),
            HashAlg::Blake3,
            &rel,
            &local,
            &store,
            &progress,
            |_| {},
        )
        .await
        .unwrap_or_else(|e| panic!("file {i}: {e}"));
        assert_eq!(std::fs::read(&local).unwrap(), data);
    }
    srv.stop().await;
}

/// A tree of small files comes down in batches: no reconnects, every file
/// verified with its mode and mtime, a second run fetches nothing, and a
/// local file changed at the same size is fetched again.
#[tokio::test]
async fn small_files_come_down_in_batches() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let opts = client_opts(dir.path(), None);
    let mut files = Vec::new();
    for i in 0..1200u64 {
        let rel = format!("t/d{}/f{i:04}", i % 5);
        let size = if i == 0 { 0 } else { 1 + (i * 11) % 5000 };
        files.push((rel.clone(), random_file(&srv.root.join(&rel), size, i)));
    }
    let big = random_file(&srv.root.join("t/big.bin"), 2 * CHUNK + 3, 77);
    let down = dir.path().join("down");
    let s = cp(&[srv.url("t")], &down.display().to_string(), &opts)
        .await
        .unwrap();
    assert_eq!(s.files, 1201);
    assert_eq!(s.retries, 0, "a download reconnected");
    for (rel, data) in &files {
        let local = down.join(rel.trim_start_matches("t/"));
        assert_eq!(&std::fs::read(&local).unwrap(), data, "{rel}");
        let (a, b) = (
            std::fs::metadata(srv.root.join(rel)).unwrap(),
            std::fs::metadata(&local).unwrap(),
        );
        assert_eq!(a.mode() & 0o777, b.mode() & 0o777, "{rel}");
        assert_eq!(a.mtime(), b.mtime(), "{rel}");
    }
    assert_eq!(std::fs::read(down.join("big.bin")).unwrap(), big);
    assert_eq!(
        walk(&down)
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(".ferry.part"))
            .count(),
        0
    );
    // Again into the same place: nothing small is fetched again.
    let again = cp(&[srv.url("t/d2")], &down.display().to_string(), &opts)
        .await
        .unwrap();
    assert_eq!(again.bytes_sent, 0, "identical files fetched again");
    // A local copy changed at the same size is replaced.
    let victim = down.join("d2/f0002");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();
    let fix = cp(&[srv.url("t/d2")], &down.display().to_string(), &opts)
        .await
        .unwrap();
    assert_eq!(fix.bytes_sent, files[2].1.len() as u64);
    assert_eq!(std::fs::read(&victim).unwrap(), files[2].1);
    srv.stop().await;
}

/// A destination edited after a finished upload (same size, new mtime) is not
/// taken as done when the same copy runs again: it is re-checked and re-sent.
/// One left untouched is confirmed without sending anything.
#[tokio::test]
async fn edited_destination_is_sent_again_untouched_one_is_not() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let opts = client_opts(dir.path(), None);
    let size = 5 * CHUNK + 3;
    let src = dir.path().join("e.bin");
    let data = random_file(&src, size, 5);
    cp(&[src.display().to_string()], &srv.url("e.bin"), &opts)
        .await
        .unwrap();
    // Untouched: nothing goes again.
    let again = cp(&[src.display().to_string()], &srv.url("e.bin"), &opts)
        .await
        .unwrap();
    assert_eq!(again.bytes_sent, 0);
    // Edited in place at the same size.
    let dst = srv.root.join("e.bin");
    let mut bytes = std::fs::read(&dst).unwrap();
    bytes[(CHUNK + 10) as usize] ^= 0x55;
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&dst, &bytes).unwrap();
    let fix = cp(&[src.display().to_string()], &srv.url("e.bin"), &opts)
        .await
        .unwrap();
    assert!(
        fix.bytes_sent > 0,
        "an edited destination was taken as done"
    );
    assert_eq!(std::fs::read(&dst).unwrap(), data);
    srv.stop().await;
}

/// `--hash sha256` applies to downloads too: the digest of a download equals
/// the digest of the upload of the same content with the same algorithm.
#[tokio::test]
async fn the_chosen_hash_applies_to_downloads() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let mut opts = client_opts(dir.path(), None);
    opts.alg = HashAlg::Sha256;
    let src = dir.path().join("h.bin");
    random_file(&src, 3 * CHUNK + 1, 8);
    let up = cp(&[src.display().to_string()], &srv.url("h.bin"), &opts)
        .await
        .unwrap();
    let down = cp(
        &[srv.url("h.bin")],
        &dir.path().join("h2.bin").display().to_string(),
        &opts,
    )
    .await
    .unwrap();
    assert_eq!(up.alg, "sha256");
    assert_eq!(down.alg, "sha256");
    assert_eq!(up.digest, down.digest);
    let mut b3 = client_opts(dir.path(), None);
    b3.state_dir = dir.path().join("other-state");
    let other = cp(
        &[srv.url("h.bin")],
        &dir.path().join("h3.bin").display().to_string(),
        &b3,
    )
    .await
    .unwrap();
    assert_ne!(
        other.digest, down.digest,
        "blake3 and sha256 digests differ"
    );
    srv.stop().await;
}

/// The client lost its journal (a new machine, a wiped state dir) but the
/// server holds most of the file: the client hashes what the server offers
/// (off the async threads, with keepalives, under the server's 2 s stall
/// watchdog), agrees on it, and sends only the rest.
#[tokio::test]
async fn resume_after_the_senders_journal_was_lost() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let size = 96 * 1024 * 1024;
    let src = dir.path().join("j.bin");
    let data = random_file(&src, size, 21);
    interrupted_upload(dir.path(), &srv, &src, "j.bin", size * 3 / 4).await;
    std::fs::remove_dir_all(dir.path().join("client-state")).unwrap();
    let s = cp(
        &[src.display().to_string()],
        &srv.url("j.bin"),
        &client_opts(dir.path(), None),
    )
    .await
    .unwrap();
    assert!(s.bytes_resumed >= size / 2, "resumed {}", s.bytes_resumed);
    assert_eq!(s.bytes_sent + s.bytes_resumed, size, "nothing sent twice");
    assert_eq!(std::fs::read(srv.root.join("j.bin")).unwrap(), data);
    srv.stop().await;
}

#[tokio::test]
async fn hostile_lanes_are_refused_and_the_server_stays_up() {
    use ferry_proto::{FailureCode, ProtoError, TransferId};
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let cfg = client_opts(dir.path(), None).client;
    let addr = srv.addr.to_string();
    // A lane for a transfer that is not running is refused.
    let e = ferry::client::open_lane(&addr, &cfg, TransferId([5; 16]))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&e, Error::Proto(ProtoError::Remote(f)) if f.code == FailureCode::NotFound),
        "{e}"
    );
    // A lane that carries something other than data fails its transfer only.
    let src = dir.path().join("h.bin");
    let data = random_file(&src, 8 << 20, 4);
    let mut slow = cfg.clone();
    slow.bwlimit = 2 << 20;
    let store = Arc::new(ferry::store::Store::open(&dir.path().join("lane-state")).unwrap());
    let prepared = ferry::transfer::prepare_send(&store, &src, HashAlg::Blake3).unwrap();
    let id = TransferId([6; 16]);
    let mut s = Session::connect(&addr, &slow).await.unwrap();
    let put = tokio::spawn(async move {
        s.put(
            id,
            &prepared,
            "h.bin",
            &store,
            &ferry::progress::FileProgress::detached(Arc::new(Progress::default())),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut lane = ferry::client::open_lane(&addr, &cfg, id).await.unwrap();
    lane.send(&Message::Stat { path: "x".into() })
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(20), put)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_err(), "the transfer with a misbehaving lane failed");
    assert!(!srv.root.join("h.bin").exists());
    // The server goes on serving: the copy resumes and completes.
    let sum = cp(
        &[src.display().to_string()],
        &srv.url("h.bin"),
        &client_opts(dir.path(), None),
    )
    .await
    .unwrap();
    assert!(sum.bytes_resumed > 0, "kept what was verified");
    assert_eq!(std::fs::read(srv.root.join("h.bin")).unwrap(), data);
    srv.stop().await;
}

/// Small files in several batches go on two connections taking batches in
/// turn; cuts on either are retried and every file lands once, whole.
#[tokio::test]
async fn small_file_batches_on_two_connections_survive_cuts() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let src = dir.path().join("small");
    let mut want = Vec::new();
    let mut total = 0;
    for i in 0..2100u64 {
        let rel = format!("d{}/f{i:05}", i % 7);
        let size = 1 + (i * 37) % 3000;
        total += size;
        want.push((rel.clone(), random_file(&src.join(&rel), size, 500 + i)));
    }
    let proxy = FaultProxy::start(srv.addr, vec![total / 3, total * 2 / 3])
        .await
        .unwrap();
    let opts = client_opts(dir.path(), Some(proxy.addr().to_string()));
    let up = cp(&[src.display().to_string()], &srv.url("small"), &opts)
        .await
        .unwrap();
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 2);
    assert!(up.retries >= 1, "cuts were retried");
    assert_eq!(up.files, 2100);
    for (rel, data) in &want {
        assert_eq!(
            &std::fs::read(srv.root.join("small").join(rel)).unwrap(),
            data,
            "{rel}"
        );
    }
    no_partials(&srv.root);
    // The same tree on one connection to another server: the same tree
    // digest, whatever order the batches finished in.
    let dir2 = TempDir::new().unwrap();
    let srv2 = TestServer::start(dir2.path()).await;
    let mut one = client_opts(dir2.path(), None);
    one.client.streams = ferry::lanes::Streams::Fixed(1);
    let again = cp(&[src.display().to_string()], &srv2.url("small"), &one)
        .await
        .unwrap();
    assert_eq!(again.files, 2100);
    assert_eq!(again.bytes_sent, total);
    assert_eq!(again.digest, up.digest);
    srv2.stop().await;
    // And back down.
    let back = dir.path().join("back");
    let down = cp(&[srv.url("small")], &back.display().to_string(), &one)
        .await
        .unwrap();
    assert_eq!(down.bytes_sent, total);
    assert_eq!(down.digest, up.digest);
    for (rel, data) in &want {
        assert_eq!(&std::fs::read(back.join(rel)).unwrap(), data, "{rel}");
    }
    no_partials(&back);
    // Down again on two connections (each worker fetching and storing its
    // own groups), with both of its first requests cut.
    let proxy = FaultProxy::start(srv.addr, vec![20_000, 90_000])
        .await
        .unwrap();
    let opts = client_opts(dir.path(), Some(proxy.addr().to_string()));
    let back2 = dir.path().join("back2");
    let down2 = cp(&[srv.url("small")], &back2.display().to_string(), &opts)
        .await
        .unwrap();
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 2);
    assert!(down2.retries >= 1, "cuts were retried");
    assert_eq!(down2.files, 2100);
    assert_eq!(down2.bytes_sent, total, "each file came down once");
    assert_eq!(down2.digest, up.digest);
    for (rel, data) in &want {
        assert_eq!(&std::fs::read(back2.join(rel)).unwrap(), data, "{rel}");
    }
    no_partials(&back2);
    srv.stop().await;
}

#[tokio::test]
async fn many_files_move_several_at_once_and_survive_cuts() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let src = dir.path().join("many");
    let mut want = Vec::new();
    let mut total = 0;
    for i in 0..24u64 {
        let rel = format!("d{}/f{i}", i % 3);
        let size = (1 << 20) + i * 4099;
        total += size;
        want.push((rel.clone(), random_file(&src.join(&rel), size, 100 + i)));
    }
    let proxy = FaultProxy::start(srv.addr, vec![total / 4, total / 2, total * 3 / 4])
        .await
        .unwrap();
    let mut opts = client_opts(dir.path(), Some(proxy.addr().to_string()));
    opts.client.streams = ferry::lanes::Streams::Fixed(4);
    let up = cp(&[src.display().to_string()], &srv.url("many"), &opts)
        .await
        .unwrap();
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 3);
    assert!(up.retries >= 3);
    assert_eq!(up.files, 24);
    assert_eq!(up.files_at_once, 4);
    for (rel, data) in &want {
        assert_eq!(
            &std::fs::read(srv.root.join("many").join(rel)).unwrap(),
            data
        );
    }
    no_partials(&srv.root);
    // Back down, four at a time, with the same tree digest whatever order
    // the files finished in.
    let back = dir.path().join("back");
    let mut opts = client_opts(dir.path(), None);
    opts.client.streams = ferry::lanes::Streams::Fixed(4);
    let down = cp(&[srv.url("many")], &back.display().to_string(), &opts)
        .await
        .unwrap();
    assert_eq!(down.files, 24);
    assert_eq!(down.files_at_once, 4);
    assert_eq!(down.bytes_sent, total);
    for (rel, data) in &want {
        assert_eq!(&std::fs::read(back.join(rel)).unwrap(), data);
    }
    no_partials(&back);
    assert_eq!(up.digest, down.digest);
    srv.stop().await;
}

/// Whether `p` is a regular file itself (not a link) holding `data`.
fn regular_with(p: &Path, data: &[u8]) {
    let md = std::fs::symlink_metadata(p).unwrap();
    assert!(
        md.file_type().is_file(),
        "{} is not a regular file",
        p.display()
    );
    assert_eq!(md.nlink(), 1, "{} has other names", p.display());
    assert_eq!(std::fs::read(p).unwrap(), data, "{}", p.display());
}

/// Links planted at a partial's name (a symlink out of the root, a hard link
/// to a file elsewhere), before a first run or in place of a partial between
/// runs, are never written through nor put in place: uploads and downloads,
/// chunked files and batched small ones.
#[tokio::test]
async fn links_planted_at_partial_names_are_never_followed() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let victim = |name: &str| {
        let p = outside.join(name);
        std::fs::write(&p, b"not yours").unwrap();
        p
    };
    let untouched = |p: &Path| assert_eq!(std::fs::read(p).unwrap(), b"not yours");
    let size = 3 * 1024 * 1024;
    std::fs::create_dir_all(&srv.root).unwrap();

    // Upload: a symlink and a hard link at the part names, a chunked file
    // and a small one.
    let (sym, hard, small) = (victim("sym"), victim("hard"), victim("small"));
    std::os::unix::fs::symlink(&sym, srv.root.join(".s.bin.ferry.part")).unwrap();
    std::fs::hard_link(&hard, srv.root.join(".h.bin.ferry.part")).unwrap();
    std::os::unix::fs::symlink(&small, srv.root.join(".t.txt.ferry.part")).unwrap();
    for (name, len, seed) in [("s.bin", size, 20), ("h.bin", size, 21), ("t.txt", 100, 22)] {
        let src = dir.path().join(name);
        let data = random_file(&src, len, seed);
        cp(
            &[src.display().to_string()],
            &srv.url(name),
            &client_opts(dir.path(), None),
        )
        .await
        .unwrap();
        regular_with(&srv.root.join(name), &data);
    }
    for p in [&sym, &hard, &small] {
        untouched(p);
    }

    // Between runs: the partial of an interrupted upload replaced by a link
    // to a file that holds the very same bytes.
    let src = dir.path().join("r.bin");
    let data = random_file(&src, 20 * 1024 * 1024, 23);
    interrupted_upload(dir.path(), &srv, &src, "r.bin", 15 * 1024 * 1024).await;
    let part = srv.root.join(".r.bin.ferry.part");
    let decoy = outside.join("decoy");
    std::fs::copy(&part, &decoy).unwrap();
    let before = std::fs::read(&decoy).unwrap();
    std::fs::remove_file(&part).unwrap();
    std::os::unix::fs::symlink(&decoy, &part).unwrap();
    cp(
        &[src.display().to_string()],
        &srv.url("r.bin"),
        &client_opts(dir.path(), None),
    )
    .await
    .unwrap();
    regular_with(&srv.root.join("r.bin"), &data);
    assert_eq!(
        std::fs::read(&decoy).unwrap(),
        before,
        "decoy written through"
    );

    // Download: a symlink at the local part name.
    let data = random_file(&srv.root.join("d.bin"), size, 24);
    let local = dir.path().join("down");
    std::fs::create_dir_all(&local).unwrap();
    let dsym = victim("dsym");
    std::os::unix::fs::symlink(&dsym, local.join(".d.bin.ferry.part")).unwrap();
    cp(
        &[srv.url("d.bin")],
        &local.display().to_string(),
        &client_opts(dir.path(), None),
    )
    .await
    .unwrap();
    regular_with(&local.join("d.bin"), &data);
    untouched(&dsym);
    srv.stop().await;
}

/// A partial extended past the file's size between runs is cut back before
/// it is trusted: the final file has exactly the source's bytes, both ways.
#[tokio::test]
async fn a_partial_grown_past_the_file_size_is_cut_back_both_ways() {
    let dir = TempDir::new().unwrap();
    let srv = TestServer::start(dir.path()).await;
    let size = 20 * 1024 * 1024;
    let append = |p: &Path| {
        let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
        std::io::Write::write_all(&mut f, b"junk after the end").unwrap();
    };
    // Upload.
    let src = dir.path().join("g.bin");
    let data = random_file(&src, size, 30);
    interrupted_upload(dir.path(), &srv, &src, "g.bin", size * 3 / 4).await;
    append(&srv.root.join(".g.bin.ferry.part"));
    let s = cp(
        &[src.display().to_string()],
        &srv.url("g.bin"),
        &client_opts(dir.path(), None),
    )
    .await
    .unwrap();
    assert!(s.bytes_resumed > 0, "the kept chunks are still used");
    regular_with(&srv.root.join("g.bin"), &data);
    // Download.
    let data = random_file(&srv.root.join("gd.bin"), size, 31);
    let local = dir.path().join("gd.bin");
    let proxy = FaultProxy::start(srv.addr, vec![600]).await.unwrap();
    let mut opts = client_opts(dir.path(), Some(proxy.addr().to_string()));
    opts.retry.max_attempts = 1;
    let _ = cp(&[srv.url("gd.bin")], &local.display().to_string(), &opts).await;
    let part = dir.path().join(".gd.bin.ferry.part");
    assert!(part.exists(), "the cut download left its partial");
    append(&part);
    cp(
        &[srv.url("gd.bin")],
        &local.display().to_string(),
        &client_opts(dir.path(), None),
    )
    .await
    .unwrap();
    regular_with(&local, &data);
    srv.stop().await;
}
