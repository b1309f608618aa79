//! Launcher of `kernels/softmax.cu`: softmax over the last dimension, f32 math for f32, f16 and
//! bf16 tensors.
//!
//! A row is read once and written once while it fits in registers: those of one thread block up
//! to 16384 columns (32768 before Hopper), and on Hopper (compute capability 9.0+) those of a
//! cluster of 2 or 4 blocks, which exchange their partial max and sum through distributed shared
//! memory, up to 65536 columns. Longer rows take the online form: a running max and sum in one
//! pass, then a second pass that re-reads the row, mostly from L2, and writes it.
//!
//! The limits are measured, not only what fits: on an H200, 256 x 128256 f16 ran at 1.35 TB/s
//! (of a 4.23 TB/s copy) in clusters of 8 blocks and at 1.53 TB/s in the online form with 512
//! threads, while 4096 x 32000 ran at 1.78 TB/s in clusters of 2 and 1.66 TB/s online.

use pagoda_tensor::cudarc::driver::{LaunchConfig, PushKernelArg};
use pagoda_tensor::{CudaDevice, Tensor};

use super::registry::{KernelModule, function};
use super::tensor_access::{
    FLOAT_DTYPES, alloc_output, common_device, device_view, dtype_suffix, expect_dtype,
    into_tensor, launch_error,
};
use crate::{Error, Result};

const OP: &str = "softmax_rows";

/// Columns one block holds with 512 threads of 32 values each: small enough that two blocks
/// share a multiprocessor, so one block's loads overlap another's reductions.
const BLOCK_COLUMNS: usize = 512 * 32;
/// Columns one block holds at its largest, 1024 threads of 32 values.
const MAX_BLOCK_COLUMNS: usize = 1024 * 32;
/// The largest cluster the launcher uses: past 4 blocks of 16384 columns the online form was
/// faster (see the module documentation).
const MAX_CLUSTER: usize = 4;
/// Threads per row of the online form; 512 beat 256 and 1024 on both long-row shapes measured.
const ONLINE_THREADS: u32 = 512;

/// `softmax(x)` over the last dimension of `x` (f32, f16 or bf16, contiguous, on a CUDA device):
/// a new tensor of the same shape and dtype.
///
/// As on the CPU ([`crate::cpu::softmax::softmax_rows`]), the row maximum is subtracted first,
/// `-inf` entries become 0, and a row that is all `-inf` or holds NaN or `+inf` comes out as NaN.
pub fn softmax_rows(x: &Tensor) -> Result<Tensor> {
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
    let rows = x.elem_count() / cols;
    let dims = x.dims().to_vec();
    let mut out = alloc_output(OP, &device, x.dtype(), &dims)?;
    if rows == 0 {
        return into_tensor(out, &dims);
    }
    let suffix =
        dtype_suffix(x.dtype()).ok_or_else(|| Error::dtype(OP, "x must be a float tensor"))?;
    let plan = Plan::new(
        cols,
        x.dtype().size_in_bytes(),
        clusters_available(&device)?,
    );
    let name = format!("{}_{suffix}", plan.kernel);
    let kernel = function(&device, KernelModule::Softmax, &name)?;

    // A grid-stride loop covers rows beyond the grid limit; the grid is a whole number of clusters.
    let clusters = rows.min(i32::MAX as usize / plan.cluster);
    let config = LaunchConfig {
        grid_dim: ((clusters * plan.cluster) as u32, 1, 1),
        block_dim: (plan.threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let x_view = device_view(OP, "x", x)?;
    let rows = rows as u64;
    let (cols, segment) = (signed(cols)?, signed(plan.segment)?);
    let stream = device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch
        .arg(&x_view)
        .arg(out.slice_mut())
        .arg(&rows)
        .arg(&cols);
    if plan.kernel != "softmax_online" {
        launch.arg(&segment);
    }
    // SAFETY: the arguments match the kernel's signature in softmax.cu (x, y, rows, cols and,
    // except for the online form, segment); x and the new output each hold rows x cols elements
    // of the dtype the kernel name carries; the block size is a multiple of 32 within the
    // kernel's launch bound, and the grid a multiple of the kernel's cluster size.
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

/// Whether `device` runs thread block clusters (compute capability 9.0 and later).
fn clusters_available(device: &CudaDevice) -> Result<bool> {
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

/// Which kernel of softmax.cu runs a row of `cols` columns, and its geometry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Plan {
    /// Kernel name without the dtype suffix.
    kernel: &'static str,
    /// Blocks per row.
    cluster: usize,
    /// Columns each block of a row holds (a whole number of 16-byte vectors, unless the row is
    /// held by one block).
    segment: usize,
    threads: u32,
}

impl Plan {
    fn new(cols: usize, element_size: usize, clusters: bool) -> Plan {
        let vector = 16 / element_size;
        let single = |kernel, per_thread: usize| Plan {
            kernel,
            cluster: 1,
            segment: cols,
            threads: threads_for(cols.div_ceil(vector).div_ceil(per_thread / vector)),
        };
        if cols <= BLOCK_COLUMNS {
            // The fewest values per thread that keep the block at 512 threads or fewer.
            return match cols.div_ceil(512) {
                0..=8 => single("softmax_row_e8", 8),
                9..=16 => single("softmax_row_e16", 16),
                _ => single("softmax_row_e32", 32),
            };
        }
        if clusters && cols <= MAX_CLUSTER * BLOCK_COLUMNS {
            let (kernel, cluster) = if cols <= 2 * BLOCK_COLUMNS {
                ("softmax_cluster2", 2)
            } else {
                ("softmax_cluster4", 4)
            };
            let segment = cols.div_ceil(cluster).next_multiple_of(vector);
            return Plan {
                kernel,
                cluster,
                segment,
                threads: threads_for(segment.div_ceil(32)),
            };
        }
        if !clusters && cols <= MAX_BLOCK_COLUMNS {
            return single("softmax_row_e32", 32);
        }
        Plan {
            kernel: "softmax_online",
            cluster: 1,
            segment: cols,
            threads: ONLINE_THREADS,
        }
    }
}

/// A block of `threads` threads rounded up to whole warps (at least one, at most 1024).
fn threads_for(threads: usize) -> u32 {
    threads.next_multiple_of(32).clamp(32, 1024) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(cols: usize, element_size: usize, clusters: bool) -> (&'static str, usize, usize, u32) {
        let plan = Plan::new(cols, element_size, clusters);
        (plan.kernel, plan.cluster, plan.segment, plan.threads)
    }

    #[test]
    fn rows_that_fit_one_block_stay_in_its_registers() {
        assert_eq!(plan(1, 2, true), ("softmax_row_e8", 1, 1, 32));
        assert_eq!(plan(67, 4, true), ("softmax_row_e8", 1, 67, 32));
        assert_eq!(plan(1000, 2, true), ("softmax_row_e8", 1, 1000, 128));
        assert_eq!(plan(4096, 2, true), ("softmax_row_e8", 1, 4096, 512));
        assert_eq!(plan(4096, 4, false), ("softmax_row_e8", 1, 4096, 512));
        assert_eq!(plan(4097, 2, true), ("softmax_row_e16", 1, 4097, 288));
        assert_eq!(plan(16384, 4, true), ("softmax_row_e32", 1, 16384, 512));
    }

    #[test]
    fn longer_rows_spread_over_a_cluster_on_hopper() {
        assert_eq!(plan(16385, 2, true), ("softmax_cluster2", 2, 8200, 288));
        assert_eq!(plan(32000, 2, true), ("softmax_cluster2", 2, 16000, 512));
        assert_eq!(plan(32769, 4, true), ("softmax_cluster4", 4, 8196, 288));
        assert_eq!(plan(65536, 2, true), ("softmax_cluster4", 4, 16384, 512));
    }

    #[test]
    fn the_longest_rows_stream_online() {
        assert_eq!(plan(65537, 2, true), ("softmax_online", 1, 65537, 512));
        assert_eq!(plan(128256, 2, true), ("softmax_online", 1, 128256, 512));
        assert_eq!(plan(32000, 2, false), ("softmax_row_e32", 1, 32000, 1024));
        assert_eq!(plan(32769, 2, false), ("softmax_online", 1, 32769, 512));
    }

    #[test]
    fn every_plan_covers_its_row() {
        for cols in [
            1, 7, 511, 4096, 16383, 16385, 32768, 40000, 65536, 65537, 100_000, 262_144,
        ] {
            for element_size in [2, 4] {
                for clusters in [false, true] {
                    let plan = Plan::new(cols, element_size, clusters);
                    let per_thread = match plan.kernel {
                        "softmax_row_e8" => 8,
                        "softmax_row_e16" => 16,
                        "softmax_online" => continue,
                        _ => 32,
                    };
                    assert!(
                        plan.threads.is_multiple_of(32) && plan.threads <= 1024,
                        "{plan:?}"
                    );
                    assert!(plan.segment * plan.cluster >= cols, "{cols}: {plan:?}");
                    // Every vector of a segment has a thread slot.
                    let vector = 16 / element_size;
                    let capacity = plan.threads as usize * (per_thread / vector) * vector;
                    assert!(capacity >= plan.segment, "{cols}: {plan:?}");
                }
            }
        }
    }
}
