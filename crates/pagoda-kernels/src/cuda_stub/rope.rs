//! Without the `cuda` feature: the signatures of `cuda::rope`, each failing with
//! [`pagoda_tensor::Error::CudaNotCompiled`]; a [`CudaRopeTable`] cannot be built.

use pagoda_tensor::{CudaDevice, Tensor};

use crate::cpu::rope::RopeTable;
use crate::{Error, Result};

/// Uninhabited: no value of the stub types can exist.
#[derive(Clone, Copy, Debug)]
enum Never {}

/// A RoPE cos/sin table on a CUDA device; cannot be built without the `cuda` feature.
pub struct CudaRopeTable {
    never: Never,
}

impl CudaRopeTable {
    /// Always fails without the `cuda` feature.
    pub fn new(_table: &RopeTable, _device: &CudaDevice) -> Result<Self> {
        Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
    }

    /// Leading dimensions of each head that are rotated.
    pub fn rotary_dim(&self) -> usize {
        match self.never {}
    }

    /// Positions the table covers: `0..max_positions`.
    pub fn max_positions(&self) -> usize {
        match self.never {}
    }

    /// The cos table, f32 `[max_positions, rotary_dim / 2]`.
    pub fn cos(&self) -> &Tensor {
        match self.never {}
    }

    /// The sin table, f32 `[max_positions, rotary_dim / 2]`.
    pub fn sin(&self) -> &Tensor {
        match self.never {}
    }
}

/// RoPE in place on the GPU; always fails without the `cuda` feature.
pub fn apply_rope(_x: &mut Tensor, _positions: &Tensor, _table: &CudaRopeTable) -> Result<()> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}
