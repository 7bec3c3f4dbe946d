//! TCP + TLS 1.3.
//!
//! Socket tuning: Nagle is off (frames are written whole and flushed when a
//! reply is awaited). Buffer sizes are left to Linux's autotuning, which grows
//! them to the bandwidth-delay product (setting SO_SNDBUF/SO_RCVBUF would turn
//! autotuning off and cap the window), except where the host allows a larger
//! buffer by request than autotuning reaches (see [`send_buffer_request`]).
//! Congestion control is BBR on ferry's
//! own sockets when the kernel offers it: loss-based controllers such as Cubic
//! collapse to a few hundred KB/s at 50 ms and 1 % random loss, while BBR keeps
//! the link full. [`TransportConfig::tcp_congestion`] overrides the choice
//! (any name the kernel offers, or `None` for the host's default).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{
    tls_accept, tls_connect, BoxFuture, DialTarget, Dialer, Incoming, Listener, TransportConfig,
};
use crate::conn::BoxStream;
use crate::error::{Error, Result};

/// Dials TCP and runs TLS over it.
#[derive(Debug, Clone)]
pub struct TcpDialer {
    /// The congestion controller asked for (see [`TransportConfig::tcp_congestion`]).
    pub congestion: Option<String>,
}

impl TcpDialer {
    pub fn new(cfg: &TransportConfig) -> Self {
        Self {
            congestion: cfg.tcp_congestion.clone(),
        }
    }
}

impl Default for TcpDialer {
    fn default() -> Self {
        Self::new(&TransportConfig::default())
    }
}

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
            tune(&tcp, self.congestion.as_deref());
            tls_connect(tcp, t.tls, t.server_name, t.timeout).await
        })
    }
}

/// Accepts TCP connections; TLS runs in each connection's task.
pub struct TcpTlsListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    congestion: Option<String>,
}

impl TcpTlsListener {
    /// Binds `addr`; accepted sockets are tuned by `cfg`.
    pub async fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        cfg: &TransportConfig,
    ) -> Result<Self> {
        let listener = TcpListener::bind(addr).await.map_err(|e| Error::Listen {
            addr: addr.to_string(),
            source: e,
        })?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(tls),
            congestion: cfg.tcp_congestion.clone(),
        })
    }
}

impl Listener for TcpTlsListener {
    fn accept(&mut self) -> BoxFuture<'_, std::io::Result<(Incoming, String)>> {
        Box::pin(async move {
            let (tcp, peer) = self.listener.accept().await?;
            tune(&tcp, self.congestion.as_deref());
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

/// Nagle off, the send buffer where asking beats autotuning, and the
/// congestion controller `congestion` (see the module docs; `None` or empty
/// keeps the host's). Each is an optimisation: a failure is ignored.
pub fn tune(tcp: &TcpStream, congestion: Option<&str>) {
    let _ = tcp.set_nodelay(true);
    if let Some(size) = send_buffer_request() {
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(tcp, size);
    }
    if let Some(cc) = congestion.filter(|c| !c.is_empty()) {
        if let Err(e) = rustix::net::sockopt::set_tcp_congestion(tcp, cc) {
            tracing::debug!(congestion_control = %cc, error = %e, "could not set TCP congestion control; keeping the default");
        }
    }
}

/// The `SO_SNDBUF` to ask for, if asking beats the kernel's autotuning.
///
/// A single TCP stream moves at most its send buffer per round trip.
/// Autotuning grows the buffer up to `net.ipv4.tcp_wmem`'s maximum (4 MiB by
/// default: ~80 MB/s at 50 ms); an explicit request is doubled by the kernel
/// and capped at 2 x `net.core.wmem_max`, and turns autotuning off. Hosts tuned
/// for long fat pipes raise `wmem_max`; there the request gives a larger buffer
/// (measured at 50 ms RTT: +30 % with no loss, +70 % at 1 % loss,
/// docs/BENCHMARKS.md). On stock kernels `wmem_max` is 208 KiB and a request
/// would *shrink* the buffer, so nothing is asked.
fn send_buffer_request() -> Option<usize> {
    static REQUEST: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *REQUEST.get_or_init(|| {
        let wmem_max = read_field("/proc/sys/net/core/wmem_max", 0)?;
        let autotune_max = read_field("/proc/sys/net/ipv4/tcp_wmem", 2)?;
        send_buffer_for(wmem_max, autotune_max)
    })
}

/// Asks for `wmem_max` only when the kernel's doubling of it exceeds what
/// autotuning reaches.
fn send_buffer_for(wmem_max: usize, autotune_max: usize) -> Option<usize> {
    (wmem_max.saturating_mul(2) > autotune_max).then_some(wmem_max)
}

fn read_field(path: &str, index: usize) -> Option<usize> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .nth(index)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_for_a_send_buffer_only_when_it_beats_autotuning() {
        // Stock kernel: wmem_max 208 KiB, tcp_wmem max 4 MiB: leave autotuning alone.
        assert_eq!(send_buffer_for(212_992, 4_194_304), None);
        // Tuned host: wmem_max 4 MiB gives an 8 MiB buffer, above autotuning's 4 MiB.
        assert_eq!(send_buffer_for(4_194_304, 4_194_304), Some(4_194_304));
        // Autotuning already reaches further.
        assert_eq!(send_buffer_for(4_194_304, 16_777_216), None);
    }

    /// The configured controller is the one the socket gets; `None` leaves
    /// the host's default.
    #[tokio::test]
    async fn sockets_get_the_configured_congestion_control() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host_default =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        tune(&c, None);
        let got = rustix::net::sockopt::tcp_congestion(&c).unwrap();
        assert_eq!(got, host_default.trim());
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        tune(&c, Some("reno"));
        let got = rustix::net::sockopt::tcp_congestion(&c).unwrap();
        assert_eq!(got, "reno");
    }

    #[tokio::test]
    async fn sockets_get_bbr_where_the_kernel_has_it() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        tune(&c, TransportConfig::default().tcp_congestion.as_deref());
        assert!(c.nodelay().unwrap());
        let available =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                .unwrap_or_default();
        let got = rustix::net::sockopt::tcp_congestion(&c).unwrap();
        if available.split_whitespace().any(|c| c == "bbr") {
            assert_eq!(got, "bbr");
        }
    }
}
