//! The ferry engine: runs the sans-IO protocol of `ferry-proto` over real
//! connections, files and a durable journal.
//!
//! A tour of the modules:
//! * [`server`]: accepts TLS connections and serves requests under a root.
//! * [`admission`]: which connections a server takes (per-source limits,
//!   dropping the oldest unauthenticated, penalties), sans-IO.
//! * [`client`]: connects (TLS, pinning, token) and issues requests.
//! * [`copy`]: `ferry cp`: plans a copy of files and trees and runs it under
//!   one runner (retries, breakers, status records) for every endpoint kind
//!   (native `ferry://` and `sftp://`).
//! * [`walk`]: the local tree walk of uploads: symlink policy, names the wire cannot carry.
//! * [`batch`]: small files stored many at a time, durable with one sync.
//! * [`transfer`]: the drivers that run a `Sender` or `Receiver` over a connection.
//! * [`lanes`]: extra connections carrying one large file's data (`--streams`).
//! * [`transport`]: what carries a session: dialers and listeners (TCP+TLS).
//! * [`conn`]: framed message I/O over any byte stream.
//! * [`tls`]: certificates, fingerprints, the known-servers file.
//! * [`storage`]: where files are received into and sent from.
//! * [`faults`]: deliberate faults for the demo and tests.
//! * [`store`]: the redb journal of partial files and source hashes.
//! * [`queue`]: the durable outbox of copies that could not finish yet.
//! * [`report`]: what a copy reports (the summary, what happened to each file).
//! * [`agent`]: running queued copies under their locks; `ferry agent`'s passes and report.
//! * [`status`]: records of unfinished transfers for `ferry status`.
//! * [`paths`]: confining peer-supplied paths to the server root.
//! * [`hostport`]: `HOST[:PORT]` in URLs, checked before anything is dialed.
//! * [`fsutil`]: durable writes, atomic renames, file identity.
//! * [`progress`]: counters a UI polls.
//! * [`sftp`]: the SFTP protocol side of `ferry cp` (resumable, verified
//!   per-file transfers, listing, SSH), run by [`copy`].
//! * [`demo`]: the self-contained showcase behind `ferry demo`.
#![forbid(unsafe_code)]

pub mod admission;
pub mod agent;
pub mod batch;
pub mod client;
pub mod conn;
pub mod copy;
pub mod demo;
pub mod error;
pub mod faults;
pub mod fsutil;
pub mod hostport;
pub mod lanes;
pub mod paths;
pub mod progress;
pub mod queue;
pub mod report;
pub mod server;
pub mod sftp;
pub mod status;
pub mod storage;
pub mod store;
pub mod tls;
pub mod transfer;
pub mod transport;
pub mod walk;

pub use error::{Error, ErrorClass, Result};
pub use ferry_proto::retry;
