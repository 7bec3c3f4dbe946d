//! WebSocket, for networks where only HTTP(S) gets through.
//!
//! The WebSocket only carries bytes: ferry's own TLS (the pinned server
//! certificate, the token) runs end to end *inside* it, so the session is as
//! secure as over TCP whatever sits in between:
//!
//! * `ws`: TCP, an HTTP/1.1 upgrade, then binary messages. This is what a
//!   plain HTTP reverse proxy (nginx `proxy_pass` with the `Upgrade` headers,
//!   or a proxy that terminates HTTPS itself) forwards to `ferry serve
//!   --ws-listen`.
//! * `wss`: the same inside an outer TLS layer, so that the connection looks
//!   like any HTTPS connection to networks that only let HTTPS through. The
//!   outer layer authenticates nothing (see [`crate::tls::outer_client_config`]):
//!   the inner TLS does.
//!
//! The server accepts the upgrade on any path (a proxy may rewrite it); the
//! client asks for `/ferry` unless told otherwise
//! ([`TransportConfig::ws_path`], the command line's `--ws-path`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::{
    tls_accept, tls_connect, BoxFuture, DialTarget, Dialer, Incoming, Listener, TransportConfig,
};
use crate::conn::BoxStream;
use crate::error::{Error, Result};

/// The most one WebSocket message carries (the TLS layer above writes records
/// of 16 KiB, so messages are small in practice).
const MAX_MESSAGE: usize = 256 * 1024;
/// Bounds on what a peer may make us buffer.
const MAX_INCOMING_MESSAGE: usize = 1024 * 1024;

/// The HTTP path the client asks for by default.
pub const DEFAULT_PATH: &str = "/ferry";

/// `path` with the leading slash an HTTP request path needs.
fn request_path(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    }
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_INCOMING_MESSAGE))
        .max_frame_size(Some(MAX_INCOMING_MESSAGE))
}

fn ws_io_error(e: tokio_tungstenite::tungstenite::Error) -> std::io::Error {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Io(e) => e,
        E::ConnectionClosed | E::AlreadyClosed => {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "websocket closed")
        }
        other => std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
    }
}

/// A WebSocket as a byte stream: each write is one binary message, reads
/// concatenate binary messages. A text message is a protocol error; pings
/// are answered by the WebSocket layer; a close message is the end of the
/// stream.
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the last binary message.
    rd: Bytes,
    eof: bool,
}

impl<S> WsStream<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Self {
            ws,
            rd: Bytes::new(),
            eof: false,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.rd.is_empty() {
                let n = self.rd.len().min(buf.remaining());
                buf.put_slice(&self.rd[..n]);
                self.rd.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => {
                    self.eof = true;
                }
                Some(Err(e)) => return Poll::Ready(Err(ws_io_error(e))),
                Some(Ok(Message::Binary(b))) => self.rd = b,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "text message on a ferry WebSocket",
                    )))
                }
                Some(Ok(_)) => {} // ping, pong: handled by the WebSocket layer
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(ws_io_error)?;
        let n = buf.len().min(MAX_MESSAGE);
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(ws_io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(ws_io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            // Closing an already closed socket is done.
            Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)
            | Err(tokio_tungstenite::tungstenite::Error::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(ws_io_error(e))),
        }
    }
}

/// Dials `ws://` or `wss://` and runs ferry's TLS inside.
#[derive(Debug, Clone)]
pub struct WsDialer {
    /// Outer TLS (`wss`).
    pub secure: bool,
    /// The HTTP path of the upgrade request.
    pub path: String,
    /// The TCP congestion controller asked for (see [`TransportConfig::tcp_congestion`]).
    pub tcp_congestion: Option<String>,
}

impl WsDialer {
    /// `ws` (or `wss` when `secure`), asking for `cfg.ws_path`.
    pub fn new(secure: bool, cfg: &TransportConfig) -> Self {
        Self {
            secure,
            path: request_path(&cfg.ws_path),
            tcp_congestion: cfg.tcp_congestion.clone(),
        }
    }
}

fn handshake_failed(addr: &str, what: String) -> Error {
    Error::Connect {
        addr: addr.to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("websocket handshake: {what}"),
        ),
    }
}

impl Dialer for WsDialer {
    fn dial<'a>(&'a self, t: DialTarget<'a>) -> BoxFuture<'a, Result<BoxStream>> {
        Box::pin(async move {
            let connect_err = |source: std::io::Error| Error::Connect {
                addr: t.addr.to_string(),
                source,
            };
            let tcp = tokio::time::timeout(t.timeout, TcpStream::connect(t.addr))
                .await
                .map_err(|_| {
                    connect_err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    ))
                })?
                .map_err(connect_err)?;
            super::tcp::tune(&tcp, self.tcp_congestion.as_deref());
            let carrier: BoxStream = if self.secure {
                let outer = TlsConnector::from(Arc::new(crate::tls::outer_client_config()?));
                match tokio::time::timeout(t.timeout, outer.connect(t.server_name.clone(), tcp))
                    .await
                {
                    Err(_) => return Err(Error::Timeout("outer TLS handshake".into())),
                    Ok(Err(e)) => return Err(connect_err(e)),
                    Ok(Ok(s)) => Box::new(s),
                }
            } else {
                Box::new(tcp)
            };
            let scheme = if self.secure { "wss" } else { "ws" };
            let url = format!("{scheme}://{}{}", t.addr, self.path);
            let ws = match tokio::time::timeout(
                t.timeout,
                tokio_tungstenite::client_async_with_config(url, carrier, Some(ws_config())),
            )
            .await
            {
                Err(_) => return Err(Error::Timeout("websocket handshake".into())),
                Ok(Err(e)) => return Err(handshake_failed(t.addr, e.to_string())),
                Ok(Ok((ws, _response))) => ws,
            };
            tls_connect(WsStream::new(ws), t.tls, t.server_name, t.timeout).await
        })
    }
}

/// Accepts WebSocket connections (`ws`, or `wss` with an outer TLS layer made
/// with the server's own certificate); the upgrade and both TLS handshakes run
/// in the connection's task.
pub struct WsListener {
    listener: TcpListener,
    inner: TlsAcceptor,
    outer: Option<TlsAcceptor>,
    tcp_congestion: Option<String>,
}

impl WsListener {
    pub async fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        secure: bool,
        cfg: &TransportConfig,
    ) -> Result<Self> {
        let listener = TcpListener::bind(addr).await.map_err(|e| Error::Listen {
            addr: addr.to_string(),
            source: e,
        })?;
        let outer = secure.then(|| {
            let mut cfg = (*tls).clone();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            TlsAcceptor::from(Arc::new(cfg))
        });
        Ok(Self {
            listener,
            inner: TlsAcceptor::from(tls),
            outer,
            tcp_congestion: cfg.tcp_congestion.clone(),
        })
    }
}

impl Listener for WsListener {
    fn accept(&mut self) -> BoxFuture<'_, std::io::Result<(Incoming, String)>> {
        Box::pin(async move {
            let (tcp, peer) = self.listener.accept().await?;
            super::tcp::tune(&tcp, self.tcp_congestion.as_deref());
            let inner = self.inner.clone();
            let outer = self.outer.clone();
            let addr = peer.to_string();
            let incoming: Incoming = Box::pin(async move {
                let carrier: BoxStream = match outer {
                    Some(acceptor) => Box::new(
                        acceptor
                            .accept(tcp)
                            .await
                            .map_err(|e| Error::Tls(format!("outer TLS: {e}")))?,
                    ),
                    None => Box::new(tcp),
                };
                let ws = tokio_tungstenite::accept_async_with_config(carrier, Some(ws_config()))
                    .await
                    .map_err(|e| handshake_failed(&addr, e.to_string()))?;
                tls_accept(WsStream::new(ws), inner).await
            });
            Ok((incoming, peer.to_string()))
        })
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    fn name(&self) -> &'static str {
        if self.outer.is_some() {
            "wss"
        } else {
            "ws"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::SinkExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn pair() -> (
        WsStream<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, Some(ws_config())).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, Some(ws_config())).await;
        (WsStream::new(client), server)
    }

    #[tokio::test]
    async fn bytes_cross_as_binary_messages_and_come_back_whole() {
        let (mut c, s) = pair().await;
        let mut s = WsStream::new(s);
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        let d = data.clone();
        let w = tokio::spawn(async move {
            c.write_all(&d).await.unwrap();
            c.flush().await.unwrap();
            c.shutdown().await.unwrap();
            c
        });
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        w.await.unwrap();
    }

    #[tokio::test]
    async fn a_text_message_is_an_error() {
        let (mut c, mut s) = pair().await;
        s.send(Message::Text("hello".into())).await.unwrap();
        let mut buf = [0u8; 16];
        let e = c.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn an_oversized_message_is_refused() {
        let (c, s) = pair().await;
        let mut c = c.ws;
        let mut s = WsStream::new(s);
        // Sent from another task: the receiver refuses it from the frame
        // header, without reading (or buffering) the whole of it.
        let w = tokio::spawn(async move {
            let _ = c
                .send(Message::Binary(Bytes::from(vec![
                    0u8;
                    4 * MAX_INCOMING_MESSAGE
                ])))
                .await;
        });
        let mut buf = [0u8; 16];
        assert!(s.read(&mut buf).await.is_err());
        drop(s);
        let _ = w.await;
    }
}
