//! Launcher of `kernels/softmax.cu`: softmax over the last dimension, f32 math for f32, f16 and
//! bf16 tensors.
//!
//! A row is read once and written once while it fits in registers: those of one thread block up
//! to 65536 columns, and on Hopper (compute capability 9.0+) those of a cluster of 2, 4 or 8
//! blocks, which exchange their partial max and sum through distributed shared memory, up to
//! 524288. Longer rows (or rows past one block before Hopper) take the online form: a running max
//! and sum in one pass, then a second pass that re-reads the row, mostly from L2, and writes it.
//!
//! On Hopper a fourth form streams rows whose length is a whole number of 16-byte words (from a
//! 16-byte aligned input): a persistent grid of clusters, each block keeping several rows'
//! segments in flight in shared memory, loaded by the copy engine (TMA), so that the loads of the
//! next rows overlap the reduction and the stores of this one. The held forms load, reduce and
//! store a wave of rows in step, which leaves 256 rows of 128256 columns at 68% of the copy
//! bandwidth. [`choose_form`] does not pick the streamed form yet: it is offered to the benchmark
//! and the tests through [`candidate_forms`] until the benchmark's timings decide where it wins.
//!
//! Which form runs is [`choose_form`]'s decision; [`softmax_rows_with`] runs any form that can hold
//! a row, so benchmarks can time every candidate on the same input.

use pagoda_tensor::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use pagoda_tensor::cudarc::driver::{
    CudaFunction, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use pagoda_tensor::{CudaDevice, DType, Tensor};

use super::registry::{KernelModule, function};
use super::tensor_access::{
    FLOAT_DTYPES, alloc_output, allow_dynamic_shared_memory, common_device, device_view,
    dtype_suffix, expect_dtype, into_tensor, launch_error, multiprocessor_count,
};
use crate::{Error, Result};

const OP: &str = "softmax_rows";

/// Values per thread of the held forms (`softmax_c*_e{8,16,32,64}` in softmax.cu). 128 was
/// measured too, for 16-bit rows: at 2.5 to 7 times the time of 64, it is not compiled.
pub const VALUES_PER_THREAD: [usize; 4] = [8, 16, 32, 64];
/// Blocks per row of the held and streamed forms: one, or a cluster (`softmax_c{2,4,8}_*`,
/// `softmax_streamed_c{2,4,8}_*`, Hopper and later).
pub const BLOCKS_PER_ROW: [usize; 4] = [1, 2, 4, 8];
const MAX_THREADS: usize = 1024;
/// Stage buffers per block the streamed form is offered with ([`candidate_forms`]); the kernel
/// takes 2 to `MAX_STAGES`.
pub const STREAM_STAGES: [usize; 4] = [2, 3, 4, 6];
/// Threads per block the streamed form is offered with.
pub const STREAM_THREADS: [u32; 3] = [256, 512, 1024];
/// `MAX_STAGES` of softmax.cu.
const MAX_STAGES: usize = 8;
/// Dynamic shared memory the streamed form may ask for: Hopper grants 227 KiB a block, less the
/// kernel's static shared memory.
const STREAM_SHARED_BYTES: usize = 200 * 1024;

/// How a row is spread over the GPU: one of the kernels of softmax.cu and its geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftmaxForm {
    /// `blocks` thread blocks per row (a cluster when more than one), each holding its segment of
    /// the row in registers, `per_thread` values per thread.
    Held { blocks: usize, per_thread: usize },
    /// One block of `threads` per row, streaming it twice.
    Online { threads: u32 },
    /// A persistent grid of clusters of `blocks` blocks (one block: no cluster) of `threads`,
    /// each block owning one segment of every row its cluster takes and keeping `stages` of
    /// those segments in shared memory, loaded rows ahead by bulk copies (Hopper). Rows must be
    /// whole 16-byte words and the input 16-byte aligned.
    Streamed {
        blocks: usize,
        stages: usize,
        threads: u32,
    },
}

impl SoftmaxForm {
    /// The kernel's name without its dtype suffix.
    fn kernel(self) -> String {
        match self {
            SoftmaxForm::Held { blocks, per_thread } => format!("softmax_c{blocks}_e{per_thread}"),
            SoftmaxForm::Online { .. } => "softmax_online".into(),
            SoftmaxForm::Streamed { blocks, .. } => format!("softmax_streamed_c{blocks}"),
        }
    }

    /// (columns per block, threads per block) of a row of `cols` elements of `element_size`
    /// bytes, or `None` when this form cannot hold such a row.
    fn geometry(self, cols: usize, element_size: usize) -> Option<(usize, u32)> {
        match self {
            SoftmaxForm::Online { threads } => (threads.is_multiple_of(32)
                && (32..=1024).contains(&threads))
            .then_some((cols, threads)),
            SoftmaxForm::Held { blocks, per_thread } => {
                let vector = 16 / element_size;
                if !BLOCKS_PER_ROW.contains(&blocks)
                    || !VALUES_PER_THREAD.contains(&per_thread)
                    || per_thread < vector
                {
                    return None;
                }
                // Every segment but the last is a whole number of 16-byte words, so each starts
                // aligned when the row does.
                let segment = if blocks == 1 {
                    cols
                } else {
                    cols.div_ceil(blocks).next_multiple_of(vector)
                };
                let threads = segment.div_ceil(per_thread).next_multiple_of(32).max(32);
                (threads <= MAX_THREADS).then_some((segment, threads as u32))
            }
            SoftmaxForm::Streamed {
                blocks,
                stages,
                threads,
            } => {
                let vector = 16 / element_size;
                // Bulk copies move whole 16-byte words from 16-byte aligned addresses: every row
                // and every segment must start on one.
                if !BLOCKS_PER_ROW.contains(&blocks)
                    || !(2..=MAX_STAGES).contains(&stages)
                    || !threads.is_multiple_of(32)
                    || !(32..=MAX_THREADS as u32).contains(&threads)
                    || !cols.is_multiple_of(vector)
                {
                    return None;
                }
                let segment = cols.div_ceil(blocks).next_multiple_of(vector);
                (stages * segment * element_size <= STREAM_SHARED_BYTES)
                    .then_some((segment, threads))
            }
        }
    }

    fn blocks(self) -> usize {
        match self {
            SoftmaxForm::Held { blocks, .. } | SoftmaxForm::Streamed { blocks, .. } => blocks,
            SoftmaxForm::Online { .. } => 1,
        }
    }

    /// Whether the form needs Hopper: clusters, or bulk copies.
    fn needs_hopper(self) -> bool {
        matches!(self, SoftmaxForm::Streamed { .. }) || self.blocks() > 1
    }
}

/// The form [`softmax_rows`] runs for rows of `cols` elements of `dtype`, with or without
/// thread-block clusters (compute capability 9.0+).
///
/// The rules come from timing every form on the BENCH.md shapes (benches/cuda_softmax.rs, f16,
/// H100): held forms read a row once, so they win wherever they fit. One block per row wins
/// while it fits, with the most values per thread that still leaves 128 threads or more: more
/// values per thread put more loads in flight per instruction, and small blocks keep more
/// blocks, at different phases, on each multiprocessor (4096 columns: 32 values per thread,
/// 128 threads, 100% of the copy bandwidth; 8 values, 512 threads, 91%). Rows too long for one
/// block take the widest cluster at 64 values per thread, the smallest blocks (128256 columns:
/// 8 blocks of 251 threads, 68%; 2 blocks of 1002, 41%).
pub fn choose_form(cols: usize, dtype: DType, clusters: bool) -> SoftmaxForm {
    let element_size = dtype.size_in_bytes();
    let threads = |form: SoftmaxForm| form.geometry(cols, element_size).map(|(_, t)| t);
    let one_block = |per_thread| SoftmaxForm::Held {
        blocks: 1,
        per_thread,
    };
    if let Some(&per_thread) = VALUES_PER_THREAD
        .iter()
        .rev()
        .find(|&&v| threads(one_block(v)).is_some_and(|t| t >= 128))
    {
        return one_block(per_thread);
    }
    // Rows too short to give any form 128 threads: one warp or a few.
    if let Some(&per_thread) = VALUES_PER_THREAD
        .iter()
        .find(|&&v| threads(one_block(v)).is_some_and(|t| t < 128))
    {
        return one_block(per_thread);
    }
    let cluster = SoftmaxForm::Held {
        blocks: 8,
        per_thread: 64,
    };
    if clusters && threads(cluster).is_some() {
        return cluster;
    }
    SoftmaxForm::Online { threads: 512 }
}

/// Every form that can take rows of `cols` elements of `dtype`: the held ones that fit, the
/// online form at 256, 512 and 1024 threads, and the streamed ones that fit
/// ([`BLOCKS_PER_ROW`] x [`STREAM_STAGES`] x [`STREAM_THREADS`]). Cluster and streamed forms are
/// listed only when `clusters` (Hopper); streamed forms also need a 16-byte aligned input,
/// which every tensor that starts its allocation has.
pub fn candidate_forms(cols: usize, dtype: DType, clusters: bool) -> Vec<SoftmaxForm> {
    let mut forms = Vec::new();
    for blocks in BLOCKS_PER_ROW {
        if blocks > 1 && !clusters {
            continue;
        }
        for per_thread in VALUES_PER_THREAD {
            let form = SoftmaxForm::Held { blocks, per_thread };
            if form.geometry(cols, dtype.size_in_bytes()).is_some() {
                forms.push(form);
            }
        }
    }
    forms.extend([256, 512, 1024].map(|threads| SoftmaxForm::Online { threads }));
    if clusters {
        for blocks in BLOCKS_PER_ROW {
            for stages in STREAM_STAGES {
                for threads in STREAM_THREADS {
                    let form = SoftmaxForm::Streamed {
                        blocks,
                        stages,
                        threads,
                    };
                    if form.geometry(cols, dtype.size_in_bytes()).is_some() {
                        forms.push(form);
                    }
                }
            }
        }
    }
    forms
}

/// Whether `device` runs thread-block clusters (compute capability 9.0 or later).
pub fn clusters_available(device: &CudaDevice) -> Result<bool> {
    let (major, _) = device.context().compute_capability().map_err(|e| {
        Error::cuda(
            OP,
            format!(
                "reading the compute capability of cuda:{}: {e}",
                device.ordinal()
            ),
        )
    })?;
    Ok(major >= 9)
}

/// `softmax(x)` over the last dimension of `x` (f32, f16 or bf16, contiguous, on a CUDA device):
/// a new tensor of the same shape and dtype.
///
/// As on the CPU ([`crate::cpu::softmax::softmax_rows`]), the row maximum is subtracted first,
/// `-inf` entries become 0, and a row that is all `-inf` or holds NaN or `+inf` comes out as NaN.
pub fn softmax_rows(x: &Tensor) -> Result<Tensor> {
    let device = common_device(OP, &[("x", x)])?;
    let cols = x.dims().last().copied().unwrap_or(0);
    let form = choose_form(cols, x.dtype(), clusters_available(&device)?);
    softmax_rows_with(x, form)
}

/// Whether the streamed `form` can run on `x`: its first element 16-byte aligned (the bulk
/// copy's rule; views into a tensor may start anywhere) and the stages within the device's
/// shared memory per block.
fn streamable(x: &Tensor, device: &CudaDevice, form: SoftmaxForm) -> Result<bool> {
    let cols = x.dims().last().copied().unwrap_or(0);
    let Some((segment, _)) = form.geometry(cols, x.dtype().size_in_bytes()) else {
        return Ok(false);
    };
    let x_view = device_view(OP, "x", x)?;
    let (address, _sync) = x_view.device_ptr(device.stream());
    Ok(address.is_multiple_of(16)
        && stream_shared_bytes(form, segment, x.dtype()) <= shared_bytes_per_block(device)?)
}

/// Dynamic shared memory of the streamed `form`: its stages of `segment` elements.
fn stream_shared_bytes(form: SoftmaxForm, segment: usize, dtype: DType) -> usize {
    match form {
        SoftmaxForm::Streamed { stages, .. } => stages * segment * dtype.size_in_bytes(),
        _ => 0,
    }
}

/// Dynamic shared memory a block of `device` may opt in to, less 1 KiB for the streamed kernel's
/// static shared memory (its barriers and reduction scratch).
fn shared_bytes_per_block(device: &CudaDevice) -> Result<usize> {
    let bytes = device
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_err(|e| Error::cuda(OP, format!("querying the shared memory per block: {e}")))?;
    Ok(usize::try_from(bytes).unwrap_or(0).saturating_sub(1024))
}

/// [`softmax_rows`] through a given form; an error when the form cannot hold the rows of `x` or
/// needs clusters the device lacks.
pub fn softmax_rows_with(x: &Tensor, form: SoftmaxForm) -> Result<Tensor> {
    let device = common_device(OP, &[("x", x)])?;
    expect_dtype(OP, "x", x, &FLOAT_DTYPES)?;
    let Some(&cols) = x.dims().last() else {
        return Err(Error::shape(OP, "x must have at least one dimension"));
    };
    if cols == 0 {
        return Err(Error::shape(
            OP,
            "the softmax (last) dimension of x is empty",
        ));
    }
    let Some((segment, threads)) = form.geometry(cols, x.dtype().size_in_bytes()) else {
        return Err(Error::shape(
            OP,
            format!("{form:?} cannot hold rows of {cols} {} values", x.dtype()),
        ));
    };
    if form.needs_hopper() && !clusters_available(&device)? {
        return Err(Error::device(
            OP,
            format!(
                "{form:?} needs thread-block clusters or bulk copies (compute capability 9.0+), \
                 which cuda:{} lacks",
                device.ordinal()
            ),
        ));
    }
    if matches!(form, SoftmaxForm::Streamed { .. }) && !streamable(x, &device, form)? {
        return Err(Error::shape(
            OP,
            format!(
                "{form:?} needs a 16-byte aligned x and its stages within cuda:{}'s shared memory",
                device.ordinal()
            ),
        ));
    }
    let rows = x.elem_count() / cols;
    let dims = x.dims().to_vec();
    let mut out = alloc_output(OP, &device, x.dtype(), &dims)?;
    if rows == 0 {
        return into_tensor(out, &dims);
    }
    let suffix =
        dtype_suffix(x.dtype()).ok_or_else(|| Error::dtype(OP, "x must be a float tensor"))?;
    let name = format!("{}_{suffix}", form.kernel());
    let kernel = function(&device, KernelModule::Softmax, &name)?;

    // A grid-stride loop covers rows beyond the grid limit; the grid is a whole number of clusters.
    let blocks = form.blocks();
    let shared_bytes = stream_shared_bytes(form, segment, x.dtype());
    let clusters = if let SoftmaxForm::Streamed { .. } = form {
        let (y_address, _sync) = out.slice_mut().device_ptr_mut(device.stream());
        if !y_address.is_multiple_of(16) {
            return Err(Error::cuda(
                OP,
                format!("{name}: the output allocation is not 16-byte aligned"),
            ));
        }
        rows.min(resident_clusters(
            &device,
            &kernel,
            &name,
            blocks,
            threads,
            shared_bytes,
        )?)
    } else {
        rows.min(i32::MAX as usize / blocks)
    };
    let config = LaunchConfig {
        grid_dim: ((clusters * blocks) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared_bytes as u32,
    };
    let x_view = device_view(OP, "x", x)?;
    let rows = rows as u64;
    let (cols, segment) = (signed(cols)?, signed(segment)?);
    let stages = match form {
        SoftmaxForm::Streamed { stages, .. } => stages as u32,
        _ => 0,
    };
    let stream = device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch
        .arg(&x_view)
        .arg(out.slice_mut())
        .arg(&rows)
        .arg(&cols);
    match form {
        SoftmaxForm::Held { .. } => {
            launch.arg(&segment);
        }
        SoftmaxForm::Streamed { .. } => {
            launch.arg(&segment).arg(&stages);
        }
        SoftmaxForm::Online { .. } => {}
    }
    // SAFETY: (x, y, rows, cols[, segment[, stages]]) is the signature of every kernel of
    // softmax.cu (held forms take the segment, streamed ones the segment and the stages); x and
    // the fresh output hold rows x cols elements of the kernel's dtype; the block is whole warps
    // covering the segment with the kernel's values per thread (checked by `geometry`), and the
    // grid is a whole number of clusters. The streamed kernels get `stages` (2..=MAX_STAGES, by
    // `geometry`) stages of `segment` elements of dynamic shared memory, allowed above, and
    // 16-byte aligned rows of whole 16-byte words (`geometry`, `streamable`, the check on y).
    unsafe { launch.launch(config) }.map_err(|e| launch_error(OP, &name, e))?;
    into_tensor(out, &dims)
}

/// Clusters of `blocks` blocks of the streamed `kernel` that the GPU holds at once: the grid of
/// the persistent form, which then has no second wave. Also allows the kernel its
/// `shared_bytes` of dynamic shared memory.
fn resident_clusters(
    device: &CudaDevice,
    kernel: &CudaFunction,
    name: &str,
    blocks: usize,
    threads: u32,
    shared_bytes: usize,
) -> Result<usize> {
    allow_dynamic_shared_memory(OP, device, kernel, name, shared_bytes)?;
    // All of the SM's shared memory, so that stages small enough leave room for a second block.
    kernel
        .set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
            100,
        )
        .map_err(|e| Error::cuda(OP, format!("asking {name} for all shared memory: {e}")))?;
    let resident = if blocks == 1 {
        kernel
            .occupancy_max_active_blocks_per_multiprocessor(threads, shared_bytes, None)
            .map(|per_sm| per_sm as usize * multiprocessor_count(OP, device).unwrap_or(1))
    } else {
        let config = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: shared_bytes as u32,
        };
        kernel
            .occupancy_max_active_clusters(config, device.stream())
            .map(|clusters| clusters as usize)
    };
    match resident {
        Ok(clusters) if clusters > 0 => Ok(clusters),
        Ok(_) => Err(Error::cuda(
            OP,
            format!("{name}: not one cluster of {blocks} blocks of {threads} threads fits the GPU"),
        )),
        // Without the occupancy query: one block per SM.
        Err(_) => Ok((multiprocessor_count(OP, device)? / blocks).max(1)),
    }
}

fn signed(value: usize) -> Result<i64> {
    i64::try_from(value).map_err(|_| {
        Error::shape(
            OP,
            format!("{value} columns exceed the kernel's index range"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(blocks: usize, per_thread: usize) -> SoftmaxForm {
        SoftmaxForm::Held { blocks, per_thread }
    }

    fn streamed(blocks: usize, stages: usize, threads: u32) -> SoftmaxForm {
        SoftmaxForm::Streamed {
            blocks,
            stages,
            threads,
        }
    }

    #[test]
    fn rows_that_fit_one_block_stay_in_its_registers() {
        assert_eq!(choose_form(1, DType::F16, true), held(1, 8));
        assert_eq!(choose_form(1000, DType::F16, true), held(1, 8));
        assert_eq!(choose_form(4096, DType::F16, true), held(1, 32));
        assert_eq!(choose_form(4097, DType::F16, true), held(1, 32));
        assert_eq!(choose_form(32000, DType::F16, false), held(1, 64));
        assert_eq!(choose_form(65536, DType::F32, true), held(1, 64));
        assert_eq!(held(1, 32).geometry(4096, 2), Some((4096, 128)));
        assert_eq!(held(1, 64).geometry(32000, 2), Some((32000, 512)));
    }

    #[test]
    fn longer_rows_spread_over_a_cluster_on_hopper() {
        assert_eq!(choose_form(65537, DType::F16, true), held(8, 64));
        assert_eq!(choose_form(128_256, DType::F16, true), held(8, 64));
        assert_eq!(choose_form(524_288, DType::F16, true), held(8, 64));
        assert_eq!(held(8, 64).geometry(128_256, 2), Some((16032, 256)));
        assert_eq!(held(2, 32).geometry(16385, 2), Some((8200, 288)));
    }

    #[test]
    fn streamed_segments_are_whole_words_within_shared_memory() {
        // 8 blocks of 16032 f16 columns: 32064 bytes a stage, six of which fit in 200 KiB.
        assert_eq!(streamed(8, 6, 256).geometry(128_256, 2), Some((16032, 256)));
        assert_eq!(streamed(8, 8, 256).geometry(128_256, 2), None);
        assert_eq!(streamed(1, 2, 512).geometry(4096, 2), Some((4096, 512)));
        // f32: a word is 4 values; 4100 columns over 8 blocks are 513 -> 516 a block.
        assert_eq!(streamed(8, 2, 256).geometry(4100, 4), Some((516, 256)));
        assert_eq!(streamed(8, 2, 256).geometry(4099, 4), None);
        assert_eq!(streamed(8, 2, 256).geometry(4100, 2), None);
        assert_eq!(streamed(8, 1, 256).geometry(4096, 2), None);
        assert_eq!(streamed(8, 9, 256).geometry(8, 2), None);
        assert_eq!(streamed(3, 2, 256).geometry(4096, 2), None);
        assert_eq!(streamed(8, 2, 100).geometry(4096, 2), None);
        // Short rows leave blocks without columns: 24 f16 columns are 3 words for 8 blocks.
        assert_eq!(streamed(8, 2, 32).geometry(24, 2), Some((8, 32)));
    }

    #[test]
    fn the_longest_rows_stream_online() {
        let online = SoftmaxForm::Online { threads: 512 };
        assert_eq!(choose_form(524_289, DType::F16, true), online);
        assert_eq!(choose_form(65537, DType::F16, false), online);
    }

    #[test]
    fn forms_that_cannot_hold_a_row_are_refused() {
        assert_eq!(held(1, 8).geometry(8193, 2), None);
        assert_eq!(held(3, 8).geometry(100, 2), None);
        assert_eq!(held(1, 12).geometry(100, 2), None);
        // An f32 word is 4 values, an f16 word 8: 8 values per thread is one word of f16.
        assert_eq!(held(1, 8).geometry(100, 4), Some((100, 32)));
        assert_eq!(SoftmaxForm::Online { threads: 100 }.geometry(100, 2), None);
    }

    #[test]
    fn every_candidate_covers_its_row() {
        for cols in [
            1, 7, 8, 511, 4096, 16385, 32000, 65537, 65544, 128_256, 262_144, 300_000, 300_001,
        ] {
            for dtype in [DType::F16, DType::F32] {
                for clusters in [false, true] {
                    let forms = candidate_forms(cols, dtype, clusters);
                    assert!(
                        forms.contains(&choose_form(cols, dtype, clusters)),
                        "{cols}"
                    );
                    for form in forms {
                        let (segment, threads) =
                            form.geometry(cols, dtype.size_in_bytes()).unwrap();
                        assert!(threads.is_multiple_of(32) && threads <= 1024, "{form:?}");
                        if let SoftmaxForm::Held { blocks, per_thread } = form {
                            assert!(clusters || blocks == 1, "{form:?}");
                            assert!(segment * blocks >= cols, "{cols}: {form:?}");
                            assert!(threads as usize * per_thread >= segment, "{cols}: {form:?}");
                        }
                        if let SoftmaxForm::Streamed { blocks, stages, .. } = form {
                            assert!(clusters, "{form:?}");
                            assert!(segment * blocks >= cols, "{cols}: {form:?}");
                            assert!((segment * dtype.size_in_bytes()).is_multiple_of(16));
                            assert!(stages * segment * dtype.size_in_bytes() <= 200 * 1024);
                        }
                    }
                }
            }
        }
    }
}
