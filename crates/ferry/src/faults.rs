//! Deliberate faults injected into transfers, for the demo and for tests.

use std::sync::atomic::{AtomicU32, Ordering};

/// Deliberate faults, for the demo and for tests.
#[derive(Debug, Default)]
pub struct FaultPlan {
    /// How many incoming chunks to corrupt (one bit flipped) before verification.
    pub corrupt_chunks: AtomicU32,
    /// How many checkpoints to withhold forever (the receiver stays connected
    /// and answers keepalives but never acknowledges): a stuck receiver.
    pub withhold_checkpoints: AtomicU32,
}

impl FaultPlan {
    pub(crate) fn take_corruption(&self) -> bool {
        self.corrupt_chunks
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    pub(crate) fn take_withhold(&self) -> bool {
        self.withhold_checkpoints
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}
