//! Real-process tests of the `ferry` binary: servers and clients are started,
//! killed with SIGKILL mid-transfer, restarted, and the results compared byte
//! for byte.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_ferry");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn random_file(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

struct Env {
    dir: TempDir,
    port: u16,
    /// The server's WebSocket port (`--ws-listen`).
    ws_port: u16,
}

impl Env {
    fn new() -> Env {
        let dir = TempDir::new().unwrap();
        std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
        Env {
            dir,
            port: free_port(),
            ws_port: free_port(),
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn url(&self, path: &str) -> String {
        format!("ferry://127.0.0.1:{}/{}", self.port, path)
    }

    /// Starts `ferry serve` and waits until it listens.
    fn server(&self) -> Child {
        let mut child = Command::new(BIN)
            .args(["serve", "--create-root", "--root"])
            .arg(self.p("root"))
            .args([
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--state-dir",
            ])
            .arg(self.p("server-state"))
            .arg("--token-file")
            .arg(self.p("token"))
            .args(["--ws-listen", &format!("127.0.0.1:{}", self.ws_port)])
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
        child
    }

    fn cp(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("cp")
            .arg("--state-dir")
            .arg(self.p("client-state"))
            .arg("--token-file")
            .arg(self.p("token"));
        c.args([
            "--no-progress",
            "--retry-initial",
            "20",
            "--retry-max-delay",
            "300",
        ]);
        c.args(args);
        c
    }
}

fn json_summary(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no output; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"))
}

fn kill9(child: &mut Child) {
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

fn wait_for_part(dir: &Path, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".ferry.part"))
            })
            .unwrap_or(false)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no partial file appeared in {}", dir.display());
}

#[test]
fn sigkill_of_the_client_at_several_points_then_resume() {
    let env = Env::new();
    let mut server = env.server();
    let size = 48 << 20;
    let data = random_file(&env.p("src.bin"), size, 1);
    let src = env.p("src.bin").display().to_string();
    for delay_ms in [300u64, 500, 500] {
        let mut child = env
            .cp(&["--bwlimit", "24M", &src, &env.url("dst.bin")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_part(&env.p("root"), Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(delay_ms));
        kill9(&mut child);
        assert!(
            !env.p("root/dst.bin").exists(),
            "final name must not appear before verification"
        );
        // ferry status shows the unfinished transfer.
        let st = Command::new(BIN)
            .args(["status", "--state-dir"])
            .arg(env.p("client-state"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&st.stdout);
        assert!(
            text.contains("interrupted") && text.contains("dst.bin"),
            "status: {text}"
        );
    }
    let out = env
        .cp(&["--json", &src, &env.url("dst.bin")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_summary(&out);
    let (sent, resumed) = (
        j["bytes_sent"].as_u64().unwrap(),
        j["bytes_resumed"].as_u64().unwrap(),
    );
    assert_eq!(
        sent + resumed,
        size as u64,
        "nothing verified is sent again: {j}"
    );
    // How much survived depends on how far each run got before its kill
    // (about a quarter on a quiet machine); that some did is the property.
    assert!(
        resumed > 0,
        "what was verified before the kills is kept: {j}"
    );
    for k in ["files", "bytes_total", "retries", "duration_s", "digest"] {
        assert!(j.get(k).is_some(), "JSON lacks {k}");
    }
    assert_eq!(std::fs::read(env.p("root/dst.bin")).unwrap(), data);
    let st = Command::new(BIN)
        .args(["status", "--state-dir"])
        .arg(env.p("client-state"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&st.stdout).contains("no unfinished transfers"));
    kill9(&mut server);
}

#[test]
fn sigkill_of_the_server_twice_during_one_copy() {
    let env = Env::new();
    let mut server = env.server();
    let size = 48 << 20;
    let data = random_file(&env.p("src.bin"), size, 2);
    let src = env.p("src.bin").display().to_string();
    let client = env
        .cp(&[
            "--json",
            "--bwlimit",
            "24M",
            "--retry-max-attempts",
            "0",
            &src,
            &env.url("up/dst.bin"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for delay_ms in [500u64, 700] {
        wait_for_part(&env.p("root/up"), Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(delay_ms));
        kill9(&mut server);
        assert!(!env.p("root/up/dst.bin").exists());
        std::thread::sleep(Duration::from_millis(400));
        server = env.server();
    }
    let out = client.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_summary(&out);
    assert!(j["retries"].as_u64().unwrap() >= 2, "{j}");
    let sent = j["bytes_sent"].as_u64().unwrap();
    // Each server crash may lose what was not yet checkpointed and in flight.
    assert!(
        sent <= size as u64 + 2 * (40 << 20),
        "re-sent too much: {j}"
    );
    assert_eq!(std::fs::read(env.p("root/up/dst.bin")).unwrap(), data);
    kill9(&mut server);
}

#[test]
fn sigkill_of_a_download_then_resume() {
    let env = Env::new();
    std::fs::create_dir_all(env.p("root")).unwrap();
    let size = 32 << 20;
    let data = random_file(&env.p("root/remote.bin"), size, 3);
    let mut server = env.server();
    let dst = env.p("local.bin").display().to_string();
    let mut child = env
        .cp(&["--bwlimit", "16M", &env.url("remote.bin"), &dst])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_part(env.dir.path(), Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1200));
    kill9(&mut child);
    assert!(!env.p("local.bin").exists());
    let out = env
        .cp(&["--json", &env.url("remote.bin"), &dst])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_summary(&out);
    assert!(j["bytes_resumed"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(
        j["bytes_sent"].as_u64().unwrap() + j["bytes_resumed"].as_u64().unwrap(),
        size as u64
    );
    assert_eq!(std::fs::read(env.p("local.bin")).unwrap(), data);
    kill9(&mut server);
}

#[test]
fn exit_codes_distinguish_failures() {
    let env = Env::new();
    random_file(&env.p("f"), 10, 4);
    let f = env.p("f").display().to_string();
    // Usage.
    let out = env.cp(&[&f]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = env.cp(&[&f, "/tmp/x"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "local to local is a usage error"
    );
    // Unreachable after retries.
    let out = env
        .cp(&["--retry-max-attempts", "2", &f, &env.url("f")])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .last()
            .unwrap_or("")
            .starts_with("ferry: error:"),
        "{stderr}"
    );
    // Auth.
    let mut server = env.server();
    let out = Command::new(BIN)
        .args(["cp", "--no-progress", "--state-dir"])
        .arg(env.p("client-state"))
        .env("FERRY_TOKEN", "wrong")
        .args([&f, &env.url("f")])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Local I/O: a missing source.
    let out = env
        .cp(&[&env.p("missing").display().to_string(), &env.url("f")])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And a good copy with the token from the environment.
    let out = Command::new(BIN)
        .args(["cp", "--no-progress", "--state-dir"])
        .arg(env.p("client-state"))
        .env("FERRY_TOKEN", "s3cret")
        .args([&f, &env.url("f")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    kill9(&mut server);
}

#[test]
fn demo_runs_and_verifies() {
    let out = Command::new(BIN)
        .args(["demo", "--size-mib", "24", "--seed", "7"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("verified: the received file is byte-identical"),
        "{stdout}"
    );
    assert!(stdout.contains("re-sent"), "{stdout}");
}

#[test]
fn json_logs_carry_transfer_ids() {
    let env = Env::new();
    let mut server = env.server();
    random_file(&env.p("f"), 3 << 20, 5);
    let out = env
        .cp(&[
            "-v",
            "--log-format",
            "json",
            &env.p("f").display().to_string(),
            &env.url("f"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("\"transfer\""))
        .unwrap_or_else(|| panic!("no transfer id in logs: {stderr}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["transfer"].as_str().unwrap().len(), 32);
    kill9(&mut server);
}

#[test]
fn unreachable_copy_is_queued_and_the_agent_finishes_it_when_the_server_returns() {
    let env = Env::new();
    let data = random_file(&env.p("q.bin"), 5 << 20, 6);
    let src = env.p("q.bin").display().to_string();
    // Server down: cp gives up quickly and leaves the copy queued.
    let out = env
        .cp(&["--retry-max-attempts", "2", &src, &env.url("q/q.bin")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("queued as"), "{stderr}");
    let st = Command::new(BIN)
        .args(["status", "--state-dir"])
        .arg(env.p("client-state"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&st.stdout).contains("queued"),
        "{}",
        String::from_utf8_lossy(&st.stdout)
    );
    // Re-running the same cp joins the same entry rather than adding one.
    let _ = env
        .cp(&["--retry-max-attempts", "1", &src, &env.url("q/q.bin")])
        .output()
        .unwrap();
    let queue_dir = env.p("client-state/queue");
    assert_eq!(std::fs::read_dir(&queue_dir).unwrap().count(), 1);
    // The agent starts while the server is still down, then the server comes up.
    let agent = Command::new(BIN)
        .args([
            "agent",
            "--poll",
            "0.2",
            "--exit-when-empty",
            "--retry-max-attempts",
            "0",
            "--retry-initial",
            "50",
            "--retry-max-delay",
            "500",
            "--state-dir",
        ])
        .arg(env.p("client-state"))
        .arg("--token-file")
        .arg(env.p("token"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut server = env.server();
    let out = agent.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("completed") && stdout.contains("reconciliation"),
        "{stdout}"
    );
    assert_eq!(std::fs::read(env.p("root/q/q.bin")).unwrap(), data);
    assert_eq!(std::fs::read_dir(&queue_dir).unwrap().count(), 0);
    kill9(&mut server);
}

/// One resumable session whatever carries it: an upload killed (SIGKILL) on
/// QUIC, resumed and killed again on TCP, then on WebSocket, is finished over
/// `auto`; a download
/// the same the other way round. Nothing verified is sent twice.
#[test]
fn sigkill_then_resume_on_another_transport() {
    let env = Env::new();
    let mut server = env.server();
    let size = 48 << 20;
    let data = random_file(&env.p("src.bin"), size, 4);
    let src = env.p("src.bin").display().to_string();
    let ws_url = format!("ferry://127.0.0.1:{}/dst.bin", env.ws_port);
    for (transport, url) in [
        ("quic", env.url("dst.bin")),
        ("tcp", env.url("dst.bin")),
        ("ws", ws_url),
    ] {
        let mut child = env
            .cp(&["--transport", transport, "--bwlimit", "24M", &src, &url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_part(&env.p("root"), Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(500));
        kill9(&mut child);
        assert!(!env.p("root/dst.bin").exists());
    }
    let out = env
        .cp(&["--json", "--transport", "auto", &src, &env.url("dst.bin")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_summary(&out);
    let (sent, resumed) = (
        j["bytes_sent"].as_u64().unwrap(),
        j["bytes_resumed"].as_u64().unwrap(),
    );
    assert_eq!(sent + resumed, size as u64, "nothing sent twice: {j}");
    assert!(
        resumed >= 8 << 20,
        "two kills after 0.5 s each at 24 MiB/s: {j}"
    );
    assert_eq!(std::fs::read(env.p("root/dst.bin")).unwrap(), data);

    // Download: killed on TCP, finished with a ferry+quic:// URL.
    let dst = env.p("local.bin").display().to_string();
    let mut child = env
        .cp(&["--bwlimit", "24M", &env.url("dst.bin"), &dst])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_part(env.dir.path(), Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(800));
    kill9(&mut child);
    let quic_url = env.url("dst.bin").replace("ferry://", "ferry+quic://");
    let out = env.cp(&["--json", &quic_url, &dst]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_summary(&out);
    assert!(j["bytes_resumed"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(
        j["bytes_sent"].as_u64().unwrap() + j["bytes_resumed"].as_u64().unwrap(),
        size as u64
    );
    assert_eq!(std::fs::read(env.p("local.bin")).unwrap(), data);
    kill9(&mut server);
}

/// The server killed twice under a QUIC upload: the client reconnects over
/// QUIC to the restarted server and finishes.
#[test]
fn sigkill_of_the_server_during_a_quic_copy() {
    let env = Env::new();
    let mut server = env.server();
    let size = 32 << 20;
    let data = random_file(&env.p("src.bin"), size, 5);
    let src = env.p("src.bin").display().to_string();
    let client = env
        .cp(&[
            "--json",
            "--transport",
            "quic",
            "--stall-timeout",
            "3",
            "--bwlimit",
            "24M",
            "--retry-max-attempts",
            "0",
            &src,
            &env.url("q/dst.bin"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for delay_ms in [400u64, 600] {
        wait_for_part(&env.p("root/q"), Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(delay_ms));
        kill9(&mut server);
        assert!(!env.p("root/q/dst.bin").exists());
        std::thread::sleep(Duration::from_millis(400));
        server = env.server();
    }
    let out = client.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_summary(&out);
    // The second kill may land while the client is still reconnecting.
    assert!(j["retries"].as_u64().unwrap() >= 1, "{j}");
    assert_eq!(std::fs::read(env.p("root/q/dst.bin")).unwrap(), data);
    kill9(&mut server);
}

/// Requests that can never work fail at once with one line that says what is
/// wrong, exit 2 (usage) or 3 (refused), and leave nothing queued: they are
/// not outages to retry.
#[test]
fn hopeless_requests_fail_at_once_and_nothing_is_queued() {
    let env = Env::new();
    let mut server = env.server();
    random_file(&env.p("f"), 10, 9);
    let f = env.p("f").display().to_string();
    let long_path = format!("ferry://127.0.0.1:{}/{}", env.port, "d/".repeat(3000));
    let wrong_fp = format!("SHA256:{}", "ab".repeat(32));
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (
            vec![f.clone(), "ferry://127.0.0.1:http/x".into()],
            2,
            "not a number",
        ),
        (vec![f.clone(), "ferry://[::1/x".into()], 2, "unclosed"),
        (
            vec![f.clone(), "ferry://127.0.0.1:0/x".into()],
            2,
            "not a number",
        ),
        (
            vec![f.clone(), "ferry://127.0.0.1:65536/x".into()],
            2,
            "not a number",
        ),
        (
            vec![
                "--fingerprint".into(),
                "SHA256:xyz".into(),
                f.clone(),
                env.url("f"),
            ],
            2,
            "not a server fingerprint",
        ),
        (vec![f.clone(), long_path], 2, "at most 4096"),
        (
            vec!["--fingerprint".into(), wrong_fp, f.clone(), env.url("f")],
            3,
            "--fingerprint",
        ),
    ];
    let mut commands: Vec<(Command, String, i32, &str)> = cases
        .into_iter()
        .map(|(args, code, says)| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            (env.cp(&args), args.join(" "), code, says)
        })
        .collect();
    let mut long_token = Command::new(BIN);
    long_token
        .args(["cp", "--no-progress", "--state-dir"])
        .arg(env.p("client-state"))
        .env("FERRY_TOKEN", "t".repeat(5000))
        .args([&f, &env.url("f")]);
    commands.push((
        long_token,
        "FERRY_TOKEN=5000 bytes".into(),
        2,
        "token is 5000 bytes",
    ));
    for (mut cmd, args, code, says) in commands {
        let start = Instant::now();
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{args:?} took {:?}",
            start.elapsed()
        );
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("known_servers"), "{args:?}: {stderr}");
        assert!(!stderr.contains("queued"), "{args:?}: {stderr}");
        let queued = std::fs::read_dir(env.p("client-state/queue"))
            .map(|rd| rd.count())
            .unwrap_or(0);
        assert_eq!(queued, 0, "{args:?} left a queue entry");
    }
    kill9(&mut server);
}

/// A state store cut short (a crash of the disk, a full disk) stops `serve`
/// and `cp` with one line that names the file and what to do: exit 6, never
/// a panic (exit 101), nothing written.
#[test]
fn a_damaged_state_store_is_reported_not_a_panic() {
    let env = Env::new();
    let mut server = env.server();
    random_file(&env.p("f"), 300_000, 10);
    let f = env.p("f").display().to_string();
    let out = env.cp(&[&f, &env.url("f")]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    kill9(&mut server);
    let cut = |p: PathBuf| {
        let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let len = file.metadata().unwrap().len();
        file.set_len(len / 2).unwrap();
        p
    };
    let client_db = cut(env.p("client-state/state.redb"));
    let server_db = cut(env.p("server-state/state.redb"));
    let check = |out: std::process::Output, db: &Path, code: i32| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains(&db.display().to_string()), "{stderr}");
        assert!(stderr.contains("damaged"), "{stderr}");
    };
    let out = Command::new(BIN)
        .args(["serve", "--root"])
        .arg(env.p("root"))
        .args([
            "--listen",
            &format!("127.0.0.1:{}", env.port),
            "--state-dir",
        ])
        .arg(env.p("server-state"))
        .arg("--token-file")
        .arg(env.p("token"))
        .output()
        .unwrap();
    // `serve` cannot start (8); `cp` meets a local I/O error (6).
    check(out, &server_db, 8);
    check(
        env.cp(&[&f, &env.url("g")]).output().unwrap(),
        &client_db,
        6,
    );
}
