//! What the user sees: progress bars or plain lines, logs, summaries, status.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry::copy::CopySummary;
use ferry::progress::Progress;
use ferry::status::StatusDir;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Sends log lines to stderr, above the progress bars when there are any.
#[derive(Clone)]
struct LogWriter {
    multi: Option<MultiProgress>,
}

struct LineWriter {
    multi: Option<MultiProgress>,
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buf).into_owned();
        match &self.multi {
            Some(m) => m.suspend(|| eprint!("{text}")),
            None => eprint!("{text}"),
        }
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            multi: self.multi.clone(),
            buf: Vec::new(),
        }
    }
}

/// Structured logs on stderr; `RUST_LOG` overrides the level.
pub fn init_logging(json: bool, default_level: &str, multi: Option<MultiProgress>) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let writer = LogWriter { multi };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.try_init()
    };
}

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Progress bars on a terminal, a plain line every few seconds otherwise.
pub struct ProgressDisplay {
    multi: Option<MultiProgress>,
    task: tokio::task::JoinHandle<()>,
    stop: Arc<tokio::sync::Notify>,
}

impl ProgressDisplay {
    pub fn start(p: Arc<Progress>) -> Self {
        let tty = std::io::stderr().is_terminal();
        let stop = Arc::new(tokio::sync::Notify::new());
        let stop2 = stop.clone();
        if tty {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
            let style_file = ProgressStyle::with_template("{msg:30!} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            let style_total = ProgressStyle::with_template("{msg:30!} [{bar:30.green/white}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            let file = multi.add(ProgressBar::new(0).with_style(style_file));
            let total = multi.add(ProgressBar::new(0).with_style(style_total));
            let task = tokio::spawn(async move {
                loop {
                    let (name, size, done) = p.current();
                    file.set_length(size);
                    file.set_position(done.min(size));
                    file.set_message(short_name(&name));
                    let t = Progress::get(&p.bytes_total);
                    total.set_length(t);
                    total.set_position(Progress::get(&p.bytes_done).min(t));
                    total.set_message(format!(
                        "total {}/{} files, {} retries",
                        Progress::get(&p.files_done),
                        Progress::get(&p.files_total),
                        Progress::get(&p.retries)
                    ));
                    tokio::select! {
                        _ = stop2.notified() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
                let t = Progress::get(&p.bytes_total);
                total.set_position(Progress::get(&p.bytes_done).min(t));
                file.finish_and_clear();
                total.finish();
            });
            Self {
                multi: Some(multi),
                task,
                stop,
            }
        } else {
            let task = tokio::spawn(async move {
                let start = Instant::now();
                loop {
                    tokio::select! {
                        _ = stop2.notified() => break,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                    let done = Progress::get(&p.bytes_done);
                    let total = Progress::get(&p.bytes_total);
                    let rate = done as f64 / start.elapsed().as_secs_f64().max(0.001);
                    let pct = if total == 0 {
                        100.0
                    } else {
                        done as f64 * 100.0 / total as f64
                    };
                    eprintln!(
                        "progress: {} / {} ({pct:.1}%), {}/s, files {}/{}, retries {}",
                        human(done),
                        human(total),
                        human(rate as u64),
                        Progress::get(&p.files_done),
                        Progress::get(&p.files_total),
                        Progress::get(&p.retries)
                    );
                }
            });
            Self {
                multi: None,
                task,
                stop,
            }
        }
    }

    pub fn multi(&self) -> Option<MultiProgress> {
        self.multi.clone()
    }

    pub async fn finish(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

fn short_name(s: &str) -> String {
    let n: Vec<char> = s.chars().collect();
    if n.len() <= 30 {
        s.to_string()
    } else {
        format!("…{}", n[n.len() - 29..].iter().collect::<String>())
    }
}

/// What happened per file of an SFTP copy, one line each: every file that
/// was not simply sent fresh (resumed, restarted, repaired, fell back,
/// already complete), then one line counting the fresh ones.
pub fn per_file_lines(s: &CopySummary) -> Vec<String> {
    use ferry::sftp::Resume;
    let mut out: Vec<String> = s
        .per_file
        .iter()
        .filter(|r| r.resume != Resume::Fresh)
        .map(|r| r.to_string())
        .collect();
    let fresh: Vec<_> = s
        .per_file
        .iter()
        .filter(|r| r.resume == Resume::Fresh)
        .collect();
    match fresh.as_slice() {
        [] => {}
        [one] => out.push(one.to_string()),
        many => {
            let mut by: Vec<&str> = many.iter().map(|r| r.verified_by.as_str()).collect();
            by.sort_unstable();
            by.dedup();
            out.push(format!(
                "{} file(s): fresh; verified by {}",
                many.len(),
                by.join(", ")
            ))
        }
    }
    out
}

pub fn summary_line(s: &CopySummary) -> String {
    let rate = s.bytes_total as f64 / s.duration_s.max(0.001);
    let lanes = match s.data_lanes {
        0 => String::new(),
        n => format!(", {n} data lane(s)"),
    };
    format!(
        "copied {} file(s), {} in {:.2}s ({}/s); sent {}, resumed {}, {} retries{lanes}; {} {}",
        s.files,
        human(s.bytes_total),
        s.duration_s,
        human(rate as u64),
        human(s.bytes_sent),
        human(s.bytes_resumed),
        s.retries,
        s.alg,
        s.digest
    )
}

/// The server's token: read from STATE_DIR/token, or made there (0600).
pub fn server_token(state_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = state_dir.join("token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim();
        if !t.is_empty() {
            return Ok(t.as_bytes().to_vec());
        }
    }
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let raw: [u8; 24] = rand::random();
    let token = ferry::fsutil::hex(&raw);
    ferry::fsutil::write_private(&path, format!("{token}\n").as_bytes())?;
    Ok(token.into_bytes())
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

pub fn print_status(state_dir: &Path, json: bool) -> anyhow::Result<()> {
    let mut recs = StatusDir::new(state_dir).list();
    for r in &mut recs {
        if r.state == ferry::status::RecordState::Active
            && (r.pid == 0 || !pid_alive(r.pid) || r.pid == std::process::id())
        {
            r.state = ferry::status::RecordState::Interrupted;
        }
    }
    let peers = ferry::status::PeerStatus::new(state_dir).list();
    let queue = ferry::queue::Queue::new(state_dir);
    let scan = queue.scan();
    if json {
        let queued: Vec<_> = scan
            .entries
            .iter()
            .map(|q| {
                let mut v = serde_json::to_value(q).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    let running = queue.is_running_elsewhere(&q.id);
                    o.insert(
                        "state".into(),
                        (if running { "running" } else { "queued" }).into(),
                    );
                }
                v
            })
            .collect();
        let damaged: Vec<_> = scan
            .damaged
            .iter()
            .map(|d| serde_json::json!({ "path": d.path, "problem": d.problem }))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "transfers": recs, "peers": peers, "queue": queued, "damaged": damaged })
        );
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for p in &peers {
        match (p.breaker.as_str(), p.retry_at_unix) {
            ("closed", _) => {}
            ("open", Some(t)) if t > now => println!(
                "peer {}: circuit breaker open, next attempt in {}s",
                p.addr,
                t - now
            ),
            (state, _) => println!("peer {}: circuit breaker {state}", p.addr),
        }
    }
    for d in &scan.damaged {
        println!("{d}");
    }
    let queued = &scan.entries;
    for q in queued {
        let state = if queue.is_running_elsewhere(&q.id) {
            "running"
        } else {
            "queued"
        };
        println!(
            "{} {state:<11} copy {} -> {} (attempts {})",
            q.id,
            q.srcs.join(" "),
            q.dst,
            q.attempts
        );
        if let Some(e) = &q.last_error {
            println!("    last error: {e}");
        }
    }
    if recs.is_empty() {
        if queued.is_empty() && scan.damaged.is_empty() {
            println!("no unfinished transfers");
        }
        return Ok(());
    }
    for r in recs {
        let pct = if r.size == 0 {
            0.0
        } else {
            r.bytes_done as f64 * 100.0 / r.size as f64
        };
        let (from, to) = if r.direction == "upload" {
            (&r.local, &r.remote)
        } else {
            (&r.remote, &r.local)
        };
        println!("{} {:<11} {} -> {}", r.id, r.state, from, to);
        println!(
            "    {} / {} ({pct:.1}%)",
            human(r.bytes_done),
            human(r.size)
        );
        if let Some(e) = r.last_error {
            println!("    last error: {e}");
        }
    }
    Ok(())
}
