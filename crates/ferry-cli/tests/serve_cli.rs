//! `ferry serve` start-up: what it refuses, how it says so, and its exit code.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_ferry");
/// The exit code of a server that could not start.
const STARTUP: i32 = 8;

fn serve(dir: &TempDir, root: &std::path::Path, listen: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args([
        "serve",
        "--no-auth",
        "--no-quic",
        "--listen",
        listen,
        "--root",
    ])
    .arg(root)
    .arg("--state-dir")
    .arg(dir.path().join("state"))
    .args(extra);
    c
}

fn run_briefly(mut c: Command) -> Output {
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A server that starts would run on: these must end by themselves.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("ferry serve did not exit");
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_missing_root_is_refused_unless_create_root() {
    let dir = TempDir::new().unwrap();
    let root = dir.path().join("typo");
    let out = run_briefly(serve(&dir, &root, "127.0.0.1:0", &[]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(STARTUP), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(err.contains("--create-root"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!root.exists(), "nothing was created");

    // A file is not a root either.
    std::fs::write(&root, b"x").unwrap();
    let out = run_briefly(serve(&dir, &root, "127.0.0.1:0", &["--create-root"]));
    assert_eq!(out.status.code(), Some(STARTUP), "{}", stderr(&out));
    assert!(stderr(&out).contains("not a directory"), "{}", stderr(&out));
    std::fs::remove_file(&root).unwrap();

    // With --create-root it is made and served.
    let mut child = serve(&dir, &root, "127.0.0.1:0", &["--create-root"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut listening = false;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if line.contains("listening on") {
            listening = true;
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening);
    assert!(root.is_dir());
}

#[test]
fn a_port_in_use_is_a_startup_error_that_says_so() {
    let dir = TempDir::new().unwrap();
    std::fs::create_dir(dir.path().join("root")).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run_briefly(serve(&dir, &dir.path().join("root"), &addr, &[]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(STARTUP), "{err}");
    assert!(
        err.contains(&format!("cannot listen on {addr}: address already in use")),
        "{err}"
    );
    assert!(!err.contains("cannot connect"), "{err}");
    drop(taken);
}

#[test]
fn admission_limits_are_flags_and_zero_is_a_usage_error() {
    let help = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--max-unauthenticated-per-source",
        "--max-unauthenticated ",
        "--max-authenticated",
        "--penalty-max",
        "--create-root",
        "8 could not start",
    ] {
        assert!(text.contains(flag), "{flag} not in --help:\n{text}");
    }
    let dir = TempDir::new().unwrap();
    std::fs::create_dir(dir.path().join("root")).unwrap();
    let out = run_briefly(serve(
        &dir,
        &dir.path().join("root"),
        "127.0.0.1:0",
        &["--max-unauthenticated", "0"],
    ));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("at least 1"), "{}", stderr(&out));
}
