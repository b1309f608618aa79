//! Progress reports while a checkpoint loads: how many bytes of its tensor data have been read
//! and placed, out of how many.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use pagoda_tensor::Tensor;

use crate::Result;
use crate::weights::WeightSource;

/// How far a load has come, counted in the checkpoint's own bytes: a GGUF Q4 tensor counts its
/// packed size, a safetensors bf16 tensor two bytes an element, whatever the model converts them
/// to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadEvent {
    /// Bytes of tensor data read and placed so far.
    pub bytes_done: u64,
    /// Bytes of tensor data in the checkpoint (in the dtypes pagoda reads).
    pub bytes_total: u64,
    /// Tensors read and placed so far.
    pub tensors_done: usize,
    /// Tensors in the checkpoint (in the dtypes pagoda reads).
    pub tensors_total: usize,
}

impl LoadEvent {
    /// Whether this is the last event of a load: every byte accounted for.
    pub fn is_done(&self) -> bool {
        self.bytes_done == self.bytes_total && self.tensors_done == self.tensors_total
    }
}

/// A callback that receives [`LoadEvent`]s while a model loads.
///
/// The first event of a load has `bytes_done == 0`; then one follows each tensor placed where
/// the model runs (quantized, converted or copied to the GPU as the load options ask), with
/// `bytes_done` never decreasing; the last, sent once the model is built, has
/// [`LoadEvent::is_done`]. Tensors the model never reads (say, a stored rotary table) are counted
/// done then. A failed load sends no last event. The callback runs on the loading thread between
/// tensors, so it should return quickly.
#[derive(Clone)]
pub struct LoadProgress(Arc<dyn Fn(LoadEvent) + Send + Sync>);

impl LoadProgress {
    pub fn new(callback: impl Fn(LoadEvent) + Send + Sync + 'static) -> Self {
        Self(Arc::new(callback))
    }

    /// Calls the callback with `event`.
    pub fn report(&self, event: LoadEvent) {
        (self.0)(event);
    }
}

impl fmt::Debug for LoadProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LoadProgress(..)")
    }
}

/// Counts the tensors of one load and reports to a [`LoadProgress`].
pub(crate) struct LoadTracker {
    progress: LoadProgress,
    bytes_total: u64,
    tensors_total: usize,
    bytes_done: Cell<u64>,
    tensors_done: Cell<usize>,
    /// The tensor count of the last event sent, so that only news is reported.
    reported: Cell<Option<usize>>,
    /// Names already counted: a tied embedding is read twice but stored once.
    counted: RefCell<HashSet<String>>,
}

impl LoadTracker {
    /// A tracker for loading from `source`; sends the first event.
    pub(crate) fn start(progress: LoadProgress, source: &dyn WeightSource) -> Self {
        let (bytes_total, tensors_total) = source.stored_total();
        let tracker = Self {
            progress,
            bytes_total,
            tensors_total,
            bytes_done: Cell::new(0),
            tensors_done: Cell::new(0),
            reported: Cell::new(None),
            counted: RefCell::new(HashSet::new()),
        };
        tracker.report();
        tracker
    }

    /// Counts tensor `name` (`bytes` as stored) as read, once however often it is read.
    fn count(&self, name: &str, bytes: u64) {
        if self.counted.borrow_mut().insert(name.to_owned()) {
            self.bytes_done
                .set((self.bytes_done.get() + bytes).min(self.bytes_total));
            self.tensors_done
                .set((self.tensors_done.get() + 1).min(self.tensors_total));
        }
    }

    /// Sends an event if tensors were counted since the last one.
    pub(crate) fn report(&self) {
        let done = self.tensors_done.get();
        if self.reported.get() == Some(done) {
            return;
        }
        self.reported.set(Some(done));
        self.progress.report(LoadEvent {
            bytes_done: self.bytes_done.get(),
            bytes_total: self.bytes_total,
            tensors_done: done,
            tensors_total: self.tensors_total,
        });
    }

    /// Counts everything done and sends the last event.
    pub(crate) fn finish(&self) {
        self.bytes_done.set(self.bytes_total);
        self.tensors_done.set(self.tensors_total);
        // Sent even when the count already stood at the total: the last event comes after the
        // last tensor was placed.
        self.reported.set(None);
        self.report();
    }
}

/// A [`WeightSource`] that counts what is read from it.
pub(crate) struct TrackedSource<'a> {
    pub(crate) inner: &'a dyn WeightSource,
    pub(crate) tracker: &'a LoadTracker,
}

impl TrackedSource<'_> {
    fn counted(&self, name: &str, tensor: Result<Tensor>) -> Result<Tensor> {
        if tensor.is_ok()
            && let Some(bytes) = self.inner.stored_bytes(name)
        {
            self.tracker.count(name, bytes);
        }
        tensor
    }
}

impl WeightSource for TrackedSource<'_> {
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn load_matrix(&self, name: &str) -> Result<Tensor> {
        self.counted(name, self.inner.load_matrix(name))
    }

    fn load_f32(&self, name: &str) -> Result<Tensor> {
        self.counted(name, self.inner.load_f32(name))
    }

    fn load_raw(&self, name: &str) -> Result<Tensor> {
        self.counted(name, self.inner.load_raw(name))
    }

    fn stored_bytes(&self, name: &str) -> Option<u64> {
        self.inner.stored_bytes(name)
    }

    fn stored_total(&self) -> (u64, usize) {
        self.inner.stored_total()
    }
}
