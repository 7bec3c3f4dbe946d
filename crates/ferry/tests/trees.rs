//! Trees on native (`ferry://`) copies: symlinks (skipped by default,
//! followed with loop detection under `-L`), names that are not UTF-8
//! (failed loudly, never merged) and two sources for one destination.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry::copy::{copy, CopyOptions, CopySummary};
use ferry::progress::Progress;
use ferry::server::{Server, ServerConfig};
use ferry::walk::{Kind, Plan, WalkOptions};
use ferry::{Error, ErrorClass};

const TOKEN: &[u8] = b"tree-token";

struct TestServer {
    addr: std::net::SocketAddr,
    root: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    async fn start(dir: &Path) -> TestServer {
        let root = dir.join("root");
        std::fs::create_dir_all(&root).unwrap();
        let server = Server::bind(ServerConfig {
            root: root.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: dir.join("server-state"),
            token: Some(TOKEN.to_vec()),
            receiver: Default::default(),
            faults: None,
            timeouts: ferry::conn::Timeouts::with_stall(Duration::from_secs(5)),
            min_free_bytes: 0,
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
            stop: Some(tx),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("ferry://{}/{}", self.addr, path)
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }
}

fn opts(dir: &Path, follow_links: bool) -> CopyOptions {
    CopyOptions {
        recursive: true,
        follow_links,
        state_dir: dir.join("client-state"),
        client: ferry::client::ClientConfig {
            transport: Default::default(),
            direct_io: true,
            streams: ferry::lanes::Streams::Auto,
            token: Some(TOKEN.to_vec()),
            fingerprint: None,
            known_servers: ferry::tls::KnownServers::new(dir.join("client-state/known_servers")),
            connect_timeout: Duration::from_secs(5),
            via: None,
            bwlimit: 0,
            timeouts: Default::default(),
            dialer: Arc::new(ferry::transport::tcp::TcpDialer::default()),
        },
        retry: ferry::retry::RetryPolicy {
            initial: Duration::from_millis(10),
            multiplier: 2.0,
            max_delay: Duration::from_millis(50),
            max_attempts: 3,
            budget: None,
        },
        alg: ferry_proto::HashAlg::Blake3,
        seed: Some(7),
        sftp: Default::default(),
    }
}

async fn cp(srcs: &[&Path], dst: &str, o: &CopyOptions) -> Result<CopySummary, Error> {
    let srcs: Vec<String> = srcs.iter().map(|p| p.display().to_string()).collect();
    copy(&srcs, dst, o, Arc::new(Progress::default())).await
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// `d/f`, `d/sub/g`, `d/loop -> ..` (a loop back to d's parent) and
/// `d/sub/up -> ..` (a loop back to d).
fn tree_with_loops(base: &Path) -> PathBuf {
    let d = base.join("d");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(d.join("f"), b"f").unwrap();
    std::fs::write(d.join("sub/g"), b"g").unwrap();
    symlink("..", d.join("loop")).unwrap();
    symlink("..", d.join("sub/up")).unwrap();
    d
}

fn dests(p: &Plan) -> Vec<String> {
    p.items.iter().map(|i| i.dest.clone()).collect()
}

#[test]
fn plan_skips_symlinks_inside_a_tree_by_default() {
    let t = tempfile::tempdir().unwrap();
    let d = tree_with_loops(t.path());
    std::fs::write(t.path().join("outside"), b"o").unwrap();
    symlink("../outside", d.join("flink")).unwrap();
    let mut p = Plan::new();
    let o = WalkOptions {
        recursive: true,
        follow_links: false,
    };
    p.add_source(&d, "up", true, o).unwrap();
    assert_eq!(dests(&p), ["up/d", "up/d/f", "up/d/sub", "up/d/sub/g"]);
    assert_eq!(p.skipped.len(), 3, "{:?}", p.skipped);
    let line = format!(
        "skipping symlink {} (use -L to follow links)",
        d.join("loop").display()
    );
    assert!(p.skipped.contains(&line), "{:?}", p.skipped);
    assert!(p.failed.is_empty());
    // A symlink named as the source is followed, as cp and rsync do.
    let mut p = Plan::new();
    p.add_source(&d.join("flink"), "x", false, o).unwrap();
    assert_eq!(dests(&p), ["x"]);
    assert_eq!(p.items[0].kind, Kind::File { size: 1 });
}

#[test]
fn plan_follows_links_with_loop_detection() {
    let t = tempfile::tempdir().unwrap();
    let d = tree_with_loops(t.path());
    std::fs::create_dir_all(t.path().join("other")).unwrap();
    std::fs::write(t.path().join("other/x"), b"x").unwrap();
    symlink("../other", d.join("linkdir")).unwrap();
    symlink("f", d.join("linkfile")).unwrap();
    symlink("sub", d.join("zagain")).unwrap();
    symlink("nowhere", d.join("dangling")).unwrap();
    let mut p = Plan::new();
    let o = WalkOptions {
        recursive: true,
        follow_links: true,
    };
    p.add_source(&d, "", true, o).unwrap();
    assert_eq!(
        dests(&p),
        [
            "d",
            "d/f",
            "d/linkfile",
            "d/linkdir",
            "d/linkdir/x",
            "d/sub",
            "d/sub/g"
        ]
    );
    let has = |what: &str, name: &str| {
        p.skipped
            .iter()
            .any(|l| l.contains(what) && l.contains(&d.join(name).display().to_string()))
    };
    assert!(has("a loop", "loop"), "{:?}", p.skipped);
    assert!(has("a loop", "sub/up"), "{:?}", p.skipped);
    assert!(has("copied already", "zagain"), "{:?}", p.skipped);
    assert!(has("leads nowhere", "dangling"), "{:?}", p.skipped);
    assert_eq!(p.skipped.len(), 4, "{:?}", p.skipped);
}

#[test]
fn plan_fails_names_that_are_not_utf8_and_never_merges_them() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d");
    std::fs::create_dir_all(d.join(os(b"dir\xff"))).unwrap();
    std::fs::write(d.join(os(b"dir\xff/inner")), b"i").unwrap();
    std::fs::write(d.join(os(b"a\xff")), b"1").unwrap();
    std::fs::write(d.join(os(b"a\xfe")), b"2").unwrap();
    std::fs::write(d.join("ok"), b"ok").unwrap();
    let mut p = Plan::new();
    let o = WalkOptions {
        recursive: true,
        follow_links: false,
    };
    p.add_source(&d, "", true, o).unwrap();
    assert_eq!(dests(&p), ["d", "d/ok"]);
    assert_eq!(p.failed.len(), 3, "{:?}", p.failed);
    // Each names its own file, bytes escaped, so the two never look alike.
    assert!(
        p.failed.iter().any(|l| l.contains("d/a\\xff:")),
        "{:?}",
        p.failed
    );
    assert!(
        p.failed.iter().any(|l| l.contains("d/a\\xfe:")),
        "{:?}",
        p.failed
    );
    assert!(p
        .failed
        .iter()
        .any(|l| l.contains("dir\\xff (and all it holds)")));
}

#[tokio::test]
async fn upload_skips_a_symlink_loop_by_default_and_follows_with_l() {
    let t = tempfile::tempdir().unwrap();
    let srv = TestServer::start(t.path()).await;
    let d = tree_with_loops(t.path());
    let sum = cp(&[&d], &srv.url(""), &opts(t.path(), false))
        .await
        .unwrap();
    assert_eq!(sum.files, 2);
    assert_eq!(sum.skipped, 2);
    assert_eq!(std::fs::read(srv.root.join("d/sub/g")).unwrap(), b"g");
    assert!(!srv.root.join("d/loop").exists());
    assert!(!srv.root.join("d/sub/up").exists());
    // -L: a link to a directory outside is copied, the loops still are not.
    std::fs::create_dir_all(t.path().join("other")).unwrap();
    std::fs::write(t.path().join("other/x"), b"x").unwrap();
    symlink("../other", d.join("linkdir")).unwrap();
    let sum = cp(&[&d], &srv.url("L/"), &opts(t.path(), true))
        .await
        .unwrap();
    assert_eq!(sum.files, 3);
    assert_eq!(std::fs::read(srv.root.join("L/d/linkdir/x")).unwrap(), b"x");
    assert!(!srv.root.join("L/d/loop").exists());
    assert!(!srv.root.join("L/d/sub/up").exists());
    srv.stop().await;
}

#[tokio::test]
async fn upload_fails_names_it_cannot_carry_and_copies_the_rest() {
    let t = tempfile::tempdir().unwrap();
    let srv = TestServer::start(t.path()).await;
    let d = t.path().join("d");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(os(b"a\xff")), b"first").unwrap();
    std::fs::write(d.join(os(b"a\xfe")), b"second").unwrap();
    // Legal here, refused by a ferry server: failed alone, not the whole copy.
    std::fs::write(d.join("back\\slash"), b"b").unwrap();
    std::fs::write(d.join("ok"), b"ok").unwrap();
    let e = cp(&[&d], &srv.url(""), &opts(t.path(), false))
        .await
        .unwrap_err();
    let Error::NotAllCopied { failed, summary } = &e else {
        panic!("{e}");
    };
    assert_eq!((*failed, summary.files), (3, 1), "{e}");
    assert_eq!(e.class(), ErrorClass::Usage);
    assert!(
        e.to_string().contains("3 file(s) could not be copied"),
        "{e}"
    );
    assert_eq!(std::fs::read(srv.root.join("d/ok")).unwrap(), b"ok");
    let names: Vec<_> = std::fs::read_dir(srv.root.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["ok"]);
    srv.stop().await;
}

#[tokio::test]
async fn two_sources_for_one_destination_fail_the_second() {
    let t = tempfile::tempdir().unwrap();
    let srv = TestServer::start(t.path()).await;
    for (dir, body) in [("x", "from x"), ("y", "from y")] {
        std::fs::create_dir_all(t.path().join(dir)).unwrap();
        std::fs::write(t.path().join(dir).join("f"), body).unwrap();
    }
    let (a, b) = (t.path().join("x/f"), t.path().join("y/f"));
    let e = cp(&[&a, &b], &srv.url("to/"), &opts(t.path(), false))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::NotAllCopied { failed: 1, summary } if summary.files == 1),
        "{e}"
    );
    assert_eq!(std::fs::read(srv.root.join("to/f")).unwrap(), b"from x");
    srv.stop().await;
}

#[tokio::test]
async fn download_reports_links_and_names_the_server_cannot_carry() {
    let t = tempfile::tempdir().unwrap();
    let srv = TestServer::start(t.path()).await;
    let d = srv.root.join("t");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(d.join("f"), b"f").unwrap();
    std::fs::write(d.join("sub/g"), b"g").unwrap();
    symlink("..", d.join("loop")).unwrap();
    std::fs::write(d.join(os(b"a\xff")), b"1").unwrap();
    std::fs::write(d.join(os(b"a\xfe")), b"2").unwrap();
    let local = t.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    let e = cp(
        &[Path::new(&srv.url("t"))],
        &local.display().to_string(),
        &opts(t.path(), false),
    )
    .await
    .unwrap_err();
    let Error::NotAllCopied { failed, summary } = &e else {
        panic!("{e}");
    };
    assert_eq!((*failed, summary.files, summary.skipped), (2, 2, 1), "{e}");
    assert_eq!(std::fs::read(local.join("t/sub/g")).unwrap(), b"g");
    let mut names: Vec<_> = std::fs::read_dir(local.join("t"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["f", "sub"]);
    srv.stop().await;
}
