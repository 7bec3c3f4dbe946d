//! The `ferry` command: thin argument handling over the `ferry` engine.

mod demo;
mod ui;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ferry::copy::{copy, CopyOptions};
use ferry::progress::Progress;
use ferry::retry::RetryPolicy;
use ferry::tls::KnownServers;
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

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a server that receives uploads into and serves downloads from --root.
    Serve {
        /// Directory served; nothing is ever written outside it.
        #[arg(long)]
        root: PathBuf,
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
    },
    /// Copy files and trees; SRC and DST are local paths or ferry://HOST[:PORT]/PATH.
    Cp {
        /// Copy directories recursively.
        #[arg(short, long)]
        recursive: bool,
        /// Print a JSON summary as the last line of stdout.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// File holding the server's token (or set FERRY_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Expected server fingerprint (SHA256:…); otherwise pinned on first use.
        #[arg(long)]
        fingerprint: Option<String>,
        /// Hash algorithm for new transfers.
        #[arg(long, default_value = "blake3")]
        hash: String,
        /// Attempts without progress before giving up (0 = unlimited).
        #[arg(long, default_value_t = 10)]
        retry_max_attempts: u32,
        /// First retry delay, in milliseconds.
        #[arg(long, default_value_t = 250)]
        retry_initial: u64,
        /// Longest retry delay, in milliseconds.
        #[arg(long, default_value_t = 30_000)]
        retry_max_delay: u64,
        /// Give up after this many seconds without progress (default: no limit).
        #[arg(long)]
        retry_budget: Option<u64>,
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
        /// Sources, then the destination.
        #[arg(required = true, num_args = 2..)]
        paths: Vec<String>,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    }
    exit::OTHER
}

#[derive(Debug)]
struct UsageError(String);

impl std::error::Error for UsageError {}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let default_level = match (&cli.cmd, cli.verbose, cli.quiet) {
        (_, _, true) => "error",
        (_, 0, _) if matches!(cli.cmd, Cmd::Cp { .. } | Cmd::Status { .. }) => "warn",
        (_, 0, _) => "info",
        (_, 1, _) => "info",
        _ => "debug",
    };
    match cli.cmd {
        Cmd::Serve {
            root,
            listen,
            token_file,
            state_dir,
            no_auth,
            stall_timeout,
        } => {
            ui::init_logging(cli.log_format == LogFormat::Json, default_level, None);
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
                timeouts: timeouts(stall_timeout)?,
            };
            let server = ferry::server::Server::bind(cfg).await?;
            println!("ferry server listening on {}", server.local_addr()?);
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
            json,
            state_dir,
            token_file,
            fingerprint,
            hash,
            retry_max_attempts,
            retry_initial,
            retry_max_delay,
            retry_budget,
            no_progress,
            via,
            bwlimit,
            stall_timeout,
            mut paths,
        } => {
            let dst = paths
                .pop()
                .ok_or_else(|| UsageError("missing destination".into()))?;
            let state_dir = state_dir.unwrap_or_else(default_state_dir);
            let alg = HashAlg::from_name(&hash).ok_or_else(|| {
                UsageError(format!("unknown hash {hash:?}: use blake3 or sha256"))
            })?;
            let opts = CopyOptions {
                recursive,
                state_dir: state_dir.clone(),
                client: ferry::client::ClientConfig {
                    token: read_token(token_file.as_deref())?,
                    fingerprint,
                    known_servers: KnownServers::new(state_dir.join("known_servers")),
                    connect_timeout: Duration::from_secs(10),
                    via,
                    bwlimit,
                    timeouts: timeouts(stall_timeout)?,
                },
                retry: RetryPolicy {
                    initial: Duration::from_millis(retry_initial),
                    multiplier: 2.0,
                    max_delay: Duration::from_millis(retry_max_delay.max(retry_initial)),
                    max_attempts: retry_max_attempts,
                    budget: retry_budget.map(Duration::from_secs),
                },
                alg,
            };
            let progress = Arc::new(Progress::default());
            let display = if no_progress {
                None
            } else {
                Some(ui::ProgressDisplay::start(progress.clone()))
            };
            ui::init_logging(
                cli.log_format == LogFormat::Json,
                default_level,
                display.as_ref().and_then(|d| d.multi()),
            );
            let r = copy(&paths, &dst, &opts, progress.clone()).await;
            if let Some(d) = display {
                d.finish().await;
            }
            let summary = r?;
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else if !cli.quiet {
                println!("{}", ui::summary_line(&summary));
            }
            Ok(())
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

/// Checkpoint tuning for benchmarks: FERRY_CHECKPOINT_MIB and FERRY_CHECKPOINT_MS.
fn receiver_config_from_env() -> ferry_proto::ReceiverConfig {
    let mut c = ferry_proto::ReceiverConfig::default();
    if let Some(m) = std::env::var("FERRY_CHECKPOINT_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        c.checkpoint_bytes = m << 20;
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
