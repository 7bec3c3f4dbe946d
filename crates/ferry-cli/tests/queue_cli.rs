//! Real-process tests of the durable queue: `ferry agent`, `ferry resume`,
//! `ferry status` and a re-run `ferry cp` against a `ferry serve` on
//! loopback, with queue entries written the way `ferry cp` leaves them.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_ferry");

struct Env {
    dir: TempDir,
    port: u16,
}

impl Env {
    fn new() -> Env {
        let dir = TempDir::new().unwrap();
        std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Env { dir, port }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn state(&self) -> PathBuf {
        self.p("client-state")
    }

    fn queue_dir(&self) -> PathBuf {
        self.state().join("queue")
    }

    fn url(&self, path: &str) -> String {
        format!("ferry://127.0.0.1:{}/{}", self.port, path)
    }

    /// Starts `ferry serve` (with the token unless `no_auth`) and waits until it listens.
    fn server(&self, no_auth: bool) -> Child {
        let mut c = Command::new(BIN);
        c.args(["serve", "--no-quic", "--create-root", "--root"])
            .arg(self.p("root"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--state-dir")
            .arg(self.p("server-state"));
        if no_auth {
            c.arg("--no-auth");
        } else {
            c.arg("--token-file").arg(self.p("token"));
        }
        let mut child = c
            .env_remove("FERRY_TOKEN")
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

    /// A client command (`agent`, `resume`, `cp`) on this state dir, without a token.
    fn client(&self, cmd: &str) -> Command {
        let mut c = Command::new(BIN);
        c.arg(cmd)
            .arg("--state-dir")
            .arg(self.state())
            .args([
                "--no-progress",
                "--retry-initial",
                "20",
                "--retry-max-delay",
                "300",
            ])
            .env_remove("FERRY_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn agent(&self) -> Command {
        let mut c = self.client("agent");
        c.args(["--poll", "0.1", "--exit-when-empty"]);
        c
    }

    fn status(&self) -> String {
        let out = Command::new(BIN)
            .arg("status")
            .arg("--state-dir")
            .arg(self.state())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A source file of `size` bytes and a queued copy of it to `remote`,
    /// as a `ferry cp` that gave up leaves it. Returns the entry id.
    fn queued_copy(&self, n: u64, size: usize, remote: &str) -> String {
        let src = self.p(&format!("src{n}.bin"));
        let data: Vec<u8> = (0..size).map(|i| (i as u64 * 31 + n) as u8).collect();
        std::fs::write(&src, data).unwrap();
        let id = format!("{:016x}", 0xfe00 + n);
        let entry = serde_json::json!({
            "id": id,
            "srcs": [src.display().to_string()],
            "dst": self.url(remote),
            "recursive": false,
            "alg": "blake3",
            "state": "queued",
            "attempts": 1,
            "last_error": "cannot connect",
            "created_unix": 1_700_000_000u64 + n,
            "updated_unix": 1_700_000_000u64 + n,
            "next_attempt_unix": 0,
            "pid": 0,
        });
        std::fs::create_dir_all(self.queue_dir()).unwrap();
        std::fs::write(
            self.queue_dir().join(format!("{id}.json")),
            serde_json::to_vec_pretty(&entry).unwrap(),
        )
        .unwrap();
        id
    }

    fn assert_delivered(&self, n: u64, remote: &str) {
        assert_eq!(
            std::fs::read(self.p(&format!("src{n}.bin"))).unwrap(),
            std::fs::read(self.p("root").join(remote)).unwrap(),
            "{remote}"
        );
    }
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits for `child` to exit (killing it after `limit`) and collects its output.
fn finish(mut child: Child, limit: Duration) -> Output {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > limit {
            kill9(&mut child);
            let stdout = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
            panic!("still running after {limit:?}; stdout:\n{stdout}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Lines saying a queue entry was delivered.
fn completions(stdout: &str) -> usize {
    stdout
        .lines()
        .filter(|l| l.starts_with("completed "))
        .count()
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_agents_started_together_deliver_each_queued_copy_once() {
    let env = Env::new();
    let ids: Vec<String> = (0..4)
        .map(|n| env.queued_copy(n, 300 << 10, &format!("d/f{n}.bin")))
        .collect();
    let mut server = env.server(true);
    let a = env.agent().spawn().unwrap();
    let b = env.agent().spawn().unwrap();
    let outs = [
        finish(a, Duration::from_secs(60)),
        finish(b, Duration::from_secs(60)),
    ];
    let mut codes: Vec<Option<i32>> = outs.iter().map(|o| o.status.code()).collect();
    codes.sort();
    let all = outs
        .iter()
        .map(|o| format!("{}{}", text(&o.stdout), text(&o.stderr)))
        .collect::<Vec<_>>()
        .join("\n----\n");
    assert_eq!(codes, [Some(0), Some(9)], "{all}");
    let loser = outs.iter().find(|o| o.status.code() == Some(9)).unwrap();
    let msg = text(&loser.stderr);
    assert!(
        msg.contains("another ferry agent (pid ") && msg.contains("is draining"),
        "{msg}"
    );
    let delivered: usize = outs.iter().map(|o| completions(&text(&o.stdout))).sum();
    assert_eq!(delivered, ids.len(), "each copy delivered once: {all}");
    let winner = text(&outs.iter().find(|o| o.status.success()).unwrap().stdout);
    for id in &ids {
        assert!(winner.contains(&format!("completed {id}")), "{winner}");
    }
    assert!(winner.contains("nothing missing"), "{winner}");
    for n in 0..4 {
        env.assert_delivered(n, &format!("d/f{n}.bin"));
    }
    assert_eq!(std::fs::read_dir(env.queue_dir()).unwrap().count(), 0);
    kill9(&mut server);
}

#[test]
fn resume_and_a_rerun_cp_refuse_the_entry_an_agent_is_running() {
    let env = Env::new();
    let id = env.queued_copy(0, 6 << 20, "slow.bin");
    let mut server = env.server(true);
    let mut agent = env.agent();
    agent.args(["--bwlimit", "1M"]);
    let agent = agent.spawn().unwrap();
    wait_until(
        Duration::from_secs(20),
        "the agent to run the entry",
        || env.status().contains(&format!("{id} running")),
    );
    let out = env.client("resume").arg(&id).output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "queue entry {id} is being run by another ferry process (pid {})",
            agent.id()
        )),
        "{stderr}"
    );
    let src = env.p("src0.bin").display().to_string();
    let out = env
        .client("cp")
        .args([&src, &env.url("slow.bin")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(9), "{}", text(&out.stderr));
    let out = finish(agent, Duration::from_secs(60));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert_eq!(completions(&stdout), 1, "{stdout}");
    env.assert_delivered(0, "slow.bin");
    kill9(&mut server);
}

#[test]
fn an_agent_without_the_token_keeps_the_queue_and_says_why() {
    let env = Env::new();
    let id = env.queued_copy(0, 100 << 10, "t.bin");
    let mut server = env.server(false);
    let mut agent = env
        .agent()
        .args(["--retry-max-attempts", "1"])
        .spawn()
        .unwrap();
    // Read the agent's output as it comes, then stop it with ^C.
    let seen = Arc::new(Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        let out = agent.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut s = seen.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        })
    };
    let exited = (|| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Some(st) = agent.try_wait().unwrap() {
                return Some(st);
            }
            if seen.lock().unwrap().contains("reconciliation") {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no report: {}", seen.lock().unwrap());
    })();
    if exited.is_none() {
        std::thread::sleep(Duration::from_millis(300));
        let st = Command::new("kill")
            .args(["-INT", &agent.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }
    let start = Instant::now();
    let status = loop {
        if let Some(st) = agent.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(20) {
            kill9(&mut agent);
            panic!("the agent ignored ^C: {}", seen.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().unwrap();
    let stdout = seen.lock().unwrap().clone();
    assert!(status.success(), "{stdout}");
    assert!(
        stdout.contains("server refused our token: set FERRY_TOKEN or --token-file"),
        "{stdout}"
    );
    assert!(!stdout.contains("nothing missing"), "{stdout}");
    assert!(!stdout.contains("failed for good"), "{stdout}");
    assert!(stdout.contains("1 still queued"), "{stdout}");
    assert!(
        env.queue_dir().join(format!("{id}.json")).exists(),
        "the entry must stay queued"
    );
    let st = env.status();
    assert!(
        st.contains(&id) && st.contains("server refused our token"),
        "{st}"
    );
    // With the token it completes.
    let out = env
        .agent()
        .arg("--token-file")
        .arg(env.p("token"))
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("nothing missing"), "{stdout}");
    env.assert_delivered(0, "t.bin");
    kill9(&mut server);
}

#[test]
fn damaged_queue_entries_are_reported_by_status_and_the_agent_and_kept() {
    let env = Env::new();
    let id = env.queued_copy(0, 10, "x.bin");
    let q = env.queue_dir();
    let body = std::fs::read(q.join(format!("{id}.json"))).unwrap();
    std::fs::write(q.join("truncated.json"), &body[..body.len() / 3]).unwrap();
    std::fs::write(q.join("garbage.json"), "\u{1}\u{2}garbage").unwrap();
    std::fs::remove_file(q.join(format!("{id}.json"))).unwrap();

    let st = env.status();
    for name in ["truncated.json", "garbage.json"] {
        let path = q.join(name).display().to_string();
        assert!(
            st.lines()
                .any(|l| l.starts_with("damaged queue entry") && l.contains(&path)),
            "{st}"
        );
    }
    assert!(!st.contains("no unfinished transfers"), "{st}");

    let out = finish(env.agent().spawn().unwrap(), Duration::from_secs(30));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(6), "{stdout}{}", text(&out.stderr));
    assert!(!stdout.contains("nothing missing"), "{stdout}");
    assert!(stdout.contains("2 damaged"), "{stdout}");
    for name in ["truncated.json", "garbage.json"] {
        assert!(
            stdout.contains(&q.join(name).display().to_string()),
            "{stdout}"
        );
        assert!(q.join(name).exists(), "{name} must be kept");
    }
    assert!(
        text(&out.stderr).contains("damaged"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_duplicated_entry_is_delivered_once_and_the_agent_exits() {
    let env = Env::new();
    let id = env.queued_copy(0, 100 << 10, "dup.bin");
    std::fs::copy(
        env.queue_dir().join(format!("{id}.json")),
        env.queue_dir().join("dup-of-it.json"),
    )
    .unwrap();
    let mut server = env.server(true);
    let out = finish(env.agent().spawn().unwrap(), Duration::from_secs(30));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert_eq!(completions(&stdout), 1, "{stdout}");
    assert!(stdout.contains("nothing missing"), "{stdout}");
    assert_eq!(std::fs::read_dir(env.queue_dir()).unwrap().count(), 0);
    env.assert_delivered(0, "dup.bin");
    kill9(&mut server);
}

#[test]
fn resume_forget_removes_a_queued_copy_on_request() {
    let env = Env::new();
    let id = env.queued_copy(0, 10, "x.bin");
    let out = env
        .client("resume")
        .args(["--forget", &id])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("forgot {id}")));
    assert_eq!(std::fs::read_dir(env.queue_dir()).unwrap().count(), 0);
    assert!(env.status().contains("no unfinished transfers"));
}
