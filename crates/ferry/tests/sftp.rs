//! SFTP against a real OpenSSH `sshd` that each test starts on a free
//! loopback port with its own config, host key and authorized_keys.
//! (`scripts/test.sh` installs openssh-server when `sshd` is missing.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ferry::copy::{copy, CopyOptions, CopySummary};
use ferry::progress::Progress;
use ferry::sftp::{RestartReason, Resume, SftpOptions, SshConfig, VerifiedBy, Verify};
use ferry::Error;

const MIB: usize = 1 << 20;
const RANGE: usize = 8 * MIB;

struct Sshd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // Our own child, by PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
}

fn sshd_bin() -> Option<PathBuf> {
    ["/usr/sbin/sshd", "/usr/local/sbin/sshd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn sftp_server() -> String {
    for p in [
        "/usr/lib/openssh/sftp-server",
        "/usr/libexec/openssh/sftp-server",
        "/usr/libexec/sftp-server",
    ] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "internal-sftp".into()
}

/// Python wrapper around sftp-server that refuses a handle's first write
/// unless it is at offset 0: an object-storage gateway that cannot write
/// into an existing object.
const NO_OFFSET_WRAPPER: &str = r#"#!/usr/bin/env python3
import os, struct, subprocess, sys, threading
p = subprocess.Popen([SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
inp, out, lock = sys.stdin.buffer, sys.stdout.buffer, threading.Lock()
def pump():
    while True:
        d = p.stdout.read1(65536)
        if not d: break
        with lock:
            out.write(d); out.flush()
    os._exit(0)
threading.Thread(target=pump, daemon=True).start()
def readn(n):
    b = b''
    while len(b) < n:
        c = inp.read(n - len(b))
        if not c: os._exit(0)
        b += c
    return b
seen = set()
while True:
    hdr = readn(4); body = readn(struct.unpack('>I', hdr)[0])
    if body[0] == 6:
        rid = body[1:5]; hl = struct.unpack('>I', body[5:9])[0]; h = body[9:9 + hl]
        off = struct.unpack('>Q', body[9 + hl:17 + hl])[0]
        if h not in seen:
            seen.add(h)
            if off != 0:
                msg = b'offset writes not supported'
                st = bytes([101]) + rid + struct.pack('>I', 8) + struct.pack('>I', len(msg)) + msg + struct.pack('>I', 0)
                with lock:
                    out.write(struct.pack('>I', len(st)) + st); out.flush()
                continue
    p.stdin.write(hdr + body); p.stdin.flush()
"#;

/// Python wrapper around sftp-server that adds the `check-file-handle`
/// extension OpenSSH lacks (sha256 over a handle's range, computed from the
/// file on disk), as ProFTPD and MINA SSHD offer it. With LIE set it answers
/// a wrong digest.
const CHECK_FILE_WRAPPER: &str = r#"#!/usr/bin/env python3
import hashlib, os, struct, subprocess, sys, threading
LIE = LIE_FLAG
p = subprocess.Popen([SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
inp, out, lock = sys.stdin.buffer, sys.stdout.buffer, threading.Lock()
opening, paths = {}, {}
def readn(f, n):
    b = b''
    while len(b) < n:
        c = f.read(n - len(b))
        if not c: os._exit(0)
        b += c
    return b
def sstr(b, at):
    n = struct.unpack('>I', b[at:at + 4])[0]
    return b[at + 4:at + 4 + n], at + 4 + n
def pack(*parts):
    return b''.join(struct.pack('>I', len(x)) + x for x in parts)
def send(body):
    with lock:
        out.write(struct.pack('>I', len(body)) + body); out.flush()
def pump():
    while True:
        body = readn(p.stdout, struct.unpack('>I', readn(p.stdout, 4))[0])
        if body[0] == 2:
            body += pack(b'check-file-handle', b'1')
        elif body[0] == 102:
            rid = body[1:5]; h, _ = sstr(body, 5)
            if rid in opening: paths[h] = opening.pop(rid)
        send(body)
threading.Thread(target=pump, daemon=True).start()
while True:
    hdr = readn(inp, 4); body = readn(inp, struct.unpack('>I', hdr)[0])
    if body[0] == 3:
        name, _ = sstr(body, 5); opening[body[1:5]] = name
    elif body[0] == 200:
        rid = body[1:5]; name, at = sstr(body, 5)
        if name == b'check-file-handle':
            h, at = sstr(body, at); algs, at = sstr(body, at)
            off, ln = struct.unpack('>QQ', body[at:at + 16])
            with open(paths[h], 'rb') as f:
                f.seek(off); data = f.read(ln) if ln else f.read()
            d = bytearray(hashlib.sha256(data).digest())
            if LIE: d[0] ^= 1
            send(bytes([201]) + rid + pack(b'check-file', b'sha256') + bytes(d))
            continue
    p.stdin.write(hdr + body); p.stdin.flush()
"#;

#[derive(PartialEq)]
enum Mode {
    Plain,
    /// The wrapper below: a handle's first write must be at offset 0.
    NoOffsetWrites,
    /// sftp-server -P posix-rename: the extension is announced but refused.
    NoPosixRename,
    /// The wrapper above: `check-file-handle` offered; `true`: it lies.
    CheckFile(bool),
    /// `MaxSessions 1`: no side session for checkpoint flushes.
    OneSession,
}

fn start_sshd(mode: Mode) -> Option<Sshd> {
    let Some(bin) = sshd_bin() else {
        eprintln!("sshd not installed; run scripts/test.sh (it installs openssh-server)");
        return None;
    };
    let _ = std::fs::create_dir_all("/run/sshd");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    keygen(&d.join("hostkey"));
    keygen(&d.join("clientkey"));
    keygen(&d.join("otherkey"));
    std::fs::copy(d.join("clientkey.pub"), d.join("authorized_keys")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let subsystem = if mode == Mode::NoPosixRename {
        format!("{} -P posix-rename", sftp_server())
    } else if let Mode::CheckFile(lie) = mode {
        let w = d.join("sftp-wrapper.py");
        let script = CHECK_FILE_WRAPPER
            .replace("SERVER", &format!("{:?}", sftp_server()))
            .replace("LIE_FLAG", if lie { "True" } else { "False" });
        std::fs::write(&w, script).unwrap();
        std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        w.display().to_string()
    } else if mode == Mode::NoOffsetWrites {
        let w = d.join("sftp-wrapper.py");
        std::fs::write(
            &w,
            NO_OFFSET_WRAPPER.replace("SERVER", &format!("{:?}", sftp_server())),
        )
        .unwrap();
        std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        w.display().to_string()
    } else {
        sftp_server()
    };
    let cfg = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile none\nAuthorizedKeysFile {ak}\n\
         PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         UsePAM no\nStrictModes no\nUseDNS no\nSubsystem sftp {subsystem}\nLogLevel ERROR\n{extra}",
        hk = d.join("hostkey").display(),
        ak = d.join("authorized_keys").display(),
        extra = if mode == Mode::OneSession {
            "MaxSessions 1\n"
        } else {
            ""
        },
    );
    std::fs::write(d.join("sshd_config"), cfg).unwrap();
    let child = Command::new(bin)
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sshd");
    // Readiness: wait until the port accepts (bounded).
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let host_pub = std::fs::read_to_string(d.join("hostkey.pub")).unwrap();
    let mut parts = host_pub.split_whitespace();
    let (alg, key) = (parts.next().unwrap(), parts.next().unwrap());
    std::fs::write(
        d.join("known_hosts"),
        format!("[127.0.0.1]:{port} {alg} {key}\n"),
    )
    .unwrap();
    Some(Sshd { child, port, dir })
}

impl Sshd {
    fn url(&self, path: &Path) -> String {
        format!(
            "sftp://{}@127.0.0.1:{}/{}",
            user(),
            self.port,
            path.display()
        )
    }
    fn ssh(&self) -> SshConfig {
        SshConfig {
            identities: vec![self.dir.path().join("clientkey")],
            passphrase: None,
            passphrase_prompt: None,
            known_hosts: Some(self.dir.path().join("known_hosts")),
            accept_new_host_key: false,
            no_agent: true,
            agent_socket: None,
            home: None,
            default_user: None,
        }
    }
    fn opts(&self) -> SftpOptions {
        SftpOptions {
            ssh: self.ssh(),
            verify: Verify::Tail,
            stop_after_ranges: None,
        }
    }
}

fn user() -> String {
    std::env::var("USER").unwrap_or_else(|_| "root".into())
}

fn copy_opts(state: &Path) -> CopyOptions {
    CopyOptions {
        recursive: true,
        follow_links: false,
        state_dir: state.to_path_buf(),
        client: ferry::client::ClientConfig {
            transport: Default::default(),
            direct_io: true,
            streams: ferry::lanes::Streams::Auto,
            token: None,
            fingerprint: None,
            known_servers: ferry::tls::KnownServers::new(state.join("known_servers")),
            connect_timeout: Duration::from_secs(5),
            via: None,
            bwlimit: 0,
            timeouts: Default::default(),
            dialer: std::sync::Arc::new(ferry::transport::tcp::TcpDialer::default()),
        },
        retry: ferry::retry::RetryPolicy {
            initial: Duration::from_millis(10),
            multiplier: 2.0,
            max_delay: Duration::from_millis(50),
            max_attempts: 2,
            budget: None,
        },
        alg: ferry_proto::HashAlg::Blake3,
        seed: None,
        sftp: Default::default(),
    }
}

async fn cp(src: &str, dst: &str, state: &Path, o: &SftpOptions) -> Result<CopySummary, Error> {
    copy(
        &[src.to_string()],
        dst,
        &CopyOptions {
            sftp: o.clone(),
            ..copy_opts(state)
        },
        Arc::new(Progress::default()),
    )
    .await
}

/// The outcome of a one-file copy, checked against its JSON form too.
fn outcome(sum: &CopySummary) -> Resume {
    assert_eq!(sum.per_file.len(), 1, "{:?}", sum.per_file);
    let r = sum.per_file[0].resume;
    let j = serde_json::to_value(sum).unwrap();
    let f = &j["per_file"][0];
    let tag = match r {
        Resume::Fresh => "fresh",
        Resume::Resumed { .. } => "resumed",
        Resume::Restarted { .. } => "restarted",
        Resume::Repaired { .. } => "repaired",
        Resume::FallbackRestart { .. } => "fallback_restart",
        Resume::AlreadyComplete => "already_complete",
    };
    assert_eq!(f["outcome"], tag, "{j}");
    assert!(f["verified_by"].is_string(), "{j}");
    match r {
        Resume::Resumed { offset } => assert_eq!(f["offset"], offset, "{j}"),
        Resume::Repaired { offset, recorded } => {
            assert_eq!(f["offset"], offset, "{j}");
            assert_eq!(f["recorded"], recorded, "{j}");
        }
        _ => {}
    }
    r
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
        .collect()
}

#[tokio::test]
async fn upload_and_download_interesting_sizes() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    std::fs::create_dir_all(t.path().join("remote")).unwrap();
    for (i, n) in [0, 1, RANGE - 1, RANGE, RANGE + 1, 3 * RANGE + 12345]
        .into_iter()
        .enumerate()
    {
        let src = t.path().join(format!("src{i}"));
        let body = data(n, i as u8);
        std::fs::write(&src, &body).unwrap();
        let remote = t.path().join("remote").join(format!("f{i}"));
        let sum = cp(src.to_str().unwrap(), &s.url(&remote), &state, &s.opts())
            .await
            .unwrap();
        assert_eq!(sum.bytes_sent, n as u64);
        assert_eq!(outcome(&sum), Resume::Fresh);
        assert_eq!(sum.per_file[0].verified_by, VerifiedBy::Readback);
        assert_eq!(std::fs::read(&remote).unwrap(), body, "upload size {n}");
        assert!(!Path::new(&format!("{}.part", remote.display())).exists());
        let back = t.path().join(format!("back{i}"));
        let sum2 = cp(&s.url(&remote), back.to_str().unwrap(), &state, &s.opts())
            .await
            .unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), body, "download size {n}");
        assert_eq!(outcome(&sum2), Resume::Fresh);
        assert_eq!(sum.digest, sum2.digest);
        assert_eq!(sum.digest, blake3::hash(&body).to_hex().to_string());
    }
}

#[tokio::test]
async fn recursive_upload_and_download() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let tree = t.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("top"), b"top").unwrap();
    std::fs::write(tree.join("a/b/deep"), data(100_000, 3)).unwrap();
    let remote = t.path().join("remote");
    std::fs::create_dir_all(&remote).unwrap();
    cp(tree.to_str().unwrap(), &s.url(&remote), &state, &s.opts())
        .await
        .unwrap();
    assert_eq!(std::fs::read(remote.join("tree/top")).unwrap(), b"top");
    assert_eq!(
        std::fs::read(remote.join("tree/a/b/deep")).unwrap(),
        data(100_000, 3)
    );
    let back = t.path().join("back");
    std::fs::create_dir_all(&back).unwrap();
    cp(
        &s.url(&remote.join("tree")),
        back.to_str().unwrap(),
        &state,
        &s.opts(),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(back.join("tree/a/b/deep")).unwrap(),
        data(100_000, 3)
    );
}

/// Uploads `body` but stops (as a crash would) after `ranges` checkpoints.
async fn interrupted_upload(s: &Sshd, src: &Path, remote: &Path, state: &Path, ranges: usize) {
    let mut o = s.opts();
    o.stop_after_ranges = Some(ranges);
    let e = cp(src.to_str().unwrap(), &s.url(remote), state, &o)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("stopped for a test"), "{e}");
    assert!(!remote.exists());
    let part = PathBuf::from(format!("{}.part", remote.display()));
    let size = std::fs::metadata(src).unwrap().len();
    assert!(std::fs::metadata(&part).unwrap().len() >= ((ranges * RANGE) as u64).min(size));
}

#[tokio::test]
async fn resume_resends_only_the_rest() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let src = t.path().join("src");
    let body = data(2 * RANGE + 5 * MIB, 7);
    std::fs::write(&src, &body).unwrap();
    let remote = t.path().join("dst");
    interrupted_upload(&s, &src, &remote, &state, 2).await;
    let sum = cp(src.to_str().unwrap(), &s.url(&remote), &state, &s.opts())
        .await
        .unwrap();
    assert_eq!(sum.bytes_resumed, (2 * RANGE) as u64);
    assert_eq!(sum.bytes_sent, (5 * MIB) as u64);
    assert_eq!(
        outcome(&sum),
        Resume::Resumed {
            offset: (2 * RANGE) as u64
        }
    );
    assert_eq!(std::fs::read(&remote).unwrap(), body);

    // A crash after the last range was recorded but before the rename:
    // nothing is re-sent, the part is verified and renamed.
    std::fs::remove_file(&remote).unwrap();
    interrupted_upload(&s, &src, &remote, &state, 3).await;
    let sum = cp(src.to_str().unwrap(), &s.url(&remote), &state, &s.opts())
        .await
        .unwrap();
    assert_eq!(sum.bytes_resumed, body.len() as u64);
    assert_eq!(sum.bytes_sent, 0);
    assert_eq!(outcome(&sum), Resume::AlreadyComplete);
    assert_eq!(std::fs::read(&remote).unwrap(), body);
}

/// Checkpoint flushes go on a second session where the server allows one;
/// with `MaxSessions 1` they go on the only session, and checkpoints and
/// resume work the same.
#[tokio::test]
async fn one_session_server_checkpoints_on_the_main_session() {
    let Some(s) = start_sshd(Mode::OneSession) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let src = t.path().join("src");
    let body = data(6 * RANGE + 3 * MIB, 9);
    std::fs::write(&src, &body).unwrap();
    let remote = t.path().join("dst");
    interrupted_upload(&s, &src, &remote, &state, 3).await;
    let sum = cp(src.to_str().unwrap(), &s.url(&remote), &state, &s.opts())
        .await
        .unwrap();
    assert_eq!(sum.bytes_resumed, (3 * RANGE) as u64);
    assert_eq!(sum.bytes_sent, (3 * RANGE + 3 * MIB) as u64);
    assert_eq!(std::fs::read(&remote).unwrap(), body);
    // A fresh one, checkpoints every few ranges.
    let remote2 = t.path().join("dst2");
    let sum = cp(src.to_str().unwrap(), &s.url(&remote2), &state, &s.opts())
        .await
        .unwrap();
    assert_eq!(outcome(&sum), Resume::Fresh);
    assert_eq!(std::fs::read(&remote2).unwrap(), body);
}

#[tokio::test]
async fn changed_source_starts_fresh() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let src = t.path().join("src");
    std::fs::write(&src, data(2 * RANGE + 100, 1)).unwrap();
    let remote = t.path().join("dst");
    interrupted_upload(&s, &src, &remote, &state, 2).await;
    // Same size, different tail, different mtime.
    let mut body = data(2 * RANGE + 100, 1);
    let n = body.len();
    body[n - 1] ^= 0xff;
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&src, &body).unwrap();
    let sum = cp(src.to_str().unwrap(), &s.url(&remote), &state, &s.opts())
        .await
        .unwrap();
    assert_eq!(sum.bytes_resumed, 0);
    assert_eq!(sum.bytes_sent, n as u64);
    assert_eq!(
        outcome(&sum),
        Resume::Restarted {
            reason: RestartReason::SourceChanged
        }
    );
    assert_eq!(std::fs::read(&remote).unwrap(), body);
}

fn flip(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).unwrap();
}

#[tokio::test]
async fn damaged_remote_partial_is_found_and_rewritten() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let src = t.path().join("src");
    let body = data(3 * RANGE + 77, 9);
    std::fs::write(&src, &body).unwrap();
    let remote = t.path().join("dst");
    interrupted_upload(&s, &src, &remote, &state, 2).await;
    // Damage the last recorded range (range 1): resume walks back to range 1.
    let part = PathBuf::from(format!("{}.part", remote.display()));
    flip(&part, (RANGE + 4096) as u64);
    let sum = cp(src.to_str().unwrap(), &s.url(&remote), &state, &s.opts())
        .await
        .unwrap();
    assert_eq!(sum.bytes_resumed, RANGE as u64);
    assert_eq!(
        outcome(&sum),
        Resume::Repaired {
            offset: RANGE as u64,
            recorded: (2 * RANGE) as u64
        }
    );
    assert_eq!(std::fs::read(&remote).unwrap(), body);

    // With --verify full, damage in the first range is found as well.
    std::fs::remove_file(&remote).unwrap();
    interrupted_upload(&s, &src, &remote, &state, 2).await;
    flip(&part, 10);
    let mut o = s.opts();
    o.verify = Verify::Full;
    let sum = cp(src.to_str().unwrap(), &s.url(&remote), &state, &o)
        .await
        .unwrap();
    assert_eq!(sum.bytes_resumed, 0);
    assert_eq!(
        outcome(&sum),
        Resume::Restarted {
            reason: RestartReason::PartialUnusable
        }
    );
    assert!(
        server_hashed(sum.per_file[0].verified_by),
        "{}",
        sum.per_file[0]
    );
    assert_eq!(std::fs::read(&remote).unwrap(), body);
}

#[tokio::test]
async fn host_keys_unknown_and_changed_are_refused() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let src = t.path().join("src");
    std::fs::write(&src, b"x").unwrap();
    let remote = t.path().join("dst");
    let kh = t.path().join("kh");
    let mut o = s.opts();
    o.ssh.known_hosts = Some(kh.clone());
    let e = cp(src.to_str().unwrap(), &s.url(&remote), &state, &o)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::HostKeyUnknown { .. }), "{e}");
    assert_eq!(e.class(), ferry::ErrorClass::Auth);
    assert!(!remote.exists());
    // Accepting records it; the next run passes without the flag.
    o.ssh.accept_new_host_key = true;
    cp(src.to_str().unwrap(), &s.url(&remote), &state, &o)
        .await
        .unwrap();
    assert!(std::fs::read_to_string(&kh)
        .unwrap()
        .contains(&format!("{}", s.port)));
    o.ssh.accept_new_host_key = false;
    cp(src.to_str().unwrap(), &s.url(&remote), &state, &o)
        .await
        .unwrap();
    // A changed key is refused even with --accept-new-host-key.
    let other = std::fs::read_to_string(s.dir.path().join("otherkey.pub")).unwrap();
    let mut p = other.split_whitespace();
    std::fs::write(
        &kh,
        format!(
            "[127.0.0.1]:{} {} {}\n",
            s.port,
            p.next().unwrap(),
            p.next().unwrap()
        ),
    )
    .unwrap();
    o.ssh.accept_new_host_key = true;
    let e = cp(src.to_str().unwrap(), &s.url(&remote), &state, &o)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::HostKeyChanged { line: 1, .. }), "{e}");
    assert!(e.to_string().contains("CHANGED"));
}

#[tokio::test]
async fn wrong_key_is_refused() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::write(&src, b"x").unwrap();
    let mut o = s.opts();
    o.ssh.identities = vec![s.dir.path().join("otherkey")];
    let e = cp(
        src.to_str().unwrap(),
        &s.url(&t.path().join("dst")),
        &t.path().join("state"),
        &o,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::SshAuth { .. }), "{e}");
    assert!(!e.is_retryable());
    assert_eq!(e.class(), ferry::ErrorClass::Auth);
}

#[tokio::test]
async fn server_without_offset_writes_takes_the_fallback() {
    let Some(s) = start_sshd(Mode::NoOffsetWrites) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let src = t.path().join("src");
    let body = data(2 * RANGE + 3, 4);
    std::fs::write(&src, &body).unwrap();
    let remote = t.path().join("dst");
    interrupted_upload(&s, &src, &remote, &state, 1).await;
    let sum = cp(src.to_str().unwrap(), &s.url(&remote), &state, &s.opts())
        .await
        .unwrap();
    // The probe at offset 8 MiB was refused: the whole file went again.
    assert_eq!(sum.bytes_resumed, 0);
    assert_eq!(
        outcome(&sum),
        Resume::FallbackRestart {
            refused_offset: Some(RANGE as u64)
        }
    );
    assert_eq!(std::fs::read(&remote).unwrap(), body);
    // ...and the host is remembered.
    {
        let store = ferry::store::Store::open(&state).unwrap();
        let caps =
            ferry::sftp::sidecar::host_caps(&store, &format!("127.0.0.1:{}", s.port)).unwrap();
        assert!(caps.no_offset_writes);
    }
    // The next interrupted upload to that host restarts without probing.
    std::fs::remove_file(&remote).unwrap();
    interrupted_upload(&s, &src, &remote, &state, 1).await;
    let sum = cp(src.to_str().unwrap(), &s.url(&remote), &state, &s.opts())
        .await
        .unwrap();
    assert_eq!(
        outcome(&sum),
        Resume::FallbackRestart {
            refused_offset: None
        }
    );
    assert_eq!(std::fs::read(&remote).unwrap(), body);
}

#[tokio::test]
async fn download_resumes_and_rewrites_a_damaged_local_part() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let remote = t.path().join("remote.bin");
    let body = data(3 * RANGE + 1234, 5);
    std::fs::write(&remote, &body).unwrap();
    let local = t.path().join("local.bin");
    let part = t.path().join(".local.bin.ferry.part");
    let mut o = s.opts();
    o.stop_after_ranges = Some(2);
    let e = cp(&s.url(&remote), local.to_str().unwrap(), &state, &o)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("stopped for a test"), "{e}");
    assert!(!local.exists());
    assert!(std::fs::metadata(&part).unwrap().len() >= (2 * RANGE) as u64);
    let sum = cp(&s.url(&remote), local.to_str().unwrap(), &state, &s.opts())
        .await
        .unwrap();
    assert_eq!(sum.bytes_resumed, (2 * RANGE) as u64);
    assert_eq!(sum.bytes_sent, (RANGE + 1234) as u64);
    assert_eq!(
        outcome(&sum),
        Resume::Resumed {
            offset: (2 * RANGE) as u64
        }
    );
    assert_eq!(std::fs::read(&local).unwrap(), body);
    assert!(!part.exists());

    // Damage in the last recorded range of the local part: walk back one range.
    std::fs::remove_file(&local).unwrap();
    let e = cp(&s.url(&remote), local.to_str().unwrap(), &state, &o)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("stopped for a test"), "{e}");
    flip(&part, (RANGE + 99) as u64);
    let sum = cp(&s.url(&remote), local.to_str().unwrap(), &state, &s.opts())
        .await
        .unwrap();
    assert_eq!(sum.bytes_resumed, RANGE as u64);
    assert_eq!(
        outcome(&sum),
        Resume::Repaired {
            offset: RANGE as u64,
            recorded: (2 * RANGE) as u64
        }
    );
    assert_eq!(std::fs::read(&local).unwrap(), body);
}

#[tokio::test]
async fn replaces_an_existing_file_without_posix_rename() {
    let Some(s) = start_sshd(Mode::NoPosixRename) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::write(&src, b"new content").unwrap();
    let remote = t.path().join("dst");
    std::fs::write(&remote, b"old").unwrap();
    cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &t.path().join("state"),
        &s.opts(),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&remote).unwrap(), b"new content");
    assert!(!Path::new(&format!("{}.part", remote.display())).exists());
}

#[tokio::test]
async fn encrypted_key_needs_its_passphrase() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("enckey");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "pass word", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let mut ak = std::fs::read_to_string(s.dir.path().join("authorized_keys")).unwrap();
    ak.push_str(&std::fs::read_to_string(t.path().join("enckey.pub")).unwrap());
    std::fs::write(s.dir.path().join("authorized_keys"), ak).unwrap();
    let src = t.path().join("src");
    std::fs::write(&src, b"secret").unwrap();
    let remote = t.path().join("dst");
    let mut o = s.opts();
    o.ssh.identities = vec![key];
    let e = cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &t.path().join("st"),
        &o,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::SshAuth { .. }), "{e}");
    assert!(e.to_string().contains("FERRY_SSH_PASSPHRASE"), "{e}");
    // A prompt (the binary's asks on the terminal): a wrong answer is
    // refused, the right one logs in; each is asked once per key.
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let prompt = |answer: &'static str, asked: Arc<std::sync::atomic::AtomicUsize>| {
        ferry::sftp::PassphrasePrompt(Arc::new(move |p: &Path| {
            assert!(p.ends_with("enckey"));
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(Some(answer.to_string()))
        }))
    };
    o.ssh.passphrase_prompt = Some(prompt("wrong", asked.clone()));
    let e = cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &t.path().join("st"),
        &o,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::SshAuth { .. }), "{e}");
    assert!(e.to_string().contains("wrong passphrase"), "{e}");
    o.ssh.passphrase_prompt = Some(prompt("pass word", asked.clone()));
    cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &t.path().join("st"),
        &o,
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&remote).unwrap(), b"secret");
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);
    std::fs::remove_file(&remote).unwrap();
    o.ssh.passphrase_prompt = None;
    o.ssh.passphrase = Some("pass word".into());
    cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &t.path().join("st"),
        &o,
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&remote).unwrap(), b"secret");
}

/// Makes a key with `ssh-keygen ARGS` (no passphrase) and authorizes it on `s`.
fn authorized_key(s: &Sshd, path: &Path, args: &[&str]) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-N", ""])
        .args(args)
        .arg("-f")
        .arg(path)
        .status()
        .expect("ssh-keygen");
    assert!(st.success(), "ssh-keygen {args:?}");
    let ak = s.dir.path().join("authorized_keys");
    let mut text = std::fs::read_to_string(&ak).unwrap();
    text.push_str(&std::fs::read_to_string(format!("{}.pub", path.display())).unwrap());
    std::fs::write(&ak, text).unwrap();
}

/// One small upload with `o`; checks the file arrived.
async fn upload_with(s: &Sshd, t: &Path, o: &SftpOptions, what: &str) {
    let src = t.join(format!("src-{what}"));
    std::fs::write(&src, what.as_bytes()).unwrap();
    let remote = t.join(format!("dst-{what}"));
    cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &t.join(format!("state-{what}")),
        o,
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(std::fs::read(&remote).unwrap(), what.as_bytes());
}

#[tokio::test]
async fn rsa_key_authenticates() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("rsakey");
    authorized_key(&s, &key, &["-t", "rsa", "-b", "3072"]);
    let mut o = s.opts();
    o.ssh.identities = vec![key];
    upload_with(&s, t.path(), &o, "rsa").await;
}

#[tokio::test]
async fn ecdsa_key_authenticates() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("ecdsakey");
    authorized_key(&s, &key, &["-t", "ecdsa", "-b", "256"]);
    let mut o = s.opts();
    o.ssh.identities = vec![key];
    upload_with(&s, t.path(), &o, "ecdsa").await;
}

/// An `ssh-agent -D` of the test's own, killed by its PID on drop.
struct Agent {
    child: Child,
    sock: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(dir: &Path) -> Option<Agent> {
    let sock = dir.join("agent.sock");
    let child = match Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ssh-agent not available ({e}); skipped");
            return None;
        }
    };
    let agent = Agent { child, sock };
    for _ in 0..200 {
        if agent.sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(agent.sock.exists(), "ssh-agent made no socket");
    Some(agent)
}

fn ssh_add(agent: &Agent, key: &Path) {
    let st = Command::new("ssh-add")
        .arg("-q")
        .arg(key)
        .env("SSH_AUTH_SOCK", &agent.sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("ssh-add");
    assert!(st.success(), "ssh-add {}", key.display());
}

#[tokio::test]
async fn agent_keys_authenticate() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let Some(agent) = start_agent(t.path()) else {
        return;
    };
    // No key file offered: only what the agent holds can log in. A missing
    // default ~/.ssh/id_* is fine; one that exists is refused by this sshd.
    let mut o = s.opts();
    o.ssh.identities = Vec::new();
    o.ssh.no_agent = false;
    o.ssh.agent_socket = Some(agent.sock.clone());

    // An empty agent: refused, and the error says the agent had nothing.
    let src = t.path().join("src");
    std::fs::write(&src, b"x").unwrap();
    let e = cp(
        src.to_str().unwrap(),
        &s.url(&t.path().join("never")),
        &t.path().join("state0"),
        &o,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::SshAuth { .. }), "{e}");
    assert!(e.to_string().contains("no keys"), "{e}");

    // ed25519, then RSA (signed by the agent with rsa-sha2-*).
    ssh_add(&agent, &s.dir.path().join("clientkey"));
    upload_with(&s, t.path(), &o, "agent-ed25519").await;
    let rsa = t.path().join("agentrsa");
    authorized_key(&s, &rsa, &["-t", "rsa", "-b", "3072"]);
    let st = Command::new("ssh-add")
        .arg("-D")
        .env("SSH_AUTH_SOCK", &agent.sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    ssh_add(&agent, &rsa);
    upload_with(&s, t.path(), &o, "agent-rsa").await;
    drop(agent);
}

#[tokio::test]
async fn openssh_has_no_check_file_so_full_verify_hashes_over_exec() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    // What this sftp-server announces in its init reply.
    let target = ferry::sftp::SftpTarget::parse(&s.url(Path::new("/tmp"))).unwrap();
    let conn = ferry::sftp::auth::connect(&target, &s.ssh()).await.unwrap();
    assert!(
        conn.has("posix-rename@openssh.com"),
        "{:?}",
        conn.extensions
    );
    assert!(
        !conn.has("check-file-handle") && !conn.has("check-file-name"),
        "OpenSSH now offers check-file: {:?}",
        conn.extensions
    );
    drop(conn);
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let body = data(RANGE + 5, 2);
    std::fs::write(&src, &body).unwrap();
    let remote = t.path().join("dst");
    let mut o = s.opts();
    o.verify = Verify::Full;
    let sum = cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &t.path().join("st"),
        &o,
    )
    .await
    .unwrap();
    assert!(
        server_hashed(sum.per_file[0].verified_by),
        "{}",
        sum.per_file[0]
    );
    assert_eq!(std::fs::read(&remote).unwrap(), body);
}

#[tokio::test]
async fn check_file_verifies_where_the_server_offers_it() {
    let Some(s) = start_sshd(Mode::CheckFile(false)) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let body = data(2 * RANGE + 999, 8);
    std::fs::write(&src, &body).unwrap();
    for (i, v) in [Verify::Full, Verify::Tail, Verify::Size]
        .into_iter()
        .enumerate()
    {
        let remote = t.path().join(format!("dst{i}"));
        let mut o = s.opts();
        o.verify = v;
        let sum = cp(
            src.to_str().unwrap(),
            &s.url(&remote),
            &t.path().join("st"),
            &o,
        )
        .await
        .unwrap();
        let want = if v == Verify::Size {
            VerifiedBy::Size
        } else {
            VerifiedBy::CheckFile
        };
        assert_eq!(sum.per_file[0].verified_by, want, "{v:?}");
        let j = serde_json::to_value(&sum).unwrap();
        assert_eq!(j["per_file"][0]["verified_by"], want.as_str());
        assert_eq!(std::fs::read(&remote).unwrap(), body);
    }
}

#[tokio::test]
async fn check_file_mismatch_fails_the_upload() {
    let Some(s) = start_sshd(Mode::CheckFile(true)) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::write(&src, data(RANGE + 1, 6)).unwrap();
    let remote = t.path().join("dst");
    let mut o = s.opts();
    o.verify = Verify::Full;
    let e = cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &t.path().join("st"),
        &o,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::SftpIntegrity { .. }), "{e}");
    assert!(e.to_string().contains("check-file-handle"), "{e}");
    assert!(!remote.exists(), "nothing renamed into place");
}

/// An SSH host that refuses connections: the copy retries under the policy,
/// the host's circuit breaker opens (as for native transfers), and `ferry
/// status` keeps an "interrupted" record of the unfinished upload.
#[tokio::test]
async fn unreachable_host_opens_the_breaker_and_leaves_a_status_record() {
    let dir = tempfile::TempDir::new().unwrap();
    keygen(&dir.path().join("key"));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let src = dir.path().join("src.bin");
    std::fs::write(&src, data(100_000, 3)).unwrap();
    let state = dir.path().join("state");
    let mut copts = copy_opts(&state);
    copts.retry.max_attempts = 6;
    let o = SftpOptions {
        ssh: SshConfig {
            identities: vec![dir.path().join("key")],
            passphrase: None,
            passphrase_prompt: None,
            known_hosts: Some(dir.path().join("known_hosts")),
            accept_new_host_key: true,
            no_agent: true,
            agent_socket: None,
            home: None,
            default_user: None,
        },
        verify: Verify::Tail,
        stop_after_ranges: None,
    };
    let progress = Arc::new(Progress::default());
    let url = format!("sftp://{}@127.0.0.1:{port}/tmp/x.bin", user());
    let e = copy(
        &[src.display().to_string()],
        &url,
        &CopyOptions { sftp: o, ..copts },
        progress.clone(),
    )
    .await
    .unwrap_err();
    assert!(
        e.is_retryable() || matches!(e, Error::RetriesExhausted { .. }),
        "{e}"
    );
    assert!(
        Progress::get(&progress.breaker_opens) >= 1,
        "breaker never opened"
    );
    let peers = std::fs::read_dir(state.join("peers")).unwrap().count();
    assert_eq!(peers, 1, "the breaker's state is recorded for ferry status");
}

/// An upload cut short leaves a record for `ferry status`; finishing it
/// removes the record.
#[tokio::test]
async fn an_unfinished_upload_is_listed_until_it_completes() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = s.dir.path();
    let src = t.join("st.bin");
    std::fs::write(&src, data(3 * RANGE + 5, 9)).unwrap();
    let remote = t.join("remote-st.bin");
    let state = t.join("state");
    interrupted_upload(&s, &src, &remote, &state, 1).await;
    let recs = ferry::status::StatusDir::new(&state).list();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].direction, "upload");
    assert_ne!(recs[0].state, ferry::status::RecordState::Active);
    assert!(recs[0].remote.starts_with("sftp://"), "{:?}", recs[0]);
    assert!(recs[0].last_error.is_some());
    cp(src.to_str().unwrap(), &s.url(&remote), &state, &s.opts())
        .await
        .unwrap();
    assert!(ferry::status::StatusDir::new(&state).list().is_empty());
}

/// The default options of a copy (what `ferry cp` uses without `--verify`).
fn default_opts(s: &Sshd) -> SftpOptions {
    SftpOptions {
        verify: Verify::default(),
        ..s.opts()
    }
}

/// Proven by a hashing command run on the server (which one depends on what
/// the machine has: b3sum, openssl, sha256sum or shasum).
fn server_hashed(v: VerifiedBy) -> bool {
    matches!(
        v,
        VerifiedBy::B3sum | VerifiedBy::OpensslSha256 | VerifiedBy::Sha256sum | VerifiedBy::Shasum
    )
}

fn part_of(remote: &Path) -> PathBuf {
    PathBuf::from(format!("{}.part", remote.display()))
}

/// A byte flipped early in the remote partial (range 0 of two kept ranges)
/// is caught by the default verification, which proves every kept byte
/// (here with the server's sha256sum over an exec channel), and the partial
/// is rewritten; `--verify tail` only reads back the last kept range.
#[tokio::test]
async fn default_verify_proves_every_kept_byte_of_an_upload() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    assert_eq!(Verify::default(), Verify::Full);
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let src = t.path().join("src");
    let body = data(3 * RANGE + 77, 4);
    std::fs::write(&src, &body).unwrap();
    let remote = t.path().join("dst");
    interrupted_upload(&s, &src, &remote, &state, 2).await;
    flip(&part_of(&remote), 10);
    let sum = cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &state,
        &default_opts(&s),
    )
    .await
    .unwrap();
    assert_eq!(
        outcome(&sum),
        Resume::Restarted {
            reason: RestartReason::PartialUnusable
        }
    );
    assert_eq!(sum.bytes_sent, body.len() as u64);
    assert!(
        server_hashed(sum.per_file[0].verified_by),
        "{}",
        sum.per_file[0]
    );
    let j = serde_json::to_value(&sum).unwrap();
    assert_eq!(
        j["per_file"][0]["verified_by"],
        sum.per_file[0].verified_by.as_str()
    );
    assert!(std::fs::read(&remote).unwrap() == body);

    // Damage in range 1: ranges 0 is kept, the rest rewritten.
    std::fs::remove_file(&remote).unwrap();
    interrupted_upload(&s, &src, &remote, &state, 2).await;
    flip(&part_of(&remote), (RANGE + 5) as u64);
    let sum = cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &state,
        &default_opts(&s),
    )
    .await
    .unwrap();
    assert_eq!(
        outcome(&sum),
        Resume::Repaired {
            offset: RANGE as u64,
            recorded: (2 * RANGE) as u64
        }
    );
    assert!(std::fs::read(&remote).unwrap() == body);

    // Undamaged: resumed, and the finished file proven by the server.
    std::fs::remove_file(&remote).unwrap();
    interrupted_upload(&s, &src, &remote, &state, 2).await;
    let sum = cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &state,
        &default_opts(&s),
    )
    .await
    .unwrap();
    assert_eq!(
        outcome(&sum),
        Resume::Resumed {
            offset: (2 * RANGE) as u64
        }
    );
    assert!(
        server_hashed(sum.per_file[0].verified_by),
        "{}",
        sum.per_file[0]
    );
    assert!(std::fs::read(&remote).unwrap() == body);
}

/// Where the account cannot open another channel (MaxSessions 1: no exec
/// beside the SFTP session), the default reads every kept range back.
#[tokio::test]
async fn default_verify_reads_back_where_the_server_cannot_hash() {
    let Some(s) = start_sshd(Mode::OneSession) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let src = t.path().join("src");
    let body = data(2 * RANGE + 3, 6);
    std::fs::write(&src, &body).unwrap();
    let remote = t.path().join("dst");
    interrupted_upload(&s, &src, &remote, &state, 2).await;
    flip(&part_of(&remote), 3);
    let sum = cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &state,
        &default_opts(&s),
    )
    .await
    .unwrap();
    assert_eq!(
        outcome(&sum),
        Resume::Restarted {
            reason: RestartReason::PartialUnusable
        }
    );
    assert_eq!(sum.per_file[0].verified_by, VerifiedBy::Readback);
    assert!(std::fs::read(&remote).unwrap() == body);
}

/// A source rewritten in place with its old mtime put back (same size, same
/// tail) is a changed source: the partial is not resumed, with any --verify
/// level that compares more than the mtime.
#[tokio::test]
async fn source_rewritten_with_its_old_mtime_is_not_resumed() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    for v in [Verify::Tail, Verify::Full] {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        let src = t.path().join("src");
        let old = data(3 * RANGE + 77, 1);
        std::fs::write(&src, &old).unwrap();
        let mtime = std::fs::metadata(&src).unwrap().modified().unwrap();
        let remote = t.path().join("dst");
        interrupted_upload(&s, &src, &remote, &state, 2).await;
        // Rewrite range 0 in place (same inode), then put the mtime back.
        let mut new = old.clone();
        new[..1000].fill(0xee);
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
            f.write_all_at(&new[..1000], 0).unwrap();
            f.set_modified(mtime).unwrap();
        }
        assert_eq!(std::fs::metadata(&src).unwrap().modified().unwrap(), mtime);
        let mut o = s.opts();
        o.verify = v;
        let sum = cp(src.to_str().unwrap(), &s.url(&remote), &state, &o)
            .await
            .unwrap();
        assert_eq!(
            outcome(&sum),
            Resume::Restarted {
                reason: RestartReason::SourceChanged
            },
            "{v:?}"
        );
        assert!(std::fs::read(&remote).unwrap() == new, "{v:?}");
        assert_eq!(sum.digest, blake3::hash(&new).to_hex().to_string());
    }
}

/// A symlink planted at the remote PATH.part is never written through: the
/// name is removed (its target untouched) and the partial made anew, both
/// for a fresh upload and for a resume; a directory there is removed too.
#[tokio::test]
async fn planted_symlink_at_the_remote_part_is_not_followed() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let src = t.path().join("src");
    let body = data(2 * RANGE + 11, 3);
    std::fs::write(&src, &body).unwrap();
    let victim = t.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();

    // Fresh upload.
    let remote = t.path().join("dst");
    std::os::unix::fs::symlink(&victim, part_of(&remote)).unwrap();
    let sum = cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &state,
        &default_opts(&s),
    )
    .await
    .unwrap();
    assert_eq!(outcome(&sum), Resume::Fresh);
    assert!(std::fs::read(&victim).unwrap() == b"keep me");
    assert!(std::fs::symlink_metadata(&remote).unwrap().is_file());
    assert!(std::fs::read(&remote).unwrap() == body);

    // Resume: the partial replaced by a link to a file holding the same
    // bytes (so every range would verify through the link).
    let remote = t.path().join("dst2");
    interrupted_upload(&s, &src, &remote, &state, 1).await;
    let victim2 = t.path().join("victim2");
    std::fs::rename(part_of(&remote), &victim2).unwrap();
    let before = std::fs::read(&victim2).unwrap();
    std::os::unix::fs::symlink(&victim2, part_of(&remote)).unwrap();
    let sum = cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &state,
        &default_opts(&s),
    )
    .await
    .unwrap();
    assert_eq!(
        outcome(&sum),
        Resume::Restarted {
            reason: RestartReason::PartialUnusable
        }
    );
    assert!(std::fs::read(&victim2).unwrap() == before);
    assert!(std::fs::symlink_metadata(&remote).unwrap().is_file());
    assert!(std::fs::read(&remote).unwrap() == body);

    // An (empty) directory at the partial's name.
    let remote = t.path().join("dst3");
    std::fs::create_dir(part_of(&remote)).unwrap();
    cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &state,
        &default_opts(&s),
    )
    .await
    .unwrap();
    assert!(std::fs::read(&remote).unwrap() == body);
}

/// A remote partial extended past the file's size is cut back to the proven
/// prefix and the upload completes (it used to fail "size is N, expected M"
/// on every run), also when every range was already recorded.
#[tokio::test]
async fn remote_part_longer_than_the_file_is_cut_back() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let src = t.path().join("src");
    let body = data(2 * RANGE + 99, 8);
    std::fs::write(&src, &body).unwrap();
    let grow = |p: &Path| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
        f.write_all(&[7u8; 3 * MIB]).unwrap();
    };
    for (ranges, want) in [
        (
            1,
            Resume::Resumed {
                offset: RANGE as u64,
            },
        ),
        (3, Resume::AlreadyComplete),
    ] {
        for v in [Verify::Tail, Verify::Full] {
            let remote = t.path().join(format!("dst-{ranges}-{v:?}"));
            interrupted_upload(&s, &src, &remote, &state, ranges).await;
            grow(&part_of(&remote));
            let mut o = s.opts();
            o.verify = v;
            let sum = cp(src.to_str().unwrap(), &s.url(&remote), &state, &o)
                .await
                .unwrap();
            assert_eq!(outcome(&sum), want, "{ranges} {v:?}");
            assert!(std::fs::read(&remote).unwrap() == body, "{ranges} {v:?}");
        }
    }
}

/// Downloads by default re-hash every kept range of the local part, and
/// (where the server hashes) prove the remote file's kept ranges unchanged:
/// a remote file rewritten with the same size and mtime is caught.
#[tokio::test]
async fn default_verify_proves_a_download_s_kept_bytes_and_its_source() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let remote = t.path().join("remote.bin");
    let body = data(3 * RANGE + 1234, 5);
    std::fs::write(&remote, &body).unwrap();
    let local = t.path().join("local.bin");
    let part = t.path().join(".local.bin.ferry.part");
    let interrupted = || async {
        let mut o = default_opts(&s);
        o.stop_after_ranges = Some(2);
        let e = cp(&s.url(&remote), local.to_str().unwrap(), &state, &o)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("stopped for a test"), "{e}");
    };
    // A flipped byte early in the local part.
    interrupted().await;
    flip(&part, 100);
    let sum = cp(
        &s.url(&remote),
        local.to_str().unwrap(),
        &state,
        &default_opts(&s),
    )
    .await
    .unwrap();
    assert_eq!(
        outcome(&sum),
        Resume::Restarted {
            reason: RestartReason::PartialUnusable
        }
    );
    assert!(std::fs::read(&local).unwrap() == body);

    // The remote file rewritten in range 0, size and mtime as they were.
    std::fs::remove_file(&local).unwrap();
    interrupted().await;
    let mtime = std::fs::metadata(&remote).unwrap().modified().unwrap();
    let mut new = body.clone();
    new[5..500].fill(1);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&remote)
            .unwrap();
        f.write_all_at(&new[5..500], 5).unwrap();
        f.set_modified(mtime).unwrap();
    }
    let sum = cp(
        &s.url(&remote),
        local.to_str().unwrap(),
        &state,
        &default_opts(&s),
    )
    .await
    .unwrap();
    assert_eq!(
        outcome(&sum),
        Resume::Restarted {
            reason: RestartReason::PartialUnusable
        }
    );
    assert!(std::fs::read(&local).unwrap() == new);
    assert!(sum.per_file[0].to_string().contains("restarted"));
}

/// A symlink planted at the local `.NAME.ferry.part` of an SFTP download is
/// not written through. (Relies on `fsutil::open_part` refusing planted
/// links.)
#[tokio::test]
async fn planted_symlink_at_the_local_part_of_a_download_is_not_followed() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let remote = t.path().join("remote.bin");
    let body = data(RANGE + 3, 2);
    std::fs::write(&remote, &body).unwrap();
    let victim = t.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let local = t.path().join("local.bin");
    std::os::unix::fs::symlink(&victim, t.path().join(".local.bin.ferry.part")).unwrap();
    let _ = cp(
        &s.url(&remote),
        local.to_str().unwrap(),
        &state,
        &default_opts(&s),
    )
    .await;
    assert!(std::fs::read(&victim).unwrap() == b"keep me");
    if let Ok(md) = std::fs::symlink_metadata(&local) {
        assert!(md.is_file());
        assert!(std::fs::read(&local).unwrap() == body);
    }
}

// Trees, names and server details: symlinks skipped by default and followed
// with loop detection under -L, names that cannot be carried failed loudly,
// backslashes copied, @revoked keys refused, missing parents made, and a
// full disk named as such.

fn os(b: &[u8]) -> &std::ffi::OsStr {
    std::os::unix::ffi::OsStrExt::from_bytes(b)
}

async fn cp_tree(
    src: &Path,
    dst: &str,
    state: &Path,
    o: &SftpOptions,
    follow_links: bool,
) -> Result<CopySummary, Error> {
    let mut opts = copy_opts(state);
    opts.follow_links = follow_links;
    opts.sftp = o.clone();
    copy(
        &[src.display().to_string()],
        dst,
        &opts,
        Arc::new(Progress::default()),
    )
    .await
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    n.sort();
    n
}

#[tokio::test]
async fn sftp_upload_tree_skips_links_and_fails_names_it_cannot_carry() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let d = t.path().join("d");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(d.join("f"), b"f").unwrap();
    std::fs::write(d.join("sub/g"), b"g").unwrap();
    std::os::unix::fs::symlink("..", d.join("loop")).unwrap();
    std::os::unix::fs::symlink("..", d.join("sub/up")).unwrap();
    std::os::unix::fs::symlink("nowhere", d.join("dangling")).unwrap();
    std::fs::write(d.join(os(b"a\xff")), b"1").unwrap();
    std::fs::write(d.join(os(b"a\xfe")), b"2").unwrap();
    let remote = t.path().join("remote");
    std::fs::create_dir_all(&remote).unwrap();
    let e = cp_tree(&d, &s.url(&remote), &state, &s.opts(), false)
        .await
        .unwrap_err();
    let Error::NotAllCopied { failed, summary } = &e else {
        panic!("{e}");
    };
    assert_eq!((*failed, summary.files, summary.skipped), (2, 2, 3), "{e}");
    assert_eq!(names(&remote.join("d")), ["f", "sub"]);
    assert_eq!(names(&remote.join("d/sub")), ["g"]);
    // -L: a link to a directory outside is followed; loops and the dangling link are not.
    std::fs::create_dir_all(t.path().join("other")).unwrap();
    std::fs::write(t.path().join("other/x"), b"x").unwrap();
    std::os::unix::fs::symlink("../other", d.join("linkdir")).unwrap();
    std::fs::remove_file(d.join(os(b"a\xff"))).unwrap();
    std::fs::remove_file(d.join(os(b"a\xfe"))).unwrap();
    let remote2 = t.path().join("remote2");
    std::fs::create_dir_all(&remote2).unwrap();
    let sum = cp_tree(&d, &s.url(&remote2), &state, &s.opts(), true)
        .await
        .unwrap();
    assert_eq!((sum.files, sum.skipped), (3, 3));
    assert_eq!(names(&remote2.join("d")), ["f", "linkdir", "sub"]);
    assert_eq!(std::fs::read(remote2.join("d/linkdir/x")).unwrap(), b"x");
}

/// A remote tree with a directory symlink, a dangling one, a loop, a name
/// with a backslash and a Windows device name.
fn remote_tree(base: &Path) -> PathBuf {
    let rt = base.join("rt");
    std::fs::create_dir_all(rt.join("sub")).unwrap();
    std::fs::write(rt.join("f"), b"f").unwrap();
    std::fs::write(rt.join("sub/g"), b"g").unwrap();
    std::fs::write(rt.join("back\\slash"), b"b").unwrap();
    std::fs::write(rt.join("con.txt"), b"c").unwrap();
    std::os::unix::fs::symlink("sub", rt.join("dirlink")).unwrap();
    std::os::unix::fs::symlink("nowhere", rt.join("dangling")).unwrap();
    std::os::unix::fs::symlink("..", rt.join("loop")).unwrap();
    rt
}

#[tokio::test]
async fn sftp_download_tree_skips_links_and_keeps_backslash_names() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let rt = remote_tree(t.path());
    let local = t.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    let sum = cp_tree(
        Path::new(&s.url(&rt)),
        local.to_str().unwrap(),
        &state,
        &s.opts(),
        false,
    )
    .await
    .unwrap();
    assert_eq!((sum.files, sum.skipped), (4, 3));
    assert_eq!(
        names(&local.join("rt")),
        ["back\\slash", "con.txt", "f", "sub"]
    );
    assert_eq!(std::fs::read(local.join("rt/back\\slash")).unwrap(), b"b");
    // -L: the directory link is followed (by the server's realpath), the loop
    // and the dangling link are skipped.
    let local2 = t.path().join("local2");
    std::fs::create_dir_all(&local2).unwrap();
    let sum = cp_tree(
        Path::new(&s.url(&rt)),
        local2.to_str().unwrap(),
        &state,
        &s.opts(),
        true,
    )
    .await
    .unwrap();
    assert_eq!((sum.files, sum.skipped), (5, 2));
    assert_eq!(
        names(&local2.join("rt")),
        ["back\\slash", "con.txt", "dirlink", "f", "sub"]
    );
    assert_eq!(std::fs::read(local2.join("rt/dirlink/g")).unwrap(), b"g");
}

#[tokio::test]
async fn sftp_download_fails_names_that_are_not_utf8() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let rt = t.path().join("rt");
    std::fs::create_dir_all(&rt).unwrap();
    std::fs::write(rt.join(os(b"a\xff")), b"1").unwrap();
    std::fs::write(rt.join(os(b"a\xfe")), b"2").unwrap();
    std::fs::write(rt.join("ok"), b"ok").unwrap();
    let local = t.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    let e = cp_tree(
        Path::new(&s.url(&rt)),
        local.to_str().unwrap(),
        &state,
        &s.opts(),
        false,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, Error::NotAllCopied { failed: 2, summary } if summary.files == 1),
        "{e}"
    );
    assert_eq!(names(&local.join("rt")), ["ok"]);
}

#[tokio::test]
async fn revoked_host_key_is_refused() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::write(&src, b"x").unwrap();
    let host_pub = std::fs::read_to_string(s.dir.path().join("hostkey.pub")).unwrap();
    let mut p = host_pub.split_whitespace();
    let (alg, key) = (p.next().unwrap(), p.next().unwrap());
    let kh = t.path().join("kh");
    std::fs::write(
        &kh,
        format!(
            "[127.0.0.1]:{} {alg} {key}\n@revoked * {alg} {key}\n",
            s.port
        ),
    )
    .unwrap();
    let mut o = s.opts();
    o.ssh.known_hosts = Some(kh);
    o.ssh.accept_new_host_key = true;
    let remote = t.path().join("dst");
    let e = cp(
        src.to_str().unwrap(),
        &s.url(&remote),
        &t.path().join("state"),
        &o,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::HostKeyRevoked { line: 2, .. }), "{e}");
    assert_eq!(e.class(), ferry::ErrorClass::Auth);
    assert!(!remote.exists());
}

#[tokio::test]
async fn upload_makes_missing_parent_directories() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let src = t.path().join("src");
    std::fs::write(&src, b"deep").unwrap();
    let remote = t.path().join("remote/new/deeper/file");
    cp(src.to_str().unwrap(), &s.url(&remote), &state, &s.opts())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&remote).unwrap(), b"deep");
    let d = t.path().join("d");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("f"), b"f").unwrap();
    let into = format!("{}/", s.url(&t.path().join("remote/x/y")));
    cp_tree(&d, &into, &state, &s.opts(), false).await.unwrap();
    assert_eq!(
        std::fs::read(t.path().join("remote/x/y/d/f")).unwrap(),
        b"f"
    );
}

/// A small tmpfs, unmounted when dropped.
struct SmallFs(PathBuf);

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazily: the server may still hold the partial open.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn full_disk_on_the_server_is_reported_as_no_space() {
    let Some(s) = start_sshd(Mode::Plain) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let small = t.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&small)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|st| st.success());
    if !mounted {
        eprintln!("cannot mount a tmpfs here (needs root); skipped");
        return;
    }
    let _fs = SmallFs(small.clone());
    let src = t.path().join("big");
    std::fs::write(&src, data(4 * MIB, 5)).unwrap();
    let e = cp(
        src.to_str().unwrap(),
        &s.url(&small.join("big")),
        &t.path().join("state"),
        &s.opts(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::NoSpace { .. }), "{e}");
    assert_eq!(e.class(), ferry::ErrorClass::LocalIo);
    assert!(
        e.to_string()
            .starts_with(&format!("no space left on 127.0.0.1:{}:", s.port)),
        "{e}"
    );
}
