//! Without the `cuda` feature: the signatures of `cuda::sampling`, each failing with
//! [`pagoda_tensor::Error::CudaNotCompiled`]; [`DeviceSamplingParams`] cannot be built.

use pagoda_tensor::{CudaDevice, Tensor};

use crate::cpu::sampling::SamplingConfig;
use crate::{Error, Result};

/// The token id the CUDA sampler writes for a row that has no token to give.
pub const NO_TOKEN: u32 = u32::MAX;

/// Uninhabited: no value of the stub types can exist.
#[derive(Clone, Copy, Debug)]
enum Never {}

/// Per-row sampling settings on a CUDA device; cannot be built without the `cuda` feature.
pub struct DeviceSamplingParams {
    never: Never,
}

impl DeviceSamplingParams {
    /// Always fails without the `cuda` feature.
    pub fn new(_configs: &[SamplingConfig], _device: &CudaDevice) -> Result<Self> {
        Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
    }

    /// Always fails without the `cuda` feature.
    pub fn shared(_config: &SamplingConfig, _rows: usize, _device: &CudaDevice) -> Result<Self> {
        Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
    }

    /// The number of rows these settings are for.
    pub fn rows(&self) -> usize {
        match self.never {}
    }
}

/// Argmax per row on the GPU; always fails without the `cuda` feature.
pub fn argmax(_logits: &Tensor) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// Sampling per row on the GPU; always fails without the `cuda` feature.
pub fn sample(
    _logits: &Tensor,
    _params: &DeviceSamplingParams,
    _uniforms: &Tensor,
) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}
