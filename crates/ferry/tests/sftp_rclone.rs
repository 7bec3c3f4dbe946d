//! SFTP against `rclone serve sftp`, a server that is not OpenSSH: it takes
//! writes only in order (by default), offers no `fsync@openssh.com`, no
//! `posix-rename@openssh.com` and no exec of hashing commands, and with its
//! write cache (`--vfs-cache-mode writes`) it changes what a resumed upload
//! finds. Each test starts its own server on a free loopback port.
//! (`scripts/test.sh` installs Debian's rclone when it is missing.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ferry::copy::{copy, CopyOptions, CopySummary};
use ferry::progress::Progress;
use ferry::sftp::{Resume, SftpOptions, SshConfig, Verify};
use ferry::Error;

const MIB: usize = 1 << 20;
const RANGE: usize = 8 * MIB;

struct Rclone {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Rclone {
    fn drop(&mut self) {
        // Our own child, by PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// rclone's path, installing Debian's package when missing and possible.
fn rclone_bin() -> Option<PathBuf> {
    let find = || {
        ["/usr/bin/rclone", "/usr/local/bin/rclone"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return Some(p);
    }
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-qq", "rclone"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    find()
}

/// Starts `rclone serve sftp` over a fresh directory; `extra` are more flags.
fn start_rclone(extra: &[&str]) -> Option<Rclone> {
    let Some(bin) = rclone_bin() else {
        eprintln!("rclone not installed and could not be installed; run scripts/test.sh");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("root")).unwrap();
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(d.join("clientkey"))
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
    std::fs::copy(d.join("clientkey.pub"), d.join("authorized_keys")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args(["serve", "sftp"])
        .arg(d.join("root"))
        .args(["--addr", &format!("127.0.0.1:{port}")])
        .arg("--authorized-keys")
        .arg(d.join("authorized_keys"))
        .args(["--config", "/dev/null", "--cache-dir"])
        .arg(d.join("cache"))
        .arg("-q")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn rclone");
    for _ in 0..400 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Some(Rclone { child, port, dir })
}

impl Rclone {
    fn url(&self, name: &str) -> String {
        format!("sftp://ferry@127.0.0.1:{}/{name}", self.port)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join("root").join(name)
    }

    fn opts(&self) -> SftpOptions {
        SftpOptions {
            ssh: SshConfig {
                identities: vec![self.dir.path().join("clientkey")],
                passphrase: None,
                passphrase_prompt: None,
                known_hosts: Some(self.dir.path().join("known_hosts")),
                accept_new_host_key: true,
                no_agent: true,
                agent_socket: None,
                home: None,
                default_user: None,
            },
            verify: Verify::default(),
            stop_after_ranges: None,
        }
    }
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

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// Uploads and downloads of a few sizes, across the 1 MiB that used to fail
/// with "Illegal seek" (rclone takes writes only in order), with the
/// default settings of both.
#[tokio::test]
async fn rclone_uploads_and_downloads_a_few_sizes() {
    let Some(r) = start_rclone(&[]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    for (i, n) in [0, 1, MIB - 1, MIB + 1, 3 * MIB, RANGE + 5, 2 * RANGE + 3]
        .into_iter()
        .enumerate()
    {
        let src = t.path().join(format!("src{i}"));
        let body = data(n, i as u8);
        std::fs::write(&src, &body).unwrap();
        let name = format!("f{i}");
        let sum = cp(src.to_str().unwrap(), &r.url(&name), &state, &r.opts())
            .await
            .unwrap_or_else(|e| panic!("upload of {n} bytes: {e}"));
        assert_eq!(sum.per_file[0].resume, Resume::Fresh, "{n}");
        assert!(
            std::fs::read(r.path(&name)).unwrap() == body,
            "upload size {n}"
        );
        assert_eq!(sum.digest, blake3::hash(&body).to_hex().to_string());
        let back = t.path().join(format!("back{i}"));
        let sum2 = cp(&r.url(&name), back.to_str().unwrap(), &state, &r.opts())
            .await
            .unwrap_or_else(|e| panic!("download of {n} bytes: {e}"));
        assert!(std::fs::read(&back).unwrap() == body, "download size {n}");
        assert_eq!(sum.digest, sum2.digest);
    }
}

/// With rclone's write cache in between, an upload stopped after two
/// checkpoints and resumed must end byte-identical: the kept prefix is
/// proven (read back) before anything is appended, and whatever the cache
/// left there that does not match is rewritten.
#[tokio::test]
async fn rclone_write_cache_interrupted_upload_resumes_byte_identical() {
    let Some(r) = start_rclone(&["--vfs-cache-mode", "writes", "--vfs-write-back", "1s"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let src = t.path().join("src");
    let body = data(3 * RANGE + 77, 9);
    std::fs::write(&src, &body).unwrap();
    let mut o = r.opts();
    o.stop_after_ranges = Some(2);
    let e = cp(src.to_str().unwrap(), &r.url("dst"), &state, &o)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("stopped for a test"), "{e}");
    // Let the write-back happen, as after a killed client.
    std::thread::sleep(Duration::from_secs(3));
    let sum = cp(src.to_str().unwrap(), &r.url("dst"), &state, &r.opts())
        .await
        .unwrap();
    eprintln!("resume outcome: {}", sum.per_file[0]);
    // The cache writes back to the directory a moment later.
    let mut got = Vec::new();
    for _ in 0..100 {
        got = std::fs::read(r.path("dst")).unwrap_or_default();
        if got.len() == body.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let first_diff = got.iter().zip(&body).position(|(a, b)| a != b);
    assert!(
        got == body,
        "not byte-identical: {} bytes of {}, first difference at {first_diff:?}",
        got.len(),
        body.len()
    );
    assert_eq!(sum.digest, blake3::hash(&body).to_hex().to_string());
    assert_eq!(
        sum.per_file[0].resume,
        Resume::FallbackRestart {
            refused_offset: None
        }
    );
}
