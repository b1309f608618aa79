//! Decode steps on a GPU replayed from recorded CUDA graphs, one graph per batch-size bucket.
//!
//! A decode step's launches depend only on its number of sequences (block tables are padded to
//! the longest a request can have), so the engine pads each decode batch to the next bucket and
//! replays that bucket's graph: one launch per step instead of one per kernel. Prefill chunks
//! run eagerly.

use std::collections::HashMap;
use std::sync::Arc;

use pagoda_kv::KvCache;
use pagoda_models::{Batch, Model, StepGraph};
use pagoda_tensor::Tensor;

use crate::Result;
use crate::step_batch::pad_decode;

/// Largest bucket recorded: beyond it decode batches are compute-bound and launches are a small
/// share of a step.
const MAX_BUCKET: usize = 256;

/// A recorded graph, owned by one engine.
struct OwnedGraph(StepGraph);

// SAFETY: a StepGraph is not `Send` only because its CUDA graph handles are raw pointers. The
// CUDA driver lets any thread use a graph as long as no two threads use it at once ("Graph
// object thread safety" in the CUDA programming guide); the engine owns its graphs and is used
// by one thread at a time (`&mut self`), and a replay binds the CUDA context to the calling
// thread first (cudarc's `CudaGraph::launch`). So moving the engine, graphs included, to its
// step thread is sound.
unsafe impl Send for OwnedGraph {}

enum BucketGraph {
    /// A padded batch of this size ran eagerly once, so every kernel the graph will hold is
    /// loaded (recording cannot load one).
    Warm,
    Recorded(Box<OwnedGraph>),
    /// Recording failed; batches of this size run eagerly, unpadded.
    Eager,
}

/// The decode graphs of one model and KV cache.
pub(crate) struct DecodeGraphs {
    /// Batch sizes with a graph, ascending.
    buckets: Vec<usize>,
    /// Blocks of the longest sequence the engine admits: the padded block-table width.
    max_blocks_per_seq: usize,
    /// A block of the pages that no request is ever given: padding rows write there.
    pad_block: u32,
    block_size: usize,
    graphs: HashMap<usize, BucketGraph>,
    /// Why the last recording failed, for the metrics.
    pub last_error: Option<String>,
}

impl DecodeGraphs {
    /// Graphs for decode batches of up to `max_num_seqs` sequences (powers of two, the last at
    /// or above `max_num_seqs`, at most 256).
    pub fn new(
        max_num_seqs: usize,
        max_blocks_per_seq: usize,
        pad_block: u32,
        block_size: usize,
    ) -> Self {
        let mut buckets = vec![1];
        while let Some(&last) = buckets.last()
            && last < max_num_seqs.min(MAX_BUCKET)
        {
            buckets.push(last * 2);
        }
        Self {
            buckets,
            max_blocks_per_seq,
            pad_block,
            block_size,
            graphs: HashMap::new(),
            last_error: None,
        }
    }

    /// Runs the decode batch `batch` padded to its bucket: eagerly the first time (to load the
    /// kernels), by recording the graph the second, by replaying it after that. Returns the
    /// logits of the real rows (on the device), or `None` when the batch has no bucket or its
    /// graph could not be recorded, for the caller to run it eagerly.
    ///
    /// The logits of a replay are a view of the graph's own output buffer: read them before
    /// the next step.
    pub fn run(
        &mut self,
        model: &Arc<dyn Model>,
        batch: &Batch,
        kv: &mut KvCache,
    ) -> Result<Option<Tensor>> {
        let rows = batch.tokens.len();
        let Some(&bucket) = self.buckets.iter().find(|&&b| b >= rows) else {
            return Ok(None);
        };
        let mut padded = batch.clone();
        pad_decode(&mut padded, bucket, self.pad_block, self.block_size);
        let logits = match self.graphs.get_mut(&bucket) {
            Some(BucketGraph::Eager) => return Ok(None),
            Some(BucketGraph::Recorded(graph)) => graph.0.run(&padded, kv)?.narrow(0, 0, rows)?,
            Some(BucketGraph::Warm) => {
                match StepGraph::record(Arc::clone(model), &padded, self.max_blocks_per_seq, kv) {
                    Ok(graph) => {
                        let logits = graph.logits().narrow(0, 0, rows)?;
                        self.graphs
                            .insert(bucket, BucketGraph::Recorded(Box::new(OwnedGraph(graph))));
                        logits
                    }
                    Err(e) => {
                        // An eager run writes the same K/V to the same slots, so whatever the
                        // failed recording ran is harmless.
                        self.last_error = Some(format!(
                            "recording the decode graph of {bucket} sequences: {e}"
                        ));
                        self.graphs.insert(bucket, BucketGraph::Eager);
                        return Ok(None);
                    }
                }
            }
            None => {
                let logits = model.forward(&padded, kv)?.narrow(0, 0, rows)?;
                self.graphs.insert(bucket, BucketGraph::Warm);
                logits
            }
        };
        Ok(Some(logits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_covering_max_num_seqs() {
        assert_eq!(DecodeGraphs::new(1, 4, 0, 16).buckets, [1]);
        assert_eq!(DecodeGraphs::new(8, 4, 0, 16).buckets, [1, 2, 4, 8]);
        assert_eq!(DecodeGraphs::new(9, 4, 0, 16).buckets, [1, 2, 4, 8, 16]);
        assert_eq!(
            DecodeGraphs::new(10_000, 4, 0, 16).buckets.last(),
            Some(&256)
        );
    }
}
