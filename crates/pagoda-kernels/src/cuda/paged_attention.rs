//! Launcher of `kernels/paged_attention.cu`: causal attention for a flat batch of sequences whose
//! keys and values live in the paged KV cache, as [`crate::cpu::attention::paged_attention`]
//! computes it: single-token decode above all, and any other query rows alike (prompt chunks the
//! flash kernel does not take), with grouped-query attention and head dimensions up to 256,
//! softmax statistics in f32.
//!
//! Decode streams every key and value of each context once per step, so the kernels are built to
//! read them at the memory's rate: one thread block per (query row, KV head, context split) serves
//! all the query heads that share the KV head, so each K/V row is read once per group. 16-bit
//! K/V with heads of 64, 96 or 128 dimensions take the tensor-core kernel, which leaves the SMs
//! little but loads to issue; f32 and other head sizes a CUDA-core kernel. When the (row, KV
//! head) pairs alone cannot fill the GPU, each context is cut into splits whose partial results a
//! second kernel merges (the flash-decoding scheme).

use pagoda_tensor::cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use pagoda_tensor::{CudaDevice, DType, Device, Storage, Tensor};

use super::launch::DependentLaunch;
use super::registry::{KernelModule, function};
use super::tensor_access::{
    FLOAT_DTYPES, alloc_output, arg_u32, common_device, device_view, dims_of, expect_dims,
    expect_dtype, expect_same_dtype, into_tensor, kernel_name, launch_error, multiprocessor_count,
};
use crate::cpu::attention::AttentionParams;
use crate::{Error, Result};

/// The largest head dimension the kernel holds (8 values per lane of a warp).
pub const MAX_HEAD_DIM: usize = 256;

/// The most splits a context is cut into; must equal `MAX_SPLITS` in paged_attention.cu, whose
/// merge keeps one weight per split in shared memory.
pub const MAX_SPLITS: usize = 256;

/// Warps per thread block of the CUDA-core kernels; must equal `WARPS` in paged_attention.cu.
const WARPS: u32 = 4;

/// Threads per block of the kernel that merges a row's splits; must equal `COMBINE_THREADS` in
/// paged_attention.cu.
const COMBINE_THREADS: u32 = 256;

/// A split holds at least this many context tokens (`MIN_SPLIT_TOKENS` in paged_attention.cu):
/// one step of a block's warps.
const MIN_SPLIT_TOKENS: usize = 64;

/// The most tiles ahead of its loads the tensor-core kernel asks L2 for; must equal
/// `MAX_PREFETCH_TILES` in paged_attention.cu.
pub const MAX_PREFETCH_TILES: u32 = 4;

/// Tiles ahead of its loads the tensor-core kernel asks L2 for by default: the next tile, as the
/// CUDA-core kernel does. With four blocks of four warps on each of 132 SMs, every tile of
/// prefetch holds about 17 MB of L2 (8 KiB per warp), a third of an H100's, beside the lines
/// already read; two tiles cost B64 H24 KVH8 L2048 3% (97.4% -> 94.1% of copy). The pipelined
/// form loads a tile ahead of its arithmetic, so its prefetch reaches two tiles past the tile it
/// computes; one tile of prefetch was also its best at B1 L32768.
const PREFETCH_TILES: u32 = 1;

/// The tensor-core form for calls that split their contexts, heads of 128 dimensions: the
/// pipelined loop (each warp issues a tile's loads a tile before its arithmetic, so it has two
/// tiles in flight instead of one), four warps, registers for two blocks per SM (210 used). Such
/// calls have few rows, and each warp's stream waits on L2's latency once per tile unless its
/// loads run ahead.
const SPLIT_FORM: (u32, u32) = (4, 2);

/// Where each sequence of a flat batch keeps its query rows and its context, on the device.
///
/// Sequence `s` owns query rows `query_start[s]..query_start[s + 1]` and has `context_len[s]`
/// tokens of context (its query tokens included, already written into the pages); context token
/// `j` lives in block `block_tables[s][j / block_size]` at offset `j % block_size`, and query row
/// `i` of the sequence sits at position `context_len[s] - query_len + i`.
///
/// Built from host arrays, which are validated here, once, so the kernel can trust them.
pub struct DeviceBatchLayout {
    query_start: Tensor,
    context_len: Tensor,
    block_tables: Tensor,
    num_seqs: usize,
    num_tokens: usize,
    max_context_len: usize,
    max_blocks_per_seq: usize,
    block_size: usize,
    num_blocks: usize,
}

impl DeviceBatchLayout {
    /// Checks and uploads a batch layout for pages of `num_blocks` blocks of `block_size` tokens.
    ///
    /// `query_start` (`num_seqs + 1` cumulative offsets from 0) gives each sequence's query rows;
    /// `block_tables` holds `max_blocks_per_seq` block ids per sequence, row-major, padded with
    /// anything past the blocks a sequence's context needs. Fails if the offsets decrease, a
    /// sequence has more query rows than context, a table is too short for its context, or a
    /// block id it needs is outside the pages.
    pub fn new(
        query_start: &[u32],
        context_len: &[u32],
        block_tables: &[u32],
        max_blocks_per_seq: usize,
        block_size: usize,
        num_blocks: usize,
        device: &CudaDevice,
    ) -> Result<Self> {
        let num_seqs = context_len.len();
        let mut words = Vec::with_capacity(query_start.len() + num_seqs + block_tables.len());
        words.extend_from_slice(query_start);
        words.extend_from_slice(context_len);
        words.extend_from_slice(block_tables);
        if query_start.len() != num_seqs + 1 {
            return Err(Error::shape(
                "DeviceBatchLayout::new",
                format!(
                    "query_start must hold {} offsets, got {}",
                    num_seqs + 1,
                    query_start.len()
                ),
            ));
        }
        let on_device = Tensor::from_slice(&words, [words.len()])?
            .to_device(&Device::Cuda(device.ordinal()))?;
        Self::from_words(
            &on_device,
            &words,
            num_seqs,
            max_blocks_per_seq,
            block_size,
            num_blocks,
        )
    }

    /// U32 words a layout of `num_seqs` sequences with `max_blocks_per_seq`-block tables takes
    /// in [`Self::from_words`]'s form.
    pub fn words_len(num_seqs: usize, max_blocks_per_seq: usize) -> usize {
        2 * num_seqs + 1 + num_seqs * max_blocks_per_seq
    }

    /// A layout whose arrays the caller has already placed on the device, packed as `query_start`
    /// (`num_seqs + 1`), `context_len` (`num_seqs`), then the block tables (`num_seqs x
    /// max_blocks_per_seq`) from the start of `device_words` (U32, 1-D, possibly longer); the
    /// layout views that memory, so a caller that rewrites it in place (a replayed graph's inputs)
    /// keeps the addresses kernels were recorded with. `host_words` is the same data on the host,
    /// checked here as [`Self::new`] checks its arrays.
    pub fn from_words(
        device_words: &Tensor,
        host_words: &[u32],
        num_seqs: usize,
        max_blocks_per_seq: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self> {
        const OP: &str = "DeviceBatchLayout::from_words";
        let len = num_seqs
            .checked_mul(max_blocks_per_seq)
            .and_then(|t| t.checked_add(2 * num_seqs + 1))
            .ok_or_else(|| Error::shape(OP, "num_seqs x max_blocks_per_seq overflows usize"))?;
        if host_words.len() != len {
            return Err(Error::shape(
                OP,
                format!(
                    "{num_seqs} sequences with {max_blocks_per_seq}-block tables take {len} words, got {}",
                    host_words.len()
                ),
            ));
        }
        expect_dtype(OP, "device_words", device_words, &[DType::U32])?;
        if device_words.rank() != 1 || device_words.dims()[0] < len {
            return Err(Error::shape(
                OP,
                format!(
                    "device_words must be 1-D with at least {len} words, got {:?}",
                    device_words.dims()
                ),
            ));
        }
        let (query_start, rest) = host_words.split_at(num_seqs + 1);
        let (context_len, block_tables) = rest.split_at(num_seqs);
        validate(
            query_start,
            context_len,
            block_tables,
            max_blocks_per_seq,
            block_size,
            num_blocks,
        )?;
        let part = |start: usize, len: usize, dims: Vec<usize>| -> Result<Tensor> {
            Ok(device_words.narrow(0, start, len)?.reshape(dims)?)
        };
        Ok(DeviceBatchLayout {
            query_start: part(0, num_seqs + 1, vec![num_seqs + 1])?,
            context_len: part(num_seqs + 1, num_seqs, vec![num_seqs])?,
            block_tables: part(
                2 * num_seqs + 1,
                num_seqs * max_blocks_per_seq,
                vec![num_seqs, max_blocks_per_seq],
            )?,
            num_seqs,
            num_tokens: query_start[num_seqs] as usize,
            max_context_len: context_len.iter().map(|&c| c as usize).max().unwrap_or(0),
            max_blocks_per_seq,
            block_size,
            num_blocks,
        })
    }

    /// The number of sequences.
    pub fn num_seqs(&self) -> usize {
        self.num_seqs
    }

    /// Query rows of the whole batch: `query_start[num_seqs]`.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// Block ids per sequence in `block_tables`.
    pub fn max_blocks_per_seq(&self) -> usize {
        self.max_blocks_per_seq
    }

    /// `query_start`, U32 `[num_seqs + 1]`.
    pub fn query_start(&self) -> &Tensor {
        &self.query_start
    }

    /// `context_len`, U32 `[num_seqs]`.
    pub fn context_len(&self) -> &Tensor {
        &self.context_len
    }

    /// `block_tables`, U32 `[num_seqs, max_blocks_per_seq]`.
    pub fn block_tables(&self) -> &Tensor {
        &self.block_tables
    }

    /// Tokens per block of the pages the layout was checked against.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks of the pages the layout was checked against.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The longest context of the batch, in tokens, when the layout was built (a layout whose
    /// device words are rewritten later may describe other lengths by then).
    pub fn max_context_len(&self) -> usize {
        self.max_context_len
    }
}

/// The checks of [`DeviceBatchLayout::new`] on the host arrays, so the kernels can trust them.
fn validate(
    query_start: &[u32],
    context_len: &[u32],
    block_tables: &[u32],
    max_blocks_per_seq: usize,
    block_size: usize,
    num_blocks: usize,
) -> Result<()> {
    const OP: &str = "DeviceBatchLayout";
    let num_seqs = context_len.len();
    if query_start.len() != num_seqs + 1 || query_start.first() != Some(&0) {
        return Err(Error::shape(
            OP,
            format!(
                "query_start must hold {} offsets starting at 0, got {query_start:?}",
                num_seqs + 1
            ),
        ));
    }
    if block_size == 0 {
        return Err(Error::shape(OP, "block_size must be positive"));
    }
    let expected_tables = num_seqs
        .checked_mul(max_blocks_per_seq)
        .ok_or_else(|| Error::shape(OP, "num_seqs x max_blocks_per_seq overflows usize"))?;
    if block_tables.len() != expected_tables {
        return Err(Error::shape(
            OP,
            format!(
                "block_tables has {} ids, expected {num_seqs} sequences x {max_blocks_per_seq}",
                block_tables.len()
            ),
        ));
    }
    for (s, &context) in context_len.iter().enumerate() {
        let fail = |message: String| Err(Error::shape(OP, format!("sequence {s}: {message}")));
        let (start, end) = (query_start[s], query_start[s + 1]);
        if end < start {
            return fail(format!("query_start decreases from {start} to {end}"));
        }
        if end - start > context {
            return fail(format!(
                "{} query rows exceed the context of {context} tokens",
                end - start
            ));
        }
        let needed = (context as usize).div_ceil(block_size);
        if needed > max_blocks_per_seq {
            return fail(format!(
                "a context of {context} tokens needs {needed} blocks, tables hold {max_blocks_per_seq}"
            ));
        }
        let table = &block_tables[s * max_blocks_per_seq..][..needed];
        if let Some(block) = table.iter().find(|&&b| b as usize >= num_blocks) {
            return fail(format!("block {block} is outside the {num_blocks} pages"));
        }
    }
    Ok(())
}

/// Causal attention of every query row of `q` (`[num_tokens, num_heads, head_dim]`, f32/f16/bf16)
/// over its sequence's context in `k_pages` and `v_pages` (`[num_blocks, block_size,
/// num_kv_heads, head_dim]`, `q`'s dtype), laid out as `layout` says; returns `[num_tokens,
/// num_heads, head_dim]` in `q`'s dtype.
///
/// `q`'s rows must be exactly the layout's query rows, and the pages must have the block count and
/// size the layout was checked against. Each context is cut into [`default_num_splits`] splits.
pub fn paged_attention(
    q: &Tensor,
    layout: &DeviceBatchLayout,
    params: &AttentionParams,
    k_pages: &Tensor,
    v_pages: &Tensor,
) -> Result<Tensor> {
    let mut plan = Plan::new(q, layout, params, k_pages, v_pages)?;
    let num_splits = plan.choose_splits(q, layout, params)?;
    plan.launch(q, layout, params, k_pages, v_pages, num_splits)
}

/// [`paged_attention`] with each context cut into `num_splits` splits (1 to [`MAX_SPLITS`])
/// instead of the default, by the kernel the default takes for that many splits: the same result
/// up to rounding, for benchmarks that compare the choices.
pub fn paged_attention_with_splits(
    q: &Tensor,
    layout: &DeviceBatchLayout,
    params: &AttentionParams,
    k_pages: &Tensor,
    v_pages: &Tensor,
    num_splits: usize,
) -> Result<Tensor> {
    let mut plan = Plan::new(q, layout, params, k_pages, v_pages)?;
    check_splits(num_splits)?;
    plan.take_split_form(q, params, num_splits)?;
    plan.launch(q, layout, params, k_pages, v_pages, num_splits)
}

/// A choice [`paged_attention_variant`] makes differently from [`paged_attention`], for the
/// benchmark that compares them; `None` keeps the default.
#[doc(hidden)]
#[derive(Clone, Debug, Default)]
pub struct DecodeVariant {
    /// Splits per context (1 to [`MAX_SPLITS`]); `None` for [`default_num_splits`], or with a
    /// named `kernel`, the count [`split_count`] gives for the blocks per SM that kernel holds.
    pub num_splits: Option<usize>,
    /// Tiles ahead of its loads the tensor-core kernel asks L2 for (0 to
    /// [`MAX_PREFETCH_TILES`]).
    pub prefetch_tiles: Option<u32>,
    /// The split kernel: `"fma"` for the CUDA-core kernel, `"mma_w<warps>_b<blocks>[_pl]"` for a
    /// compiled form of the tensor-core one. For 128 dimensions: `"mma_w4_b4"` (the default
    /// when contexts are not split), `"mma_w4_b3"`, and the pipelined `"mma_w4_b2_pl"` (the
    /// default when they are) and `"mma_w8_b1_pl"`; for 64 and 96 `"mma_w4_b3"`.
    pub kernel: Option<String>,
    /// Whether the merge of split contexts is launched to overlap the split kernel's end, where
    /// the GPU allows it, or only after it, as an ordinary launch (the default: the overlap has
    /// not been timed against it yet).
    pub overlap_merge: Option<bool>,
}

/// [`paged_attention`] as `variant` says: the same result up to rounding.
#[doc(hidden)]
pub fn paged_attention_variant(
    q: &Tensor,
    layout: &DeviceBatchLayout,
    params: &AttentionParams,
    k_pages: &Tensor,
    v_pages: &Tensor,
    variant: &DecodeVariant,
) -> Result<Tensor> {
    let mut plan = Plan::new(q, layout, params, k_pages, v_pages)?;
    if let Some(kernel) = &variant.kernel {
        plan.select(q, params, kernel)?;
    }
    if let Some(tiles) = variant.prefetch_tiles {
        if tiles > MAX_PREFETCH_TILES {
            return Err(Error::shape(
                Plan::OP,
                format!("prefetch_tiles must be at most {MAX_PREFETCH_TILES}, got {tiles}"),
            ));
        }
        plan.prefetch_tiles = Some(tiles);
    }
    if let Some(overlap) = variant.overlap_merge {
        plan.overlap_merge = overlap;
    }
    let num_splits = match variant.num_splits {
        Some(splits) => {
            check_splits(splits)?;
            if variant.kernel.is_none() {
                plan.take_split_form(q, params, splits)?;
            }
            splits
        }
        None if variant.kernel.is_none() => plan.choose_splits(q, layout, params)?,
        None => plan.default_num_splits(layout)?,
    };
    plan.launch(q, layout, params, k_pages, v_pages, num_splits)
}

/// How many splits [`paged_attention`] cuts each context of this batch into on this GPU.
///
/// One split when the (row, KV head) pairs alone fill every block slot of the GPU (prefill);
/// otherwise enough splits that their blocks fill at least 90% of the slots, spread as evenly
/// over the SMs as a count up to twice that allows, and no more than a context of the table's
/// capacity has 64-token pieces. Calls that split and take the tensor cores with heads of 128
/// dimensions run the pipelined form, whose slots are counted as one block per SM (at least two
/// splits): for one sequence over 8 KV heads on 132 SMs, 16 splits. The kernels cut each
/// sequence's context from its own length, so the count depends only on the batch's shape and
/// the GPU: a recorded graph replays it at every context length.
pub fn default_num_splits(
    q: &Tensor,
    layout: &DeviceBatchLayout,
    params: &AttentionParams,
    k_pages: &Tensor,
    v_pages: &Tensor,
) -> Result<usize> {
    Plan::new(q, layout, params, k_pages, v_pages)?.choose_splits(q, layout, params)
}

fn check_splits(num_splits: usize) -> Result<()> {
    if !(1..=MAX_SPLITS).contains(&num_splits) {
        return Err(Error::shape(
            Plan::OP,
            format!("num_splits must be 1 to {MAX_SPLITS}, got {num_splits}"),
        ));
    }
    Ok(())
}

/// The kernel that computes a call's splits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SplitKernel {
    /// `paged_attention_mma_d<head_dim>_w<warps>_b<min_blocks>[_pl]`: 16-bit K/V on the tensor
    /// cores, up to 8 query heads per block; `_pl` for the pipelined loop.
    Mma {
        head_dim: usize,
        warps: u32,
        min_blocks: u32,
        pipelined: bool,
    },
    /// `paged_attention_g<width>`: f32 dot products on the CUDA cores, up to `width` query heads
    /// per block.
    Fma { width: usize },
}

impl SplitKernel {
    /// The tensor-core kernel's default form: four warps, registers capped for four blocks per
    /// SM (three for heads of 64 and 96 dimensions, whose forms take no cap).
    fn mma(head_dim: usize) -> SplitKernel {
        let (warps, min_blocks) = if head_dim == 128 { (4, 4) } else { (4, 3) };
        SplitKernel::Mma {
            head_dim,
            warps,
            min_blocks,
            pipelined: false,
        }
    }

    /// The kernel's name without its dtype suffix.
    fn base_name(self) -> String {
        match self {
            SplitKernel::Mma {
                head_dim,
                warps,
                min_blocks,
                pipelined,
            } => format!(
                "paged_attention_mma_d{head_dim}_w{warps}_b{min_blocks}{}",
                if pipelined { "_pl" } else { "" }
            ),
            SplitKernel::Fma { width } => format!("paged_attention_g{width}"),
        }
    }

    /// Query heads one block serves.
    fn heads_per_block(self) -> usize {
        match self {
            SplitKernel::Mma { .. } => 8,
            SplitKernel::Fma { width } => width,
        }
    }

    fn threads(self) -> u32 {
        match self {
            SplitKernel::Mma { warps, .. } => warps * 32,
            SplitKernel::Fma { .. } => WARPS * 32,
        }
    }
}

/// The tensor-core form a [`DecodeVariant`] names (`"mma_w<warps>_b<blocks>[_pl]"`) as (warps,
/// blocks, pipelined).
fn parse_mma_form(kernel: &str) -> Option<(u32, u32, bool)> {
    let (warps, rest) = kernel.strip_prefix("mma_w")?.split_once("_b")?;
    let (blocks, pipelined) = match rest.strip_suffix("_pl") {
        Some(blocks) => (blocks, true),
        None => (rest, false),
    };
    Some((warps.parse().ok()?, blocks.parse().ok()?, pipelined))
}

/// A checked call: its device, and the kernel and grid for its group of query heads.
struct Plan {
    device: CudaDevice,
    kind: SplitKernel,
    kernel: CudaFunction,
    name: String,
    /// Thread blocks per context split: query rows x KV heads x blocks per KV head.
    blocks_per_split: usize,
    /// The grid's y dimension: KV heads x blocks per KV head.
    head_blocks: u32,
    /// Tiles ahead of its loads the tensor-core kernel prefetches; `None` for
    /// [`PREFETCH_TILES`].
    prefetch_tiles: Option<u32>,
    /// Whether the merge kernel may start while the split kernel finishes.
    overlap_merge: bool,
}

impl Plan {
    const OP: &'static str = "paged_attention";

    fn new(
        q: &Tensor,
        layout: &DeviceBatchLayout,
        params: &AttentionParams,
        k_pages: &Tensor,
        v_pages: &Tensor,
    ) -> Result<Self> {
        let device = check_attention(Self::OP, q, layout, params, k_pages, v_pages, &FLOAT_DTYPES)?;
        let AttentionParams {
            num_heads,
            num_kv_heads,
            head_dim,
            ..
        } = *params;
        if head_dim > MAX_HEAD_DIM {
            return Err(Error::shape(
                Self::OP,
                format!("head_dim {head_dim} exceeds the kernel's {MAX_HEAD_DIM}"),
            ));
        }
        // Blocks per row (and the merge's heads) index the grid's y dimension, at most 65535.
        if num_heads > 65535 {
            return Err(Error::shape(
                Self::OP,
                format!("{num_heads} heads exceed the grid's 65535 blocks per row"),
            ));
        }
        let group = num_heads / num_kv_heads;
        let kind = if takes_tensor_cores(q.dtype(), head_dim)
            && is_aligned16(k_pages)
            && is_aligned16(v_pages)
        {
            SplitKernel::mma(head_dim)
        } else {
            SplitKernel::Fma {
                width: group_width(group),
            }
        };
        Self::with_kernel(device, q, layout.num_tokens, params, kind)
    }

    /// The plan of a call that runs `kind`.
    fn with_kernel(
        device: CudaDevice,
        q: &Tensor,
        num_tokens: usize,
        params: &AttentionParams,
        kind: SplitKernel,
    ) -> Result<Self> {
        let group = params.num_heads / params.num_kv_heads;
        let head_blocks = params.num_kv_heads * group.div_ceil(kind.heads_per_block());
        let name = kernel_name(Self::OP, &kind.base_name(), q.dtype())?;
        let kernel = function(&device, KernelModule::PagedAttention, &name)?;
        Ok(Plan {
            device,
            kind,
            kernel,
            name,
            blocks_per_split: num_tokens.saturating_mul(head_blocks),
            // At most num_heads <= 65535 (checked in `new`).
            head_blocks: head_blocks as u32,
            prefetch_tiles: None,
            overlap_merge: false,
        })
    }

    /// Switches to the kernel a [`DecodeVariant`] names.
    fn select(&mut self, q: &Tensor, params: &AttentionParams, kernel: &str) -> Result<()> {
        let group = params.num_heads / params.num_kv_heads;
        let kind = if kernel == "fma" {
            SplitKernel::Fma {
                width: group_width(group),
            }
        } else {
            let (Some((warps, min_blocks, pipelined)), SplitKernel::Mma { head_dim, .. }) =
                (parse_mma_form(kernel), self.kind)
            else {
                return Err(Error::shape(
                    Self::OP,
                    format!("no kernel {kernel:?} for this call ({:?})", self.kind),
                ));
            };
            SplitKernel::Mma {
                head_dim,
                warps,
                min_blocks,
                pipelined,
            }
        };
        let num_tokens = self.blocks_per_split / self.head_blocks.max(1) as usize;
        *self = Self::with_kernel(self.device.clone(), q, num_tokens, params, kind)?;
        Ok(())
    }

    /// Switches a default tensor-core plan for heads of 128 dimensions to [`SPLIT_FORM`] when
    /// the call cuts its contexts into `num_splits > 1` splits; returns whether it switched.
    fn take_split_form(
        &mut self,
        q: &Tensor,
        params: &AttentionParams,
        num_splits: usize,
    ) -> Result<bool> {
        if num_splits == 1 || self.kind != SplitKernel::mma(128) {
            return Ok(false);
        }
        let (warps, min_blocks) = SPLIT_FORM;
        let kind = SplitKernel::Mma {
            head_dim: 128,
            warps,
            min_blocks,
            pipelined: true,
        };
        let num_tokens = self.blocks_per_split / self.head_blocks.max(1) as usize;
        let (prefetch_tiles, overlap_merge) = (self.prefetch_tiles, self.overlap_merge);
        *self = Self::with_kernel(self.device.clone(), q, num_tokens, params, kind)?;
        self.prefetch_tiles = prefetch_tiles;
        self.overlap_merge = overlap_merge;
        Ok(true)
    }

    /// [`default_num_splits`] for this call: [`split_count`] for the default form at the blocks
    /// per SM it holds; when that splits and [`SPLIT_FORM`] applies, [`split_count`] again for
    /// the split form at one block per SM (at least two splits), the count that ran best at B1
    /// L32768 (16 splits: 56.9 us, against 58.7 at two blocks per SM and 61.8 at half an SM's
    /// share).
    fn choose_splits(
        &mut self,
        q: &Tensor,
        layout: &DeviceBatchLayout,
        params: &AttentionParams,
    ) -> Result<usize> {
        let num_splits = self.default_num_splits(layout)?;
        if !self.take_split_form(q, params, num_splits)? {
            return Ok(num_splits);
        }
        Ok(split_count(
            self.blocks_per_split,
            layout.max_blocks_per_seq * layout.block_size,
            multiprocessor_count(Self::OP, &self.device)?,
            1,
        )
        .max(2))
    }

    /// The split count [`split_count`] gives this plan's kernel.
    fn default_num_splits(&self, layout: &DeviceBatchLayout) -> Result<usize> {
        let sms = multiprocessor_count(Self::OP, &self.device)?;
        // The occupancy query needs the device's context current on this thread.
        let per_sm = self
            .device
            .context()
            .bind_to_thread()
            .and_then(|()| {
                self.kernel.occupancy_max_active_blocks_per_multiprocessor(
                    self.kind.threads(),
                    0,
                    None,
                )
            })
            .map_err(|e| {
                Error::cuda(
                    Self::OP,
                    format!("querying the occupancy of {}: {e}", self.name),
                )
            })?;
        Ok(split_count(
            self.blocks_per_split,
            layout.max_blocks_per_seq * layout.block_size,
            sms,
            (per_sm as usize).max(1),
        ))
    }

    fn launch(
        &self,
        q: &Tensor,
        layout: &DeviceBatchLayout,
        params: &AttentionParams,
        k_pages: &Tensor,
        v_pages: &Tensor,
        num_splits: usize,
    ) -> Result<Tensor> {
        const OP: &str = Plan::OP;
        let AttentionParams {
            num_heads,
            num_kv_heads,
            head_dim,
            scale,
        } = *params;
        let num_tokens = layout.num_tokens;
        let dims = [num_tokens, num_heads, head_dim];
        let mut out = alloc_output(OP, &self.device, q.dtype(), &dims)?;
        if num_tokens == 0 {
            return into_tensor(out, &dims);
        }
        // With one split the kernel writes the output itself and never touches the scratch.
        let scratch_dims = if num_splits > 1 {
            [num_tokens, num_heads, num_splits, head_dim + 2]
        } else {
            [1, 1, 1, 1]
        };
        let mut scratch = alloc_output(OP, &self.device, DType::F32, &scratch_dims)?;
        let num_seqs = arg_u32(OP, "num_seqs", layout.num_seqs)?;
        let max_blocks = arg_u32(OP, "max_blocks_per_seq", layout.max_blocks_per_seq)?;
        let rows = arg_u32(OP, "num_tokens", num_tokens)?;
        let heads = arg_u32(OP, "num_heads", num_heads)?;
        let kv_heads = arg_u32(OP, "num_kv_heads", num_kv_heads)?;
        let head_dim_arg = head_dim as u32;
        let block_size = arg_u32(OP, "block_size", layout.block_size)?;
        let num_blocks = arg_u32(OP, "num_blocks", layout.num_blocks)?;
        let num_splits_arg = num_splits as u32;
        let (q_view, k_view, v_view) = (
            device_view(OP, "q", q)?,
            device_view(OP, "k_pages", k_pages)?,
            device_view(OP, "v_pages", v_pages)?,
        );
        let query_start = device_view(OP, "query_start", &layout.query_start)?;
        let context_len = device_view(OP, "context_len", &layout.context_len)?;
        let block_tables = device_view(OP, "block_tables", &layout.block_tables)?;
        // Rows index the grid's x dimension; the kernels loop over rows past its limit.
        let row_blocks = rows.min(i32::MAX as u32);
        let prefetch_tiles = self.prefetch_tiles.unwrap_or(PREFETCH_TILES);
        let config = LaunchConfig {
            grid_dim: (row_blocks, self.head_blocks, num_splits_arg),
            block_dim: (self.kind.threads(), 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = self.device.stream();
        let mut launch = stream.launch_builder(&self.kernel);
        launch
            .arg(&q_view)
            .arg(&k_view)
            .arg(&v_view)
            .arg(out.slice_mut())
            .arg(scratch.slice_mut())
            .arg(&query_start)
            .arg(&context_len)
            .arg(&block_tables)
            .arg(&num_seqs)
            .arg(&max_blocks)
            .arg(&rows)
            .arg(&heads)
            .arg(&kv_heads);
        // The tensor-core kernels have head_dim in their name and take the prefetch depth.
        let is_mma = matches!(self.kind, SplitKernel::Mma { .. });
        if !is_mma {
            launch.arg(&head_dim_arg);
        }
        launch.arg(&block_size).arg(&num_blocks).arg(&scale);
        if is_mma {
            launch.arg(&prefetch_tiles);
        }
        // SAFETY: the arguments follow the kernel's signature in paged_attention.cu (q, k_pages,
        // v_pages, out, scratch, query_start, context_len, block_tables, num_seqs, max_blocks,
        // num_tokens, num_heads, num_kv_heads, head_dim (CUDA-core kernels only), block_size,
        // num_blocks, scale, prefetch_tiles (tensor-core kernels only)); every buffer has the
        // shape checked in `Plan::new` in the kernel name's dtype (metadata u32, scratch f32
        // [num_tokens, num_heads, num_splits, head_dim + 2] whenever num_splits > 1), the layout
        // was validated against these pages when it was built, head_dim <= 256 (and equal to a
        // tensor-core kernel's, whose pages are 16-byte aligned), num_splits <= MAX_SPLITS,
        // prefetch_tiles <= MAX_PREFETCH_TILES, the block has the kernel's warps and the grid's y
        // dimension covers every KV head's blocks of the kernel's heads per block; the kernel
        // sizes each sequence's splits to cover its context.
        unsafe { launch.launch(config) }.map_err(|e| launch_error(OP, &self.name, e))?;
        if num_splits > 1 {
            let combine_name = kernel_name(OP, "paged_attention_combine", q.dtype())?;
            let combine = function(&self.device, KernelModule::PagedAttention, &combine_name)?;
            let config = LaunchConfig {
                grid_dim: (row_blocks, heads, 1),
                block_dim: (COMBINE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // With `overlap_merge`, the merge is scheduled once all the split kernel's blocks
            // run (they allow it at their start), so its blocks wait on the SMs for the last split
            // instead of being launched after it.
            let mut launch = DependentLaunch::new(&self.device, &combine, self.overlap_merge);
            launch
                .buffer(scratch.slice())
                .buffer_mut(out.slice_mut())
                .value(&rows)
                .value(&heads)
                .value(&head_dim_arg)
                .value(&num_splits_arg);
            // SAFETY: the arguments follow paged_attention_combine's signature (scratch, out,
            // num_tokens, num_heads, head_dim, num_splits); the launch above, on the same stream,
            // wrote every split's statistics for every (row, head), and the values of every
            // split whose statistics give it weight, which is all the merge reads; the merge
            // waits for that launch to complete before it reads or writes anything;
            // num_heads <= 65535.
            unsafe { launch.launch(config) }.map_err(|e| launch_error(OP, &combine_name, e))?;
        }
        into_tensor(out, &dims)
    }
}

/// Whether a call's dtype and head size fit the tensor-core kernel (which also needs its pages
/// 16-byte aligned): 16-bit K/V, heads of 64, 96 or 128 dimensions.
fn takes_tensor_cores(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::F16 | DType::BF16) && matches!(head_dim, 64 | 96 | 128)
}

/// Whether a CUDA tensor's first element is 16-byte aligned (its storage's address plus its
/// offset); false on the host.
fn is_aligned16(tensor: &Tensor) -> bool {
    match tensor.storage() {
        Storage::Cuda(storage) => {
            let offset = tensor.layout().offset() * tensor.dtype().size_in_bytes();
            (storage.address() + offset as u64).is_multiple_of(16)
        }
        Storage::Cpu(_) => false,
    }
}

/// The query heads one block serves for a group of `group` query heads per KV head: the kernel
/// `paged_attention_g<width>`. Groups of up to four heads have a kernel of their own; larger
/// ones use blocks of 8 (several per KV head when the group is larger still).
fn group_width(group: usize) -> usize {
    if group <= 4 { group } else { 8 }
}

/// The checks every attention launcher over a [`DeviceBatchLayout`] makes: `q`, the pages and
/// the layout on one device; `q` of one of `dtypes` and the pages of its dtype; positive head
/// counts and size, the query heads a multiple of the KV heads; `q` `[layout tokens, heads,
/// head_dim]` and both pages `[layout blocks, block size, kv heads, head_dim]`. Returns the
/// device.
pub(crate) fn check_attention(
    op: &'static str,
    q: &Tensor,
    layout: &DeviceBatchLayout,
    params: &AttentionParams,
    k_pages: &Tensor,
    v_pages: &Tensor,
    dtypes: &[DType],
) -> Result<CudaDevice> {
    let device = common_device(
        op,
        &[
            ("q", q),
            ("k_pages", k_pages),
            ("v_pages", v_pages),
            ("layout", &layout.query_start),
        ],
    )?;
    expect_dtype(op, "q", q, dtypes)?;
    expect_same_dtype(op, "k_pages", k_pages, "q", q.dtype())?;
    expect_same_dtype(op, "v_pages", v_pages, "q", q.dtype())?;
    let AttentionParams {
        num_heads,
        num_kv_heads,
        head_dim,
        ..
    } = *params;
    if num_heads == 0 || num_kv_heads == 0 || head_dim == 0 || num_heads % num_kv_heads != 0 {
        return Err(Error::shape(
            op,
            format!("{params:?}: heads must be positive and a multiple of kv heads"),
        ));
    }
    dims_of::<3>(op, "q", q)?;
    expect_dims(op, "q", q, &[layout.num_tokens, num_heads, head_dim])?;
    let pages = [layout.num_blocks, layout.block_size, num_kv_heads, head_dim];
    expect_dims(op, "k_pages", k_pages, &pages)?;
    expect_dims(op, "v_pages", v_pages, &pages)?;
    Ok(device)
}

/// How many splits to cut each context into, given the thread blocks one split takes, the
/// longest context the block tables hold (`capacity` tokens), the GPU's SMs and the blocks each
/// holds at once: one when the rows alone fill every resident slot (prefill); otherwise, from the
/// fewest splits whose blocks fill 90% of the slots up to twice as many, the count that loads
/// the SMs most evenly (the blocks over the most any SM runs times the SMs), fewer splits
/// winning unless more are over a point more even. No more than the capacity has
/// [`MIN_SPLIT_TOKENS`]-token pieces, nor [`MAX_SPLITS`].
fn split_count(blocks_per_split: usize, capacity: usize, sms: usize, per_sm: usize) -> usize {
    let max_splits = (capacity / MIN_SPLIT_TOKENS).clamp(1, MAX_SPLITS);
    let (blocks_per_split, sms) = (blocks_per_split.max(1), sms.max(1));
    let resident = sms * per_sm.max(1);
    if blocks_per_split >= resident {
        return 1;
    }
    let balance = |splits: usize| {
        let blocks = blocks_per_split * splits;
        blocks as f64 / (blocks.div_ceil(sms) * sms) as f64
    };
    let fill = (resident * 9)
        .div_ceil(blocks_per_split * 10)
        .min(max_splits);
    let mut best = fill;
    for splits in fill..=(2 * fill).min(max_splits) {
        if balance(splits) > balance(best) + 0.01 {
            best = splits;
        }
    }
    best
}

/// The context tokens `[begin, end)` split `split` of `num_splits` covers: the same rule as
/// `split_range` in paged_attention.cu.
#[cfg(test)]
fn split_range(context: usize, num_splits: usize, split: usize) -> (usize, usize) {
    let pieces = num_splits.min(context / MIN_SPLIT_TOKENS).max(1);
    (
        split.min(pieces) * context / pieces,
        (split + 1).min(pieces) * context / pieces,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_and_balance_the_gpu() {
        // An H100: 132 SMs, four blocks resident per SM.
        let (sms, per_sm) = (132, 4);
        let balance = |blocks: usize| blocks as f64 / (blocks.div_ceil(sms) * sms) as f64;
        for blocks in [1, 8, 24, 96, 511, 512, 528, 600, 4096] {
            for capacity in [16, 64, 4096, 32768, 1 << 20] {
                let splits = split_count(blocks, capacity, sms, per_sm);
                let max_splits = (capacity / MIN_SPLIT_TOKENS).clamp(1, MAX_SPLITS);
                assert!((1..=max_splits).contains(&splits), "{blocks} {capacity}");
                if blocks >= sms * per_sm {
                    assert_eq!(splits, 1, "{blocks} {capacity}");
                } else if splits < max_splits {
                    // 90% of the slots busy, and no count up to twice the fewest that fill them
                    // is over a point more even.
                    let launched = blocks * splits;
                    assert!(
                        launched * 10 >= sms * per_sm * 9,
                        "{blocks} {capacity}: {splits}"
                    );
                    let fewest = (1..)
                        .find(|&s| blocks * s * 10 >= sms * per_sm * 9)
                        .unwrap();
                    for other in fewest..=(2 * fewest).min(max_splits) {
                        assert!(
                            balance(blocks * other) <= balance(launched) + 0.01 + 1e-9,
                            "{blocks} {capacity}: {other} splits are more even than {splits}"
                        );
                    }
                }
            }
        }
        // Prefill-sized batches fill the GPU without splitting; B64 x 8 KV heads (512 blocks,
        // 3.9 per SM) is as even unsplit as split in two.
        assert_eq!(split_count(4096, 32768, sms, per_sm), 1);
        assert_eq!(split_count(512, 2048, sms, per_sm), 1);
        // One sequence of 32k tokens over 8 KV heads: 66 splits, four blocks on every SM.
        assert_eq!(split_count(8, 32768, sms, per_sm), 66);
        // Two blocks per SM: 33 splits; one (the split form's count): 16, 128 blocks.
        assert_eq!(split_count(8, 32768, sms, 2), 33);
        assert_eq!(split_count(8, 32768, sms, 1), 16);
        // A short table cannot be split further than its 64-token pieces.
        assert_eq!(split_count(8, 128, sms, per_sm), 2);
        assert_eq!(split_count(1, 1 << 20, sms, per_sm), MAX_SPLITS);
    }

    #[test]
    fn split_ranges_tile_the_context() {
        for context in [1, 31, 63, 64, 65, 190, 1000, 4096, 32768, 32769] {
            for splits in [1, 2, 7, 33, 64, 66, MAX_SPLITS] {
                let mut next = 0;
                let mut longest = 0;
                let mut shortest = usize::MAX;
                for split in 0..splits {
                    let (begin, end) = split_range(context, splits, split);
                    assert_eq!(begin, next.min(context), "{context} {splits} {split}");
                    assert!(end >= begin);
                    next = end;
                    if end > begin {
                        longest = longest.max(end - begin);
                        shortest = shortest.min(end - begin);
                    }
                }
                assert_eq!(next, context, "{context} {splits}");
                // Non-empty splits differ by at most a token and hold a full step unless the
                // context is shorter than one.
                assert!(longest - shortest <= 1, "{context} {splits}");
                assert!(
                    shortest >= MIN_SPLIT_TOKENS.min(context),
                    "{context} {splits}"
                );
            }
        }
    }

    #[test]
    fn variant_kernel_names_parse() {
        assert_eq!(parse_mma_form("mma_w4_b4"), Some((4, 4, false)));
        assert_eq!(parse_mma_form("mma_w4_b2_pl"), Some((4, 2, true)));
        assert_eq!(parse_mma_form("mma_w8_b1_pl"), Some((8, 1, true)));
        for bad in [
            "fma",
            "mma_w4",
            "mma_w4_b",
            "mma_wx_b4",
            "mma_w4_b4_kp",
            "mma_w4_b2_pl_pl",
        ] {
            assert_eq!(parse_mma_form(bad), None, "{bad}");
        }
        let (warps, min_blocks) = SPLIT_FORM;
        let form = SplitKernel::Mma {
            head_dim: 128,
            warps,
            min_blocks,
            pipelined: true,
        };
        assert_eq!(form.base_name(), "paged_attention_mma_d128_w4_b2_pl");
    }

    #[test]
    fn groups_map_to_the_compiled_widths() {
        let widths: Vec<usize> = (1..=12).map(group_width).collect();
        assert_eq!(widths, [1, 2, 3, 4, 8, 8, 8, 8, 8, 8, 8, 8]);
    }

    #[test]
    fn tensor_cores_take_16_bit_heads_of_64_96_and_128() {
        for dtype in [DType::F16, DType::BF16] {
            for head_dim in [64, 96, 128] {
                assert!(takes_tensor_cores(dtype, head_dim));
            }
            for head_dim in [3, 32, 40, 80, 112, 256] {
                assert!(!takes_tensor_cores(dtype, head_dim));
            }
        }
        assert!(!takes_tensor_cores(DType::F32, 128));
    }
}
