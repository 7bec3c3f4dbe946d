//! Real-process SFTP test: `ferry cp` to a real OpenSSH sshd (started here on
//! a free loopback port with its own keys), killed with SIGKILL mid-upload,
//! then run again: only the unverified rest is re-sent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_ferry");
const MIB: u64 = 1 << 20;

struct Sshd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

fn start_sshd() -> Option<Sshd> {
    let bin = PathBuf::from("/usr/sbin/sshd");
    if !bin.exists() {
        eprintln!("sshd not installed; run scripts/test.sh (it installs openssh-server)");
        return None;
    }
    let _ = std::fs::create_dir_all("/run/sshd");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    keygen(&d.join("hostkey"));
    keygen(&d.join("clientkey"));
    std::fs::copy(d.join("clientkey.pub"), d.join("authorized_keys")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = [
        "/usr/lib/openssh/sftp-server",
        "/usr/libexec/openssh/sftp-server",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .unwrap_or("internal-sftp");
    let cfg = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile none\nAuthorizedKeysFile {}\n\
         PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         UsePAM no\nStrictModes no\nUseDNS no\nSubsystem sftp {server}\nLogLevel ERROR\n",
        d.join("hostkey").display(),
        d.join("authorized_keys").display(),
    );
    std::fs::write(d.join("sshd_config"), cfg).unwrap();
    let child = Command::new(bin)
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Some(Sshd { child, port, dir })
}

fn json_summary(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "last line is not JSON ({e}): {last}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn sigkill_mid_upload_then_resume_resends_little() {
    let Some(s) = start_sshd() else { return };
    let d = s.dir.path();
    let src = d.join("src.bin");
    let size = 128 * MIB;
    let mut body = vec![0u8; size as usize];
    rand::rngs::StdRng::seed_from_u64(11).fill_bytes(&mut body);
    std::fs::write(&src, &body).unwrap();
    let dst = d.join("dst.bin");
    let part = d.join("dst.bin.part");
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let url = format!("sftp://{user}@127.0.0.1:{}/{}", s.port, dst.display());
    let cp = |json: bool| {
        let mut c = Command::new(BIN);
        c.arg("cp");
        if json {
            c.arg("--json");
        }
        c.arg("--no-progress")
            .arg("--state-dir")
            .arg(d.join("state"))
            .arg("-i")
            .arg(d.join("clientkey"))
            .arg("--known-hosts")
            .arg(d.join("known_hosts"))
            .arg("--accept-new-host-key")
            .arg(&src)
            .arg(&url)
            .env_remove("SSH_AUTH_SOCK");
        c
    };
    // An unknown host key is refused with exit code 3 (auth) and nothing is written.
    let out = Command::new(BIN)
        .args([
            "cp",
            "--no-progress",
            "--retry-max-attempts",
            "1",
            "--state-dir",
        ])
        .arg(d.join("state"))
        .arg("-i")
        .arg(d.join("clientkey"))
        .arg("--known-hosts")
        .arg(d.join("known_hosts"))
        .arg(&src)
        .arg(&url)
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--accept-new-host-key"));
    assert!(!part.exists());

    let mut child = cp(false)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once the first checkpoint (32 MiB) must be recorded: a checkpoint's
    // flush runs on a side session while later ranges are written, and the
    // next checkpoint (64 MiB acknowledged) waits for it and records it. The
    // part on the server runs ahead of what is acknowledged by at most the
    // requests in flight (16 MiB) and the range being issued (8 MiB), so a
    // part of 96 MiB means the record holds 32 MiB or more, however slow the
    // server's disk.
    let started = Instant::now();
    loop {
        let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if have >= 96 * MIB {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "upload finished before it could be killed"
        );
        assert!(started.elapsed() < Duration::from_secs(60), "upload stuck");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL, our own child
    child.wait().unwrap();
    assert!(!dst.exists(), "no final file after a kill");

    let out = cp(true).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_summary(&out);
    let sent = j["bytes_sent"].as_u64().unwrap();
    let resumed = j["bytes_resumed"].as_u64().unwrap();
    assert!(resumed >= 32 * MIB, "{j}");
    assert_eq!(sent + resumed, size, "{j}");
    assert_eq!(j["per_file"][0]["outcome"], "resumed", "{j}");
    assert_eq!(j["per_file"][0]["offset"], resumed, "{j}");
    // Every byte proven: by the server's hashing where it can run a hash
    // tool over SSH, else by reading back.
    let proofs = [
        "b3sum",
        "openssl-sha256",
        "sha256sum",
        "shasum",
        "check-file",
        "readback",
    ];
    let by = j["per_file"][0]["verified_by"].as_str().unwrap_or_default();
    assert!(proofs.contains(&by), "{j}");
    assert!(!part.exists());
    assert_eq!(std::fs::read(&dst).unwrap(), body);
    assert_eq!(
        j["digest"].as_str().unwrap(),
        blake3::hash(&body).to_hex().as_str()
    );
    // The human output names what happened to the file.
    std::fs::remove_file(&dst).unwrap();
    let out = cp(false).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        proofs
            .iter()
            .any(|p| stdout.contains(&format!(": fresh; verified by {p}"))),
        "{stdout}"
    );
    eprintln!("bytes re-sent after SIGKILL: {sent} of {size} ({resumed} resumed)");
}

/// Runs ARGV on a new pseudo-terminal; each time the output asks for a
/// passphrase, types the next of ANSWERS (`|`-separated) and Enter. Prints everything the terminal showed
/// and exits with the child's code.
const PTY_DRIVER: &str = r#"
import os, pty, select, sys
answers = [a.encode() for a in sys.argv[1].split('|')]
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
out, sent = b'', 0
while True:
    r, _, _ = select.select([fd], [], [], 60)
    if not r:
        break
    try:
        d = os.read(fd, 4096)
    except OSError:
        break
    if not d:
        break
    out += d
    if sent < len(answers) and out.count(b'passphrase for key') > sent:
        os.write(fd, answers[sent] + b'\n')
        sent += 1
_, st = os.waitpid(pid, 0)
sys.stdout.buffer.write(out)
sys.exit(os.waitstatus_to_exitcode(st))
"#;

#[test]
fn encrypted_key_prompts_on_a_terminal_and_says_the_env_var_otherwise() {
    let Some(s) = start_sshd() else { return };
    let d = s.dir.path();
    let key = d.join("enckey");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "open sesame", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let mut ak = std::fs::read_to_string(d.join("authorized_keys")).unwrap();
    ak.push_str(&std::fs::read_to_string(d.join("enckey.pub")).unwrap());
    std::fs::write(d.join("authorized_keys"), ak).unwrap();
    let src = d.join("src.txt");
    std::fs::write(&src, b"behind a passphrase").unwrap();
    let dst = d.join("dst.txt");
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let url = format!("sftp://{user}@127.0.0.1:{}/{}", s.port, dst.display());
    let args = |c: &mut Command| {
        c.args([
            "cp",
            "--no-progress",
            "--retry-max-attempts",
            "1",
            "--state-dir",
        ])
        .arg(d.join("state"))
        .arg("-i")
        .arg(&key)
        .arg("--known-hosts")
        .arg(d.join("known_hosts"))
        .arg("--accept-new-host-key")
        .arg(&src)
        .arg(&url)
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("FERRY_SSH_PASSPHRASE");
    };

    // No terminal: no prompt; the error names the variable (exit 3, auth).
    let mut c = Command::new(BIN);
    args(&mut c);
    let out = c.stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("FERRY_SSH_PASSPHRASE"), "{stderr}");
    assert!(!dst.exists());

    // A terminal: asked there, the answer not echoed; a wrong one is asked again.
    let py = match Command::new("python3").arg("--version").output() {
        Ok(o) if o.status.success() => "python3",
        _ => {
            eprintln!("python3 missing; the terminal prompt is not tested");
            return;
        }
    };
    let mut c = Command::new(py);
    c.arg("-c")
        .arg(PTY_DRIVER)
        .arg("not it|open sesame")
        .arg(BIN);
    args(&mut c);
    let out = c.stdin(Stdio::null()).output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("Enter passphrase for key {}", key.display())),
        "{shown}"
    );
    assert!(!shown.contains("open sesame"), "passphrase echoed: {shown}");
    assert!(!shown.contains("not it"), "passphrase echoed: {shown}");
    assert!(shown.contains("Bad passphrase, try again"), "{shown}");
    assert_eq!(std::fs::read(&dst).unwrap(), b"behind a passphrase");
}
