//! Backpressure: a bound on the generation requests in flight. A request holds a slot from
//! before it is tokenized until its last output is sent (or its client goes away); with every
//! slot taken, a new request is answered 429 at once instead of growing the engine's queue
//! without limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    limit: usize,
    rejected: AtomicU64,
}

/// A held slot; dropping it lets the next request in.
pub type Slot = OwnedSemaphorePermit;

impl Admission {
    pub fn new(limit: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limit)),
            limit,
            rejected: AtomicU64::new(0),
        }
    }

    /// A slot, or the 429 to answer when none is free.
    pub fn admit(&self) -> Result<Slot, ApiError> {
        Arc::clone(&self.slots).try_acquire_owned().map_err(|_| {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            ApiError::overloaded(self.limit)
        })
    }

    /// Requests holding a slot now.
    pub fn pending(&self) -> usize {
        self.limit - self.slots.available_permits()
    }

    /// Requests turned away since start.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_past_the_limit_is_refused_until_a_slot_frees() {
        let admission = Admission::new(2);
        let a = admission.admit().unwrap();
        let _b = admission.admit().unwrap();
        assert_eq!(admission.pending(), 2);
        let refused = admission.admit().unwrap_err();
        assert_eq!(refused.status.as_u16(), 429);
        assert_eq!(admission.rejected(), 1);
        drop(a);
        assert_eq!(admission.pending(), 1);
        assert!(admission.admit().is_ok());
    }
}
