//! Launchers of `kernels/activation.cu`: GELU (exact or tanh-approximated), the SwiGLU gate
//! `silu(gate) * up`, and elementwise `add`; f32, f16 or bf16 tensors of any shape, math in f32.
//!
//! Also the row broadcast [`gemm`](super::gemm) uses to seed an output with its bias.

use pagoda_tensor::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use pagoda_tensor::{CudaDevice, DType, Tensor};

use super::registry::{KernelModule, function};
use super::tensor_access::{
    FLOAT_DTYPES, alloc_output, arg_u32, common_device, device_view, dtype_suffix, expect_dims,
    expect_dtype, expect_same_dtype, into_tensor, kernel_name, launch_error,
};
use crate::{Error, Result};

/// Threads per block of the elementwise kernels.
const THREADS: u32 = 256;

/// Elements one thread handles per step when the data is aligned (the kernels' VEC_WIDTH).
const VECTOR_WIDTH: usize = 8;

/// Blocks enough for one vector per thread, capped: the kernels loop over what is left, and
/// past a few waves more blocks only add scheduling work.
fn grid_for(elements: usize) -> u32 {
    const MAX_BLOCKS: usize = 1 << 16;
    elements
        .div_ceil(VECTOR_WIDTH)
        .div_ceil(THREADS as usize)
        .clamp(1, MAX_BLOCKS) as u32
}

/// GELU of every element: `0.5 x (1 + erf(x / √2))`, or with `tanh_approximation` the tanh form
/// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`. Same shape and dtype as `x`.
pub fn gelu(x: &Tensor, tanh_approximation: bool) -> Result<Tensor> {
    let base = if tanh_approximation {
        "gelu_tanh"
    } else {
        "gelu"
    };
    elementwise("gelu", base, &[("x", x)])
}

/// `silu(gate) * up` elementwise, `silu(g) = g / (1 + e^-g)`: Llama's gated MLP. `gate` and
/// `up` have the same shape and dtype, which the result has too.
pub fn silu_and_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    elementwise(
        "silu_and_mul",
        "silu_and_mul",
        &[("gate", gate), ("up", up)],
    )
}

/// `a + b` elementwise; same shapes and dtypes.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    elementwise("add", "add", &[("a", a), ("b", b)])
}

/// Launches `<base>_<dtype>(inputs..., out, n)` over tensors of one shape and dtype.
fn elementwise(op: &'static str, base: &str, inputs: &[(&str, &Tensor)]) -> Result<Tensor> {
    let device = common_device(op, inputs)?;
    let (first_name, first) = inputs[0];
    expect_dtype(op, first_name, first, &FLOAT_DTYPES)?;
    for &(name, tensor) in &inputs[1..] {
        expect_same_dtype(op, name, tensor, first_name, first.dtype())?;
        expect_dims(op, name, tensor, first.dims())?;
    }
    let dims = first.dims().to_vec();
    let len = first.elem_count();
    let mut out = alloc_output(op, &device, first.dtype(), &dims)?;
    if len == 0 {
        return into_tensor(out, &dims);
    }
    let name = kernel_name(op, base, first.dtype())?;
    let kernel = function(&device, KernelModule::Activation, &name)?;
    let views = inputs
        .iter()
        .map(|&(n, t)| device_view(op, n, t))
        .collect::<Result<Vec<_>>>()?;
    let n = len as u64;
    let config = LaunchConfig {
        grid_dim: (grid_for(len), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = device.stream();
    let mut launch = stream.launch_builder(&kernel);
    for view in &views {
        launch.arg(view);
    }
    launch.arg(out.slice_mut()).arg(&n);
    // SAFETY: the kernel takes (inputs..., out, n) with every buffer holding n elements of the
    // dtype its name says, as checked above; it loops over n with a grid-stride loop.
    unsafe { launch.launch(config) }.map_err(|e| launch_error(op, &name, e))?;
    into_tensor(out, &dims)
}

/// Writes `row` (of `cols` elements, f32 or `dtype`) into each of the `rows` rows of `out`, a
/// buffer of at least `rows * cols` elements of `dtype` on `device`.
pub(crate) fn broadcast_rows(
    op: &'static str,
    device: &CudaDevice,
    row: &Tensor,
    out: &mut CudaSlice<u8>,
    dtype: DType,
    rows: usize,
    cols: usize,
) -> Result<()> {
    expect_dtype(op, "bias", row, &[dtype, DType::F32])?;
    expect_dims(op, "bias", row, &[cols])?;
    let elements = rows
        .checked_mul(cols)
        .ok_or_else(|| Error::shape(op, format!("{rows} x {cols} overflows usize")))?;
    if elements == 0 {
        return Ok(());
    }
    let (Some(out_suffix), Some(row_suffix)) = (dtype_suffix(dtype), dtype_suffix(row.dtype()))
    else {
        return Err(Error::dtype(op, "bias broadcast needs float tensors"));
    };
    let name = format!("broadcast_rows_{out_suffix}_{row_suffix}");
    let kernel = function(device, KernelModule::Activation, &name)?;
    let row_view = device_view(op, "bias", row)?;
    let (rows, cols) = (arg_u32(op, "rows", rows)?, arg_u32(op, "cols", cols)?);
    let config = LaunchConfig {
        grid_dim: (grid_for(elements * VECTOR_WIDTH), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch.arg(&row_view).arg(out).arg(&rows).arg(&cols);
    // SAFETY: (row, out, rows, cols) matches the kernel; `row` holds `cols` elements and the
    // caller's `out` at least rows x cols elements of `dtype`.
    unsafe { launch.launch(config) }.map_err(|e| launch_error(op, &name, e))?;
    Ok(())
}
