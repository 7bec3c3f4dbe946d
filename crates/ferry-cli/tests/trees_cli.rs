//! `ferry cp -r` of trees holding symlinks and names that are not UTF-8, as
//! a user sees it: the warning and error lines, the summary and the exit code.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_ferry");

/// A `ferry serve` on a free loopback port, killed (by PID) when dropped.
struct Server {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "t0ken\n").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(BIN)
            .args(["serve", "--no-quic", "--create-root", "--root"])
            .arg(dir.path().join("root"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--state-dir"])
            .arg(dir.path().join("server-state"))
            .arg("--token-file")
            .arg(dir.path().join("token"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("server did not start");
        Server { child, port, dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn cp(&self, args: &[&OsStr]) -> Output {
        Command::new(BIN)
            .arg("cp")
            .arg("--state-dir")
            .arg(self.dir.path().join("client-state"))
            .arg("--token-file")
            .arg(self.dir.path().join("token"))
            .args(["--no-progress", "--retry-max-attempts", "2"])
            .args(args)
            .output()
            .unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("ferry://127.0.0.1:{}/{path}", self.port)
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tree(base: &Path) -> PathBuf {
    let d = base.join("d");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(d.join("f"), b"f").unwrap();
    std::fs::write(d.join("sub/g"), b"g").unwrap();
    std::os::unix::fs::symlink("..", d.join("loop")).unwrap();
    d
}

#[test]
fn a_symlink_loop_is_skipped_with_one_warning_and_l_does_not_loop() {
    let s = Server::start();
    let t = tempfile::tempdir().unwrap();
    let d = tree(t.path());
    let url = s.url("");
    let out = s.cp(&["-r".as_ref(), d.as_os_str(), url.as_ref()]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let warning = format!(
        "skipping symlink {} (use -L to follow links)",
        d.join("loop").display()
    );
    assert_eq!(err.matches(&warning).count(), 1, "{err}");
    assert!(text(&out.stdout).contains("copied 2 file(s)"));
    assert!(!s.root().join("d/loop").exists());
    let url = s.url("L/");
    let out = s.cp(&["-r".as_ref(), "-L".as_ref(), d.as_os_str(), url.as_ref()]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("(a loop)"), "{err}");
    assert!(!s.root().join("L/d/loop").exists());
    assert_eq!(std::fs::read(s.root().join("L/d/sub/g")).unwrap(), b"g");
}

#[test]
fn names_that_are_not_utf8_fail_loudly_and_the_exit_code_says_so() {
    let s = Server::start();
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(OsStr::from_bytes(b"a\xff")), b"1").unwrap();
    std::fs::write(d.join(OsStr::from_bytes(b"a\xfe")), b"2").unwrap();
    std::fs::write(d.join("ok"), b"ok").unwrap();
    let url = s.url("");
    let out = s.cp(&["-r".as_ref(), d.as_os_str(), url.as_ref()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for name in ["a\\xff", "a\\xfe"] {
        let line = format!("{}: not copied", d.join(name).display());
        assert_eq!(err.matches(&line).count(), 1, "{err}");
    }
    assert!(
        err.contains("ferry: error: 2 file(s) could not be copied"),
        "{err}"
    );
    assert!(text(&out.stdout).contains("copied 1 file(s)"));
    assert_eq!(std::fs::read(s.root().join("d/ok")).unwrap(), b"ok");
    assert_eq!(std::fs::read_dir(s.root().join("d")).unwrap().count(), 1);
}
