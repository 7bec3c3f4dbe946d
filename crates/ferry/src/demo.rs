//! A fault-injecting TCP proxy, used by `ferry demo` and by tests: it forwards
//! connections to a target and cuts them when the client→server byte count
//! crosses planned points.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// A proxy that drops connections at planned points of the upstream byte stream.
pub struct FaultProxy {
    addr: SocketAddr,
    /// Connections cut so far.
    pub cuts: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts on 127.0.0.1 with cut points given as cumulative client→server
    /// byte counts (across all connections), in any order.
    pub async fn start(target: SocketAddr, cut_points: Vec<u64>) -> std::io::Result<Self> {
        Self::start_with(target, cut_points, false).await
    }

    /// Like [`FaultProxy::start`], but at each point the connection goes dark
    /// instead of closing: nothing more is forwarded either way and the sockets
    /// stay open, as on a link that silently drops everything.
    pub async fn start_blackholing(target: SocketAddr, points: Vec<u64>) -> std::io::Result<Self> {
        Self::start_with(target, points, true).await
    }

    async fn start_with(
        target: SocketAddr,
        mut cut_points: Vec<u64>,
        hold: bool,
    ) -> std::io::Result<Self> {
        cut_points.sort_unstable();
        cut_points.reverse();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cuts = Arc::new(AtomicU64::new(0));
        let plan = Arc::new(Mutex::new(cut_points));
        let total = Arc::new(AtomicU64::new(0));
        let cuts2 = cuts.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (plan, total, cuts) = (plan.clone(), total.clone(), cuts2.clone());
                tokio::spawn(async move {
                    if let Err(e) = pump(client, server, plan, total, cuts, hold).await {
                        debug!(error = %e, "proxy connection ended");
                    }
                });
            }
        });
        Ok(Self { addr, cuts, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    client: TcpStream,
    server: TcpStream,
    plan: Arc<Mutex<Vec<u64>>>,
    total: Arc<AtomicU64>,
    cuts: Arc<AtomicU64>,
    hold: bool,
) -> std::io::Result<()> {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    let result = loop {
        let n = cr.read(&mut buf).await?;
        if n == 0 {
            break Ok(());
        }
        let before = total.fetch_add(n as u64, Ordering::SeqCst);
        let cut_at = {
            let mut p = plan.lock().map_err(|_| std::io::Error::other("poisoned"))?;
            match p.last() {
                Some(&c) if c < before + n as u64 => {
                    p.pop();
                    Some(c.saturating_sub(before) as usize)
                }
                _ => None,
            }
        };
        if let Some(keep) = cut_at {
            sw.write_all(&buf[..keep.min(n)]).await?;
            cuts.fetch_add(1, Ordering::SeqCst);
            if hold {
                warn!(
                    at_byte = before + keep as u64,
                    "fault injector: the link goes dark"
                );
                down.abort();
                // Keep both sockets open and silent until the proxy goes away.
                let _keep = (cr, sw);
                std::future::pending::<()>().await;
            }
            warn!(
                at_byte = before + keep as u64,
                "fault injector: cutting the connection"
            );
            break Ok(());
        }
        sw.write_all(&buf[..n]).await?;
    };
    down.abort();
    result
}
