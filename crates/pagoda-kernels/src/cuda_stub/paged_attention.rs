//! Without the `cuda` feature: the signatures of `cuda::paged_attention`, failing with
//! [`pagoda_tensor::Error::CudaNotCompiled`]; a [`DeviceBatchLayout`] cannot be built.

use pagoda_tensor::{CudaDevice, Tensor};

use crate::cpu::attention::AttentionParams;
use crate::{Error, Result};

/// The largest head dimension the CUDA kernel holds.
pub const MAX_HEAD_DIM: usize = 256;

/// The most splits the CUDA kernel cuts a context into.
pub const MAX_SPLITS: usize = 256;

/// The most tiles ahead of its loads the CUDA tensor-core kernel asks L2 for.
pub const MAX_PREFETCH_TILES: u32 = 4;

/// Uninhabited: no value of the stub types can exist.
#[derive(Clone, Copy, Debug)]
enum Never {}

/// A batch layout on a CUDA device; cannot be built without the `cuda` feature.
pub struct DeviceBatchLayout {
    never: Never,
}

impl DeviceBatchLayout {
    /// Always fails without the `cuda` feature.
    pub fn new(
        _query_start: &[u32],
        _context_len: &[u32],
        _block_tables: &[u32],
        _max_blocks_per_seq: usize,
        _block_size: usize,
        _num_blocks: usize,
        _device: &CudaDevice,
    ) -> Result<Self> {
        Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
    }

    /// U32 words a layout takes in `from_words`' form.
    pub fn words_len(num_seqs: usize, max_blocks_per_seq: usize) -> usize {
        2 * num_seqs + 1 + num_seqs * max_blocks_per_seq
    }

    /// Always fails without the `cuda` feature.
    pub fn from_words(
        _device_words: &Tensor,
        _host_words: &[u32],
        _num_seqs: usize,
        _max_blocks_per_seq: usize,
        _block_size: usize,
        _num_blocks: usize,
    ) -> Result<Self> {
        Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
    }

    /// Tokens per block of the pages.
    pub fn block_size(&self) -> usize {
        match self.never {}
    }

    /// Blocks of the pages.
    pub fn num_blocks(&self) -> usize {
        match self.never {}
    }

    /// The longest context of the batch when the layout was built.
    pub fn max_context_len(&self) -> usize {
        match self.never {}
    }

    /// The number of sequences.
    pub fn num_seqs(&self) -> usize {
        match self.never {}
    }

    /// Query rows of the whole batch.
    pub fn num_tokens(&self) -> usize {
        match self.never {}
    }

    /// Block ids per sequence in `block_tables`.
    pub fn max_blocks_per_seq(&self) -> usize {
        match self.never {}
    }

    /// `query_start`, U32 `[num_seqs + 1]`.
    pub fn query_start(&self) -> &Tensor {
        match self.never {}
    }

    /// `context_len`, U32 `[num_seqs]`.
    pub fn context_len(&self) -> &Tensor {
        match self.never {}
    }

    /// `block_tables`, U32 `[num_seqs, max_blocks_per_seq]`.
    pub fn block_tables(&self) -> &Tensor {
        match self.never {}
    }
}

/// Paged attention on the GPU; always fails without the `cuda` feature.
pub fn paged_attention(
    _q: &Tensor,
    _layout: &DeviceBatchLayout,
    _params: &AttentionParams,
    _k_pages: &Tensor,
    _v_pages: &Tensor,
) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// Paged attention on the GPU with a given number of splits; always fails without the `cuda`
/// feature.
pub fn paged_attention_with_splits(
    _q: &Tensor,
    _layout: &DeviceBatchLayout,
    _params: &AttentionParams,
    _k_pages: &Tensor,
    _v_pages: &Tensor,
    _num_splits: usize,
) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// The splits paged attention would use on the GPU; always fails without the `cuda` feature.
pub fn default_num_splits(
    _q: &Tensor,
    _layout: &DeviceBatchLayout,
    _params: &AttentionParams,
    _k_pages: &Tensor,
    _v_pages: &Tensor,
) -> Result<usize> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// A choice `paged_attention_variant` makes differently from `paged_attention` (see the CUDA
/// build's documentation); `None` keeps the default.
#[doc(hidden)]
#[derive(Clone, Debug, Default)]
pub struct DecodeVariant {
    /// Splits per context.
    pub num_splits: Option<usize>,
    /// Tiles ahead of its loads the tensor-core kernel asks L2 for.
    pub prefetch_tiles: Option<u32>,
    /// The split kernel's name.
    pub kernel: Option<String>,
    /// Whether the merge kernel may overlap the split kernel's end.
    pub overlap_merge: Option<bool>,
}

/// Paged attention on the GPU as a variant says; always fails without the `cuda` feature.
#[doc(hidden)]
pub fn paged_attention_variant(
    _q: &Tensor,
    _layout: &DeviceBatchLayout,
    _params: &AttentionParams,
    _k_pages: &Tensor,
    _v_pages: &Tensor,
    _variant: &DecodeVariant,
) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}
