//! The ferry server: accepts TLS connections, authenticates clients, and
//! serves stat, list, mkdir, upload and download requests under its root.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::handshake::{keepalive_for, millis, negotiate};
use ferry_proto::message::{BatchFailure, BatchFile, Entry, EntryKind, MAX_LIST_ENTRIES};
use ferry_proto::RangeSet;
use ferry_proto::{
    Failure, FailureCode, HashAlg, Message, ReceiverConfig, Sender, SenderConfig, TransferId,
};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, Notify};
use tracing::{info, warn, Instrument};

use crate::admission::{Admission, AdmissionConfig, Admit, ConnId, NotAdmitted, Refusal};
use crate::conn::{Conn, Timeouts};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::lanes::Lanes;
use crate::paths::{resolve, PathError};
use crate::progress::{FileProgress, Progress};
use crate::storage::{LocalStorage, Storage};
use crate::store::Store;
use crate::tls::ServerIdentity;
use crate::transfer::{blocking_live, FaultPlan, PreparedSource, ReceiveDriver, SendDriver};
use crate::transport::{tcp::TcpTlsListener, Incoming, Listener, TransportConfig};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
const REQUEST_IDLE: Duration = Duration::from_secs(300);

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
    /// Which connections are taken, per source and in total (see [`crate::admission`]).
    pub admission: AdmissionConfig,
    /// Write received chunks past the page cache where the filesystem allows
    /// (see [`crate::fsutil::open_direct`]); `true` is the default.
    pub direct_io: bool,
}

struct Shared {
    root: PathBuf,
    token_hash: Option<[u8; 32]>,
    store: Arc<Store>,
    /// Where files are kept: the handlers reach data only through it.
    storage: Arc<dyn Storage>,
    receiver: ReceiverConfig,
    faults: Option<Arc<FaultPlan>>,
    timeouts: Timeouts,
    min_free_bytes: u64,
    /// Destinations being written now: one writer each, with a way to stop it.
    busy: Mutex<HashMap<PathBuf, (TransferId, Arc<Notify>)>>,
    /// Transfers running now that take data lanes (see [`crate::lanes`]).
    lanes: Mutex<HashMap<TransferId, mpsc::Sender<Conn>>>,
}

impl Shared {
    /// `f` as a client may see it: paths relative to the root, never where
    /// the root is on this machine.
    fn relative(&self, mut f: Failure) -> Failure {
        f.message = root_relative(&self.root, &f.message);
        f
    }

    /// The failure a client is told for `e`, with root-relative paths.
    fn failure(&self, e: &Error) -> Failure {
        self.relative(failure_for(e))
    }
}

/// `text` with every path under `root` made relative to it (the root itself
/// becomes `.`).
fn root_relative(root: &Path, text: &str) -> String {
    let r = root.to_string_lossy();
    if r.is_empty() || r == "/" {
        return text.to_string();
    }
    text.replace(&format!("{r}/"), "").replace(&*r, ".")
}

/// The admission books (see [`crate::admission`]), shared by the accept loop
/// and the connections; each unauthenticated connection's handle is the
/// signal that stops it when it is dropped to make room.
type Gate = Mutex<Admission<Arc<Notify>>>;

fn lock_gate(gate: &Gate) -> std::sync::MutexGuard<'_, Admission<Arc<Notify>>> {
    // The books stay consistent whatever panicked while holding them.
    gate.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection's place in the admission books, given back when it ends.
struct Admitted {
    gate: Arc<Gate>,
    id: ConnId,
    /// Notified when this connection is dropped to make room.
    evict: Arc<Notify>,
}

impl Admitted {
    /// Decides on a new connection from `peer`: its place, or `None` to drop it.
    fn admit(gate: &Arc<Gate>, peer: &str) -> Option<Admitted> {
        let ip = peer
            .parse::<SocketAddr>()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let evict = Arc::new(Notify::new());
        let now = tokio::time::Instant::now().into_std();
        let decision = lock_gate(gate).admit(ip, now, evict.clone());
        match decision {
            Admit::Accept { id, evicted } => {
                if let Some(oldest) = evicted {
                    tracing::debug!(
                        peer,
                        "too many unauthenticated connections; dropping the oldest"
                    );
                    oldest.notify_one();
                }
                Some(Admitted {
                    gate: gate.clone(),
                    id,
                    evict,
                })
            }
            Admit::Refuse(Refusal::SourceFull {
                now_penalised: true,
            }) => {
                warn!(peer, "this source keeps exceeding its unauthenticated connections; refusing it for a while");
                None
            }
            Admit::Refuse(why) => {
                tracing::debug!(peer, reason = ?why, "connection refused");
                None
            }
        }
    }

    fn authenticate(&self) -> std::result::Result<(), NotAdmitted> {
        lock_gate(&self.gate).authenticate(self.id)
    }

    fn auth_failed(&self) {
        let now = tokio::time::Instant::now().into_std();
        lock_gate(&self.gate).auth_failed(self.id, now);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        lock_gate(&self.gate).close(self.id);
    }
}

/// A transfer's entry in the lane registry, removed when dropped.
struct LaneSlot<'a> {
    shared: &'a Shared,
    id: TransferId,
    tx: mpsc::Sender<Conn>,
}

impl<'a> LaneSlot<'a> {
    /// Registers transfer `id` for lanes; its driver gets them from the result.
    fn open(shared: &'a Shared, id: TransferId) -> (Self, Lanes) {
        let (tx, mut lanes) = Lanes::channel();
        lanes.faults = shared.faults.clone();
        if let Ok(mut m) = shared.lanes.lock() {
            m.insert(id, tx.clone());
        }
        (Self { shared, id, tx }, lanes)
    }
}

impl Drop for LaneSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.shared.lanes.lock() {
            if m.get(&self.id).is_some_and(|t| t.same_channel(&self.tx)) {
                m.remove(&self.id);
            }
        }
    }
}

/// Hands an authenticated connection that asked to be a lane of transfer `id`
/// to that transfer, or tells the client there is no such transfer.
async fn join_lane(mut conn: Conn, id: TransferId, shared: &Shared) -> Result<()> {
    let start = tokio::time::Instant::now();
    let tx = loop {
        let found = shared.lanes.lock().ok().and_then(|m| m.get(&id).cloned());
        if let Some(tx) = found {
            break tx;
        }
        if start.elapsed() >= crate::lanes::LANE_JOIN_WAIT {
            conn.send(&Message::Failure(Failure::new(
                FailureCode::NotFound,
                format!("no transfer {id} running here to add a data lane to"),
            )))
            .await?;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    conn.send(&Message::Ok).await?;
    info!(transfer = %id, "data lane joined");
    // The transfer may have ended meanwhile: then the lane just closes.
    let _ = tx.send(conn).await;
    Ok(())
}

/// A bound server, ready to run.
pub struct Server {
    listeners: Vec<Box<dyn Listener>>,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
    fingerprint: String,
    gate: Arc<Gate>,
}

impl Server {
    /// Sets up a server listening on `cfg.listen` over TCP+TLS with the
    /// default [`TransportConfig`] (for other tuning: [`Server::new`] and
    /// [`Server::add_listener`]).
    pub async fn bind(cfg: ServerConfig) -> Result<Self> {
        let listen = cfg.listen;
        let mut server = Self::new(cfg)?;
        let tcp =
            TcpTlsListener::bind(listen, server.tls_config(), &TransportConfig::default()).await?;
        server.add_listener(Box::new(tcp));
        Ok(server)
    }

    /// Sets up a server with no listener yet: identity, journal, root.
    /// Add transports with [`Server::add_listener`].
    pub fn new(cfg: ServerConfig) -> Result<Self> {
        std::fs::create_dir_all(&cfg.root).map_err(|e| Error::local(&cfg.root, e))?;
        let root = std::fs::canonicalize(&cfg.root).map_err(|e| Error::local(&cfg.root, e))?;
        let identity = ServerIdentity::load_or_create(&cfg.state_dir)?;
        let tls = Arc::new(identity.server_config()?);
        let store = Arc::new(Store::open(&cfg.state_dir)?);
        let shared = Arc::new(Shared {
            root,
            token_hash: cfg.token.as_deref().map(|t| *blake3::hash(t).as_bytes()),
            storage: Arc::new(LocalStorage::new(store.clone(), cfg.direct_io)),
            store,
            receiver: cfg.receiver,
            faults: cfg.faults,
            timeouts: cfg.timeouts,
            min_free_bytes: cfg.min_free_bytes,
            busy: Mutex::new(HashMap::new()),
            lanes: Mutex::new(HashMap::new()),
        });
        Ok(Self {
            listeners: Vec::new(),
            tls,
            shared,
            fingerprint: identity.fingerprint(),
            gate: Arc::new(Mutex::new(Admission::new(cfg.admission))),
        })
    }

    /// The server's TLS settings (certificate and key), for building listeners.
    pub fn tls_config(&self) -> Arc<rustls::ServerConfig> {
        self.tls.clone()
    }

    /// Serves on one more transport as well.
    pub fn add_listener(&mut self, l: Box<dyn Listener>) {
        self.listeners.push(l);
    }

    /// The address of the first listener.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listeners
            .first()
            .ok_or_else(|| Error::Usage("server has no listener".into()))?
            .local_addr()
            .map_err(|e| Error::local("listener", e))
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Serves until `shutdown` completes, then stops accepting.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        if self.listeners.is_empty() {
            return Err(Error::Usage("server has no listener".into()));
        }
        // One accept loop per transport, all feeding this loop.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Incoming, String, &'static str)>(16);
        let mut accepts = tokio::task::JoinSet::new();
        for mut l in self.listeners {
            let tx = tx.clone();
            accepts.spawn(async move {
                let name = l.name();
                loop {
                    match l.accept().await {
                        Ok((inc, peer)) => {
                            if tx.send((inc, peer, name)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!(transport = name, error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        drop(tx);
        let mut next_conn: u64 = 0;
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    info!(connections = conns.len(), "server shutting down");
                    accepts.abort_all();
                    while accepts.join_next().await.is_some() {}
                    drop(rx);
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
                r = rx.recv() => {
                    let Some((incoming, peer, transport)) = r else {
                        return Err(Error::Usage("all listeners stopped".into()));
                    };
                    let Some(admitted) = Admitted::admit(&self.gate, &peer) else {
                        drop(incoming);
                        continue;
                    };
                    next_conn += 1;
                    let span = tracing::info_span!("conn", id = next_conn, peer = %peer, transport);
                    let shared = self.shared.clone();
                    conns.spawn(async move {
                        match serve_conn(incoming, peer, shared, admitted).await {
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
    incoming: Incoming,
    peer: String,
    shared: Arc<Shared>,
    admitted: Admitted,
) -> Result<()> {
    let evicted = admitted.evict.clone();
    let conn = tokio::select! {
        r = accept_client(incoming, peer, &shared, &admitted) => r?,
        _ = evicted.notified() => {
            info!("dropped before authenticating, to make room for a newer connection");
            return Ok(());
        }
    };
    match conn {
        Some(conn) => serve_requests(conn, &shared).await,
        None => Ok(()),
    }
}

/// Runs the transport handshake, `Hello` and the token check: the
/// authenticated connection, or `None` if it was turned away (and told why).
async fn accept_client(
    incoming: Incoming,
    peer: String,
    shared: &Shared,
    admitted: &Admitted,
) -> Result<Option<Conn>> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming)
        .await
        .map_err(|_| Error::Timeout("TLS handshake".into()))??;
    let mut conn = Conn::new(stream, peer);
    conn.set_timeouts(shared.timeouts);
    // Nothing large is read from a client that has not authenticated.
    conn.rd
        .set_frame_limit(Some(ferry_proto::message::MAX_UNAUTHENTICATED_FRAME));
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.rd.expect())
        .await
        .map_err(|_| Error::Timeout("hello".into()))??;
    let Message::Hello {
        versions,
        caps,
        token,
        agent,
        stall_ms,
    } = hello
    else {
        conn.send(&Message::Failure(Failure::new(
            FailureCode::Protocol,
            "expected Hello",
        )))
        .await?;
        return Err(Error::Proto(
            ferry_proto::Misbehavior::FirstFrameNotHello.into(),
        ));
    };
    let negotiated = match negotiate(&versions, &caps) {
        Ok(n) => n,
        Err(f) => {
            conn.send(&Message::Failure(f.clone())).await?;
            return Err(Error::Proto(
                ferry_proto::Incompatibility::Version(f).into(),
            ));
        }
    };
    if let Some(expected) = &shared.token_hash {
        let got = blake3::hash(&token);
        if !bool::from(got.as_bytes().ct_eq(expected)) {
            admitted.auth_failed();
            conn.send(&Message::Failure(Failure::new(
                FailureCode::Unauthorized,
                "authentication failed: wrong or missing token",
            )))
            .await?;
            warn!(agent = %agent, "authentication failed");
            return Ok(None);
        }
    }
    match admitted.authenticate() {
        Ok(()) => {}
        Err(NotAdmitted::Evicted) => return Ok(None),
        Err(NotAdmitted::Full) => {
            let mut f = Failure::new(
                FailureCode::Busy,
                "the server has as many clients as it takes; try again later",
            );
            f.retry_after_ms = Some(1000);
            conn.send(&Message::Failure(f)).await?;
            warn!(agent = %agent, "authenticated connection limit reached; turning a client away");
            return Ok(None);
        }
    }
    conn.timeouts.keepalive = keepalive_for(conn.timeouts.keepalive, stall_ms);
    conn.send(&Message::Welcome {
        version: negotiated.version,
        caps: negotiated.caps.clone(),
        server: format!("ferry/{}", env!("CARGO_PKG_VERSION")),
        stall_ms: Some(millis(shared.timeouts.stall)),
    })
    .await?;
    conn.rd.set_frame_limit(None);
    info!(agent = %agent, version = ?negotiated.version, "client authenticated");
    Ok(Some(conn))
}

/// Serves an authenticated connection's requests until it closes or idles out.
async fn serve_requests(mut conn: Conn, shared: &Arc<Shared>) -> Result<()> {
    // A request read while taking in a run of `Mkdir`, not yet handled.
    let mut next = None;
    loop {
        let req = match next.take() {
            Some(m) => m,
            None => match tokio::time::timeout(REQUEST_IDLE, conn.rd.next()).await {
                Err(_) => return Ok(()),
                Ok(r) => match r? {
                    None => return Ok(()),
                    Some(m) => m,
                },
            },
        };
        if let Message::Lane { id } = req {
            return join_lane(conn, id, shared).await;
        }
        if let Message::Mkdir {
            path,
            mode,
            mtime_ns,
        } = req
        {
            // The client pipelines them (a whole tree): the ones already
            // here are made together, each parent fsynced once.
            let mut run = vec![(path, mode, mtime_ns)];
            while run.len() < MKDIR_RUN {
                match conn.rd.next_buffered()? {
                    Some(Message::Mkdir {
                        path,
                        mode,
                        mtime_ns,
                    }) => run.push((path, mode, mtime_ns)),
                    Some(m) => {
                        next = Some(m);
                        break;
                    }
                    None => break,
                }
            }
            mkdir_run(&mut conn, run, shared).await?;
            continue;
        }
        match handle_request(&mut conn, req, shared).await {
            Ok(()) => {}
            Err(RequestError::Reply(f)) => {
                warn!(code = ?f.code, message = %f.message, "request refused");
                conn.send(&Message::Failure(shared.relative(f))).await?;
            }
            Err(RequestError::Fatal(e)) => {
                let f = shared.failure(&e);
                let _ = conn.send(&Message::Failure(f)).await;
                return Err(e);
            }
        }
    }
}

/// At most this many pipelined `Mkdir` are made together (the client keeps
/// up to 256 in flight).
const MKDIR_RUN: usize = 256;

/// One `Mkdir` request: path, mode, mtime.
type DirRequest = (String, u32, i64);

/// Makes a run of directories (`Mkdir` requests) off the runtime, fsyncs
/// each directory that gained an entry once, then answers each request in
/// order: `Ok` only once its directory is durable.
async fn mkdir_run(conn: &mut Conn, run: Vec<DirRequest>, shared: &Arc<Shared>) -> Result<()> {
    let root = shared.root.clone();
    let results = tokio::task::spawn_blocking(move || {
        let mut grew = std::collections::BTreeSet::new();
        let mut results: Vec<std::result::Result<(), Failure>> = run
            .into_iter()
            .map(|(path, mode, mtime_ns)| mkdir_one(&root, &path, mode, mtime_ns, &mut grew))
            .collect();
        if let Err((dir, e)) = fsutil::fsync_dirs(&grew) {
            // Which of them it concerns is not known: none is durable.
            let f = failure_for(&Error::local(&dir, e));
            for r in results.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(f.clone());
            }
        }
        results
    })
    .await
    .map_err(|e| Error::Store(e.to_string()))?;
    for r in results {
        match r {
            Ok(()) => conn.wr.send_batched(&Message::Ok).await?,
            Err(f) => {
                warn!(code = ?f.code, message = %f.message, "request refused");
                conn.wr
                    .send_batched(&Message::Failure(shared.relative(f)))
                    .await?;
            }
        }
    }
    conn.wr.flush().await
}

/// One `Mkdir` of a run: creates it (and missing parents), noting in
/// `grew` what must be fsynced. Only a directory this request creates takes
/// the requested mode and mtime: one that exists (the root among them) is
/// left as it is, and an existing non-directory is refused untouched.
fn mkdir_one(
    root: &Path,
    path: &str,
    mode: u32,
    mtime_ns: i64,
    grew: &mut std::collections::BTreeSet<PathBuf>,
) -> std::result::Result<(), Failure> {
    let full = resolve(root, path).map_err(path_refused)?;
    if full == root {
        return Ok(());
    }
    let created = fsutil::create_dirs_noting(&full, grew).map_err(|e| {
        if full.exists() && !full.is_dir() {
            Failure::new(
                FailureCode::BadRequest,
                format!("{path} exists and is not a directory"),
            )
        } else {
            failure_for(&Error::local(path, e))
        }
    })?;
    if !created {
        return Ok(());
    }
    fsutil::apply_dir_meta(&full, mode, mtime_ns).map_err(|e| failure_for(&e))
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
        Error::LocalIo { source, .. } => io_failure_code(source),
        Error::Usage(_) => FailureCode::BadRequest,
        Error::NotFound(_) => FailureCode::NotFound,
        _ => FailureCode::Internal,
    };
    Failure::new(code, e.to_string())
}

/// What a local I/O error means to the client. Only an error that the
/// request itself caused (a file where it asked for a directory, a name too
/// long, a loop in the path it named) is the client's to fix (`BadRequest`);
/// what is wrong with the server's own storage is reported as such: full
/// (`NoSpace`, also for a file or directory past the filesystem's limits),
/// or any other trouble there (`Io`, which a later attempt may get past).
fn io_failure_code(e: &std::io::Error) -> FailureCode {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge | K::TooManyLinks => {
            FailureCode::NoSpace
        }
        K::PermissionDenied => FailureCode::PermissionDenied,
        K::NotADirectory | K::IsADirectory | K::DirectoryNotEmpty | K::InvalidFilename => {
            FailureCode::BadRequest
        }
        _ if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            FailureCode::BadRequest
        }
        _ => FailureCode::Io,
    }
}

fn path_failure(e: PathError) -> RequestError {
    RequestError::Reply(path_refused(e))
}

fn path_refused(e: PathError) -> Failure {
    Failure::new(FailureCode::PermissionDenied, e.to_string())
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
            let entry = shared.storage.stat(&full, path.clone()).unwrap_or(Entry {
                path,
                kind: EntryKind::Missing,
                size: 0,
                mtime_ns: 0,
                mode: 0,
            });
            conn.send(&Message::StatReply { entry }).await?;
        }
        Message::List { path } => {
            let full = resolve(root, &path).map_err(path_failure)?;
            let entries = shared.storage.list(&full).map_err(|e| {
                RequestError::Reply(Failure::new(FailureCode::NotFound, e.to_string()))
            })?;
            let pages = list_pages(&entries);
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
        } => mkdir_run(conn, vec![(path, mode, mtime_ns)], shared).await?,
        Message::PutOpen { id, path, meta } => {
            let full = resolve(root, &path).map_err(path_failure)?;
            let is_dir = |e: Option<Entry>| e.is_some_and(|e| e.kind == EntryKind::Dir);
            if full == *root || is_dir(shared.storage.stat(&full, String::new())) {
                return Err(RequestError::Reply(Failure::new(
                    FailureCode::BadRequest,
                    format!("{path:?} is a directory"),
                )));
            }
            let guard = claim(shared, &full, id).await?;
            shared
                .storage
                .make_parents(&full)
                .map_err(|e| RequestError::Reply(failure_for(&e)))?;
            // Re-check after creating parents: a symlink may have appeared.
            resolve(root, &path).map_err(path_failure)?;
            admit_upload(shared, &full, &meta)?;
            let (storage, name, m, cfg) = (
                shared.storage.clone(),
                full.clone(),
                meta.clone(),
                shared.receiver.clone(),
            );
            let prepared =
                blocking_live(conn, move || storage.prepare_receive(&name, id, &m, cfg)).await;
            let (rx, dest) = match prepared {
                Ok(x) => x,
                Err(e @ Error::Proto(_)) => return Err(RequestError::Reply(failure_for(&e))),
                Err(e) => return Err(RequestError::Reply(failure_for(&e))),
            };
            let span = tracing::info_span!("put", transfer = %id, path = %path);
            let progress = FileProgress::detached(Arc::new(Progress::default()));
            let (_slot, lanes) = LaneSlot::open(shared, id);
            let r = ReceiveDriver {
                faults: shared.faults.as_deref(),
                lanes: Some(lanes),
                superseded: Some(&guard.stop),
                ..ReceiveDriver::new(conn, rx, dest, &progress)
            }
            .run()
            .instrument(span)
            .await?;
            info!(transfer = %id, path = %path, bytes = r.bytes_received, digest = %r.digest, "upload complete");
        }
        Message::GetOpen { id, path, algs } => {
            let full = resolve(root, &path).map_err(path_failure)?;
            let is_file = |e: Option<Entry>| e.is_some_and(|e| e.kind == EntryKind::File);
            if !is_file(shared.storage.stat(&full, String::new())) {
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
            let PreparedSource { src, meta, known } = shared
                .storage
                .open_source(&full, alg)
                .map_err(|e| RequestError::Reply(failure_for(&e)))?;
            let layout =
                ferry_proto::ChunkLayout::new(meta.size, meta.chunk_size).ok_or_else(|| {
                    RequestError::Reply(Failure::new(FailureCode::BadRequest, "file too large"))
                })?;
            conn.send(&Message::GetMeta { id, meta }).await?;
            let tx = Sender::new(id, layout, alg, SenderConfig::default(), known);
            let span = tracing::info_span!("get", transfer = %id, path = %path);
            let progress = FileProgress::detached(Arc::new(Progress::default()));
            let (_slot, lanes) = LaneSlot::open(shared, id);
            let digest = SendDriver {
                conn,
                tx,
                src: &src,
                store: shared.store.clone(),
                progress: &progress,
                throttle: None,
                lanes: Some(lanes),
            }
            .run()
            .instrument(span)
            .await?;
            info!(transfer = %id, path = %path, digest = %digest, "download complete");
        }
        Message::BatchPut { alg, files } => serve_batch(conn, &alg, files, shared).await?,
        Message::BatchGet { alg, files } => serve_batch_get(conn, &alg, files, shared).await?,
        Message::Ping { nonce, .. } => conn.send(&Message::Pong { nonce }).await?,
        Message::Pong { .. } => {}
        other => {
            return Err(RequestError::Fatal(Error::Proto(
                ferry_proto::ProtoError::unexpected(other.name(), "between requests"),
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
    meta: &ferry_proto::message::FileMeta,
) -> std::result::Result<(), RequestError> {
    if shared.storage.holds_partial(full, meta) {
        return Ok(());
    }
    let Some(free) = shared.storage.free_bytes(full) else {
        return Ok(());
    };
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

/// Paths claimed by a batch, released when it ends.
struct BatchClaims<'a> {
    set: &'a Mutex<HashMap<PathBuf, (TransferId, Arc<Notify>)>>,
    stop: Arc<Notify>,
    paths: Vec<PathBuf>,
}

#[derive(Debug, PartialEq, Eq)]
enum Take {
    Taken,
    HeldByOther,
    HeldBySelf,
}

impl BatchClaims<'_> {
    /// Claims `full` for this batch unless a transfer (or this batch) holds it.
    fn try_take(&mut self, full: &Path, id: TransferId) -> std::result::Result<Take, RequestError> {
        let mut s = self.set.lock().map_err(|_| {
            RequestError::Reply(Failure::new(FailureCode::Internal, "lock poisoned"))
        })?;
        match s.get(full) {
            Some((_, n)) if Arc::ptr_eq(n, &self.stop) => return Ok(Take::HeldBySelf),
            Some(_) => return Ok(Take::HeldByOther),
            None => {}
        }
        s.insert(full.to_path_buf(), (id, self.stop.clone()));
        self.paths.push(full.to_path_buf());
        Ok(Take::Taken)
    }
}

impl Drop for BatchClaims<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            for p in &self.paths {
                if s.get(p).is_some_and(|(_, n)| Arc::ptr_eq(n, &self.stop)) {
                    s.remove(p);
                }
            }
        }
    }
}

/// The hash algorithm a batch names, or a reply saying it is unknown.
fn batch_alg(name: &str) -> std::result::Result<HashAlg, RequestError> {
    HashAlg::from_name(name).ok_or_else(|| {
        RequestError::Reply(Failure::new(
            FailureCode::BadRequest,
            format!("unknown hash algorithm {name:?}"),
        ))
    })
}

/// Runs one small-file batch (see [`crate::batch`]).
async fn serve_batch(
    conn: &mut Conn,
    alg: &str,
    files: Vec<BatchFile>,
    shared: &Arc<Shared>,
) -> std::result::Result<(), RequestError> {
    let alg = batch_alg(alg)?;
    let n = files.len();
    let mut failures: Vec<BatchFailure> = Vec::new();
    let fail = |failures: &mut Vec<BatchFailure>, i: usize, f: Failure| {
        failures.push(BatchFailure {
            index: i as u32,
            failure: f,
        })
    };
    // Where each file goes, and who else may be writing it.
    let mut claims = BatchClaims {
        set: &shared.busy,
        stop: Arc::new(Notify::new()),
        paths: Vec::new(),
    };
    let batch_id = TransferId(rand::random());
    let mut targets: Vec<Option<PathBuf>> = Vec::with_capacity(n);
    let mut held: Vec<usize> = Vec::new();
    let mut resolved_parents = HashMap::new();
    // What resolving saw at each target (saves `already_there` a stat).
    let mut seen_at: HashMap<usize, crate::paths::Seen> = HashMap::new();
    for (i, f) in files.iter().enumerate() {
        let full =
            match crate::paths::resolve_cached_seen(&shared.root, &f.path, &mut resolved_parents) {
                Ok((p, seen)) if p != shared.root => {
                    seen_at.insert(i, seen);
                    p
                }
                Ok(_) => {
                    fail(
                        &mut failures,
                        i,
                        Failure::new(FailureCode::BadRequest, "the root is a directory"),
                    );
                    targets.push(None);
                    continue;
                }
                Err(e) => {
                    fail(
                        &mut failures,
                        i,
                        Failure::new(FailureCode::PermissionDenied, e.to_string()),
                    );
                    targets.push(None);
                    continue;
                }
            };
        match claims.try_take(&full, batch_id)? {
            Take::Taken => {}
            Take::HeldByOther => held.push(i),
            Take::HeldBySelf => {
                fail(
                    &mut failures,
                    i,
                    Failure::new(FailureCode::BadRequest, "the same path twice in one batch"),
                );
                targets.push(None);
                continue;
            }
        }
        targets.push(Some(full));
    }
    // Paths held by another transfer: most often this client's own batch on
    // a connection that was just cut and that the server has not yet seen
    // end. Wait a little for such holders to let go (polling, 1 s at most)
    // before answering Busy, which would send those files the slow way.
    for _ in 0..50 {
        if held.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut still = Vec::new();
        for i in held {
            if let Some(full) = targets[i].clone() {
                if claims.try_take(&full, batch_id)? != Take::Taken {
                    still.push(i);
                } else {
                    // Its holder may have changed it meanwhile.
                    seen_at.remove(&i);
                }
            }
        }
        held = still;
    }
    for i in held {
        let mut f = Failure::new(
            FailureCode::Busy,
            format!("{} is being written by another transfer", files[i].path),
        );
        f.retry_after_ms = Some(1000);
        fail(&mut failures, i, f);
        targets[i] = None;
    }
    // Room for the batch (beyond the reserve)?
    let total: u64 = files.iter().map(|f| f.size).sum();
    if let Ok(st) = rustix::fs::statvfs(&shared.root) {
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if free < total.saturating_add(shared.min_free_bytes) {
            let mut f = Failure::new(
                FailureCode::InsufficientStorage,
                format!("server disk is nearly full ({free} bytes free); try again later"),
            );
            f.retry_after_ms = Some(60_000);
            return Err(RequestError::Reply(f));
        }
    }
    // Which files are already in place? (Blocking work, off the runtime.)
    let t_check = std::time::Instant::now();
    let root = shared.root.clone();
    let check: Vec<(usize, PathBuf, BatchFile, crate::paths::Seen)> = targets
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let seen = seen_at.remove(&i).unwrap_or(crate::paths::Seen::Unknown);
            t.clone().map(|p| (i, p, files[i].clone(), seen))
        })
        .collect();
    let checked = tokio::task::spawn_blocking(move || {
        // Parents made sure of in this batch (most files share a few).
        let mut ensured: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
        check
            .into_iter()
            .map(|(i, full, f, seen)| {
                let parent = fsutil::parent_of(&full);
                let r = (|| {
                    if !ensured.contains(&parent) {
                        if !parent.is_dir() {
                            fsutil::create_dirs_durable(&parent)
                                .map_err(|e| Error::local(&parent, e))?;
                            // Re-check after creating parents: a symlink may have appeared.
                            crate::paths::resolve(&root, &f.path)
                                .map_err(|e| Error::Usage(e.to_string()))?;
                        }
                        ensured.insert(parent.clone());
                    }
                    crate::batch::already_there_seen(&full, seen, &f, alg)
                })();
                (i, r)
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| RequestError::Fatal(Error::Store(e.to_string())))?;
    let mut need = RangeSet::new();
    let mut done = RangeSet::new();
    for (i, r) in checked {
        match r {
            Ok(true) => done.insert(i as u32),
            Ok(false) => need.insert(i as u32),
            Err(e) => {
                targets[i] = None;
                fail(&mut failures, i, failure_for(&e));
            }
        }
    }
    conn.send(&Message::BatchNeed {
        indexes: need.clone(),
    })
    .await?;
    let t_receive = std::time::Instant::now();
    // Receive the needed files, verify, write their parts.
    let mut written: Vec<crate::batch::Part> = Vec::new();
    let mut written_idx: Vec<u32> = Vec::new();
    let mut got = RangeSet::new();
    // Verified files waiting to be written, in one blocking call per few MiB.
    let mut pending: Vec<(u32, PathBuf, BatchFile, bytes::Bytes)> = Vec::new();
    let mut pending_bytes = 0usize;
    // The previous group's writes run while the next group arrives.
    let mut inflight: Option<WriteJob> = None;
    let r = async {
        // Keepalives while the batch arrives say how much has: on a slow
        // link the client, done writing, may wait longer than its
        // acknowledgement limit for the result (see `Session::put_batch`).
        let mut last_write = std::time::Instant::now();
        let mut heard = (std::time::Instant::now(), conn.rd.bytes_in);
        loop {
            let wait = conn.timeouts.keepalive.saturating_sub(last_write.elapsed());
            let m = match tokio::time::timeout(wait, conn.rd.expect()).await {
                Ok(m) => m?,
                Err(_) => {
                    if conn.rd.bytes_in != heard.1 {
                        heard = (std::time::Instant::now(), conn.rd.bytes_in);
                    } else if heard.0.elapsed() >= conn.timeouts.stall {
                        return Err(Error::Timeout("batch data".into()));
                    }
                    let received = Some(conn.rd.bytes_in);
                    conn.send(&Message::Ping { nonce: 5, received }).await?;
                    last_write = std::time::Instant::now();
                    continue;
                }
            };
            heard = (std::time::Instant::now(), conn.rd.bytes_in);
            match m {
                Message::BatchData { index, payload } => {
                    let i = index as usize;
                    if !need.contains(index) || got.contains(index) {
                        return Err(Error::Proto(
                            ferry_proto::Misbehavior::BatchDataUnasked { index }.into(),
                        ));
                    }
                    got.insert(index);
                    let f = &files[i];
                    let payload = match shared.faults.as_deref() {
                        Some(fp) if !payload.is_empty() && fp.take_corruption() => {
                            warn!(path = %f.path, "fault injector: flipping a bit of this batch file in flight");
                            let mut p = payload.to_vec();
                            p[0] ^= 0x01;
                            bytes::Bytes::from(p)
                        }
                        _ => payload,
                    };
                    if payload.len() as u64 != f.size
                        || ferry_proto::hash::small_file_digest(alg, &payload) != f.digest
                    {
                        warn!(path = %f.path, "batch file failed verification");
                        fail(
                            &mut failures,
                            i,
                            Failure::new(FailureCode::Integrity, "content does not match its digest"),
                        );
                        continue;
                    }
                    let Some(full) = targets[i].clone() else { continue };
                    pending_bytes += payload.len();
                    pending.push((index, full, f.clone(), payload));
                    if pending_bytes >= 512 * 1024 {
                        pending_bytes = 0;
                        if let Some(job) = inflight.take() {
                            absorb(job, &mut written, &mut written_idx, &mut failures).await?;
                        }
                        inflight = Some(spawn_writes(std::mem::take(&mut pending)));
                    }
                }
                Message::Ping { nonce, .. } => {
                    conn.send(&Message::Pong { nonce }).await?;
                    last_write = std::time::Instant::now();
                }
                Message::Pong { .. } => {}
                Message::BatchCommit => {
                    if let Some(job) = inflight.take() {
                        absorb(job, &mut written, &mut written_idx, &mut failures).await?;
                    }
                    let job = spawn_writes(std::mem::take(&mut pending));
                    return absorb(job, &mut written, &mut written_idx, &mut failures).await;
                }
                other => {
                    return Err(Error::Proto(ferry_proto::ProtoError::unexpected(
                        other.name(),
                        "in a batch",
                    )))
                }
            }
        }
    }
    .await;
    if let Some(job) = inflight.take() {
        // Whatever was still being written is discarded with the rest below.
        let _ = absorb(job, &mut written, &mut written_idx, &mut failures).await;
    }
    if let Err(e) = r {
        let w = std::mem::take(&mut written);
        let _ = tokio::task::spawn_blocking(move || crate::batch::discard(w)).await;
        return Err(RequestError::Fatal(e));
    }
    if got != need {
        let w = std::mem::take(&mut written);
        let _ = tokio::task::spawn_blocking(move || crate::batch::discard(w)).await;
        return Err(RequestError::Fatal(Error::Proto(
            ferry_proto::Misbehavior::BatchIncomplete.into(),
        )));
    }
    let t_commit = std::time::Instant::now();
    let store = shared.store.clone();
    let results = tokio::task::spawn_blocking(move || {
        let results = crate::batch::commit(&written);
        // A stale chunked partial of the same destination no longer applies.
        for (part, r) in written.iter().zip(&results) {
            if r.is_ok() {
                let key = part.fin.to_string_lossy();
                if let Ok(Some(_)) = store.partial(&key) {
                    let _ = store.remove_partial(&key);
                }
            }
        }
        results
    })
    .await
    .map_err(|e| RequestError::Fatal(Error::Store(e.to_string())))?;
    for (idx, r) in written_idx.iter().zip(results) {
        match r {
            Ok(()) => done.insert(*idx),
            Err(e) => fail(&mut failures, *idx as usize, failure_for(&e)),
        }
    }
    info!(
        files = n,
        stored = done.count(),
        failed = failures.len(),
        check_ms = (t_receive - t_check).as_millis() as u64,
        receive_ms = (t_commit - t_receive).as_millis() as u64,
        commit_ms = t_commit.elapsed().as_millis() as u64,
        "batch committed"
    );
    drop(claims);
    let failures = failures
        .into_iter()
        .map(|f| BatchFailure {
            index: f.index,
            failure: shared.relative(f.failure),
        })
        .collect();
    conn.send(&Message::BatchResult { done, failures }).await?;
    Ok(())
}

type WriteJob = tokio::task::JoinHandle<Vec<(u32, Result<crate::batch::Part>)>>;

/// Writes verified batch files to their parts on a blocking thread.
fn spawn_writes(pending: Vec<(u32, PathBuf, BatchFile, bytes::Bytes)>) -> WriteJob {
    tokio::task::spawn_blocking(move || {
        pending
            .into_iter()
            .map(|(index, full, f, data)| (index, crate::batch::write_part(&full, &f, &data)))
            .collect()
    })
}

/// Waits for a group of writes and records what each did.
async fn absorb(
    job: WriteJob,
    written: &mut Vec<crate::batch::Part>,
    written_idx: &mut Vec<u32>,
    failures: &mut Vec<BatchFailure>,
) -> Result<()> {
    let results = job.await.map_err(|e| Error::Store(e.to_string()))?;
    for (index, r) in results {
        match r {
            Ok(part) => {
                written.push(part);
                written_idx.push(index);
            }
            Err(e) => failures.push(BatchFailure {
                index,
                failure: failure_for(&e),
            }),
        }
    }
    Ok(())
}

/// Answers a `BatchGet`: reads the files a few hundred KiB at a time on a
/// blocking thread and streams them, skipping those the client already holds.
async fn serve_batch_get(
    conn: &mut Conn,
    alg: &str,
    files: Vec<BatchFile>,
    shared: &Arc<Shared>,
) -> std::result::Result<(), RequestError> {
    let alg = batch_alg(alg)?;
    let mut done = RangeSet::new();
    let mut failures = Vec::new();
    let mut cache = HashMap::new();
    let mut start = 0usize;
    while start < files.len() {
        let mut end = start;
        let mut bytes = 0u64;
        while end < files.len() && (end == start || bytes < 512 * 1024) {
            bytes += files[end].size.min(ferry_proto::message::MAX_BATCH_FILE);
            end += 1;
        }
        let group: Vec<(u32, BatchFile)> =
            (start..end).map(|i| (i as u32, files[i].clone())).collect();
        let root = shared.root.clone();
        let mut c = std::mem::take(&mut cache);
        let (results, c) = tokio::task::spawn_blocking(move || {
            let r: Vec<_> = group
                .into_iter()
                .map(|(i, f)| (i, crate::batch::read_for_get(&root, &f, alg, &mut c)))
                .collect();
            (r, c)
        })
        .await
        .map_err(|e| RequestError::Fatal(Error::Store(e.to_string())))?;
        cache = c;
        for (index, r) in results {
            match r {
                Ok((file, payload)) => {
                    conn.wr
                        .send_batched(&Message::BatchItem {
                            index,
                            file,
                            payload,
                        })
                        .await?;
                    done.insert(index);
                }
                Err(e) => failures.push(BatchFailure {
                    index,
                    failure: failure_for(&e),
                }),
            }
        }
        start = end;
    }
    info!(
        files = files.len(),
        served = done.count(),
        failed = failures.len(),
        "batch served"
    );
    let failures = failures
        .into_iter()
        .map(|f| BatchFailure {
            index: f.index,
            failure: shared.relative(f.failure),
        })
        .collect();
    conn.send(&Message::BatchResult { done, failures }).await?;
    Ok(())
}

/// Splits a listing into pages that each fit well inside a control frame: at
/// most `MAX_LIST_ENTRIES` entries and about 768 KiB of paths (a path may be
/// 4 KiB long, so a count bound alone could exceed the 1 MiB frame limit).
fn list_pages(entries: &[Entry]) -> Vec<&[Entry]> {
    const PAGE_BYTES: usize = 768 * 1024;
    let mut pages = Vec::new();
    let (mut start, mut bytes) = (0usize, 0usize);
    for (i, e) in entries.iter().enumerate() {
        let cost = e.path.len() + 48;
        if i > start && (i - start >= MAX_LIST_ENTRIES || bytes + cost > PAGE_BYTES) {
            pages.push(&entries[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += cost;
    }
    pages.push(&entries[start..]);
    pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorClass;

    /// The class a client gives a failure the server reported for `e`.
    fn client_class(e: Error) -> ErrorClass {
        Error::Proto(ferry_proto::ProtoError::Remote(failure_for(&e))).class()
    }

    #[test]
    fn server_side_storage_trouble_is_not_the_clients_usage_error() {
        use rustix::io::Errno;
        let io = |errno: Errno| {
            Error::local(
                "/srv/root/x",
                std::io::Error::from_raw_os_error(errno.raw_os_error()),
            )
        };
        for errno in [
            Errno::XDEV,
            Errno::FBIG,
            Errno::MLINK,
            Errno::ROFS,
            Errno::IO,
            Errno::NOSPC,
        ] {
            let class = client_class(io(errno));
            assert_eq!(class, ErrorClass::LocalIo, "{errno:?}");
        }
        assert_eq!(
            client_class(Error::Store("redb broke".into())),
            ErrorClass::Unreachable
        );
        // What the request named is still the client's to fix.
        for errno in [Errno::NOTDIR, Errno::ISDIR, Errno::NAMETOOLONG, Errno::LOOP] {
            assert_eq!(client_class(io(errno)), ErrorClass::Usage, "{errno:?}");
        }
        assert_eq!(client_class(io(Errno::ACCESS)), ErrorClass::Auth);
    }

    #[test]
    fn failures_name_paths_relative_to_the_root() {
        let root = Path::new("/srv/ferry root");
        assert_eq!(
            root_relative(root, "/srv/ferry root/a/b: Not a directory (os error 20)"),
            "a/b: Not a directory (os error 20)"
        );
        assert_eq!(root_relative(root, "/srv/ferry root: gone"), ".: gone");
        assert_eq!(root_relative(root, "a/b is busy"), "a/b is busy");
        assert_eq!(root_relative(Path::new("/"), "/etc/x"), "/etc/x");
    }

    #[test]
    fn list_pages_fit_in_a_control_frame() {
        let long = "d/".repeat(2000);
        let entries: Vec<Entry> = (0..3000)
            .map(|i| Entry {
                path: format!("{long}{i}"),
                kind: EntryKind::File,
                size: 1,
                mtime_ns: 1,
                mode: 0o644,
            })
            .collect();
        let pages = list_pages(&entries);
        assert_eq!(pages.iter().map(|p| p.len()).sum::<usize>(), 3000);
        for (i, p) in pages.iter().enumerate() {
            let m = Message::ListReply {
                entries: p.to_vec(),
                more: i + 1 < pages.len(),
            };
            assert!(m.encode().len() < ferry_proto::message::MAX_CONTROL_FRAME as usize);
        }
        assert_eq!(
            list_pages(&[]).len(),
            1,
            "an empty listing is one empty page"
        );
        let short: Vec<Entry> = entries
            .iter()
            .map(|e| Entry {
                path: "x".into(),
                ..e.clone()
            })
            .collect();
        assert!(list_pages(&short)
            .iter()
            .all(|p| p.len() <= MAX_LIST_ENTRIES));
    }
}
