//! Launcher of `kernels/rope.cu`: rotary position embedding in the GPT-NeoX "rotate half" layout,
//! in place, with the cos/sin table of [`RopeTable`] kept on the device.
//!
//! Keys need no separate pass: [`rope_write_kv`](super::kv_write::rope_write_kv) rotates them while
//! writing them into the KV pages. [`apply_rope`] is for queries.

use pagoda_tensor::cudarc::driver::{LaunchConfig, PushKernelArg};
use pagoda_tensor::{CudaDevice, DType, Device, Tensor};

use super::registry::{KernelModule, function};
use super::tensor_access::{
    FLOAT_DTYPES, arg_u32, common_device, device_view, device_view_mut, dims_of, expect_dims,
    expect_dtype, kernel_name, launch_error,
};
use crate::cpu::rope::RopeTable;
use crate::{Error, Result};

/// A [`RopeTable`]'s cos and sin (f32, `[max_positions, rotary_dim / 2]`) on one CUDA device.
pub struct CudaRopeTable {
    cos: Tensor,
    sin: Tensor,
    rotary_dim: usize,
    max_positions: usize,
}

impl CudaRopeTable {
    /// Copies `table` to `device`.
    pub fn new(table: &RopeTable, device: &CudaDevice) -> Result<Self> {
        let dims = [table.max_positions(), table.rotary_dim() / 2];
        let upload = |values: &[f32]| -> Result<Tensor> {
            Ok(Tensor::from_slice(values, dims.to_vec())?
                .to_device(&Device::Cuda(device.ordinal()))?)
        };
        Ok(CudaRopeTable {
            cos: upload(table.cos())?,
            sin: upload(table.sin())?,
            rotary_dim: table.rotary_dim(),
            max_positions: table.max_positions(),
        })
    }

    /// Leading dimensions of each head that are rotated.
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    /// Positions the table covers: `0..max_positions`.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// `cos(position * inv_freq[i])`, f32 `[max_positions, rotary_dim / 2]`.
    pub fn cos(&self) -> &Tensor {
        &self.cos
    }

    /// `sin(position * inv_freq[i])`, f32 `[max_positions, rotary_dim / 2]`.
    pub fn sin(&self) -> &Tensor {
        &self.sin
    }

    /// Checks that the table fits heads of `head_dim` and returns the kernel's
    /// `(rotary_dim, max_positions)` arguments.
    pub(crate) fn kernel_args(&self, op: &'static str, head_dim: usize) -> Result<(u32, u32)> {
        if self.rotary_dim > head_dim {
            return Err(Error::shape(
                op,
                format!("rotary_dim {} exceeds head_dim {head_dim}", self.rotary_dim),
            ));
        }
        Ok((
            arg_u32(op, "rotary_dim", self.rotary_dim)?,
            arg_u32(op, "max_positions", self.max_positions)?,
        ))
    }
}

/// Rotates dimensions `[0, rotary_dim)` of every head of token `t` of `x` (`[tokens, heads,
/// head_dim]`, f32/f16/bf16, rotated in place, math in f32) by the angles of position
/// `positions[t]` (U32 `[tokens]`), as [`crate::cpu::rope::apply_rope`] does.
///
/// The positions stay on the device and are not checked here: a position at or past the table's
/// `max_positions` sets that token's rotated dimensions to NaN.
pub fn apply_rope(x: &mut Tensor, positions: &Tensor, table: &CudaRopeTable) -> Result<()> {
    const OP: &str = "apply_rope";
    let device = common_device(
        OP,
        &[("x", x), ("positions", positions), ("table", &table.cos)],
    )?;
    expect_dtype(OP, "x", x, &FLOAT_DTYPES)?;
    expect_dtype(OP, "positions", positions, &[DType::U32])?;
    let [tokens, heads, head_dim] = dims_of(OP, "x", x)?;
    expect_dims(OP, "positions", positions, &[tokens])?;
    let (rotary_dim, max_positions) = table.kernel_args(OP, head_dim)?;
    let pairs = heads * (table.rotary_dim / 2);
    if tokens == 0 || pairs == 0 {
        return Ok(());
    }
    let (tokens_arg, heads_arg, head_dim_arg) = (
        arg_u32(OP, "tokens", tokens)?,
        arg_u32(OP, "heads", heads)?,
        arg_u32(OP, "head_dim", head_dim)?,
    );
    arg_u32(OP, "heads x head_dim", heads * head_dim)?;
    let name = kernel_name(OP, "apply_rope", x.dtype())?;
    let kernel = function(&device, KernelModule::Rope, &name)?;
    let config = LaunchConfig {
        grid_dim: (tokens_arg.min(i32::MAX as u32), 1, 1),
        block_dim: (pairs.next_multiple_of(32).min(256) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let positions_view = device_view(OP, "positions", positions)?;
    let cos = device_view(OP, "cos", &table.cos)?;
    let sin = device_view(OP, "sin", &table.sin)?;
    let mut x_view = device_view_mut(OP, "x", x)?;
    let stream = device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch
        .arg(&mut x_view)
        .arg(&positions_view)
        .arg(&cos)
        .arg(&sin)
        .arg(&tokens_arg)
        .arg(&heads_arg)
        .arg(&head_dim_arg)
        .arg(&rotary_dim)
        .arg(&max_positions);
    // SAFETY: the arguments follow apply_rope's signature in rope.cu (x, positions, cos, sin,
    // tokens, heads, head_dim, rotary_dim, max_positions); x holds tokens x heads x head_dim
    // elements of the kernel name's dtype, positions `tokens` u32 values, cos and sin
    // max_positions x rotary_dim / 2 f32 values, and the kernel reads the table only at positions
    // below max_positions.
    unsafe { launch.launch(config) }.map_err(|e| launch_error(OP, &name, e))?;
    Ok(())
}
