//! `--transport auto`: QUIC when UDP gets through, TCP otherwise.
//!
//! QUIC is tried first with a short handshake limit (UDP that is blocked shows
//! up as silence, not as an error). When it fails to connect, TCP is dialed at
//! once; if TCP connects, QUIC is not tried again for a while, so reconnects after a drop do
//! not each pay the probe. A TLS refusal over QUIC (a changed server key) is
//! returned as it is: TCP would meet the same key.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::quic::QuicDialer;
use super::tcp::TcpDialer;
use super::{BoxFuture, DialTarget, Dialer};
use crate::conn::BoxStream;
use crate::error::{Error, Result};

/// How long QUIC gets to complete its handshake before TCP is used.
const QUIC_PROBE: Duration = Duration::from_secs(3);
/// How long a failed QUIC probe sends connections to TCP.
const QUIC_RETRY_AFTER: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
pub struct AutoDialer {
    quic: QuicDialer,
    tcp: TcpDialer,
    /// Until when QUIC is skipped, after a failed probe.
    quic_off_until: Mutex<Option<Instant>>,
}

impl AutoDialer {
    fn quic_allowed(&self) -> bool {
        match self.quic_off_until.lock() {
            Ok(g) => g.is_none_or(|t| Instant::now() >= t),
            Err(_) => true,
        }
    }

    fn set_quic_off(&self, off: bool) {
        if let Ok(mut g) = self.quic_off_until.lock() {
            *g = off.then(|| Instant::now() + QUIC_RETRY_AFTER);
        }
    }
}

impl Dialer for AutoDialer {
    fn dial<'a>(&'a self, t: DialTarget<'a>) -> BoxFuture<'a, Result<BoxStream>> {
        Box::pin(async move {
            if self.quic_allowed() {
                let mut probe = t.clone();
                probe.timeout = t.timeout.min(QUIC_PROBE);
                match self.quic.dial(probe).await {
                    Ok(s) => {
                        self.set_quic_off(false);
                        tracing::debug!(peer = t.addr, "transport auto: QUIC");
                        return Ok(s);
                    }
                    Err(e @ Error::Tls(_)) => return Err(e),
                    Err(e) => {
                        // Only when TCP gets through is UDP the problem (not
                        // the whole network): then skip QUIC for a while.
                        let tcp = self.tcp.dial(t.clone()).await;
                        if tcp.is_ok() {
                            tracing::info!(peer = t.addr, error = %e, "QUIC did not connect but TCP did; using TCP");
                            self.set_quic_off(true);
                        }
                        return tcp;
                    }
                }
            }
            self.tcp.dial(t).await
        })
    }
}
