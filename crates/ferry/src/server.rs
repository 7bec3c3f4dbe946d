//! The ferry server: accepts TLS connections, authenticates clients, and
//! serves stat, list, mkdir, upload and download requests under its root.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::handshake::negotiate;
use ferry_proto::message::{Entry, EntryKind, MAX_LIST_ENTRIES};
use ferry_proto::{
    Failure, FailureCode, HashAlg, Message, ReceiverConfig, Sender, SenderConfig, TransferId,
};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn, Instrument};

use crate::conn::{Conn, Timeouts};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::paths::{resolve, PathError};
use crate::progress::Progress;
use crate::store::Store;
use crate::tls::ServerIdentity;
use crate::transfer::{
    drive_receiver, drive_sender, prepare_receive, prepare_send, FaultPlan, PreparedSource,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
const REQUEST_IDLE: Duration = Duration::from_secs(300);
/// Connections served at once; more are refused (each may buffer up to a frame).
const MAX_CONNECTIONS: usize = 256;

/// How a server is set up.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub root: PathBuf,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// Required client token; `None` lets anyone in (only for tests and demos).
    pub token: Option<Vec<u8>>,
    pub receiver: ReceiverConfig,
    pub faults: Option<Arc<FaultPlan>>,
    /// Stall watchdog and keepalive for every connection.
    pub timeouts: Timeouts,
    /// Refuse new uploads that would leave less free space than this; resumes
    /// and downloads go on.
    pub min_free_bytes: u64,
}

struct Shared {
    root: PathBuf,
    token_hash: Option<[u8; 32]>,
    store: Arc<Store>,
    receiver: ReceiverConfig,
    faults: Option<Arc<FaultPlan>>,
    timeouts: Timeouts,
    min_free_bytes: u64,
    /// Destinations being written now: one writer each, with a way to stop it.
    busy: Mutex<HashMap<PathBuf, (TransferId, Arc<Notify>)>>,
}

/// A bound server, ready to run.
pub struct Server {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    fingerprint: String,
    conn_limit: Arc<tokio::sync::Semaphore>,
}

impl Server {
    pub async fn bind(cfg: ServerConfig) -> Result<Self> {
        std::fs::create_dir_all(&cfg.root).map_err(|e| Error::local(&cfg.root, e))?;
        let root = std::fs::canonicalize(&cfg.root).map_err(|e| Error::local(&cfg.root, e))?;
        let identity = ServerIdentity::load_or_create(&cfg.state_dir)?;
        let acceptor = TlsAcceptor::from(Arc::new(identity.server_config()?));
        let store = Arc::new(Store::open(&cfg.state_dir)?);
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| Error::Connect {
                addr: cfg.listen.to_string(),
                source: e,
            })?;
        let shared = Arc::new(Shared {
            root,
            token_hash: cfg.token.as_deref().map(|t| *blake3::hash(t).as_bytes()),
            store,
            receiver: cfg.receiver,
            faults: cfg.faults,
            timeouts: cfg.timeouts,
            min_free_bytes: cfg.min_free_bytes,
            busy: Mutex::new(HashMap::new()),
        });
        Ok(Self {
            listener,
            acceptor,
            shared,
            fingerprint: identity.fingerprint(),
            conn_limit: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::local("listener", e))
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Serves until `shutdown` completes, then stops accepting.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        let mut next_conn: u64 = 0;
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    info!(connections = conns.len(), "server shutting down");
                    drop(self.listener);
                    // Let connections finish what they are doing, briefly; a
                    // transfer cut here resumes later from its last checkpoint.
                    let drain = async { while conns.join_next().await.is_some() {} };
                    if tokio::time::timeout(Duration::from_secs(5), drain).await.is_err() {
                        conns.abort_all();
                        while conns.join_next().await.is_some() {}
                    }
                    return Ok(());
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                r = self.listener.accept() => {
                    let (tcp, peer) = match r {
                        Ok(x) => x,
                        Err(e) => {
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = self.conn_limit.clone().try_acquire_owned() else {
                        warn!(peer = %peer, "too many connections; refusing one");
                        drop(tcp);
                        continue;
                    };
                    next_conn += 1;
                    let span = tracing::info_span!("conn", id = next_conn, peer = %peer);
                    let acceptor = self.acceptor.clone();
                    let shared = self.shared.clone();
                    conns.spawn(async move {
                        let _permit = permit;
                        match serve_conn(tcp, peer, acceptor, shared).await {
                            Ok(()) => tracing::debug!("connection closed"),
                            Err(e) if e.is_retryable() => info!(error = %e, "connection lost"),
                            Err(e) => warn!(error = %e, "connection ended with an error"),
                        }
                    }.instrument(span));
                }
            }
        }
    }
}

async fn serve_conn(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) -> Result<()> {
    crate::sockopt::tune(&tcp);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| Error::Timeout("TLS handshake".into()))?
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut conn = Conn::new(Box::new(tls), peer.to_string());
    conn.set_timeouts(shared.timeouts);
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.rd.expect())
        .await
        .map_err(|_| Error::Timeout("hello".into()))??;
    let Message::Hello {
        versions,
        caps,
        token,
        agent,
    } = hello
    else {
        conn.send(&Message::Failure(Failure::new(
            FailureCode::Protocol,
            "expected Hello",
        )))
        .await?;
        return Err(Error::Proto(ferry_proto::ProtoError::PeerMisbehaved(
            "first frame was not Hello".into(),
        )));
    };
    let negotiated = match negotiate(&versions, &caps) {
        Ok(n) => n,
        Err(f) => {
            conn.send(&Message::Failure(f.clone())).await?;
            return Err(Error::Proto(ferry_proto::ProtoError::Incompatible(
                f.message,
            )));
        }
    };
    if let Some(expected) = &shared.token_hash {
        let got = blake3::hash(&token);
        if !bool::from(got.as_bytes().ct_eq(expected)) {
            conn.send(&Message::Failure(Failure::new(
                FailureCode::Unauthorized,
                "authentication failed: wrong or missing token",
            )))
            .await?;
            warn!(agent = %agent, "authentication failed");
            return Ok(());
        }
    }
    conn.send(&Message::Welcome {
        version: negotiated.version,
        caps: negotiated.caps.clone(),
        server: format!("ferry/{}", env!("CARGO_PKG_VERSION")),
    })
    .await?;
    info!(agent = %agent, version = ?negotiated.version, "client authenticated");
    loop {
        let req = match tokio::time::timeout(REQUEST_IDLE, conn.rd.next()).await {
            Err(_) => return Ok(()),
            Ok(r) => match r? {
                None => return Ok(()),
                Some(m) => m,
            },
        };
        match handle_request(&mut conn, req, &shared).await {
            Ok(()) => {}
            Err(RequestError::Reply(f)) => {
                warn!(code = ?f.code, message = %f.message, "request refused");
                conn.send(&Message::Failure(f)).await?;
            }
            Err(RequestError::Fatal(e)) => {
                let f = failure_for(&e);
                let _ = conn.send(&Message::Failure(f)).await;
                return Err(e);
            }
        }
    }
}

enum RequestError {
    /// Tell the client and keep serving this connection.
    Reply(Failure),
    /// The connection cannot go on.
    Fatal(Error),
}

impl From<Error> for RequestError {
    fn from(e: Error) -> Self {
        RequestError::Fatal(e)
    }
}

fn failure_for(e: &Error) -> Failure {
    let code = match e {
        Error::Proto(ferry_proto::ProtoError::Remote(f)) => f.code,
        Error::Proto(ferry_proto::ProtoError::PeerMisbehaved(_)) => FailureCode::Protocol,
        Error::Proto(ferry_proto::ProtoError::Incompatible(_)) => FailureCode::VersionRefused,
        Error::Proto(ferry_proto::ProtoError::SourceChanged { .. }) => FailureCode::SourceChanged,
        Error::Proto(_) => FailureCode::Integrity,
        Error::LocalIo { source, .. } if source.raw_os_error() == Some(28) => FailureCode::NoSpace,
        Error::LocalIo { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
            FailureCode::PermissionDenied
        }
        Error::LocalIo { .. } => FailureCode::Io,
        Error::Usage(_) => FailureCode::BadRequest,
        Error::NotFound(_) => FailureCode::NotFound,
        _ => FailureCode::Internal,
    };
    Failure::new(code, e.to_string())
}

fn path_failure(e: PathError) -> RequestError {
    RequestError::Reply(Failure::new(FailureCode::PermissionDenied, e.to_string()))
}

fn entry_for(path: String, md: &std::fs::Metadata) -> Entry {
    use std::os::unix::fs::MetadataExt;
    Entry {
        path,
        kind: if md.is_dir() {
            EntryKind::Dir
        } else {
            EntryKind::File
        },
        size: if md.is_dir() { 0 } else { md.len() },
        mtime_ns: fsutil::mtime_ns(md),
        mode: md.mode() & 0o7777,
    }
}

/// Removes a destination from the busy set when dropped.
struct BusyGuard<'a> {
    set: &'a Mutex<HashMap<PathBuf, (TransferId, Arc<Notify>)>>,
    path: PathBuf,
    stop: Arc<Notify>,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            if s.get(&self.path)
                .is_some_and(|(_, n)| Arc::ptr_eq(n, &self.stop))
            {
                s.remove(&self.path);
            }
        }
    }
}

/// Claims `path` for transfer `id`. The same transfer reconnecting (its old
/// connection not yet noticed dead) takes over; another transfer gets `Busy`.
async fn claim<'a>(
    shared: &'a Shared,
    path: &Path,
    id: TransferId,
) -> std::result::Result<BusyGuard<'a>, RequestError> {
    let poisoned = || RequestError::Reply(Failure::new(FailureCode::Internal, "lock poisoned"));
    for _ in 0..100 {
        {
            let mut s = shared.busy.lock().map_err(|_| poisoned())?;
            match s.get(path) {
                None => {
                    let stop = Arc::new(Notify::new());
                    s.insert(path.to_path_buf(), (id, stop.clone()));
                    return Ok(BusyGuard {
                        set: &shared.busy,
                        path: path.to_path_buf(),
                        stop,
                    });
                }
                Some((holder, stop)) if *holder == id => {
                    info!(transfer = %id, "same transfer reconnected; stopping its old connection");
                    stop.notify_one();
                }
                Some(_) => {
                    let mut f = Failure::new(
                        FailureCode::Busy,
                        format!("{} is being written by another transfer", path.display()),
                    );
                    f.retry_after_ms = Some(1000);
                    return Err(RequestError::Reply(f));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut f = Failure::new(
        FailureCode::Busy,
        format!("{} is still held by an earlier connection", path.display()),
    );
    f.retry_after_ms = Some(1000);
    Err(RequestError::Reply(f))
}

async fn handle_request(
    conn: &mut Conn,
    req: Message,
    shared: &Arc<Shared>,
) -> std::result::Result<(), RequestError> {
    let root = &shared.root;
    match req {
        Message::Stat { path } => {
            let full = resolve(root, &path).map_err(path_failure)?;
            let entry = match std::fs::metadata(&full) {
                Ok(md) if md.is_file() || md.is_dir() => entry_for(path, &md),
                _ => Entry {
                    path,
                    kind: EntryKind::Missing,
                    size: 0,
                    mtime_ns: 0,
                    mode: 0,
                },
            };
            conn.send(&Message::StatReply { entry }).await?;
        }
        Message::List { path } => {
            let full = resolve(root, &path).map_err(path_failure)?;
            let entries = list_tree(&full).map_err(|e| {
                RequestError::Reply(Failure::new(FailureCode::NotFound, e.to_string()))
            })?;
            let pages: Vec<&[Entry]> = if entries.is_empty() {
                vec![&[]]
            } else {
                entries.chunks(MAX_LIST_ENTRIES).collect()
            };
            let n = pages.len();
            for (i, page) in pages.into_iter().enumerate() {
                conn.wr
                    .send(&Message::ListReply {
                        entries: page.to_vec(),
                        more: i + 1 < n,
                    })
                    .await?;
            }
            conn.wr.flush().await?;
        }
        Message::Mkdir {
            path,
            mode,
            mtime_ns,
        } => {
            let full = resolve(root, &path).map_err(path_failure)?;
            fsutil::create_dirs_durable(&full)
                .map_err(|e| RequestError::Reply(failure_for(&Error::local(&path, e))))?;
            fsutil::apply_dir_meta(&full, mode, mtime_ns)
                .map_err(|e| RequestError::Reply(failure_for(&e)))?;
            conn.send(&Message::Ok).await?;
        }
        Message::PutOpen { id, path, meta } => {
            let full = resolve(root, &path).map_err(path_failure)?;
            if full == *root || full.is_dir() {
                return Err(RequestError::Reply(Failure::new(
                    FailureCode::BadRequest,
                    format!("{path:?} is a directory"),
                )));
            }
            let guard = claim(shared, &full, id).await?;
            let parent = fsutil::parent_of(&full);
            fsutil::create_dirs_durable(&parent)
                .map_err(|e| RequestError::Reply(failure_for(&Error::local(&parent, e))))?;
            // Re-check after creating parents: a symlink may have appeared.
            resolve(root, &path).map_err(path_failure)?;
            admit_upload(shared, &full, &parent, &meta)?;
            let (mut rx, dest) =
                match prepare_receive(&shared.store, &full, id, &meta, shared.receiver.clone()) {
                    Ok(x) => x,
                    Err(e @ Error::Proto(_)) => return Err(RequestError::Reply(failure_for(&e))),
                    Err(e) => return Err(RequestError::Reply(failure_for(&e))),
                };
            let span = tracing::info_span!("put", transfer = %id, path = %path);
            let progress = Progress::default();
            let r = tokio::select! {
                r = drive_receiver(conn, &mut rx, &dest, &shared.store, &progress, shared.faults.as_deref(), None).instrument(span) => r?,
                _ = guard.stop.notified() => {
                    return Err(RequestError::Fatal(Error::Io {
                        addr: conn.peer.clone(),
                        source: std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "superseded by a newer connection of the same transfer"),
                    }));
                }
            };
            info!(transfer = %id, path = %path, bytes = r.bytes_received, digest = %r.digest, "upload complete");
        }
        Message::GetOpen { id, path, algs } => {
            let full = resolve(root, &path).map_err(path_failure)?;
            if !full.is_file() {
                return Err(RequestError::Reply(Failure::new(
                    FailureCode::NotFound,
                    format!("{path:?} is not a file on the server"),
                )));
            }
            let alg = algs
                .iter()
                .filter_map(|a| HashAlg::from_name(a))
                .next()
                .unwrap_or(HashAlg::Blake3);
            let PreparedSource { src, meta, known } = prepare_send(&shared.store, &full, alg)
                .map_err(|e| RequestError::Reply(failure_for(&e)))?;
            let layout =
                ferry_proto::ChunkLayout::new(meta.size, meta.chunk_size).ok_or_else(|| {
                    RequestError::Reply(Failure::new(FailureCode::BadRequest, "file too large"))
                })?;
            conn.send(&Message::GetMeta { id, meta }).await?;
            let mut tx = Sender::new(id, layout, alg, SenderConfig::default(), known);
            let span = tracing::info_span!("get", transfer = %id, path = %path);
            let progress = Progress::default();
            let digest = drive_sender(conn, &mut tx, &src, &shared.store, &progress, None)
                .instrument(span)
                .await?;
            info!(transfer = %id, path = %path, digest = %digest, "download complete");
        }
        Message::Ping { nonce } => conn.send(&Message::Pong { nonce }).await?,
        Message::Pong { .. } => {}
        other => {
            return Err(RequestError::Fatal(Error::Proto(
                ferry_proto::ProtoError::PeerMisbehaved(format!(
                    "unexpected {} between requests",
                    other.name()
                )),
            )))
        }
    }
    Ok(())
}

/// Graceful degradation: when the disk is nearly full, a new upload is told to
/// come back later, while the resume of a partial already here goes on (its
/// space is mostly taken already) and downloads are unaffected. Nothing that
/// is verified is ever removed to make room.
fn admit_upload(
    shared: &Shared,
    full: &Path,
    parent: &Path,
    meta: &ferry_proto::message::FileMeta,
) -> std::result::Result<(), RequestError> {
    let key = full.to_string_lossy();
    let source_hex = fsutil::hex(&meta.source_id);
    if let Ok(Some((rec, _))) = shared.store.partial(&key) {
        if rec.source_id == source_hex && rec.size == meta.size {
            return Ok(());
        }
    }
    let Ok(st) = rustix::fs::statvfs(parent) else {
        return Ok(());
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let needed = meta.size.saturating_add(shared.min_free_bytes);
    if free < needed {
        let mut f = Failure::new(
            FailureCode::InsufficientStorage,
            format!("server disk is nearly full ({free} bytes free, {needed} needed with the reserve); try again later"),
        );
        f.retry_after_ms = Some(60_000);
        return Err(RequestError::Reply(f));
    }
    Ok(())
}

/// Lists files and directories under `dir` (or `dir` itself if a file), with
/// paths relative to `dir`. Symlinks, special files and partials are skipped.
fn list_tree(dir: &Path) -> std::io::Result<Vec<Entry>> {
    let md = std::fs::metadata(dir)?;
    if md.is_file() {
        return Ok(vec![entry_for(String::new(), &md)]);
    }
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, rel)) = stack.pop() {
        let mut items: Vec<_> = std::fs::read_dir(&d)?.flatten().collect();
        items.sort_by_key(|e| e.file_name());
        for e in items {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if fsutil::is_part_name(&name) {
                continue;
            }
            let Ok(md) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            let rel_path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if md.is_dir() {
                out.push(entry_for(rel_path.clone(), &md));
                stack.push((e.path(), rel_path));
            } else if md.is_file() {
                out.push(entry_for(rel_path, &md));
            }
        }
    }
    Ok(out)
}
