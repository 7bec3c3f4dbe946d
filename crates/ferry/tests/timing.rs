//! Retry and breaker timing in virtual time (`start_paused`): the schedule is
//! checked to the millisecond without waiting for it.

use std::time::Duration;

use ferry::client::ClientConfig;
use ferry::copy::{copy, CopyOptions};
use ferry::progress::Progress;
use ferry::retry::RetryPolicy;
use ferry::tls::KnownServers;
use ferry::Error;
use ferry_proto::HashAlg;

#[tokio::test(start_paused = true)]
async fn backoff_and_breaker_cooldowns_pace_the_attempts() {
    let dir = tempfile::TempDir::new().unwrap();
    // Nothing listens on this port: every connection attempt fails at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let src = dir.path().join("f");
    std::fs::write(&src, b"x").unwrap();
    let opts = CopyOptions {
        recursive: false,
        follow_links: false,
        state_dir: dir.path().join("state"),
        client: ClientConfig {
            transport: Default::default(),
            direct_io: true,
            streams: ferry::lanes::Streams::Auto,
            token: None,
            fingerprint: None,
            known_servers: KnownServers::new(dir.path().join("known")),
            connect_timeout: Duration::from_secs(5),
            via: None,
            bwlimit: 0,
            timeouts: Default::default(),
            dialer: std::sync::Arc::new(ferry::transport::tcp::TcpDialer::default()),
        },
        retry: RetryPolicy {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_millis(400),
            max_attempts: 7,
            budget: None,
        },
        alg: HashAlg::Blake3,
        seed: None,
        sftp: Default::default(),
    };
    let t0 = tokio::time::Instant::now();
    let e = copy(
        &[src.display().to_string()],
        &format!("ferry://127.0.0.1:{port}/f"),
        &opts,
        Default::default(),
    )
    .await
    .unwrap_err();
    let elapsed = t0.elapsed();
    assert!(
        matches!(e, Error::RetriesExhausted { attempts: 7, .. }),
        "{e}"
    );
    // Five failures open the breaker (5 s cool-down), the failed probe doubles it
    // (10 s): at least 15 s pass, plus at most the jittered backoffs.
    let backoff_cap = Duration::from_millis(100 + 200 + 400 + 400 + 400 + 400);
    assert!(elapsed >= Duration::from_secs(15), "{elapsed:?}");
    assert!(
        elapsed <= Duration::from_secs(15) + backoff_cap + Duration::from_millis(50),
        "{elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_budget_bounds_the_total_time() {
    let dir = tempfile::TempDir::new().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let src = dir.path().join("f");
    std::fs::write(&src, b"x").unwrap();
    let mut opts = CopyOptions {
        recursive: false,
        follow_links: false,
        state_dir: dir.path().join("state"),
        client: ClientConfig {
            transport: Default::default(),
            direct_io: true,
            streams: ferry::lanes::Streams::Auto,
            token: None,
            fingerprint: None,
            known_servers: KnownServers::new(dir.path().join("known")),
            connect_timeout: Duration::from_secs(5),
            via: None,
            bwlimit: 0,
            timeouts: Default::default(),
            dialer: std::sync::Arc::new(ferry::transport::tcp::TcpDialer::default()),
        },
        retry: RetryPolicy::default(),
        alg: HashAlg::Blake3,
        sftp: Default::default(),
        seed: None,
    };
    opts.retry.max_attempts = 0;
    opts.retry.budget = Some(Duration::from_secs(42));
    let t0 = tokio::time::Instant::now();
    let progress = std::sync::Arc::new(Progress::default());
    let e = copy(
        &[src.display().to_string()],
        &format!("ferry://127.0.0.1:{port}/f"),
        &opts,
        progress.clone(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::RetriesExhausted { .. }), "{e}");
    let elapsed = t0.elapsed();
    assert!(
        elapsed >= Duration::from_secs(42) && elapsed <= Duration::from_secs(43),
        "{elapsed:?}"
    );
    // No busy loop: attempts are paced by backoff and the breaker.
    assert!(
        Progress::get(&progress.retries) < 20,
        "{} retries in 42 s",
        Progress::get(&progress.retries)
    );
}
