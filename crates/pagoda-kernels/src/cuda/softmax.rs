//! Launcher of `kernels/softmax.cu`: softmax over the last dimension, f32 math for f32, f16 and
//! bf16 tensors.
//!
//! A row is read once and written once while it fits in registers: those of one thread block up
//! to 65536 columns, and on Hopper (compute capability 9.0+) those of a cluster of 2, 4 or 8
//! blocks, which exchange their partial max and sum through distributed shared memory, up to
//! 524288. Longer rows (or rows past one block before Hopper) take the online form: a running max
//! and sum in one pass, then a second pass that re-reads the row, mostly from L2, and writes it.
//!
//! Which form runs is [`choose_form`]'s decision; [`softmax_rows_with`] runs any form that can hold
//! a row, so benchmarks can time every candidate on the same input.

use pagoda_tensor::cudarc::driver::{LaunchConfig, PushKernelArg};
use pagoda_tensor::{CudaDevice, DType, Tensor};

use super::registry::{KernelModule, function};
use super::tensor_access::{
    FLOAT_DTYPES, alloc_output, common_device, device_view, dtype_suffix, expect_dtype,
    into_tensor, launch_error,
};
use crate::{Error, Result};

const OP: &str = "softmax_rows";

/// Values per thread of the held forms (`softmax_c*_e{8,16,32,64}` in softmax.cu). 128 was
/// measured too, for 16-bit rows: at 2.5 to 7 times the time of 64, it is not compiled.
pub const VALUES_PER_THREAD: [usize; 4] = [8, 16, 32, 64];
/// Blocks per row of the held forms: one, or a cluster (`softmax_c{2,4,8}_*`, Hopper and later).
pub const BLOCKS_PER_ROW: [usize; 4] = [1, 2, 4, 8];
const MAX_THREADS: usize = 1024;

/// How a row is spread over the GPU: one of the kernels of softmax.cu and its geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftmaxForm {
    /// `blocks` thread blocks per row (a cluster when more than one), each holding its segment of
    /// the row in registers, `per_thread` values per thread.
    Held { blocks: usize, per_thread: usize },
    /// One block of `threads` per row, streaming it twice.
    Online { threads: u32 },
}

impl SoftmaxForm {
    /// The kernel's name without its dtype suffix.
    fn kernel(self) -> String {
        match self {
            SoftmaxForm::Held { blocks, per_thread } => format!("softmax_c{blocks}_e{per_thread}"),
            SoftmaxForm::Online { .. } => "softmax_online".into(),
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
        }
    }

    fn blocks(self) -> usize {
        match self {
            SoftmaxForm::Held { blocks, .. } => blocks,
            SoftmaxForm::Online { .. } => 1,
        }
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

/// Every form that can take rows of `cols` elements of `dtype`: the held ones that fit and the
/// online form at 256, 512 and 1024 threads. Cluster forms are listed only when `clusters`.
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
    if form.blocks() > 1 && !clusters_available(&device)? {
        return Err(Error::device(
            OP,
            format!(
                "{form:?} needs thread-block clusters (compute capability 9.0+), which cuda:{} lacks",
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
    let clusters = rows.min(i32::MAX as usize / blocks);
    let config = LaunchConfig {
        grid_dim: ((clusters * blocks) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let x_view = device_view(OP, "x", x)?;
    let rows = rows as u64;
    let (cols, segment) = (signed(cols)?, signed(segment)?);
    let stream = device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch
        .arg(&x_view)
        .arg(out.slice_mut())
        .arg(&rows)
        .arg(&cols);
    if let SoftmaxForm::Held { .. } = form {
        launch.arg(&segment);
    }
    // SAFETY: (x, y, rows, cols[, segment]) is the signature of every kernel of softmax.cu
    // (held forms take the segment); x and the fresh output hold rows x cols elements of the
    // kernel's dtype; the block is whole warps covering the segment with the kernel's values per
    // thread (checked by `geometry`), and the grid is a whole number of clusters.
    unsafe { launch.launch(config) }.map_err(|e| launch_error(OP, &name, e))?;
    into_tensor(out, &dims)
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
            1, 7, 511, 4096, 16385, 32000, 65537, 128_256, 262_144, 300_001,
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
                    }
                }
            }
        }
    }
}
