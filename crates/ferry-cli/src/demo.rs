//! `ferry demo`: a server on loopback, a link that is cut several times and
//! corrupts a chunk, and a transfer that completes verified anyway.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry::copy::{copy, CopyOptions};
use ferry::demo::FaultProxy;
use ferry::progress::Progress;
use ferry::retry::RetryPolicy;
use ferry::server::{Server, ServerConfig};
use ferry::tls::KnownServers;
use ferry::transfer::FaultPlan;
use ferry_proto::HashAlg;
use rand::{Rng, RngCore, SeedableRng};

use crate::ui;

pub async fn run(
    size_mib: u64,
    cuts: u32,
    seed: Option<u64>,
    json_logs: bool,
) -> anyhow::Result<()> {
    let seed = seed.unwrap_or_else(rand::random);
    let size = size_mib * 1024 * 1024;
    let tmp = tempfile::Builder::new()
        .prefix("ferry-demo-")
        .tempdir()
        .context("creating a temp dir")?;
    let src_path = tmp.path().join("payload.bin");
    println!("ferry demo (seed {seed})");
    println!("  work dir   {}", tmp.path().display());

    // 1. A file of random bytes.
    let t = Instant::now();
    {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&src_path)?);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill_bytes(&mut buf[..n]);
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        f.flush()?;
    }
    println!(
        "  source     {} ({size_mib} MiB of random data, made in {:.1}s)",
        src_path.display(),
        t.elapsed().as_secs_f64()
    );

    // 2. A server on loopback that corrupts one incoming chunk.
    let faults = Arc::new(FaultPlan::default());
    faults.corrupt_chunks.store(1, Ordering::SeqCst);
    let token: [u8; 16] = rand::random();
    let token = ferry::fsutil::hex(&token).into_bytes();
    let server = Server::bind(ServerConfig {
        root: tmp.path().join("server-root"),
        listen: "127.0.0.1:0".parse()?,
        state_dir: tmp.path().join("server-state"),
        token: Some(token.clone()),
        receiver: Default::default(),
        faults: Some(faults.clone()),
        timeouts: Default::default(),
        min_free_bytes: 0,
        admission: Default::default(),
        direct_io: true,
    })
    .await?;
    let addr = server.local_addr()?;
    println!("  server     {addr}, fingerprint {}", server.fingerprint());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    // 3. A flaky link: cut at random points of the upload.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let points: Vec<u64> = (0..cuts)
        .map(|_| rng.gen_range(size / 20..size.max(20) * 9 / 10))
        .collect();
    let proxy = FaultProxy::start(addr, points.clone()).await?;
    let mut shown: Vec<String> = points
        .iter()
        .map(|p| format!("{:.0}%", *p as f64 * 100.0 / size.max(1) as f64))
        .collect();
    shown.sort();
    println!("  link       via fault injector {} that cuts the connection {cuts} times (at ~{}) and corrupts 1 chunk", proxy.addr(), shown.join(", "));
    println!();

    // 4. The copy, with retries fast enough for a demo.
    let opts = CopyOptions {
        recursive: false,
        follow_links: false,
        state_dir: tmp.path().join("client-state"),
        client: ferry::client::ClientConfig {
            transport: Default::default(),
            direct_io: true,
            streams: ferry::lanes::Streams::Fixed(1),
            token: Some(token),
            fingerprint: None,
            known_servers: KnownServers::new(tmp.path().join("client-state/known_servers")),
            connect_timeout: Duration::from_secs(10),
            via: Some(proxy.addr().to_string()),
            bwlimit: 0,
            timeouts: Default::default(),
            dialer: std::sync::Arc::new(ferry::transport::tcp::TcpDialer::default()),
        },
        retry: RetryPolicy {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(1),
            max_attempts: 20,
            budget: None,
        },
        alg: HashAlg::Blake3,
        seed: None,
        sftp: Default::default(),
    };
    let progress = Arc::new(Progress::default());
    let display = ui::ProgressDisplay::start(progress.clone());
    ui::init_logging(json_logs, "warn", display.multi());
    let dst = format!("ferry://{addr}/received/payload.bin");
    let result = copy(
        &[src_path.display().to_string()],
        &dst,
        &opts,
        progress.clone(),
    )
    .await;
    display.finish().await;
    let _ = stop_tx.send(());
    let _ = server_task.await;
    let summary = result?;

    // 5. Check the result independently of ferry's own verification.
    let dst_path = tmp.path().join("server-root/received/payload.bin");
    let a = blake3_file(&src_path)?;
    let b = blake3_file(&dst_path)?;
    println!();
    println!("  cuts made        {}", proxy.cuts.load(Ordering::SeqCst));
    println!(
        "  corrupt chunks   {} injected, detected and re-sent",
        1 - faults.corrupt_chunks.load(Ordering::SeqCst)
    );
    println!("  retries          {}", summary.retries);
    println!("  file size        {} bytes", size);
    println!("  payload sent     {} bytes", summary.bytes_sent);
    let resent = summary.bytes_sent.saturating_sub(size);
    println!(
        "  re-sent          {} bytes ({:.2}% of the file)",
        resent,
        resent as f64 * 100.0 / size.max(1) as f64
    );
    println!("  time             {:.2}s", summary.duration_s);
    println!("  ferry digest     {}:{}", summary.alg, summary.digest);
    println!("  b3sum source     {}", a);
    println!("  b3sum received   {}", b);
    if a != b {
        bail!("the received file differs from the source");
    }
    println!("\nverified: the received file is byte-identical to the source.");
    Ok(())
}

fn blake3_file(p: &std::path::Path) -> anyhow::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?)?;
    Ok(h.finalize().to_hex().to_string())
}
