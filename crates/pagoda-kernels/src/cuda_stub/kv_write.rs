//! Without the `cuda` feature: the signatures of `cuda::kv_write`, each failing with
//! [`pagoda_tensor::Error::CudaNotCompiled`].

use pagoda_tensor::Tensor;

use super::rope::CudaRopeTable;
use crate::{Error, Result};

/// Writing K/V into pages on the GPU; always fails without the `cuda` feature.
pub fn write_kv(
    _k: &Tensor,
    _v: &Tensor,
    _slots: &Tensor,
    _k_pages: &mut Tensor,
    _v_pages: &mut Tensor,
) -> Result<()> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// RoPE on K fused with writing K/V into pages on the GPU; always fails without the `cuda` feature.
#[allow(clippy::too_many_arguments)]
pub fn rope_write_kv(
    _k: &Tensor,
    _v: &Tensor,
    _positions: &Tensor,
    _slots: &Tensor,
    _table: &CudaRopeTable,
    _k_pages: &mut Tensor,
    _v_pages: &mut Tensor,
) -> Result<()> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// RoPE on Q and K fused with writing K/V into pages on the GPU; always fails without the
/// `cuda` feature.
#[allow(clippy::too_many_arguments)]
pub fn rope_qk_write_kv(
    _q: &Tensor,
    _k: &Tensor,
    _v: &Tensor,
    _positions: &Tensor,
    _slots: &Tensor,
    _table: &CudaRopeTable,
    _k_pages: &mut Tensor,
    _v_pages: &mut Tensor,
) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}
