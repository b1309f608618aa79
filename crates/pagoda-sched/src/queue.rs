//! A queue of requests ordered by priority, then arrival.

use std::collections::BTreeMap;

use crate::request::RequestId;

/// Requests keyed by `(priority, arrival)`: the first entry is the next to admit. Arrival numbers
/// are unique, so keys never collide.
#[derive(Debug, Default)]
pub(crate) struct RequestQueue {
    entries: BTreeMap<(i32, u64), RequestId>,
}

impl RequestQueue {
    pub(crate) fn push(&mut self, key: (i32, u64), id: RequestId) {
        self.entries.insert(key, id);
    }

    pub(crate) fn remove(&mut self, key: (i32, u64)) {
        self.entries.remove(&key);
    }

    pub(crate) fn first(&self) -> Option<RequestId> {
        self.entries.values().next().copied()
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
