//! Launchers of `kernels/norm.cu`: RMSNorm and LayerNorm over the last dimension, plain and
//! fused with the residual add that precedes them (`residual += x; out = norm(residual)`), one
//! kernel instead of an add kernel and a norm kernel, each reading the row once more.
//!
//! Activations are f32, f16 or bf16; the weight (and LayerNorm's bias) is f32 or the
//! activations' dtype. Statistics are computed in f32 on the values as stored.

use pagoda_tensor::cudarc::driver::{LaunchConfig, PushKernelArg};
use pagoda_tensor::{CudaDevice, DType, Tensor};

use super::registry::{KernelModule, function};
use super::tensor_access::{
    FLOAT_DTYPES, alloc_output, arg_u32, common_device, device_view, device_view_mut, dtype_suffix,
    expect_dims, expect_dtype, expect_same_dtype, into_tensor, launch_error,
};
use crate::{Error, Result};

/// `x / sqrt(mean(x²) + eps) * weight` over the last dimension of `x`; same shape and dtype as `x`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let norm = Norm::check("rms_norm", x, None, weight, None, eps)?;
    norm.launch("rms_norm", x, None, weight, None)
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension of `x`, with the
/// biased variance (as `torch.nn.LayerNorm`); same shape and dtype as `x`. `bias` has the
/// weight's dtype.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    let norm = Norm::check("layer_norm", x, None, weight, Some(bias), eps)?;
    norm.launch("layer_norm", x, None, weight, Some(bias))
}

/// `residual += x` in place (rounded to the residual's dtype), then returns
/// [`rms_norm`]`(residual, weight, eps)`, in one kernel. `residual` must have `x`'s shape and
/// dtype and must not share its storage with another tensor.
pub fn add_rms_norm(
    x: &Tensor,
    residual: &mut Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let norm = Norm::check("add_rms_norm", x, Some(residual), weight, None, eps)?;
    norm.launch("add_rms_norm", x, Some(residual), weight, None)
}

/// `residual += x` in place (rounded to the residual's dtype), then returns
/// [`layer_norm`]`(residual, weight, bias, eps)`, in one kernel.
pub fn add_layer_norm(
    x: &Tensor,
    residual: &mut Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let norm = Norm::check("add_layer_norm", x, Some(residual), weight, Some(bias), eps)?;
    norm.launch("add_layer_norm", x, Some(residual), weight, Some(bias))
}

/// [`add_layer_norm`] with a second weight and bias: `residual += x`, then the LayerNorm of the
/// new residual under each `(weight, bias)` pair (same `eps`), in one kernel - the two norms a
/// parallel-residual block takes of one residual stream.
pub fn add_layer_norm_dual(
    x: &Tensor,
    residual: &mut Tensor,
    (weight, bias): (&Tensor, &Tensor),
    (weight2, bias2): (&Tensor, &Tensor),
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "add_layer_norm_dual";
    let norm = Norm::check(OP, x, Some(residual), weight, Some(bias), eps)?;
    Norm::check(OP, x, None, weight2, Some(bias2), eps)?;
    expect_same_dtype(OP, "weight2", weight2, "weight", weight.dtype())?;
    let dims = x.dims().to_vec();
    let mut out = alloc_output(OP, &norm.device, x.dtype(), &dims)?;
    let mut out2 = alloc_output(OP, &norm.device, x.dtype(), &dims)?;
    if norm.rows > 0 {
        let (Some(x_suffix), Some(w_suffix)) =
            (dtype_suffix(x.dtype()), dtype_suffix(weight.dtype()))
        else {
            return Err(Error::dtype(OP, "x and weight must be float tensors"));
        };
        let name = format!("{OP}_{x_suffix}_{w_suffix}");
        let kernel = function(&norm.device, KernelModule::Norm, &name)?;
        let x_view = device_view(OP, "x", x)?;
        let mut residual_view = device_view_mut(OP, "residual", residual)?;
        let params = [
            device_view(OP, "weight", weight)?,
            device_view(OP, "bias", bias)?,
            device_view(OP, "weight2", weight2)?,
            device_view(OP, "bias2", bias2)?,
        ];
        let hidden = norm.hidden as u32;
        let config = LaunchConfig {
            grid_dim: (norm.rows as u32, 1, 1),
            block_dim: (threads_per_row(norm.hidden), 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = norm.device.stream();
        let mut launch = stream.launch_builder(&kernel);
        launch
            .arg(&x_view)
            .arg(&mut residual_view)
            .arg(&params[0])
            .arg(&params[1])
            .arg(out.slice_mut())
            .arg(&params[2])
            .arg(&params[3])
            .arg(out2.slice_mut())
            .arg(&hidden)
            .arg(&norm.eps);
        // SAFETY: the argument list matches add_layer_norm_dual's signature in norm.cu (x,
        // residual, weight, bias, out, weight2, bias2, out2, hidden, eps); x, residual and both
        // outputs hold rows x hidden elements of x's dtype, the weights and biases hidden
        // elements of the weight dtype the kernel name says, as checked above; one block per row.
        unsafe { launch.launch(config) }.map_err(|e| launch_error(OP, &name, e))?;
    }
    Ok((into_tensor(out, &dims)?, into_tensor(out2, &dims)?))
}

/// The checked geometry of one norm call.
struct Norm {
    device: CudaDevice,
    rows: usize,
    hidden: usize,
    eps: f32,
}

/// Threads per row: one per 8-element vector (the kernels' vector width), in whole warps, at
/// most 1024. Rows that cannot be vectorised loop over the same threads.
fn threads_per_row(hidden: usize) -> u32 {
    const VECTOR_WIDTH: usize = 8;
    let threads = hidden
        .div_ceil(VECTOR_WIDTH)
        .next_multiple_of(32)
        .clamp(32, 1024);
    threads as u32
}

impl Norm {
    fn check(
        op: &'static str,
        x: &Tensor,
        residual: Option<&Tensor>,
        weight: &Tensor,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Norm> {
        let mut tensors = vec![("x", x), ("weight", weight)];
        tensors.extend(residual.map(|r| ("residual", r)));
        tensors.extend(bias.map(|b| ("bias", b)));
        let device = common_device(op, &tensors)?;

        expect_dtype(op, "x", x, &FLOAT_DTYPES)?;
        expect_dtype(op, "weight", weight, &[x.dtype(), DType::F32])?;
        let Some((&hidden, outer)) = x.dims().split_last() else {
            return Err(Error::shape(op, "x must have at least one dimension"));
        };
        if hidden == 0 {
            return Err(Error::shape(
                op,
                "the normalised (last) dimension of x is empty",
            ));
        }
        expect_dims(op, "weight", weight, &[hidden])?;
        if let Some(residual) = residual {
            expect_same_dtype(op, "residual", residual, "x", x.dtype())?;
            expect_dims(op, "residual", residual, x.dims())?;
        }
        if let Some(bias) = bias {
            expect_same_dtype(op, "bias", bias, "weight", weight.dtype())?;
            expect_dims(op, "bias", bias, &[hidden])?;
        }
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::InvalidParameter {
                op,
                message: format!("eps must be finite and >= 0, got {eps}"),
            });
        }
        let rows = outer.iter().product();
        arg_u32(op, "rows", rows)?;
        arg_u32(op, "hidden", hidden)?;
        Ok(Norm {
            device,
            rows,
            hidden,
            eps,
        })
    }

    fn launch(
        &self,
        op: &'static str,
        x: &Tensor,
        residual: Option<&mut Tensor>,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let mut out = alloc_output(op, &self.device, x.dtype(), &dims)?;
        if self.rows == 0 {
            return into_tensor(out, &dims);
        }
        let (Some(x_suffix), Some(w_suffix)) =
            (dtype_suffix(x.dtype()), dtype_suffix(weight.dtype()))
        else {
            return Err(Error::dtype(op, "x and weight must be float tensors"));
        };
        let name = format!("{op}_{x_suffix}_{w_suffix}");
        let kernel = function(&self.device, KernelModule::Norm, &name)?;
        let x_view = device_view(op, "x", x)?;
        let weight_view = device_view(op, "weight", weight)?;
        let bias_view = bias.map(|b| device_view(op, "bias", b)).transpose()?;
        let mut residual_view = residual
            .map(|r| device_view_mut(op, "residual", r))
            .transpose()?;
        let hidden = self.hidden as u32;
        let config = LaunchConfig {
            grid_dim: (self.rows as u32, 1, 1),
            block_dim: (threads_per_row(self.hidden), 1, 1),
            shared_mem_bytes: 0,
        };

        let stream = self.device.stream();
        let out_slice = out.slice_mut();
        let mut launch = stream.launch_builder(&kernel);
        launch.arg(&x_view);
        if let Some(residual) = residual_view.as_mut() {
            launch.arg(residual);
        }
        launch.arg(&weight_view);
        if let Some(bias) = bias_view.as_ref() {
            launch.arg(bias);
        }
        launch.arg(out_slice).arg(&hidden).arg(&self.eps);
        // SAFETY: the argument list matches the kernel's signature in norm.cu
        // (x, [residual], weight, [bias], out, hidden, eps); every buffer holds rows x hidden
        // (or hidden) elements of the dtype the kernel name says, as checked above, and the grid
        // has one block per row.
        unsafe { launch.launch(config) }.map_err(|e| launch_error(op, &name, e))?;
        into_tensor(out, &dims)
    }
}
