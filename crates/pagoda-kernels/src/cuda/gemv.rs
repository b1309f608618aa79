//! Launcher of `kernels/gemv.cu`: `x · wᵀ (+ bias)` for a few rows of `x`, the decode-time
//! shape of every linear layer. [`super::gemm::linear`] sends products with at most
//! [`MAX_ROWS`] rows here: they are bound by reading the weights once, and one kernel launch
//! costs the host far less than a cuBLAS call.

use pagoda_tensor::cudarc::driver::sys::CUdevice_attribute;
use pagoda_tensor::cudarc::driver::{LaunchConfig, PushKernelArg};
use pagoda_tensor::{CudaDevice, DType, Tensor};

use super::registry::{KernelModule, function};
use super::tensor_access::{
    alloc_output, arg_u32, device_view, expect_dims, expect_dtype, into_tensor, kernel_name,
    launch_error,
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

/// `k2` of a launch without a second product.
const NO_SECOND_PRODUCT: u32 = 0;

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

/// `out [m, n] = x [m, k] · w [n, k]ᵀ (+ second.x · second.wᵀ) (+ bias [n])` with
/// `1 <= m <=` [`MAX_ROWS`], `n >= 1`, then `epilogue`; `x` and `w` are contiguous, on `device`,
/// of the float dtype `dtype` (checked by the caller), the bias f32 or `dtype`. With
/// [`OutputActivation::SiluGate`], `w` (and the bias) hold `2n` rows, gates then ups, and there
/// is no second product. `dims` is the output shape (x's leading dimensions, then n).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemv(
    op: &'static str,
    device: &CudaDevice,
    x: &Tensor,
    w: &Tensor,
    second: Option<SecondProduct<'_>>,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
    (m, n, k): (usize, usize, usize),
    dims: &[usize],
) -> Result<Tensor> {
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
    let bias_kind = bias_kind_of(op, bias, dtype, weight_rows)?;
    if let Some(addend) = epilogue.addend {
        expect_dtype(op, "addend", addend, &[dtype])?;
        expect_dims(op, "addend", addend, dims)?;
    }
    let x_view = device_view(op, "x", x)?;
    let w_view = device_view(op, "w", w)?;
    let second_views = second
        .map(|s| -> Result<_> {
            Ok((
                device_view(op, "x2", s.x)?,
                device_view(op, "w2", s.w)?,
                s.bias.map(|b| device_view(op, "bias2", b)).transpose()?,
                bias_kind_of(op, s.bias, dtype, n)?,
                arg_u32(op, "k2", s.k)?,
            ))
        })
        .transpose()?;
    let bias_view = bias.map(|b| device_view(op, "bias", b)).transpose()?;
    let addend_view = epilogue
        .addend
        .map(|a| device_view(op, "addend", a))
        .transpose()?;
    let (m_arg, n_arg, k_arg) = (
        arg_u32(op, "m", m)?,
        arg_u32(op, "n", n)?,
        arg_u32(op, "k", k)?,
    );

    // One warp per ROWS_PER_WARP rows only when that fills every SM with warps at least once;
    // narrower layers (every projection but the lm head) run the block-split form, whose blocks
    // split k among their warps so that n / 2 blocks still keep the whole GPU loading. Only
    // the split form has an epilogue.
    let sms = device
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| Error::cuda(op, format!("querying the SM count: {e}")))?;
    let sms = usize::try_from(sms).unwrap_or(1).max(1);
    let plain = epilogue.activation == OutputActivation::Identity
        && epilogue.addend.is_none()
        && second.is_none();
    let (form, blocks, threads) = if plain && n.div_ceil(ROWS_PER_WARP) >= sms * WARPS_PER_SM {
        let rows_per_block = ROWS_PER_WARP * WARP_FORM_THREADS as usize / 32;
        ("gemv", n.div_ceil(rows_per_block), WARP_FORM_THREADS)
    } else if gated {
        // One block per output: its gate row and its up row.
        ("gemv_split", n, SPLIT_FORM_THREADS)
    } else {
        (
            "gemv_split",
            n.div_ceil(ROWS_PER_SPLIT_BLOCK),
            SPLIT_FORM_THREADS,
        )
    };
    let name = kernel_name(op, form, dtype)?;
    let kernel = function(device, KernelModule::Gemv, &name)?;
    let config = LaunchConfig {
        grid_dim: (arg_u32(op, "blocks", blocks)?, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };

    let mut out = alloc_output(op, device, dtype, dims)?;
    let stream = device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch.arg(&x_view).arg(&w_view);
    // Without a bias the kernel never reads the pointer; x stands in for it.
    match bias_view.as_ref() {
        Some(bias) => launch.arg(bias),
        None => launch.arg(&x_view),
    };
    launch.arg(&bias_kind);
    // The kernel tests the addend pointer against null.
    let no_addend: u64 = 0;
    let act = act_code(epilogue.activation);
    if form == "gemv_split" {
        // k2 = 0 leaves x2, w2 and bias2 unread (as bias_kind 0 leaves bias2); x and w stand
        // in for them.
        match second_views.as_ref() {
            Some((x2, w2, bias2, bias2_kind, k2)) => {
                launch.arg(x2).arg(w2);
                match bias2 {
                    Some(bias2) => launch.arg(bias2),
                    None => launch.arg(x2),
                };
                launch.arg(bias2_kind).arg(k2)
            }
            None => launch
                .arg(&x_view)
                .arg(&w_view)
                .arg(&x_view)
                .arg(&BIAS_NONE)
                .arg(&NO_SECOND_PRODUCT),
        };
        match addend_view.as_ref() {
            Some(addend) => launch.arg(addend),
            None => launch.arg(&no_addend),
        };
        launch.arg(&act);
    }
    launch
        .arg(out.slice_mut())
        .arg(&m_arg)
        .arg(&n_arg)
        .arg(&k_arg);
    // SAFETY: the arguments match gemv.cu's gemv (x, w, bias, bias_kind, out, m, n, k) or
    // gemv_split (x, w, bias, bias_kind, x2, w2, bias2, bias2_kind, k2, addend, act, out, m, n,
    // k); x holds m x k, w weight_rows x k, x2 m x k2, w2 n x k2 and bias2 n elements of the
    // kind bias2_kind names (or k2 is 0 and they are unread), out (and the addend, or null)
    // m x n elements of `dtype`, the bias
    // weight_rows elements of the kind `bias_kind` names (or is unread), as checked here and by
    // the caller; the grid covers the n output columns at the form's rows per warp or per block
    // (one per block when gated, where the kernel reads rows j and n + j), with at most 256
    // threads (GEMV_MAX_WARPS of the split form).
    unsafe { launch.launch(config) }.map_err(|e| launch_error(op, &name, e))?;
    into_tensor(out, dims)
}
