//! TCP + TLS 1.3.
//!
//! Socket tuning: Nagle is off (frames are written whole and flushed when a
//! reply is awaited). Buffer sizes are left to Linux's autotuning, which grows
//! them to the bandwidth-delay product (setting SO_SNDBUF/SO_RCVBUF would turn
//! autotuning off and cap the window). Congestion control is BBR on ferry's
//! own sockets when the kernel offers it: loss-based controllers such as Cubic
//! collapse to a few hundred KB/s at 50 ms and 1 % random loss, while BBR keeps
//! the link full. `FERRY_TCP_CC=cubic` (or any name, or empty for the host's
//! default) overrides the choice.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{tls_accept, tls_connect, BoxFuture, DialTarget, Dialer, Incoming, Listener};
use crate::conn::BoxStream;
use crate::error::{Error, Result};

/// Dials TCP and runs TLS over it.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpDialer;

impl Dialer for TcpDialer {
    fn dial<'a>(&'a self, t: DialTarget<'a>) -> BoxFuture<'a, Result<BoxStream>> {
        Box::pin(async move {
            let tcp = tokio::time::timeout(t.timeout, TcpStream::connect(t.addr))
                .await
                .map_err(|_| Error::Connect {
                    addr: t.addr.to_string(),
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
                })?
                .map_err(|e| Error::Connect {
                    addr: t.addr.to_string(),
                    source: e,
                })?;
            tune(&tcp);
            tls_connect(tcp, t.tls, t.server_name, t.timeout).await
        })
    }
}

/// Accepts TCP connections; TLS runs in each connection's task.
pub struct TcpTlsListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
}

impl TcpTlsListener {
    pub async fn bind(addr: SocketAddr, tls: Arc<rustls::ServerConfig>) -> Result<Self> {
        let listener = TcpListener::bind(addr).await.map_err(|e| Error::Connect {
            addr: addr.to_string(),
            source: e,
        })?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(tls),
        })
    }
}

impl Listener for TcpTlsListener {
    fn accept(&mut self) -> BoxFuture<'_, std::io::Result<(Incoming, String)>> {
        Box::pin(async move {
            let (tcp, peer) = self.listener.accept().await?;
            tune(&tcp);
            let acceptor = self.acceptor.clone();
            let incoming: Incoming = Box::pin(tls_accept(tcp, acceptor));
            Ok((incoming, peer.to_string()))
        })
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    fn name(&self) -> &'static str {
        "tcp"
    }
}

/// Nagle off, and the congestion controller ferry prefers (see the module docs).
pub fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let cc = std::env::var("FERRY_TCP_CC").unwrap_or_else(|_| "bbr".to_string());
    if !cc.is_empty() {
        if let Err(e) = rustix::net::sockopt::set_tcp_congestion(tcp, &cc) {
            tracing::debug!(congestion_control = %cc, error = %e, "could not set TCP congestion control; keeping the default");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sockets_get_bbr_where_the_kernel_has_it() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        tune(&c);
        assert!(c.nodelay().unwrap());
        let available =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                .unwrap_or_default();
        let got = rustix::net::sockopt::tcp_congestion(&c).unwrap();
        if std::env::var("FERRY_TCP_CC").is_err()
            && available.split_whitespace().any(|c| c == "bbr")
        {
            assert_eq!(got, "bbr");
        }
    }
}
