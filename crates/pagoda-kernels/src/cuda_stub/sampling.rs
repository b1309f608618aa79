//! Without the `cuda` feature: the signatures of `cuda::sampling`, each failing with
//! [`pagoda_tensor::Error::CudaNotCompiled`]; [`DeviceSamplingParams`] cannot be built.

use pagoda_tensor::{CudaDevice, Tensor};

use crate::cpu::sampling::{Penalties, SamplingConfig};
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

/// The most top tokens `logprobs` reports per row.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Per-row penalties on a CUDA device; cannot be built without the `cuda` feature.
pub struct DevicePenalties {
    never: Never,
}

impl DevicePenalties {
    /// Always fails without the `cuda` feature.
    pub fn new(
        _rows: &[(Penalties, &[u32], &[u32])],
        _vocab: usize,
        _device: &CudaDevice,
    ) -> Result<Self> {
        Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
    }

    /// The number of rows these penalties are for.
    pub fn rows(&self) -> usize {
        match self.never {}
    }

    /// Whether any row has a token to penalise.
    pub fn any(&self) -> bool {
        match self.never {}
    }
}

/// Penalties on the GPU; always fails without the `cuda` feature.
pub fn apply_penalties(_logits: &Tensor, _penalties: &DevicePenalties) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// What `logprobs` found, on the device.
pub struct DeviceLogprobs {
    pub chosen: Tensor,
    pub top_ids: Tensor,
    pub top_logprobs: Tensor,
}

/// Logprobs on the GPU; always fails without the `cuda` feature.
pub fn logprobs(
    _logits: &Tensor,
    _rows: &Tensor,
    _tokens: &Tensor,
    _top_n: usize,
) -> Result<DeviceLogprobs> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}
