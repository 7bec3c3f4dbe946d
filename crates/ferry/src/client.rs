//! Client side of a connection: TLS with pinning, hello, and the requests.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::handshake::{accept_welcome, client_hello};
use ferry_proto::message::{Entry, FileMeta};
use ferry_proto::{
    ChunkHash, ChunkLayout, HashAlg, Message, ProtoError, ReceiverConfig, Sender, SenderConfig,
    TransferId,
};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::info;

use crate::conn::{BoxStream, Conn, Timeouts};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::store::Store;
use crate::tls::{client_config, normalize_fingerprint, KnownServers};
use crate::transfer::{drive_receiver, drive_sender, prepare_receive, PreparedSource, Throttle};

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub token: Option<Vec<u8>>,
    /// Expected server fingerprint; overrides the known-servers file.
    pub fingerprint: Option<String>,
    pub known_servers: KnownServers,
    pub connect_timeout: Duration,
    /// Route connections through this address instead (a proxy or fault injector),
    /// while pinning and naming the server by its real address.
    pub via: Option<String>,
    /// Payload bytes per second per transfer; 0 for no limit.
    pub bwlimit: u64,
    /// Stall watchdog and keepalive.
    pub timeouts: Timeouts,
}

/// An authenticated connection to a server.
pub struct Session {
    conn: Conn,
    pub addr: String,
    bwlimit: u64,
}

fn remote(f: ferry_proto::Failure) -> Error {
    Error::Proto(ProtoError::Remote(f))
}

fn unexpected(m: &Message) -> Error {
    Error::Proto(ProtoError::PeerMisbehaved(format!(
        "unexpected {} from server",
        m.name()
    )))
}

impl Session {
    pub async fn connect(addr: &str, cfg: &ClientConfig) -> Result<Session> {
        let expected = cfg
            .fingerprint
            .as_deref()
            .map(normalize_fingerprint)
            .or_else(|| cfg.known_servers.lookup(addr));
        let (tls_cfg, seen) = client_config(expected.clone())?;
        let dial = cfg.via.as_deref().unwrap_or(addr);
        let tcp = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(dial))
            .await
            .map_err(|_| Error::Connect {
                addr: addr.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            })?
            .map_err(|e| Error::Connect {
                addr: addr.to_string(),
                source: e,
            })?;
        crate::sockopt::tune(&tcp);
        let host = addr
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(addr)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .unwrap_or_else(|_| ServerName::try_from("ferry").expect("static name is valid"));
        let connector = TlsConnector::from(Arc::new(tls_cfg));
        let tls =
            match tokio::time::timeout(cfg.connect_timeout, connector.connect(name, tcp)).await {
                Err(_) => return Err(Error::Timeout(format!("TLS handshake with {addr}"))),
                Ok(Err(e)) => {
                    if let (Some(exp), Some(got)) = (&expected, seen()) {
                        if *exp != got {
                            return Err(Error::FingerprintMismatch {
                                host: addr.to_string(),
                                expected: exp.clone(),
                                actual: got,
                                file: cfg.known_servers.path().display().to_string(),
                            });
                        }
                    }
                    return Err(Error::Tls(format!("{addr}: {e}")));
                }
                Ok(Ok(t)) => t,
            };
        if expected.is_none() {
            if let Some(fp) = seen() {
                cfg.known_servers.record(addr, &fp)?;
                info!(server = addr, fingerprint = %fp, file = %cfg.known_servers.path().display(), "pinned new server fingerprint");
            }
        }
        let stream: BoxStream = Box::new(tls);
        let mut conn = Conn::new(stream, addr.to_string());
        conn.set_timeouts(cfg.timeouts);
        conn.send(&client_hello(
            cfg.token.as_deref().unwrap_or(b""),
            &format!("ferry/{}", env!("CARGO_PKG_VERSION")),
        ))
        .await?;
        match tokio::time::timeout(cfg.connect_timeout, conn.rd.expect())
            .await
            .map_err(|_| Error::Timeout(format!("hello from {addr}")))??
        {
            Message::Welcome { version, caps, .. } => {
                accept_welcome(version, &caps).map_err(remote)?;
            }
            Message::Failure(f) => return Err(remote(f)),
            m => return Err(unexpected(&m)),
        }
        Ok(Session {
            conn,
            addr: addr.to_string(),
            bwlimit: cfg.bwlimit,
        })
    }

    /// Writes raw bytes on the connection (for tests of hostile input).
    #[doc(hidden)]
    pub async fn raw_write(&mut self, bytes: &[u8]) -> Result<()> {
        self.conn.wr.raw(bytes).await
    }

    async fn call(&mut self, m: &Message) -> Result<Message> {
        self.conn.send(m).await?;
        match self.conn.rd.expect().await? {
            Message::Failure(f) => Err(remote(f)),
            m => Ok(m),
        }
    }

    pub async fn stat(&mut self, path: &str) -> Result<Entry> {
        match self
            .call(&Message::Stat {
                path: path.to_string(),
            })
            .await?
        {
            Message::StatReply { entry } => Ok(entry),
            m => Err(unexpected(&m)),
        }
    }

    pub async fn list(&mut self, path: &str) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut m = self
            .call(&Message::List {
                path: path.to_string(),
            })
            .await?;
        loop {
            match m {
                Message::ListReply { entries, more } => {
                    out.extend(entries);
                    if !more {
                        return Ok(out);
                    }
                }
                m => return Err(unexpected(&m)),
            }
            m = match self.conn.rd.expect().await? {
                Message::Failure(f) => return Err(remote(f)),
                m => m,
            };
        }
    }

    pub async fn mkdir(&mut self, path: &str, mode: u32, mtime_ns: i64) -> Result<()> {
        match self
            .call(&Message::Mkdir {
                path: path.to_string(),
                mode,
                mtime_ns,
            })
            .await?
        {
            Message::Ok => Ok(()),
            m => Err(unexpected(&m)),
        }
    }

    /// Uploads one file (resuming what the server holds); returns the digest.
    pub async fn put(
        &mut self,
        id: TransferId,
        source: &PreparedSource,
        remote_path: &str,
        store: &Arc<Store>,
        progress: &Progress,
    ) -> Result<ChunkHash> {
        let (src, meta) = (&source.src, source.meta.clone());
        let layout = ChunkLayout::new(meta.size, meta.chunk_size)
            .ok_or_else(|| Error::Usage(format!("{} is too large", src.path.display())))?;
        self.conn
            .send(&Message::PutOpen {
                id,
                path: remote_path.to_string(),
                meta,
            })
            .await?;
        let mut tx = Sender::new(
            id,
            layout,
            src.alg,
            SenderConfig::default(),
            source.known.iter().copied(),
        );
        drive_sender(
            &mut self.conn,
            &mut tx,
            src,
            store,
            progress,
            Throttle::new(self.bwlimit),
        )
        .await
    }

    /// Downloads one file into `local` (resuming a local partial); returns the digest.
    pub async fn get(
        &mut self,
        id: TransferId,
        remote_path: &str,
        local: &Path,
        store: &Arc<Store>,
        progress: &Progress,
        on_meta: impl FnOnce(&FileMeta),
    ) -> Result<ChunkHash> {
        let algs = vec![
            HashAlg::Blake3.name().to_string(),
            HashAlg::Sha256.name().to_string(),
        ];
        let meta = match self
            .call(&Message::GetOpen {
                id,
                path: remote_path.to_string(),
                algs,
            })
            .await?
        {
            Message::GetMeta { id: got, meta } if got == id => meta,
            m => return Err(unexpected(&m)),
        };
        on_meta(&meta);
        let (mut rx, dest) = prepare_receive(store, local, id, &meta, ReceiverConfig::default())?;
        let r = drive_receiver(
            &mut self.conn,
            &mut rx,
            &dest,
            store,
            progress,
            None,
            Throttle::new(self.bwlimit),
        )
        .await?;
        Ok(r.digest)
    }
}
