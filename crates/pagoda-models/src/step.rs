//! A forward pass's inputs on the model's device, and forward passes recorded once as a CUDA
//! graph and replayed.
//!
//! Every input of a step - token ids, positions, KV slots, the rows whose logits are wanted and
//! the attention layout - is packed into one array of U32 words and placed with one copy:
//!
//! `tokens (T) | positions (T) | slots (T) | logits rows (R) | query starts (S + 1) |
//! context lengths (S) | block tables (S x M)`
//!
//! for T tokens, R logits rows and S sequences whose block tables are padded to M blocks. The
//! tensors the model reads are views of that one buffer.

use std::sync::Arc;

use pagoda_kernels::ops::{AttentionLayout, SequenceRows};
use pagoda_kv::KvCache;
use pagoda_tensor::{CudaDevice, DType, Device, DeviceGraph, PinnedUpload, Storage, Tensor};

use crate::{Batch, Error, Model, ModelInfo, Result};

/// The inputs of one forward pass on the model's device, as the layers read them.
pub struct StepInputs {
    pub(crate) tokens: Tensor,
    pub(crate) positions: Tensor,
    pub(crate) slots: Tensor,
    pub(crate) logits_rows: Tensor,
    pub(crate) layout: AttentionLayout,
}

impl StepInputs {
    /// Checks `batch` against the model and the cache, and places it on the model's device.
    pub fn new(batch: &Batch, info: &ModelInfo, kv: &KvCache) -> Result<Self> {
        let _timer = pagoda_kernels::profile::OpTimer::start("step_inputs", info.device);
        check_kv_cache(info, kv)?;
        let shape = StepShape::of(batch);
        let words = shape.words(batch, info)?;
        let on_device = Tensor::from_slice(&words, [words.len()])?.to_device(&info.device)?;
        shape.views(batch, &on_device, &words, kv)
    }
}

/// The sizes that fix a step's buffers and the launches a recorded graph holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StepShape {
    pub num_tokens: usize,
    pub num_seqs: usize,
    pub num_logits_rows: usize,
    /// Block ids per sequence in the attention layout (tables are padded to it).
    pub max_blocks_per_seq: usize,
}

impl StepShape {
    /// The shape of `batch` with its tables padded to its longest.
    pub fn of(batch: &Batch) -> Self {
        Self {
            num_tokens: batch.tokens.len(),
            num_seqs: batch.sequences.len(),
            num_logits_rows: batch.logits_rows.len(),
            max_blocks_per_seq: batch
                .sequences
                .iter()
                .map(|s| s.block_table.len())
                .max()
                .unwrap_or(0)
                .max(1),
        }
    }

    /// Whether `batch` fits this shape: the same counts, no table longer than
    /// `max_blocks_per_seq`.
    pub fn fits(&self, batch: &Batch) -> bool {
        let of = Self::of(batch);
        of.num_tokens == self.num_tokens
            && of.num_seqs == self.num_seqs
            && of.num_logits_rows == self.num_logits_rows
            && of.max_blocks_per_seq <= self.max_blocks_per_seq
    }

    fn num_words(&self) -> usize {
        3 * self.num_tokens
            + self.num_logits_rows
            + pagoda_kernels::cuda::paged_attention::DeviceBatchLayout::words_len(
                self.num_seqs,
                self.max_blocks_per_seq,
            )
    }

    /// `batch` (validated against the model) as this shape's packed words.
    fn words(&self, batch: &Batch, info: &ModelInfo) -> Result<Vec<u32>> {
        batch.validate(info.max_position_embeddings)?;
        if !self.fits(batch) {
            return Err(Error::Batch(format!(
                "a batch of shape {:?} does not fit buffers of shape {self:?}",
                Self::of(batch)
            )));
        }
        let mut words = Vec::with_capacity(self.num_words());
        words.extend_from_slice(&batch.tokens);
        words.extend_from_slice(&batch.positions);
        words.extend_from_slice(&batch.slots);
        for &row in &batch.logits_rows {
            words.push(
                u32::try_from(row).map_err(|_| {
                    Error::Batch(format!("logits row {row} does not fit in 32 bits"))
                })?,
            );
        }
        words.extend(AttentionLayout::device_words(
            &sequence_rows(batch),
            self.max_blocks_per_seq,
        )?);
        Ok(words)
    }

    /// The layers' view of `batch`, whose packed `words` are already at the start of
    /// `on_device` (on the model's device).
    fn views(
        &self,
        batch: &Batch,
        on_device: &Tensor,
        words: &[u32],
        kv: &KvCache,
    ) -> Result<StepInputs> {
        let (t, r) = (self.num_tokens, self.num_logits_rows);
        let part =
            |start: usize, len: usize| -> Result<Tensor> { Ok(on_device.narrow(0, start, len)?) };
        let layout_start = 3 * t + r;
        let config = kv.config();
        Ok(StepInputs {
            tokens: part(0, t)?,
            positions: part(t, t)?,
            slots: part(2 * t, t)?,
            logits_rows: part(3 * t, r)?,
            layout: AttentionLayout::from_device_words(
                sequence_rows(batch),
                &on_device.narrow(0, layout_start, on_device.dims()[0] - layout_start)?,
                &words[layout_start..],
                self.max_blocks_per_seq,
                config.block_size,
                config.num_blocks,
            )?,
        })
    }
}

fn sequence_rows(batch: &Batch) -> Vec<SequenceRows> {
    batch
        .sequences
        .iter()
        .map(|s| SequenceRows {
            query_start: s.query_start,
            query_len: s.query_len,
            context_len: s.context_len,
            block_table: s.block_table.clone(),
        })
        .collect()
}

/// Device memory for the inputs of steps of one shape, rewritten in place every step from
/// page-locked host memory: one asynchronous copy per step, always to the same addresses, which
/// is what a recorded graph needs.
pub struct StepBuffers {
    shape: StepShape,
    /// U32 words on the device; held by nothing else between steps.
    words: Tensor,
    staging: PinnedUpload,
}

impl StepBuffers {
    /// Buffers for steps of `shape` on `device` (a GPU).
    pub fn new(shape: StepShape, device: &Device) -> Result<Self> {
        let Device::Cuda(ordinal) = *device else {
            return Err(Error::Batch(
                "step buffers are for GPUs; on the CPU the inputs are used in place".into(),
            ));
        };
        let cuda = CudaDevice::get(ordinal)?;
        let len = shape.num_words();
        let words = Tensor::zeros([len], DType::U32, device)?;
        let staging = PinnedUpload::new(&cuda, len * std::mem::size_of::<u32>())?;
        Ok(Self {
            shape,
            words,
            staging,
        })
    }

    pub fn shape(&self) -> StepShape {
        self.shape
    }

    /// Queues the upload of `batch` (of this shape) and returns the layers' view of it. Drop
    /// the view before the next call.
    pub fn fill(&mut self, batch: &Batch, info: &ModelInfo, kv: &KvCache) -> Result<StepInputs> {
        check_kv_cache(info, kv)?;
        let words = self.shape.words(batch, info)?;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        match self.words.storage_mut()? {
            Storage::Cuda(storage) => self.staging.upload(&bytes, storage)?,
            Storage::Cpu(_) => {
                return Err(Error::Batch("step buffers live on a GPU".into()));
            }
        }
        self.shape.views(batch, &self.words, &words, kv)
    }
}

/// A model's forward pass for batches of one [`StepShape`], recorded once as a CUDA graph and
/// replayed: one launch per step instead of one per kernel, with the inputs rewritten in place.
///
/// The graph reads the model's weights (the graph holds the model) and the KV cache it was
/// recorded with ([`StepGraph::run`] refuses any other).
pub struct StepGraph {
    model: Arc<dyn Model>,
    buffers: StepBuffers,
    /// The graph's output, rewritten by every replay.
    logits: Tensor,
    graph: DeviceGraph,
    /// Device addresses of the KV pages the graph writes and reads.
    pages: Vec<u64>,
}

impl StepGraph {
    /// Records `model`'s forward pass for batches shaped like `batch` (block tables of up to
    /// `max_blocks_per_seq` blocks), then runs it for `batch`. Every kernel the pass uses must
    /// have run once before (recording cannot compile or load one): run a forward pass of the
    /// same model eagerly first.
    pub fn record(
        model: Arc<dyn Model>,
        batch: &Batch,
        max_blocks_per_seq: usize,
        kv: &mut KvCache,
    ) -> Result<Self> {
        let info = model.info().clone();
        let Device::Cuda(ordinal) = info.device else {
            return Err(Error::Batch(
                "graphs record GPU work; this model runs on the CPU".into(),
            ));
        };
        let device = CudaDevice::get(ordinal)?;
        let shape = StepShape {
            max_blocks_per_seq: max_blocks_per_seq.max(StepShape::of(batch).max_blocks_per_seq),
            ..StepShape::of(batch)
        };
        let mut buffers = StepBuffers::new(shape, &info.device)?;
        let mut logits = Tensor::zeros(
            [shape.num_logits_rows, info.vocab_size],
            info.dtype,
            &info.device,
        )?;
        let inputs = buffers.fill(batch, &info, kv)?;
        let (graph, ()) = device.capture(|| -> Result<()> {
            let out = model.forward_inputs(&inputs, kv)?;
            Ok(copy_into(&mut logits, &out)?)
        })?;
        drop(inputs);
        let pages = page_addresses(kv)?;
        let recorded = Self {
            model,
            buffers,
            logits,
            graph,
            pages,
        };
        // Recording ran nothing: the inputs are uploaded already, the pass itself not yet.
        recorded.graph.replay()?;
        Ok(recorded)
    }

    pub fn shape(&self) -> StepShape {
        self.buffers.shape()
    }

    /// Runs the recorded forward pass for `batch` (which must fit [`Self::shape`]) over `kv`
    /// (the cache it was recorded with) and returns its logits `[num_logits_rows, vocab]`,
    /// valid until the next run. Returns once the work is queued.
    pub fn run(&mut self, batch: &Batch, kv: &mut KvCache) -> Result<&Tensor> {
        if page_addresses(kv)? != self.pages {
            return Err(Error::Batch(
                "a graph runs only over the KV cache it was recorded with".into(),
            ));
        }
        let inputs = self.buffers.fill(batch, self.model.info(), kv)?;
        drop(inputs);
        self.graph.replay()?;
        Ok(&self.logits)
    }

    /// The logits of the last run.
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }
}

/// Queues a copy of `src` into `dst` (same dtype, shape and device).
fn copy_into(dst: &mut Tensor, src: &Tensor) -> pagoda_tensor::Result<()> {
    if dst.dims() != src.dims() || !src.is_contiguous() || !dst.is_contiguous() {
        return Err(pagoda_tensor::Error::Cuda(format!(
            "copying {:?} into {:?}",
            src.dims(),
            dst.dims()
        )));
    }
    let (offset, count) = (src.layout().offset(), src.elem_count());
    let dst_offset = dst.layout().offset();
    match (dst.storage_mut()?, src.storage()) {
        (Storage::Cuda(to), Storage::Cuda(from)) => {
            to.copy_from(dst_offset, from, offset..offset + count)
        }
        _ => Err(pagoda_tensor::Error::Cuda(
            "graph outputs are copied between GPU buffers".into(),
        )),
    }
}

/// Where the cache's pages are on the device, layer by layer.
fn page_addresses(kv: &KvCache) -> Result<Vec<u64>> {
    let mut addresses = Vec::with_capacity(2 * kv.num_layers());
    for layer in kv.layers() {
        for pages in [&layer.k, &layer.v] {
            match pages.storage() {
                Storage::Cuda(storage) => addresses.push(storage.address()),
                Storage::Cpu(_) => {
                    return Err(Error::Batch("graphs need a KV cache on a GPU".into()));
                }
            }
        }
    }
    Ok(addresses)
}

/// Fails early when the KV cache was built for another model.
pub(crate) fn check_kv_cache(info: &ModelInfo, kv: &KvCache) -> Result<()> {
    let c = kv.config();
    if c.num_layers != info.num_layers
        || c.num_kv_heads != info.num_kv_heads
        || c.head_dim != info.head_dim
    {
        return Err(Error::Batch(format!(
            "the KV cache has {} layers x {} KV heads x {} dims, the model needs {} x {} x {}",
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            info.num_layers,
            info.num_kv_heads,
            info.head_dim
        )));
    }
    if c.dtype != info.dtype || c.device != info.device {
        return Err(Error::Batch(format!(
            "the KV cache holds {} on {:?}, the model computes in {} on {:?}",
            c.dtype, c.device, info.dtype, info.device
        )));
    }
    Ok(())
}
