//! Launcher of `kernels/gemv.cu`: `x · wᵀ (+ bias)` for a few rows of `x`, the decode-time
//! shape of every linear layer. [`super::gemm::linear`] sends products with at most
//! [`MAX_ROWS`] rows here: they are bound by reading the weights once, and one kernel launch
//! costs the host far less than a cuBLAS call.

use pagoda_tensor::cudarc::driver::{
    DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use pagoda_tensor::{CudaDevice, CudaStorage, DType, Tensor};

use super::registry::{KernelModule, function};
use super::tensor_access::{
    alloc_output, arg_u32, device_view, expect_dims, expect_dtype, into_tensor, kernel_name,
    launch_error, multiprocessor_count,
};
use crate::ops::{Epilogue, OutputActivation};
use crate::{Error, Result};

/// The most rows of `x` the kernel takes (`GEMV_MAX_M` in gemv.cu).
pub(crate) const MAX_ROWS: usize = 8;

/// Output columns (weight rows) per warp of `gemv_*` (`GEMV_ROWS` in gemv.cu).
const ROWS_PER_WARP: usize = 2;
/// Output columns per block of `gemv_split_*` (`GEMV_SPLIT_ROWS` in gemv.cu).
const ROWS_PER_SPLIT_BLOCK: usize = 2;
/// Warps an SM holds at once on Hopper (and every architecture since Volta but Turing's 32).
const WARPS_PER_SM: usize = 64;
/// Threads per block of either form. On an H200 (`benches/cuda_gemv.rs`) 8 warps per block
/// suits the warp-per-row form on the lm head, and 4 the split form on every layer shape, which
/// then keeps up to 16 blocks resident per SM.
const WARP_FORM_THREADS: u32 = 256;
const SPLIT_FORM_THREADS: u32 = 128;

/// `bias_kind` values of the kernel.
const BIAS_NONE: i32 = 0;
const BIAS_F32: i32 = 1;
const BIAS_SAME: i32 = 2;

/// The kernel's `act` value for an epilogue activation (`ACT_*` in gemv.cu).
fn act_code(activation: OutputActivation) -> i32 {
    match activation {
        OutputActivation::Identity => 0,
        OutputActivation::Gelu => 1,
        OutputActivation::GeluTanh => 2,
        OutputActivation::SiluGate => 3,
    }
}

/// A second product summed into the first by [`gemv`]: `x [m, k] · w [n, k]ᵀ (+ bias [n])`,
/// contiguous, of the first product's dtype and device (checked by the caller).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SecondProduct<'a> {
    pub x: &'a Tensor,
    pub w: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub k: usize,
}

/// The kernel's `bias_kind` for `bias`, checked against the dtype and the rows it must have.
fn bias_kind_of(op: &'static str, bias: Option<&Tensor>, dtype: DType, rows: usize) -> Result<i32> {
    let Some(bias) = bias else {
        return Ok(BIAS_NONE);
    };
    expect_dtype(op, "bias", bias, &[dtype, DType::F32])?;
    expect_dims(op, "bias", bias, &[rows])?;
    Ok(if bias.dtype() == DType::F32 {
        BIAS_F32
    } else {
        BIAS_SAME
    })
}

/// The arguments of gemv.cu's split form (`GemvProblem` there, field for field): device
/// addresses of the operands (0 for those absent) and the sizes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GemvProblem {
    x: u64,
    w: u64,
    bias: u64,
    x2: u64,
    w2: u64,
    bias2: u64,
    addend: u64,
    out: u64,
    bias_kind: i32,
    bias2_kind: i32,
    act: i32,
    k2: u32,
    m: u32,
    n: u32,
    k: u32,
    blocks: u32,
}

// SAFETY: a plain #[repr(C)] struct of integers, laid out as gemv.cu's GemvProblem (eight
// 8-byte addresses, then eight 4-byte integers, no padding).
unsafe impl DeviceRepr for GemvProblem {}

/// One skinny product, checked: its kernel arguments, its output and how it is launched.
struct Checked {
    problem: GemvProblem,
    out: CudaStorage,
    /// The one-warp-per-rows form (`gemv_*`) rather than the block-split one.
    per_warp: bool,
    threads: u32,
}

/// One product of [`gemv`]: `x [m, k] · w [n, k]ᵀ (+ second) (+ bias [n])`, then `epilogue`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Product<'a> {
    pub x: &'a Tensor,
    pub w: &'a Tensor,
    pub second: Option<SecondProduct<'a>>,
    pub bias: Option<&'a Tensor>,
    pub epilogue: Epilogue<'a>,
    /// (m, n, k).
    pub sizes: (usize, usize, usize),
    /// The output shape (x's leading dimensions, then n).
    pub dims: &'a [usize],
}

/// The device address of a tensor's first element.
fn address(op: &'static str, name: &str, tensor: &Tensor, device: &CudaDevice) -> Result<u64> {
    let view = device_view(op, name, tensor)?;
    let (address, _sync) = view.device_ptr(device.stream());
    Ok(address)
}

fn optional_address(
    op: &'static str,
    name: &str,
    tensor: Option<&Tensor>,
    device: &CudaDevice,
) -> Result<u64> {
    tensor.map_or(Ok(0), |t| address(op, name, t, device))
}

/// Checks `product` and allocates its output.
fn check(op: &'static str, device: &CudaDevice, product: &Product<'_>) -> Result<Checked> {
    let Product {
        x,
        w,
        second,
        bias,
        epilogue,
        sizes: (m, n, k),
        dims,
    } = *product;
    if m == 0 || m > MAX_ROWS || n == 0 {
        return Err(Error::shape(
            op,
            format!(
                "the skinny product takes 1..={MAX_ROWS} rows and n >= 1, got m = {m}, n = {n}"
            ),
        ));
    }
    let dtype = x.dtype();
    let gated = epilogue.activation == OutputActivation::SiluGate;
    if gated && second.is_some() {
        return Err(Error::shape(op, "a gated product takes no second product"));
    }
    let weight_rows = if gated { 2 * n } else { n };
    if let Some(addend) = epilogue.addend {
        expect_dtype(op, "addend", addend, &[dtype])?;
        expect_dims(op, "addend", addend, dims)?;
    }
    let mut problem = GemvProblem {
        x: address(op, "x", x, device)?,
        w: address(op, "w", w, device)?,
        bias: optional_address(op, "bias", bias, device)?,
        addend: optional_address(op, "addend", epilogue.addend, device)?,
        bias_kind: bias_kind_of(op, bias, dtype, weight_rows)?,
        act: act_code(epilogue.activation),
        m: arg_u32(op, "m", m)?,
        n: arg_u32(op, "n", n)?,
        k: arg_u32(op, "k", k)?,
        ..GemvProblem::default()
    };
    if let Some(second) = second {
        problem.x2 = address(op, "x2", second.x, device)?;
        problem.w2 = address(op, "w2", second.w, device)?;
        problem.bias2 = optional_address(op, "bias2", second.bias, device)?;
        problem.bias2_kind = bias_kind_of(op, second.bias, dtype, n)?;
        problem.k2 = arg_u32(op, "k2", second.k)?;
    }

    // One warp per ROWS_PER_WARP rows only when that fills every SM with warps at least once;
    // narrower layers (every projection but the lm head) run the block-split form, whose blocks
    // split k among their warps so that n / 2 blocks still keep the whole GPU loading. Only
    // the split form has an epilogue.
    let sms = multiprocessor_count(op, device)?;
    let plain = epilogue.activation == OutputActivation::Identity
        && epilogue.addend.is_none()
        && second.is_none();
    let (per_warp, blocks, threads) = if plain && n.div_ceil(ROWS_PER_WARP) >= sms * WARPS_PER_SM {
        let rows_per_block = ROWS_PER_WARP * WARP_FORM_THREADS as usize / 32;
        (true, n.div_ceil(rows_per_block), WARP_FORM_THREADS)
    } else if gated {
        // One block per output: its gate row and its up row.
        (false, n, SPLIT_FORM_THREADS)
    } else {
        (false, n.div_ceil(ROWS_PER_SPLIT_BLOCK), SPLIT_FORM_THREADS)
    };
    problem.blocks = arg_u32(op, "blocks", blocks)?;
    let mut out = alloc_output(op, device, dtype, dims)?;
    problem.out = {
        let (address, _sync) = out.slice_mut().device_ptr_mut(device.stream());
        address
    };
    Ok(Checked {
        problem,
        out,
        per_warp,
        threads,
    })
}

/// `out [m, n] = x [m, k] · w [n, k]ᵀ (+ second.x · second.wᵀ) (+ bias [n])` with
/// `1 <= m <=` [`MAX_ROWS`], `n >= 1`, then `epilogue`; `x` and `w` are contiguous, on `device`,
/// of the float dtype `dtype` (checked by the caller), the bias f32 or `dtype`. With
/// [`OutputActivation::SiluGate`], `w` (and the bias) hold `2n` rows, gates then ups, and there
/// is no second product.
pub(crate) fn gemv(op: &'static str, device: &CudaDevice, product: Product<'_>) -> Result<Tensor> {
    let checked = check(op, device, &product)?;
    let p = checked.problem;
    let form = if checked.per_warp {
        "gemv"
    } else {
        "gemv_split"
    };
    let name = kernel_name(op, form, product.x.dtype())?;
    let kernel = function(device, KernelModule::Gemv, &name)?;
    let config = LaunchConfig {
        grid_dim: (p.blocks, 1, 1),
        block_dim: (checked.threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch.arg(&p.x).arg(&p.w).arg(&p.bias).arg(&p.bias_kind);
    if !checked.per_warp {
        launch
            .arg(&p.x2)
            .arg(&p.w2)
            .arg(&p.bias2)
            .arg(&p.bias2_kind)
            .arg(&p.k2)
            .arg(&p.addend)
            .arg(&p.act);
    }
    launch.arg(&p.out).arg(&p.m).arg(&p.n).arg(&p.k);
    // SAFETY: the arguments match gemv.cu's gemv (x, w, bias, bias_kind, out, m, n, k) or
    // gemv_split (x, w, bias, bias_kind, x2, w2, bias2, bias2_kind, k2, addend, act, out, m, n,
    // k), as `check` filled them from the operands the caller checked: x holds m x k, w
    // weight_rows x k, x2 m x k2 and w2 n x k2 (or k2 is 0 and they are unread), out (and the
    // addend, or 0) m x n elements of the dtype, each bias the elements of the kind its
    // bias_kind names (or 0 and unread); the tensors outlive the call, which only enqueues the
    // kernel on the stream every later use of them follows. The grid covers the n output
    // columns at the form's rows per warp or per block (one per block when gated, where the
    // kernel reads rows j and n + j), with at most 256 threads (GEMV_MAX_WARPS of the split
    // form).
    unsafe { launch.launch(config) }.map_err(|e| launch_error(op, &name, e))?;
    into_tensor(checked.out, product.dims)
}

/// Two independent products in one launch of `gemv_split_pair` (see gemv.cu): both in the
/// block-split form, of one dtype on one device, as [`gemv`] checks them.
pub(crate) fn gemv_pair(
    op: &'static str,
    device: &CudaDevice,
    a: Product<'_>,
    b: Product<'_>,
) -> Result<(Tensor, Tensor)> {
    if a.x.dtype() != b.x.dtype() {
        return Err(Error::dtype(
            op,
            format!(
                "both products need one dtype, got {} and {}",
                a.x.dtype(),
                b.x.dtype()
            ),
        ));
    }
    let (first, second) = (check(op, device, &a)?, check(op, device, &b)?);
    if first.per_warp || second.per_warp {
        // Outputs wide enough for the warp form fill the GPU on their own.
        return Ok((gemv(op, device, a)?, gemv(op, device, b)?));
    }
    let name = kernel_name(op, "gemv_split_pair", a.x.dtype())?;
    let kernel = function(device, KernelModule::Gemv, &name)?;
    let blocks = first
        .problem
        .blocks
        .checked_add(second.problem.blocks)
        .ok_or_else(|| Error::shape(op, "the two products need more blocks than a grid holds"))?;
    let config = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (SPLIT_FORM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch.arg(&first.problem).arg(&second.problem);
    // SAFETY: gemv_split_pair takes two GemvProblem structs, laid out as `GemvProblem` here,
    // each filled by `check` as for a gemv_split launch (see `gemv`), with their block counts;
    // the grid is the sum of both.
    unsafe { launch.launch(config) }.map_err(|e| launch_error(op, &name, e))?;
    Ok((
        into_tensor(first.out, a.dims)?,
        into_tensor(second.out, b.dims)?,
    ))
}
