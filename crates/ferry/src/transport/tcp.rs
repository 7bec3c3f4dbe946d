//! TCP + TLS 1.3.

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
            let _ = tcp.set_nodelay(true);
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
            let _ = tcp.set_nodelay(true);
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
