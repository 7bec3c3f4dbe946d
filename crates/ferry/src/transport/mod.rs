//! Transports: what carries a session's bytes.
//!
//! The protocol runs over any reliable, ordered byte stream ([`BoxStream`]).
//! A transport is a pair of small traits: a [`Dialer`] on the client side and a
//! [`Listener`] on the server side. Both produce streams that are already
//! secured (TLS, or QUIC's own TLS), so everything above them (hello, requests,
//! transfers, resume) is the same whatever carries it.
//!
//! * [`tcp`]: TCP + TLS 1.3, the default.
//! * [`quic`]: QUIC (quinn), same TLS identity, UDP port = TCP port.
//! * [`auto`]: QUIC when UDP gets through, else TCP.
//! * [`ws`]: WebSocket (`ws`, `wss`), ferry's TLS inside, for HTTP-only networks.
//!
//! [`Transport`] names them for the command line and URL schemes;
//! [`TransportConfig`] holds their tuning knobs.
//!
//! Tests plug in their own transports (a simulated network, an in-memory
//! duplex) through the same traits, using [`tls_connect`] and [`tls_accept`]
//! over their streams.

pub mod auto;
pub mod quic;
pub mod tcp;
pub mod ws;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::conn::{BoxStream, Stream};
use crate::error::{Error, Result};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A connection that was accepted but whose transport handshake (TLS, ...) has
/// still to run. The server runs it in the connection's own task, under its
/// handshake timeout, so a slow peer never holds up the accept loop.
pub type Incoming = BoxFuture<'static, Result<BoxStream>>;

/// The server side of a transport.
pub trait Listener: Send + 'static {
    /// Waits for the next connection; returns it with a printable peer address.
    fn accept(&mut self) -> BoxFuture<'_, std::io::Result<(Incoming, String)>>;
    fn local_addr(&self) -> std::io::Result<SocketAddr>;
    /// A short name for logs ("tcp", "quic", ...).
    fn name(&self) -> &'static str;
}

/// Where and how to dial.
#[derive(Clone)]
pub struct DialTarget<'a> {
    /// The address to connect to (the server's, or a proxy's in front of it).
    pub addr: &'a str,
    /// The name the server is verified under (pinning ignores it).
    pub server_name: ServerName<'static>,
    /// TLS client settings, with the pinning verifier.
    pub tls: Arc<rustls::ClientConfig>,
    /// Bound on the connect and on the transport handshake, each.
    pub timeout: Duration,
}

/// How ferry's transports tune their sockets and connections. The defaults
/// are ferry's own choices; the command line fills it from `FERRY_TCP_CC`,
/// `FERRY_QUIC_CC`, `FERRY_QUIC_MTU` and `--ws-path` (`FERRY_WS_PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportConfig {
    /// The TCP congestion controller asked for on ferry's own sockets
    /// (`bbr`); `None` keeps the host's default, as does a name the kernel
    /// does not offer. See [`tcp`].
    pub tcp_congestion: Option<String>,
    /// QUIC's congestion controller (BBR). See [`quic`].
    pub quic_congestion: quic::Congestion,
    /// The largest UDP payload QUIC's MTU discovery probes for (6500;
    /// clamped to 1200-6550, above which a full GSO batch exceeds 64 KiB).
    pub quic_mtu: u16,
    /// The HTTP path `ws`/`wss` dialers ask for (`/ferry`; a missing leading
    /// slash is added). Listeners accept any path.
    pub ws_path: String,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            tcp_congestion: Some("bbr".to_string()),
            quic_congestion: quic::Congestion::Bbr,
            quic_mtu: quic::MTU_UPPER_BOUND,
            ws_path: ws::DEFAULT_PATH.to_string(),
        }
    }
}

/// The client side of a transport.
pub trait Dialer: Send + Sync + fmt::Debug {
    /// Connects and secures a stream. Errors: [`Error::Connect`] when the peer
    /// cannot be reached, [`Error::Tls`] when the handshake fails (the caller
    /// then checks whether the pin was the reason), [`Error::Timeout`].
    fn dial<'a>(&'a self, target: DialTarget<'a>) -> BoxFuture<'a, Result<BoxStream>>;
}

/// Runs the TLS client handshake over any stream.
pub async fn tls_connect<S: Stream>(
    stream: S,
    target_tls: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    timeout: Duration,
) -> Result<BoxStream> {
    let connector = TlsConnector::from(target_tls);
    match tokio::time::timeout(timeout, connector.connect(name, stream)).await {
        Err(_) => Err(Error::Timeout("TLS handshake".into())),
        Ok(Err(e)) => Err(Error::Tls(e.to_string())),
        Ok(Ok(t)) => Ok(Box::new(t)),
    }
}

/// Runs the TLS server handshake over any stream (the caller bounds the time).
pub async fn tls_accept<S: Stream>(stream: S, acceptor: TlsAcceptor) -> Result<BoxStream> {
    let tls = acceptor
        .accept(stream)
        .await
        .map_err(|e| Error::Tls(e.to_string()))?;
    Ok(Box::new(tls))
}

/// The name a server is verified under, from `HOST:PORT`.
pub fn server_name(addr: &str) -> ServerName<'static> {
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::DnsName("ferry".try_into().expect("static name is valid")))
}

/// The transports a client can choose (`--transport`, or a URL scheme such as
/// `ferry+quic://`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Quic,
    /// QUIC, falling back to TCP when UDP does not get through.
    Auto,
    /// WebSocket over plain HTTP (ferry's TLS inside).
    Ws,
    /// WebSocket inside an outer TLS layer (ferry's TLS inside).
    Wss,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Quic => "quic",
            Transport::Auto => "auto",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }

    /// A dialer for this transport, tuned by `cfg`.
    pub fn dialer(self, cfg: &TransportConfig) -> Arc<dyn Dialer> {
        match self {
            Transport::Tcp => Arc::new(tcp::TcpDialer::new(cfg)),
            Transport::Quic => Arc::new(quic::QuicDialer::new(cfg)),
            Transport::Auto => Arc::new(auto::AutoDialer::with_config(cfg)),
            Transport::Ws => Arc::new(ws::WsDialer::new(false, cfg)),
            Transport::Wss => Arc::new(ws::WsDialer::new(true, cfg)),
        }
    }

    /// Splits a `ferry+TRANSPORT://` URL into the transport and the plain
    /// `ferry://` URL; other strings come back unchanged.
    pub fn split_scheme(url: &str) -> Result<(Option<Transport>, String)> {
        let Some(rest) = url.strip_prefix("ferry+") else {
            return Ok((None, url.to_string()));
        };
        let Some((name, tail)) = rest.split_once("://") else {
            return Ok((None, url.to_string()));
        };
        let t: Transport = name.parse()?;
        Ok((Some(t), format!("ferry://{tail}")))
    }
}

impl std::str::FromStr for Transport {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcp" => Ok(Transport::Tcp),
            "quic" => Ok(Transport::Quic),
            "auto" => Ok(Transport::Auto),
            "ws" => Ok(Transport::Ws),
            "wss" => Ok(Transport::Wss),
            other => Err(Error::Usage(format!(
                "unknown transport {other:?} (tcp, quic, auto, ws or wss)"
            ))),
        }
    }
}
