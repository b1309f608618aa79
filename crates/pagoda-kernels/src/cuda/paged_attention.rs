//! Launcher of `kernels/paged_attention.cu`: causal attention for a flat batch of sequences whose
//! keys and values live in the paged KV cache, as [`crate::cpu::attention::paged_attention`]
//! computes it: single-token decode above all, and any other query rows alike (prompt chunks the
//! flash kernel does not take), with grouped-query attention and head dimensions up to 256,
//! softmax statistics in f32.
//!
//! Decode streams every key and value of each context once per step, so the kernel is built to
//! read them at the memory's rate: one thread block per (query row, KV head, context split) serves
//! all the query heads that share the KV head, so each K/V row is read once per group; warps read
//! rows with 16-byte loads, several rows in flight per lane. When the (row, KV head) pairs alone
//! cannot fill the GPU the context is cut into splits whose partial results a second kernel
//! merges (the flash-decoding scheme).

use pagoda_tensor::cudarc::driver::sys::CUdevice_attribute;
use pagoda_tensor::cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use pagoda_tensor::{CudaDevice, DType, Device, Tensor};

use super::registry::{KernelModule, function};
use super::tensor_access::{
    FLOAT_DTYPES, alloc_output, arg_u32, common_device, device_view, dims_of, expect_dims,
    expect_dtype, expect_same_dtype, into_tensor, kernel_name, launch_error,
};
use crate::cpu::attention::AttentionParams;
use crate::{Error, Result};

/// The largest head dimension the kernel holds (8 values per lane of a warp).
pub const MAX_HEAD_DIM: usize = 256;

/// The most splits a context is cut into; must equal `MAX_SPLITS` in paged_attention.cu, whose
/// merge keeps one weight per split in shared memory.
pub const MAX_SPLITS: usize = 256;

/// Warps per thread block; must equal `WARPS` in paged_attention.cu.
const WARPS: u32 = 4;

/// Threads per block of the kernel that merges a row's splits (it loops over the head dimensions).
const COMBINE_THREADS: u32 = 128;

/// Splits hold a multiple of this many context tokens (`SPLIT_GRANULE` in paged_attention.cu), so
/// a split is never shorter than one step of a block's warps over a 128-dimension f16 head.
const SPLIT_GRANULE: usize = 32;

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
    let plan = Plan::new(q, layout, params, k_pages, v_pages)?;
    let num_splits = plan.default_num_splits(layout)?;
    plan.launch(q, layout, params, k_pages, v_pages, num_splits)
}

/// [`paged_attention`] with each context cut into `num_splits` splits (1 to [`MAX_SPLITS`])
/// instead of the default: the same result up to rounding, for benchmarks that compare the
/// choices.
pub fn paged_attention_with_splits(
    q: &Tensor,
    layout: &DeviceBatchLayout,
    params: &AttentionParams,
    k_pages: &Tensor,
    v_pages: &Tensor,
    num_splits: usize,
) -> Result<Tensor> {
    let plan = Plan::new(q, layout, params, k_pages, v_pages)?;
    if !(1..=MAX_SPLITS).contains(&num_splits) {
        return Err(Error::shape(
            "paged_attention",
            format!("num_splits must be 1 to {MAX_SPLITS}, got {num_splits}"),
        ));
    }
    plan.launch(q, layout, params, k_pages, v_pages, num_splits)
}

/// How many splits [`paged_attention`] cuts each context of this batch into on this GPU.
///
/// Enough that the thread blocks fill whole waves of the GPU's resident blocks (at least 90% of
/// the slots of the last wave busy), with no more than a context of the table's capacity has
/// [`SPLIT_GRANULE`]-token pieces; one split when the (row, KV head) pairs alone fill the GPU
/// (prefill). The kernels derive each sequence's split length from its own context, so the
/// count depends only on the batch's shape and the GPU: a recorded graph replays it at every
/// context length.
pub fn default_num_splits(
    q: &Tensor,
    layout: &DeviceBatchLayout,
    params: &AttentionParams,
    k_pages: &Tensor,
    v_pages: &Tensor,
) -> Result<usize> {
    Plan::new(q, layout, params, k_pages, v_pages)?.default_num_splits(layout)
}

/// A checked call: its device, and the kernel and grid for its group of query heads.
struct Plan {
    device: CudaDevice,
    kernel: CudaFunction,
    name: String,
    /// Thread blocks per context split: query rows x KV heads x blocks per KV head.
    blocks_per_split: usize,
    /// The grid's y dimension: KV heads x blocks per KV head.
    head_blocks: u32,
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
        let group = num_heads / num_kv_heads;
        let width = group_width(group);
        let head_blocks = num_kv_heads * group.div_ceil(width);
        // Blocks per row (and the merge's heads) index the grid's y dimension, at most 65535.
        if num_heads > 65535 {
            return Err(Error::shape(
                Self::OP,
                format!(
                    "{num_heads} heads over {num_kv_heads} KV heads take {head_blocks} blocks per row, \
                     more than the grid's 65535"
                ),
            ));
        }
        let name = kernel_name(Self::OP, &format!("paged_attention_g{width}"), q.dtype())?;
        let kernel = function(&device, KernelModule::PagedAttention, &name)?;
        Ok(Plan {
            device,
            kernel,
            name,
            blocks_per_split: layout.num_tokens.saturating_mul(head_blocks),
            head_blocks: head_blocks as u32,
        })
    }

    /// [`default_num_splits`] for this call.
    fn default_num_splits(&self, layout: &DeviceBatchLayout) -> Result<usize> {
        let sms = self
            .device
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| Error::cuda(Self::OP, format!("querying the SM count: {e}")))?;
        // The occupancy query needs the device's context current on this thread.
        let per_sm = self
            .device
            .context()
            .bind_to_thread()
            .and_then(|()| {
                self.kernel
                    .occupancy_max_active_blocks_per_multiprocessor(WARPS * 32, 0, None)
            })
            .map_err(|e| {
                Error::cuda(
                    Self::OP,
                    format!("querying the occupancy of {}: {e}", self.name),
                )
            })?;
        let resident = usize::try_from(sms).unwrap_or(1).max(1) * (per_sm as usize).max(1);
        Ok(split_count(
            self.blocks_per_split,
            layout.max_blocks_per_seq * layout.block_size,
            resident,
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
        let args = [
            arg_u32(OP, "num_seqs", layout.num_seqs)?,
            arg_u32(OP, "max_blocks_per_seq", layout.max_blocks_per_seq)?,
            arg_u32(OP, "num_tokens", num_tokens)?,
            arg_u32(OP, "num_heads", num_heads)?,
            arg_u32(OP, "num_kv_heads", num_kv_heads)?,
            head_dim as u32,
            arg_u32(OP, "block_size", layout.block_size)?,
            arg_u32(OP, "num_blocks", layout.num_blocks)?,
        ];
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
        let row_blocks = args[2].min(i32::MAX as u32);
        let config = LaunchConfig {
            grid_dim: (row_blocks, self.head_blocks, num_splits_arg),
            block_dim: (WARPS * 32, 1, 1),
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
            .arg(&block_tables);
        for arg in &args {
            launch.arg(arg);
        }
        launch.arg(&scale);
        // SAFETY: the arguments follow paged_attention_g<N>'s signature in paged_attention.cu (q,
        // k_pages, v_pages, out, scratch, query_start, context_len, block_tables, num_seqs,
        // max_blocks, num_tokens, num_heads, num_kv_heads, head_dim, block_size, num_blocks,
        // scale); every buffer has the shape checked in `Plan::new` in the kernel name's dtype
        // (metadata u32, scratch f32 [num_tokens, num_heads, num_splits, head_dim + 2] whenever
        // num_splits > 1), the layout was validated against these pages when it was built,
        // head_dim <= 256, num_splits <= MAX_SPLITS, the block has WARPS warps and the grid's y
        // dimension covers every KV head's blocks of the kernel's group width; the kernel sizes
        // each sequence's splits to cover its context.
        unsafe { launch.launch(config) }.map_err(|e| launch_error(OP, &self.name, e))?;
        if num_splits > 1 {
            let combine_name = kernel_name(OP, "paged_attention_combine", q.dtype())?;
            let combine = function(&self.device, KernelModule::PagedAttention, &combine_name)?;
            let config = LaunchConfig {
                grid_dim: (row_blocks, num_heads as u32, 1),
                block_dim: (COMBINE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = stream.launch_builder(&combine);
            launch
                .arg(scratch.slice())
                .arg(out.slice_mut())
                .arg(&query_start)
                .arg(&context_len)
                .arg(&args[0])
                .arg(&args[2])
                .arg(&args[3])
                .arg(&args[5])
                .arg(&num_splits_arg);
            // SAFETY: the arguments follow paged_attention_combine's signature (scratch, out,
            // query_start, context_len, num_seqs, num_tokens, num_heads, head_dim, num_splits);
            // the scratch was filled by the launch above on the same stream for every split at or
            // before each row's position, which is all the merge reads; num_heads <= 65535.
            unsafe { launch.launch(config) }.map_err(|e| launch_error(OP, &combine_name, e))?;
        }
        into_tensor(out, &dims)
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
/// longest context the block tables hold (`capacity` tokens) and the blocks the GPU keeps
/// resident at once: the fewest splits whose blocks fill whole waves to at least 90% (so no wave
/// runs mostly empty), or all the splits the capacity allows when even those do not fill one
/// wave. Splits hold at least [`SPLIT_GRANULE`] tokens and number at most [`MAX_SPLITS`].
fn split_count(blocks_per_split: usize, capacity: usize, resident: usize) -> usize {
    let max_splits = capacity.div_ceil(SPLIT_GRANULE).clamp(1, MAX_SPLITS);
    let (blocks_per_split, resident) = (blocks_per_split.max(1), resident.max(1));
    if blocks_per_split.saturating_mul(max_splits) <= resident {
        return max_splits;
    }
    let fill = |splits: usize| {
        let blocks = blocks_per_split * splits;
        blocks as f64 / (blocks.div_ceil(resident) * resident) as f64
    };
    (1..=max_splits)
        .find(|&splits| fill(splits) >= 0.9)
        .unwrap_or_else(|| {
            (1..=max_splits)
                .max_by(|&a, &b| fill(a).total_cmp(&fill(b)))
                .unwrap_or(1)
        })
}

/// Context tokens per split for a context of `context` tokens cut into `num_splits`: the same
/// rule as `split_length` in paged_attention.cu.
#[cfg(test)]
fn split_length(context: usize, num_splits: usize) -> usize {
    context
        .div_ceil(num_splits)
        .next_multiple_of(SPLIT_GRANULE)
        .max(SPLIT_GRANULE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_the_context_and_fill_the_gpu() {
        // An H100 with four blocks resident per SM.
        let resident = 132 * 4;
        for blocks in [1, 8, 24, 96, 511, 512, 528, 600, 4096] {
            for capacity in [16, 32, 4096, 32768, 1 << 20] {
                let splits = split_count(blocks, capacity, resident);
                assert!((1..=MAX_SPLITS).contains(&splits), "{blocks} {capacity}");
                assert!(
                    splits <= capacity.div_ceil(SPLIT_GRANULE),
                    "{blocks} {capacity}"
                );
                // Either every split the capacity allows, or the fewest that fill their waves.
                let max_splits = capacity.div_ceil(SPLIT_GRANULE).min(MAX_SPLITS);
                let fills = |s: usize| {
                    let launched = blocks * s;
                    launched * 10 >= launched.div_ceil(resident) * resident * 9
                };
                if splits < max_splits {
                    assert!(fills(splits), "{blocks} {capacity}: {splits} splits");
                    assert!(
                        (1..splits).all(|s| !fills(s)),
                        "{blocks} {capacity}: fewer than {splits} splits fill the GPU"
                    );
                }
                for context in [1, 31, 32, 33, 190, 4096, 32768] {
                    if context > capacity {
                        continue;
                    }
                    let len = split_length(context, splits);
                    assert!(len.is_multiple_of(SPLIT_GRANULE), "{blocks} {context}");
                    assert!(
                        splits * len >= context,
                        "{blocks} {context}: {splits} x {len}"
                    );
                }
            }
        }
        // Prefill-sized batches and B64 x 8 KV heads fill the GPU without splitting.
        assert_eq!(split_count(4096, 32768, resident), 1);
        assert_eq!(split_count(512, 2048, resident), 1);
        // 600 blocks would leave a second wave nearly empty: four splits make 2400 blocks, 4.5
        // waves at 91%.
        assert_eq!(split_count(600, 2048, resident), 4);
        // One sequence of 32k tokens over 8 KV heads: 60 splits of 576 tokens fill one wave.
        assert_eq!(split_count(8, 32768, resident), 60);
        assert_eq!(split_length(32768, 60), 576);
        // A short table cannot be split further than its 32-token pieces.
        assert_eq!(split_count(8, 64, resident), 2);
        assert_eq!(split_count(1, 1 << 20, resident), MAX_SPLITS);
    }

    #[test]
    fn groups_map_to_the_compiled_widths() {
        let widths: Vec<usize> = (1..=12).map(group_width).collect();
        assert_eq!(widths, [1, 2, 3, 4, 8, 8, 8, 8, 8, 8, 8, 8]);
    }
}
