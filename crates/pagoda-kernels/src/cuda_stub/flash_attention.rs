//! Without the `cuda` feature: the signatures of `cuda::flash_attention`, failing with
//! [`pagoda_tensor::Error::CudaNotCompiled`]; no dtype or head dimension is supported.

use pagoda_tensor::{CudaDevice, DType, Tensor};

use crate::cpu::attention::AttentionParams;
use crate::cuda::paged_attention::DeviceBatchLayout;
use crate::{Error, Result};

/// How the CUDA kernel cuts the work (see the CUDA build's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileShape {
    /// The head dimension the shape is compiled for.
    pub head_dim: usize,
    /// 16-row MMA blocks per warp.
    pub m_reps: usize,
    /// Warps per thread block.
    pub warps: usize,
    /// Keys per K/V tile.
    pub block_n: usize,
    /// How a thread block orders its copies and MMAs.
    pub schedule: Schedule,
}

/// The order in which the CUDA kernel issues copies and MMAs (see the CUDA build's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Schedule {
    /// The next tile's copies first.
    LoadsFirst,
    /// The next tile's copies after this tile's score MMAs.
    LoadsLate,
    /// The next tile's score MMAs before this tile's softmax.
    Pipelined,
    /// Warpgroup MMAs (sm_90a).
    Wgmma,
}

impl Schedule {
    /// Whether the schedule runs on warpgroup MMAs, which only an `sm_90a` build has.
    pub fn needs_sm90a(self) -> bool {
        matches!(self, Schedule::Wgmma)
    }
}

/// No kernel is compiled without the `cuda` feature.
pub const TILE_SHAPES: &[TileShape] = &[];

/// Always `None` without the `cuda` feature.
pub fn default_tile_shape(_head_dim: usize, _sm90a: bool) -> Option<TileShape> {
    None
}

/// Always fails without the `cuda` feature.
pub fn sm90a_available(_device: &CudaDevice) -> Result<bool> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// Always false without the `cuda` feature.
pub fn supports(_dtype: DType, _head_dim: usize) -> bool {
    false
}

/// Flash attention on the GPU; always fails without the `cuda` feature.
pub fn flash_attention_prefill(
    _q: &Tensor,
    _layout: &DeviceBatchLayout,
    _params: &AttentionParams,
    _k_pages: &Tensor,
    _v_pages: &Tensor,
    _causal: bool,
) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// Flash attention with a chosen tile shape; always fails without the `cuda` feature.
pub fn flash_attention_prefill_with(
    _q: &Tensor,
    _layout: &DeviceBatchLayout,
    _params: &AttentionParams,
    _k_pages: &Tensor,
    _v_pages: &Tensor,
    _causal: bool,
    _shape: TileShape,
) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}
