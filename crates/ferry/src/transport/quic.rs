//! QUIC (quinn) with the same TLS 1.3, pinning and token auth as TCP.
//!
//! A session is one bidirectional QUIC stream on its own connection; the
//! protocol above it does not know the difference. The server listens on the
//! UDP port with the same number as its TCP port.
//!
//! Tuning, for paths up to 100 ms x 1 Gbit/s (12.5 MB in flight):
//! * flow-control windows of 16 MiB per stream and 32 MiB per connection, and
//!   a 32 MiB send window, so the window never caps the rate below the path;
//! * UDP socket buffers raised towards the host's `rmem_max`/`wmem_max`, so a
//!   burst is not dropped by our own socket;
//! * the congestion controller is BBR by default: under random loss, loss-based
//!   controllers (Cubic, NewReno) shrink their window on every lost packet,
//!   while BBR paces at the measured bottleneck rate (measured figures in
//!   docs/BENCHMARKS.md). [`TransportConfig::quic_congestion`] overrides.
//! * a 30 s idle timeout with keepalives every 5 s: a partition that outlives
//!   it ends the connection and the retry policy takes over.

use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, Endpoint, EndpointConfig, TokioRuntime, VarInt};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{BoxFuture, DialTarget, Dialer, Incoming, Listener, TransportConfig};
use crate::conn::BoxStream;
use crate::error::{Error, Result};

/// The ALPN protocol id ferry's QUIC connections carry.
pub const ALPN: &[u8] = b"ferry/1";

const STREAM_WINDOW: u32 = 16 << 20;
const CONN_WINDOW: u32 = 32 << 20;
const SEND_WINDOW: u64 = 32 << 20;
const UDP_BUFFER: usize = 8 << 20;
/// The largest UDP payload MTU discovery may reach. Not 8952 (jumbo frames):
/// quinn hands the kernel up to 10 datagrams in one GSO send, and the kernel
/// refuses a GSO send over 64 KiB (EMSGSIZE, which quinn-udp drops silently,
/// as it does for probes), so at 8952 every batch of eight or more was lost,
/// the black-hole detector fell back to 1200 and loopback ran at ~200 MB/s.
/// 10 x 6500 fits. [`TransportConfig::quic_mtu`] overrides.
pub const MTU_UPPER_BOUND: u16 = 6500;
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const KEEPALIVE: Duration = Duration::from_secs(5);
/// How long a closing stream waits for its last bytes to be acknowledged.
const LINGER: Duration = Duration::from_secs(3);

/// Which congestion controller QUIC connections use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    #[default]
    Bbr,
    Cubic,
    NewReno,
}

impl Congestion {
    /// `cubic` or `newreno`; any other name is BBR, ferry's default.
    pub fn from_name(name: &str) -> Self {
        match name {
            "cubic" => Self::Cubic,
            "newreno" => Self::NewReno,
            _ => Self::Bbr,
        }
    }
}

/// `peer_streams`: how many bidirectional streams the peer may open (the
/// client opens one per connection; the server none). Each may buffer up to
/// the stream window, as a TCP socket's receive buffer would. `mtu`: the
/// upper bound of MTU discovery (see [`clamp_mtu`]).
fn transport_config(cc: Congestion, mtu: u16, peer_streams: u32) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONN_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_bidi_streams(VarInt::from_u32(peer_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(KEEPALIVE));
    // Probe for packets larger than Ethernet's (loopback, LANs with jumbo
    // frames); on ordinary paths discovery settles at ~1500, as by default.
    let mut discovery = quinn::MtuDiscoveryConfig::default();
    discovery.upper_bound(clamp_mtu(mtu));
    t.mtu_discovery_config(Some(discovery));
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    match cc {
        Congestion::Bbr => t.congestion_controller_factory(Arc::new(BbrConfig::default())),
        Congestion::Cubic => t.congestion_controller_factory(Arc::new(CubicConfig::default())),
        Congestion::NewReno => t.congestion_controller_factory(Arc::new(NewRenoConfig::default())),
    };
    Arc::new(t)
}

/// The largest UDP payload MTU discovery probes for, `mtu` brought into
/// 1200-6550 (above that a full GSO batch exceeds 64 KiB).
fn clamp_mtu(mtu: u16) -> u16 {
    mtu.clamp(1200, 6550)
}

/// The endpoint accepts datagrams as large as MTU discovery may reach. Its
/// `max_udp_payload_size` is also what it announces to the peer, and the
/// peer's discovery stops there: left at quinn's default (1472), no
/// connection ever grew past Ethernet size whatever the upper bound said.
fn endpoint_config(mtu: u16) -> EndpointConfig {
    let mut e = EndpointConfig::default();
    // In range by construction (`clamp_mtu`); on an error the default stays,
    // which only costs speed.
    let _ = e.max_udp_payload_size(clamp_mtu(mtu));
    e
}

/// A UDP socket with buffers as large as the host allows (up to 8 MiB).
fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let sock = UdpSocket::bind(addr)?;
    // Optimisations: a refusal leaves the default.
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&sock, UDP_BUFFER);
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&sock, UDP_BUFFER);
    Ok(sock)
}

fn name_str(name: &ServerName<'static>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        _ => "ferry".to_string(),
    }
}

/// Maps a failed QUIC handshake: TLS-level refusals (a pin mismatch among them)
/// become [`Error::Tls`] so the client can tell the user which key it saw;
/// everything else is a connect failure (retryable).
fn handshake_error(addr: &str, e: ConnectionError) -> Error {
    match e {
        ConnectionError::TransportError(t) if t.code.to_string().contains("crypto") => {
            Error::Tls(t.to_string())
        }
        ConnectionError::ConnectionClosed(c) if c.error_code.to_string().contains("crypto") => {
            Error::Tls(c.to_string())
        }
        other => Error::Connect {
            addr: addr.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionAborted, other.to_string()),
        },
    }
}

/// Dials QUIC: a fresh endpoint (UDP socket) per connection, so nothing is
/// shared between sessions or runtimes.
#[derive(Debug, Clone, Copy)]
pub struct QuicDialer {
    pub congestion: Congestion,
    /// The upper bound of MTU discovery (see [`TransportConfig::quic_mtu`]).
    pub mtu: u16,
}

impl QuicDialer {
    pub fn new(cfg: &TransportConfig) -> Self {
        Self {
            congestion: cfg.quic_congestion,
            mtu: cfg.quic_mtu,
        }
    }
}

impl Default for QuicDialer {
    fn default() -> Self {
        Self::new(&TransportConfig::default())
    }
}

impl Dialer for QuicDialer {
    fn dial<'a>(&'a self, t: DialTarget<'a>) -> BoxFuture<'a, Result<BoxStream>> {
        Box::pin(async move {
            let connect_err = |source: std::io::Error| Error::Connect {
                addr: t.addr.to_string(),
                source,
            };
            let addr = tokio::net::lookup_host(t.addr)
                .await
                .map_err(connect_err)?
                .next()
                .ok_or_else(|| {
                    connect_err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no address for host",
                    ))
                })?;
            let local: SocketAddr = if addr.is_ipv6() {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            };
            let endpoint = Endpoint::new(
                endpoint_config(self.mtu),
                None,
                udp_socket(local).map_err(connect_err)?,
                Arc::new(TokioRuntime),
            )
            .map_err(connect_err)?;
            let mut tls = (*t.tls).clone();
            tls.alpn_protocols = vec![ALPN.to_vec()];
            let crypto = QuicClientConfig::try_from(tls).map_err(|e| Error::Tls(e.to_string()))?;
            let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
            cfg.transport_config(transport_config(self.congestion, self.mtu, 0));
            let connecting = endpoint
                .connect_with(cfg, addr, &name_str(&t.server_name))
                .map_err(|e| {
                    connect_err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        e.to_string(),
                    ))
                })?;
            let conn = match tokio::time::timeout(t.timeout, connecting).await {
                Err(_) => return Err(Error::Timeout("QUIC handshake".into())),
                Ok(Err(e)) => return Err(handshake_error(t.addr, e)),
                Ok(Ok(c)) => c,
            };
            let (send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| handshake_error(t.addr, e))?;
            Ok(Box::new(QuicStream::new(conn, send, recv, Some(endpoint))) as BoxStream)
        })
    }
}

/// Accepts QUIC connections; each one's handshake runs in its own task.
pub struct QuicListener {
    endpoint: Endpoint,
}

impl QuicListener {
    /// Binds UDP `addr` with the server's TLS identity, tuned by `tuning`.
    pub fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        tuning: &TransportConfig,
    ) -> Result<Self> {
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.max_early_data_size = 0;
        let crypto = QuicServerConfig::try_from(tls).map_err(|e| Error::Tls(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(transport_config(tuning.quic_congestion, tuning.quic_mtu, 1));
        let bind_err = |source: std::io::Error| Error::Listen {
            addr: format!("udp {addr}"),
            source,
        };
        let endpoint = Endpoint::new(
            endpoint_config(tuning.quic_mtu),
            Some(cfg),
            udp_socket(addr).map_err(bind_err)?,
            Arc::new(TokioRuntime),
        )
        .map_err(bind_err)?;
        Ok(Self { endpoint })
    }
}

impl Listener for QuicListener {
    fn accept(&mut self) -> BoxFuture<'_, std::io::Result<(Incoming, String)>> {
        Box::pin(async move {
            let incoming = self.endpoint.accept().await.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotConnected, "QUIC endpoint closed")
            })?;
            let peer = incoming.remote_address().to_string();
            let addr = peer.clone();
            let fut: Incoming = Box::pin(async move {
                let conn = incoming.await.map_err(|e| handshake_error(&addr, e))?;
                let (send, recv) = conn
                    .accept_bi()
                    .await
                    .map_err(|e| handshake_error(&addr, e))?;
                Ok(Box::new(QuicStream::new(conn, send, recv, None)) as BoxStream)
            });
            Ok((fut, peer))
        })
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    fn name(&self) -> &'static str {
        "quic"
    }
}

/// One bidirectional QUIC stream as a byte stream. Dropping it finishes the
/// send side and, in the background, waits (bounded) for the peer to have
/// everything before closing the connection, so a last reply is not lost.
struct QuicStream {
    parts: Option<(quinn::Connection, quinn::SendStream, Option<Endpoint>)>,
    recv: quinn::RecvStream,
}

impl QuicStream {
    fn new(
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        endpoint: Option<Endpoint>,
    ) -> Self {
        Self {
            parts: Some((conn, send, endpoint)),
            recv,
        }
    }

    fn send(&mut self) -> std::io::Result<&mut quinn::SendStream> {
        self.parts
            .as_mut()
            .map(|(_, s, _)| s)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotConnected, "stream closed"))
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.recv), cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.send() {
            Ok(s) => AsyncWrite::poll_write(Pin::new(s), cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.send() {
            Ok(s) => AsyncWrite::poll_flush(Pin::new(s), cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.send() {
            Ok(s) => AsyncWrite::poll_shutdown(Pin::new(s), cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl Drop for QuicStream {
    fn drop(&mut self) {
        let Some((conn, mut send, endpoint)) = self.parts.take() else {
            return;
        };
        let _ = send.finish();
        let st = conn.stats();
        tracing::debug!(
            peer = %conn.remote_address(),
            mtu = st.path.current_mtu,
            rtt_us = st.path.rtt.as_micros() as u64,
            lost_packets = st.path.lost_packets,
            sent_datagrams = st.udp_tx.datagrams,
            sent_bytes = st.udp_tx.bytes,
            "quic connection done"
        );
        let linger = async move {
            let _ = tokio::time::timeout(LINGER, send.stopped()).await;
            conn.close(VarInt::from_u32(0), b"done");
            if let Some(ep) = endpoint {
                let _ = tokio::time::timeout(LINGER, ep.wait_idle()).await;
            }
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(linger);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On loopback, MTU discovery reaches past Ethernet size and stays there,
    /// with next to nothing lost: the endpoint announces the payload size it
    /// accepts (quinn's default announced 1472 and capped discovery there),
    /// and no GSO batch exceeds 64 KiB (at 8952 most were dropped whole, which
    /// the black-hole detector answered by falling back to 1200). Cubic, whose
    /// slow start opens the window past ten datagrams within a few
    /// milliseconds, so full GSO batches are sent.
    #[tokio::test]
    async fn loopback_path_grows_past_ethernet_mtu_without_losses() {
        let dir = tempfile::tempdir().unwrap();
        let id = crate::tls::ServerIdentity::load_or_create(dir.path()).unwrap();
        let listener = QuicListener::bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(id.server_config().unwrap()),
            &TransportConfig {
                quic_congestion: Congestion::Cubic,
                ..TransportConfig::default()
            },
        )
        .unwrap();
        let addr = listener.endpoint.local_addr().unwrap();
        let server = listener.endpoint.clone();
        let total = 32usize << 20;
        let sink = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (_send, mut recv) = conn.accept_bi().await.unwrap();
            let mut n = 0;
            while let Some(c) = recv.read_chunk(1 << 20, true).await.unwrap() {
                n += c.bytes.len();
            }
            n
        });
        let client = Endpoint::new(
            endpoint_config(MTU_UPPER_BOUND),
            None,
            udp_socket("127.0.0.1:0".parse().unwrap()).unwrap(),
            Arc::new(TokioRuntime),
        )
        .unwrap();
        let (mut tls, _) = crate::tls::client_config(None).unwrap();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        cfg.transport_config(transport_config(Congestion::Cubic, MTU_UPPER_BOUND, 0));
        let conn = client
            .connect_with(cfg, addr, "ferry")
            .unwrap()
            .await
            .unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let block = vec![7u8; 1 << 20];
        for _ in 0..total >> 20 {
            send.write_all(&block).await.unwrap();
        }
        send.finish().unwrap();
        assert_eq!(sink.await.unwrap(), total);
        let st = conn.stats();
        assert!(
            st.path.current_mtu > 1500,
            "MTU stayed at {} on loopback",
            st.path.current_mtu
        );
        assert_eq!(st.path.black_holes_detected, 0, "{:?}", st.path);
        assert!(
            st.path.lost_packets * 50 < st.path.sent_packets,
            "lost {} of {} packets",
            st.path.lost_packets,
            st.path.sent_packets
        );
    }
}
