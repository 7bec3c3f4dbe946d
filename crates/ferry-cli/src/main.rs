//! The `ferry` command: thin argument handling over the `ferry` engine.

mod demo;
mod passphrase;
mod ui;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ferry::admission::AdmissionConfig;
use ferry::agent::Origin;
use ferry::copy::{copy, CopyOptions, CopySummary};
use ferry::progress::Progress;
use ferry::queue::{now_unix, Queue, QueueEntry};
use ferry::retry::RetryPolicy;
use ferry::tls::KnownServers;
use ferry::transport::Listener as _;
use ferry::{Error, ErrorClass};
use ferry_proto::HashAlg;

/// Exit codes, one per kind of failure.
mod exit {
    pub const USAGE: u8 = 2;
    pub const AUTH: u8 = 3;
    pub const UNREACHABLE: u8 = 4;
    pub const INTEGRITY: u8 = 5;
    pub const LOCAL_IO: u8 = 6;
    pub const PROTOCOL: u8 = 7;
    /// `ferry serve` could not start (cannot listen, no root, no state).
    pub const STARTUP: u8 = 8;
    pub const BUSY: u8 = 9;
    pub const OTHER: u8 = 1;
}

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Verified, resumable file transfer that finishes the job on bad networks"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// More logging (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How a client connects and retries (shared by cp, resume and agent).
#[derive(clap::Args, Clone)]
struct ClientArgs {
    /// Client state: journal, known servers, transfer records, queue.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// File holding the server's token (or set FERRY_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Expected server fingerprint (SHA256:…); otherwise pinned on first use.
    #[arg(long)]
    fingerprint: Option<String>,
    /// Attempts without progress before giving up and queueing (0 = unlimited).
    #[arg(long, default_value_t = 10)]
    retry_max_attempts: u32,
    /// First retry delay, in milliseconds.
    #[arg(long, default_value_t = 250)]
    retry_initial: u64,
    /// Longest retry delay, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    retry_max_delay: u64,
    /// Give up (and queue) after this many seconds without progress (default: no limit).
    #[arg(long)]
    retry_budget: Option<f64>,
    /// Reconnect after this many seconds in which nothing is heard or a write cannot move.
    #[arg(long, default_value_t = 30.0)]
    stall_timeout: f64,
    /// Limit each transfer's payload rate, e.g. 10M, 512K (bytes per second).
    #[arg(long, value_parser = parse_rate, default_value = "0")]
    bwlimit: u64,
    /// No progress bars or periodic lines.
    #[arg(long)]
    no_progress: bool,
    /// Connect through this address (a proxy) instead of the server's.
    #[arg(long, hide = true)]
    via: Option<String>,
    /// What carries ferry:// sessions: tcp (TCP+TLS), quic, auto (QUIC,
    /// falling back to TCP when UDP is blocked), ws or wss (WebSocket, for
    /// HTTP-only networks; the port is the server's --ws-listen/--wss-listen
    /// port or a reverse proxy's). A URL scheme such as ferry+quic:// or
    /// ferry+wss:// chooses for that copy. Tuning from the environment:
    /// FERRY_TCP_CC (TCP congestion control, default bbr, empty for the
    /// host's), FERRY_QUIC_CC (bbr, cubic or newreno), FERRY_QUIC_MTU (largest
    /// QUIC payload probed, 1200-6550, default 6500); FERRY_DIRECT_IO=0 writes
    /// downloads through the page cache.
    #[arg(long, default_value = "tcp", env = "FERRY_TRANSPORT")]
    transport: String,
    /// HTTP path of the WebSocket upgrade for ws/wss (default /ferry).
    #[arg(long, env = "FERRY_WS_PATH")]
    ws_path: Option<String>,
    /// Connections per large file and files moved at once: auto (a file of
    /// 64 MiB or more starts on one connection and adds more, up to 8, while
    /// each raises the measured throughput by 10 % or more; files over
    /// 256 KiB go one at a time, then more at once while that pays, up to 8)
    /// or a fixed count from 1 to 16 for both. --bwlimit implies 1.
    #[arg(long, default_value = "auto", env = "FERRY_STREAMS")]
    streams: String,
}

/// SFTP endpoints (`sftp://[USER@]HOST[:PORT]/PATH`).
#[derive(clap::Args, Clone)]
struct SshArgs {
    /// SSH private key to offer (repeatable); default $HOME/.ssh/id_{ed25519,ecdsa,rsa},
    /// then ssh-agent at $SSH_AUTH_SOCK. An encrypted key's passphrase comes
    /// from FERRY_SSH_PASSPHRASE, else is asked for on the terminal (when
    /// standard input is one). An sftp:// address without USER@ logs in as $USER.
    #[arg(short = 'i', long = "identity")]
    identity: Vec<PathBuf>,
    /// Known-hosts file for SSH host keys (default $HOME/.ssh/known_hosts).
    #[arg(long)]
    known_hosts: Option<PathBuf>,
    /// Trust an SSH host key not yet in the known-hosts file, and record it.
    /// A changed key is always refused.
    #[arg(long)]
    accept_new_host_key: bool,
    /// SFTP verification. full (default): every byte kept from an earlier run
    /// and every byte of the finished file is proven before the rename (hashed
    /// by the server where it can: check-file, or b3sum, openssl, sha256sum or shasum over
    /// SSH; else read back). tail: only the last range is read back; damage in
    /// earlier ranges goes unnoticed. mtime: size and mtime only, no byte is
    /// checked. size: size only, no byte is checked.
    #[arg(long, default_value = "full", value_parser = ["full", "tail", "mtime", "size"])]
    verify: String,
}

impl SshArgs {
    /// The SFTP options; `multi` is the progress display to hide while a
    /// passphrase is asked for.
    fn options(
        &self,
        multi: Option<indicatif::MultiProgress>,
    ) -> anyhow::Result<ferry::sftp::SftpOptions> {
        let verify = self
            .verify
            .parse()
            .map_err(|e: Error| UsageError(e.to_string()))?;
        Ok(ferry::sftp::SftpOptions {
            ssh: ferry::sftp::SshConfig {
                identities: self.identity.clone(),
                passphrase: std::env::var("FERRY_SSH_PASSPHRASE").ok(),
                passphrase_prompt: passphrase::terminal_prompt(multi),
                known_hosts: self.known_hosts.clone(),
                accept_new_host_key: self.accept_new_host_key,
                no_agent: false,
                agent_socket: std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from),
                home: std::env::var_os("HOME").map(PathBuf::from),
                default_user: std::env::var("USER").ok(),
            },
            verify,
            stop_after_ranges: None,
        })
    }
}

impl ClientArgs {
    fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(default_state_dir)
    }

    fn options(&self, recursive: bool, alg: HashAlg) -> anyhow::Result<CopyOptions> {
        let state_dir = self.state_dir();
        if let Some(b) = self.retry_budget {
            if !(0.0..=1e9).contains(&b) {
                return Err(UsageError(format!("--retry-budget {b} is out of range")).into());
            }
        }
        let transport = transport_config_from_env(self.ws_path.as_deref());
        Ok(CopyOptions {
            recursive,
            follow_links: false,
            state_dir: state_dir.clone(),
            client: ferry::client::ClientConfig {
                token: read_token(self.token_file.as_deref())?,
                fingerprint: self.fingerprint.clone(),
                known_servers: KnownServers::new(state_dir.join("known_servers")),
                connect_timeout: Duration::from_secs(10),
                via: self.via.clone(),
                bwlimit: self.bwlimit,
                timeouts: timeouts(self.stall_timeout)?,
                dialer: self
                    .transport
                    .parse::<ferry::transport::Transport>()
                    .map_err(|e| UsageError(e.to_string()))?
                    .dialer(&transport),
                transport,
                direct_io: direct_io_from_env(),
                streams: ferry::lanes::Streams::parse(&self.streams)
                    .map_err(|e| UsageError(e.to_string()))?,
            },
            retry: RetryPolicy {
                initial: Duration::from_millis(self.retry_initial),
                multiplier: 2.0,
                max_delay: Duration::from_millis(self.retry_max_delay.max(self.retry_initial)),
                max_attempts: self.retry_max_attempts,
                budget: self.retry_budget.map(Duration::from_secs_f64),
            },
            alg,
            seed: None,
            sftp: Default::default(),
        })
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a server that receives uploads into and serves downloads from --root.
    #[command(
        after_help = "Exit codes: 0 stopped by Ctrl-C; 2 bad arguments; 8 could not start \
                      (address in use, --root missing, state directory unusable).\n\
                      Environment: FERRY_TCP_CC, FERRY_QUIC_CC and FERRY_QUIC_MTU tune the \
                      transports as for cp; FERRY_DIRECT_IO=0 writes uploads through the page cache."
    )]
    Serve {
        /// Directory served; nothing is ever written outside it. It must exist
        /// (see --create-root).
        #[arg(long)]
        root: PathBuf,
        /// Create --root (and its parents) if it does not exist.
        #[arg(long)]
        create_root: bool,
        #[arg(long, default_value = "0.0.0.0:7787")]
        listen: SocketAddr,
        /// File holding the token clients must present (default: STATE_DIR/token, made on first start).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Where the certificate, the token and the journal live.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Accept clients without a token (for tests on a trusted host only).
        #[arg(long)]
        no_auth: bool,
        /// Tear a connection down after this many seconds without hearing from it.
        #[arg(long, default_value_t = 30.0)]
        stall_timeout: f64,
        /// Refuse new uploads (retry later) that would leave less free disk than this, e.g. 2G.
        #[arg(long, value_parser = parse_rate, default_value = "1G")]
        min_free: u64,
        /// Do not serve QUIC (by default on the UDP port numbered like --listen).
        #[arg(long)]
        no_quic: bool,
        /// Also serve WebSocket (plain HTTP upgrade, ferry's TLS inside) on this
        /// address: for clients behind HTTP-only networks or a reverse proxy.
        #[arg(long)]
        ws_listen: Option<SocketAddr>,
        /// Also serve WebSocket inside an outer TLS layer (wss) on this address.
        #[arg(long)]
        wss_listen: Option<SocketAddr>,
        /// Connections not yet authenticated that one source (an IPv4 address,
        /// an IPv6 /64) may hold at once; more are refused.
        #[arg(long, default_value_t = AdmissionConfig::default().per_source)]
        max_unauthenticated_per_source: usize,
        /// Connections not yet authenticated in all; past this the oldest is dropped.
        #[arg(long, default_value_t = AdmissionConfig::default().unauthenticated)]
        max_unauthenticated: usize,
        /// Authenticated connections in all; past this clients are told to retry later.
        #[arg(long, default_value_t = AdmissionConfig::default().authenticated)]
        max_authenticated: usize,
        /// Longest a source that keeps exceeding its limit or failing
        /// authentication is refused, in seconds (0: never refuse for that).
        #[arg(long, default_value_t = AdmissionConfig::default().penalty_max.as_secs())]
        penalty_max: u64,
    },
    /// Copy files and trees; SRC and DST are local paths or ferry://HOST[:PORT]/PATH.
    Cp {
        /// Copy directories recursively.
        #[arg(short, long)]
        recursive: bool,
        /// Follow symlinks inside trees (a link back into its own path or to a
        /// directory copied already is skipped); by default they are skipped
        /// with a warning. Symlinks named as sources are always followed.
        #[arg(short = 'L', long)]
        copy_links: bool,
        /// Print a JSON summary as the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Hash algorithm for new transfers.
        #[arg(long, default_value = "blake3")]
        hash: String,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        ssh: SshArgs,
        /// Sources, then the destination.
        #[arg(required = true, num_args = 2..)]
        paths: Vec<String>,
    },
    /// Finish copies left queued by an earlier `ferry cp` (see `ferry status`).
    Resume {
        /// Queue entry ids to resume.
        ids: Vec<String>,
        /// Resume every queued copy.
        #[arg(long)]
        all: bool,
        /// Remove the named entries from the queue without running them.
        #[arg(long, conflicts_with = "all")]
        forget: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Drain the queue in the background: retry queued copies with backoff until
    /// their peers are back; survives restarts (the queue is on disk).
    Agent {
        /// Seconds between passes over the queue.
        #[arg(long, default_value_t = 5.0)]
        poll: f64,
        /// Exit once the queue is empty instead of waiting for new entries.
        #[arg(long)]
        exit_when_empty: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show the transfers this machine started and has not finished.
    Status {
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Show ferry at work: a local server, a flaky link, and a transfer that completes anyway.
    Demo {
        /// Size of the generated file, in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// How many times the link is cut.
        #[arg(long, default_value_t = 4)]
        cuts: u32,
        /// Seed for the fault plan (random if unset).
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FERRY_STATE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(d).join("ferry");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/state/ferry"),
        None => PathBuf::from(".ferry-state"),
    }
}

fn read_token(file: Option<&Path>) -> anyhow::Result<Option<Vec<u8>>> {
    if let Some(f) = file {
        let t = std::fs::read_to_string(f)
            .with_context(|| format!("reading token file {}", f.display()))?;
        return Ok(Some(t.trim().as_bytes().to_vec()));
    }
    Ok(std::env::var("FERRY_TOKEN")
        .ok()
        .map(|t| t.trim().as_bytes().to_vec()))
}

/// glibc serves allocations over a threshold with `mmap` and gives them
/// back when freed, but raises the threshold to the size of each such block
/// freed: after the first multi-megabyte chunk buffer, later ones come from
/// per-thread arenas that keep what was freed, and a server's peak memory for
/// a 4 GiB upload wandered between 58 and 71 MB from run to run. A fixed
/// threshold keeps large buffers out of the arenas (peak 46 MB); the chunk
/// buffers themselves are pooled, so this costs few `mmap` calls.
fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn main() -> ExitCode {
    fix_mmap_threshold();
    let cli = Cli::parse();
    ferry::fsutil::raise_fd_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start runtime: {e}");
            return ExitCode::from(exit::OTHER);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            let mut msg = format!("{e}");
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(&format!(": {c}"));
                }
            }
            eprintln!("ferry: error: {msg}");
            ExitCode::from(code)
        }
    }
}

fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.downcast_ref::<ferry::agent::Busy>().is_some() {
            return exit::BUSY;
        }
        if cause.downcast_ref::<QueueNeedsUser>().is_some() {
            return exit::LOCAL_IO;
        }
        if let Some(fe) = cause.downcast_ref::<Error>() {
            return match fe.class() {
                ErrorClass::Usage => exit::USAGE,
                ErrorClass::Auth => exit::AUTH,
                ErrorClass::Unreachable => exit::UNREACHABLE,
                ErrorClass::Integrity => exit::INTEGRITY,
                ErrorClass::LocalIo => exit::LOCAL_IO,
                ErrorClass::Protocol => exit::PROTOCOL,
            };
        }
        if cause.downcast_ref::<UsageError>().is_some() {
            return exit::USAGE;
        }
        if cause.downcast_ref::<StartupError>().is_some() {
            return exit::STARTUP;
        }
    }
    exit::OTHER
}

#[derive(Debug)]
struct UsageError(String);

/// Queue entries only the user can deal with (damaged, or left behind).
#[derive(Debug)]
struct QueueNeedsUser(String);

impl std::error::Error for QueueNeedsUser {}

impl std::fmt::Display for QueueNeedsUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `ferry serve` could not start; the text says why (exit code 8).
#[derive(Debug)]
struct StartupError(String);

impl std::error::Error for StartupError {}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Refuses a `--root` that is not an existing directory, unless it may be
/// created: a mistyped path would otherwise serve an empty tree.
fn check_root(root: &Path, create: bool) -> Result<(), StartupError> {
    match std::fs::metadata(root) {
        Ok(md) if md.is_dir() => Ok(()),
        Ok(_) => Err(StartupError(format!(
            "--root {} is not a directory",
            root.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StartupError(format!(
            "--root {} does not exist; create it, or pass --create-root",
            root.display()
        ))),
        Err(e) => Err(StartupError(format!(
            "cannot use --root {}: {e}",
            root.display()
        ))),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let default_level = match (&cli.cmd, cli.verbose, cli.quiet) {
        (_, _, true) => "error",
        (_, 0, _)
            if matches!(
                cli.cmd,
                Cmd::Cp { .. } | Cmd::Status { .. } | Cmd::Resume { .. }
            ) =>
        {
            "warn"
        }
        (_, 0, _) => "info",
        (_, 1, _) => "info",
        _ => "debug",
    };
    match cli.cmd {
        Cmd::Serve {
            root,
            create_root,
            listen,
            token_file,
            state_dir,
            no_auth,
            stall_timeout,
            min_free,
            no_quic,
            ws_listen,
            wss_listen,
            max_unauthenticated_per_source,
            max_unauthenticated,
            max_authenticated,
            penalty_max,
        } => {
            ui::init_logging(cli.log_format == LogFormat::Json, default_level, None);
            let timeouts = timeouts(stall_timeout)?;
            for (flag, n) in [
                (
                    "--max-unauthenticated-per-source",
                    max_unauthenticated_per_source,
                ),
                ("--max-unauthenticated", max_unauthenticated),
                ("--max-authenticated", max_authenticated),
            ] {
                if n == 0 {
                    return Err(UsageError(format!("{flag} must be at least 1")).into());
                }
            }
            check_root(&root, create_root)?;
            let admission = AdmissionConfig {
                per_source: max_unauthenticated_per_source,
                unauthenticated: max_unauthenticated,
                authenticated: max_authenticated,
                penalty_max: Duration::from_secs(penalty_max),
                ..AdmissionConfig::default()
            };
            let state_dir = state_dir.unwrap_or_else(|| default_state_dir().join("server"));
            let token = if no_auth {
                None
            } else {
                match read_token(token_file.as_deref())? {
                    Some(t) if !t.is_empty() => Some(t),
                    Some(_) => return Err(UsageError("the token is empty".into()).into()),
                    None => Some(ui::server_token(&state_dir)?),
                }
            };
            let cfg = ferry::server::ServerConfig {
                root,
                listen,
                state_dir: state_dir.clone(),
                token,
                receiver: receiver_config_from_env(),
                faults: None,
                timeouts,
                min_free_bytes: min_free,
                admission,
                direct_io: direct_io_from_env(),
            };
            let startup = |e: ferry::Error| StartupError(e.to_string());
            let transport = transport_config_from_env(None);
            let mut server = ferry::server::Server::new(cfg).map_err(startup)?;
            let tcp = ferry::transport::tcp::TcpTlsListener::bind(
                listen,
                server.tls_config(),
                &transport,
            )
            .await
            .map_err(startup)?;
            server.add_listener(Box::new(tcp));
            let tcp_addr = server.local_addr()?;
            println!("ferry server listening on {tcp_addr}");
            if !no_quic {
                match ferry::transport::quic::QuicListener::bind(
                    tcp_addr,
                    server.tls_config(),
                    &transport,
                ) {
                    Ok(q) => {
                        println!("quic on udp {}", q.local_addr()?);
                        server.add_listener(Box::new(q));
                    }
                    Err(e) => eprintln!("warning: QUIC not served: {e}"),
                }
            }
            for (addr, secure) in [(ws_listen, false), (wss_listen, true)] {
                let Some(addr) = addr else { continue };
                let l = ferry::transport::ws::WsListener::bind(
                    addr,
                    server.tls_config(),
                    secure,
                    &transport,
                )
                .await
                .map_err(startup)?;
                println!(
                    "{} on {}",
                    if secure { "wss" } else { "ws" },
                    l.local_addr()?
                );
                server.add_listener(Box::new(l));
            }
            println!("fingerprint {}", server.fingerprint());
            if no_auth {
                println!("authentication: OFF (--no-auth)");
            } else if token_file.is_none() && std::env::var_os("FERRY_TOKEN").is_none() {
                println!("token file {}", state_dir.join("token").display());
            }
            server
                .run(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
            Ok(())
        }
        Cmd::Cp {
            recursive,
            copy_links,
            json,
            hash,
            client,
            ssh,
            mut paths,
        } => {
            let display = (!client.no_progress).then(ProgressSlot::new);
            let multi = display.as_ref().and_then(|d| d.multi());
            let sftp = ssh.options(multi.clone())?;
            let dst = paths
                .pop()
                .ok_or_else(|| UsageError("missing destination".into()))?;
            let alg = HashAlg::from_name(&hash).ok_or_else(|| {
                UsageError(format!("unknown hash {hash:?}: use blake3 or sha256"))
            })?;
            let mut opts = client.options(recursive, alg)?;
            opts.follow_links = copy_links;
            opts.sftp = sftp;
            // Local paths are kept absolute, so `ferry resume` works from anywhere.
            let paths: Vec<String> = paths.iter().map(|p| absolutize(p)).collect();
            let dst = absolutize(&dst);
            let queue = Queue::new(&opts.state_dir);
            let mut entry = queue.entry_for(&paths, &dst, recursive, alg.name());
            entry.follow_links = copy_links;
            if paths.iter().chain([&dst]).any(|p| p.starts_with("sftp://")) {
                entry.ssh = Some(ferry::queue::QueuedSsh {
                    identities: ssh.identity.clone(),
                    known_hosts: ssh.known_hosts.clone(),
                    accept_new_host_key: ssh.accept_new_host_key,
                    verify: ssh.verify.clone(),
                });
            }
            ui::init_logging(cli.log_format == LogFormat::Json, default_level, multi);
            let print = |summary: &CopySummary| -> anyhow::Result<()> {
                if json {
                    println!("{}", serde_json::to_string(summary)?);
                } else if !cli.quiet {
                    for l in ui::per_file_lines(summary) {
                        println!("{l}");
                    }
                    println!("{}", ui::summary_line(summary));
                }
                Ok(())
            };
            match run_entry(&queue, entry, &opts, display).await {
                Ok(summary) => print(&summary),
                Err(e) => {
                    // What was copied still gets its summary; the error line says what was not.
                    if let Some(Error::NotAllCopied { summary, .. }) = e.downcast_ref::<Error>() {
                        print(summary)?;
                    }
                    Err(e)
                }
            }
        }
        Cmd::Resume {
            ids,
            all,
            forget,
            client,
        } => {
            ui::init_logging(cli.log_format == LogFormat::Json, default_level, None);
            resume(&client, &ids, all, forget).await
        }
        Cmd::Agent {
            poll,
            exit_when_empty,
            client,
        } => {
            ui::init_logging(cli.log_format == LogFormat::Json, default_level, None);
            agent(&client, poll, exit_when_empty).await
        }
        Cmd::Status { state_dir, json } => {
            ui::init_logging(cli.log_format == LogFormat::Json, default_level, None);
            let state_dir = state_dir.unwrap_or_else(default_state_dir);
            ui::print_status(&state_dir, json)
        }
        Cmd::Demo {
            size_mib,
            cuts,
            seed,
        } => demo::run(size_mib, cuts, seed, cli.log_format == LogFormat::Json).await,
    }
}

/// Transport tuning: `ws_path` (--ws-path), FERRY_TCP_CC (a congestion
/// controller, empty for the host's default), FERRY_QUIC_CC (bbr, cubic or
/// newreno; anything else is bbr) and FERRY_QUIC_MTU (an unparsable value
/// keeps the default).
fn transport_config_from_env(ws_path: Option<&str>) -> ferry::transport::TransportConfig {
    let mut c = ferry::transport::TransportConfig::default();
    if let Ok(cc) = std::env::var("FERRY_TCP_CC") {
        c.tcp_congestion = (!cc.is_empty()).then_some(cc);
    }
    if let Ok(cc) = std::env::var("FERRY_QUIC_CC") {
        c.quic_congestion = ferry::transport::quic::Congestion::from_name(&cc);
    }
    if let Some(mtu) = std::env::var("FERRY_QUIC_MTU")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        c.quic_mtu = mtu;
    }
    if let Some(p) = ws_path {
        c.ws_path = p.to_string();
    }
    c
}

/// `O_DIRECT` writes of received chunks, unless FERRY_DIRECT_IO=0.
fn direct_io_from_env() -> bool {
    !std::env::var("FERRY_DIRECT_IO").is_ok_and(|v| v == "0")
}

/// Checkpoint tuning for benchmarks: FERRY_CHECKPOINT_MIB and FERRY_CHECKPOINT_MS.
fn receiver_config_from_env() -> ferry_proto::ReceiverConfig {
    let mut c = ferry_proto::ReceiverConfig::default();
    if let Some(m) = std::env::var("FERRY_CHECKPOINT_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        // Below half the sender's 32 MiB window: at or above it the window
        // fills before a checkpoint is due, and every checkpoint waits for
        // the timer (64 MiB made a 1 GiB upload take 35 s instead of 4).
        c.checkpoint_bytes = m.clamp(1, 16) << 20;
    }
    if let Some(ms) = std::env::var("FERRY_CHECKPOINT_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        c.checkpoint_interval = Duration::from_millis(ms);
    }
    c
}

/// Parses `10M`, `512K`, `1G` or plain bytes per second.
fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a rate like 10M"))?;
    if !(0.0..1e15).contains(&n) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok((n * mult as f64) as u64)
}

fn timeouts(stall_secs: f64) -> anyhow::Result<ferry::conn::Timeouts> {
    if !(0.2..=86_400.0).contains(&stall_secs) {
        return Err(UsageError(format!(
            "--stall-timeout {stall_secs} is out of range (0.2 to 86400 seconds)"
        ))
        .into());
    }
    Ok(ferry::conn::Timeouts::with_stall(Duration::from_secs_f64(
        stall_secs,
    )))
}

/// Holds the progress display of one run, if any.
struct ProgressSlot {
    progress: Arc<Progress>,
    display: ui::ProgressDisplay,
}

impl ProgressSlot {
    fn new() -> Self {
        let progress = Arc::new(Progress::default());
        Self {
            display: ui::ProgressDisplay::start(progress.clone()),
            progress,
        }
    }

    fn multi(&self) -> Option<indicatif::MultiProgress> {
        self.display.multi()
    }
}

/// Runs the copy a queue entry describes (with the SSH settings it was
/// started with, for SFTP).
async fn copy_entry(
    e: QueueEntry,
    opts: anyhow::Result<CopyOptions>,
    multi: Option<indicatif::MultiProgress>,
    progress: Arc<Progress>,
) -> ferry::Result<CopySummary> {
    let mut opts = opts.map_err(|err| Error::Usage(format!("{err:#}")))?;
    if let Some(q) = &e.ssh {
        let args = SshArgs {
            identity: q.identities.clone(),
            known_hosts: q.known_hosts.clone(),
            accept_new_host_key: q.accept_new_host_key,
            verify: q.verify.clone(),
        };
        let sftp = args
            .options(multi)
            .map_err(|err| Error::Usage(format!("{err:#}")))?;
        opts.sftp = sftp;
    }
    copy(&e.srcs, &e.dst, &opts, progress).await
}

/// Runs one copy typed by the user as a queue entry: it stays queued if the
/// copy gives up for a reason that time can fix, and goes away when it
/// completes.
async fn run_entry(
    queue: &Queue,
    entry: QueueEntry,
    opts: &CopyOptions,
    display: Option<ProgressSlot>,
) -> anyhow::Result<CopySummary> {
    let id = entry.id.clone();
    run_queued(queue, entry, Ok(opts.clone()), display, Origin::NewCopy)
        .await?
        .ok_or_else(|| anyhow::anyhow!("queue entry {id} was completed by another ferry process"))
}

/// Runs one queue entry under its lock; `None` when another process
/// completed it first.
async fn run_queued(
    queue: &Queue,
    entry: QueueEntry,
    opts: anyhow::Result<CopyOptions>,
    display: Option<ProgressSlot>,
    origin: Origin,
) -> anyhow::Result<Option<CopySummary>> {
    let id = entry.id.clone();
    let multi = display.as_ref().and_then(|d| d.multi());
    let progress = display
        .as_ref()
        .map(|d| d.progress.clone())
        .unwrap_or_default();
    let outcome = ferry::agent::run_entry(queue, entry, origin, |e| {
        copy_entry(e, opts, multi, progress)
    })
    .await;
    if let Some(d) = display {
        d.display.finish().await;
    }
    match outcome? {
        ferry::agent::Outcome::Completed {
            summary,
            left_behind,
        } => {
            if let Some(e) = left_behind {
                eprintln!("ferry: warning: the copy completed, but its queue entry {id} could not be removed ({e}); delete it");
            }
            Ok(Some(summary))
        }
        ferry::agent::Outcome::Queued { error, .. } => {
            eprintln!(
                "ferry: could not finish now; queued as {id} (`ferry resume {id}` or `ferry agent` will complete it)"
            );
            Err(error.into())
        }
        ferry::agent::Outcome::Failed(e) => Err(e.into()),
        ferry::agent::Outcome::Busy(b) => Err(b.into()),
        ferry::agent::Outcome::Gone => Ok(None),
        _ => Err(anyhow::anyhow!("queue entry {id}: unexpected outcome")),
    }
}

/// `ferry resume`: runs (or with `forget`, removes) queued copies.
async fn resume(
    client: &ClientArgs,
    ids: &[String],
    all: bool,
    forget: bool,
) -> anyhow::Result<()> {
    let queue = Queue::new(&client.state_dir());
    let scan = queue.scan();
    if all {
        for d in &scan.damaged {
            eprintln!("ferry: {d}");
        }
    }
    let entries: Vec<QueueEntry> = if all {
        scan.entries
    } else if ids.is_empty() {
        return Err(UsageError("name queue entries to resume, or --all".into()).into());
    } else {
        ids.iter()
            .map(|id| {
                queue
                    .get(id)
                    .ok_or_else(|| UsageError(format!("no queued copy {id:?} (see ferry status)")))
            })
            .collect::<Result<_, _>>()?
    };
    if forget {
        for e in entries {
            let Some(_claim) = queue.claim(&e.id)? else {
                return Err(ferry::agent::Busy::Entry {
                    pid: queue.running_elsewhere(&e.id).unwrap_or(0),
                    id: e.id,
                }
                .into());
            };
            queue.remove(&e.id)?;
            println!("forgot {} ({} -> {})", e.id, e.srcs.join(" "), e.dst);
        }
        return Ok(());
    }
    if entries.is_empty() && scan.damaged.is_empty() {
        println!("nothing queued");
        return Ok(());
    }
    let mut failed = None;
    for e in entries {
        let alg = HashAlg::from_name(&e.alg).unwrap_or(HashAlg::Blake3);
        let opts = client.options(e.recursive, alg).map(|mut o| {
            o.follow_links = e.follow_links;
            o
        });
        let id = e.id.clone();
        match run_queued(&queue, e, opts, None, Origin::Queued).await {
            Ok(Some(s)) => {
                println!("completed {id}: {}", ui::summary_line(&s));
                for l in ui::per_file_lines(&s) {
                    println!("  {l}");
                }
            }
            Ok(None) => println!("{id}: already completed by another ferry process"),
            Err(err) => {
                eprintln!("ferry: {id}: {err:#}");
                failed = Some(err);
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None if all && !scan.damaged.is_empty() => Err(QueueNeedsUser(format!(
            "{} damaged queue entries need you (see above)",
            scan.damaged.len()
        ))
        .into()),
        None => Ok(()),
    }
}

/// What the agent prints as each entry is run.
fn print_event(ev: ferry::agent::Event<'_>) {
    use ferry::agent::Event;
    let what = |e: &QueueEntry| format!("{} ({} -> {})", e.id, e.srcs.join(" "), e.dst);
    match ev {
        Event::Completed { entry, summary } => {
            println!("completed {}: {}", what(entry), ui::summary_line(summary));
            for l in ui::per_file_lines(summary) {
                println!("  {l}");
            }
        }
        Event::LeftBehind { entry, error } => println!(
            "completed {} but its queue file could not be removed ({error}); delete it",
            what(entry)
        ),
        Event::Queued {
            entry,
            reason,
            retry_in_secs,
        } => println!(
            "still missing {}: {reason}; next attempt in {retry_in_secs}s",
            what(entry)
        ),
        Event::Busy { entry, busy } => println!("skipped {}: {busy}", what(entry)),
        Event::QueueError { entry, error } => println!("still missing {}: {error}", what(entry)),
        _ => {}
    }
}

/// ^C or SIGTERM, remembered from the moment it is installed.
struct Stop {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Stop {
    fn install() -> anyhow::Result<Stop> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Stop {
            int: signal(SignalKind::interrupt()).context("installing the ^C handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// The long-running drainer behind `ferry agent`.
async fn agent(client: &ClientArgs, poll: f64, exit_when_empty: bool) -> anyhow::Result<()> {
    if !(0.05..=3600.0).contains(&poll) {
        return Err(UsageError("--poll must be between 0.05 and 3600 seconds".into()).into());
    }
    // Bad flags or an unreadable token file stop the agent now, not each entry.
    client.options(false, HashAlg::Blake3)?;
    let state_dir = client.state_dir();
    let mut agent = ferry::agent::Agent::start(&state_dir)??;
    let scan = agent.queue().scan();
    println!(
        "ferry agent: draining {} ({} queued, {} damaged)",
        agent.queue().dir().display(),
        scan.entries.len(),
        scan.damaged.len()
    );
    // Installed once, so a ^C or SIGTERM that arrives mid-pass is not lost.
    let mut stop = Stop::install()?;
    let mut last_key = None;
    loop {
        let pass = agent.pass(
            |e| {
                let alg = HashAlg::from_name(&e.alg).unwrap_or(HashAlg::Blake3);
                let opts = client.options(e.recursive, alg).map(|mut o| {
                    o.follow_links = e.follow_links;
                    o
                });
                copy_entry(e, opts, None, Arc::default())
            },
            print_event,
        );
        let ran = tokio::select! {
            ran = pass => ran,
            _ = stop.wait() => {
                // The copy under way stops here; its entry stays queued.
                for l in agent.report().lines(now_unix()) {
                    println!("{l}");
                }
                return Ok(());
            }
        };
        let report = agent.report();
        let key = report.key();
        if ran > 0 || last_key.as_ref() != Some(&key) {
            for l in report.lines(now_unix()) {
                println!("{l}");
            }
            last_key = Some(key);
        }
        if exit_when_empty && report.queued.is_empty() {
            if report.nothing_missing() {
                return Ok(());
            }
            return Err(QueueNeedsUser(format!(
                "the queue holds {} damaged entries and {} left behind that need you (see the report above)",
                report.damaged.len(),
                report.left_behind.len()
            ))
            .into());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(poll)) => {}
            _ = stop.wait() => {
                for l in agent.report().lines(now_unix()) {
                    println!("{l}");
                }
                return Ok(());
            }
        }
    }
}

/// An absolute form of a local path argument (URLs are left alone); a
/// trailing `/` is kept since it means "into this directory".
fn absolutize(p: &str) -> String {
    if p.contains("://") {
        return p.to_string();
    }
    match std::path::absolute(p) {
        Ok(a) => {
            let mut s = a.display().to_string();
            if p.ends_with('/') && !s.ends_with('/') {
                s.push('/');
            }
            s
        }
        Err(_) => p.to_string(),
    }
}
