//! Without the `cuda` feature: the signature of `cuda::embedding`, failing with
//! [`pagoda_tensor::Error::CudaNotCompiled`].

use pagoda_tensor::Tensor;

use crate::{Error, Result};

/// Embedding gather on the GPU; always fails without the `cuda` feature.
pub fn embedding(_table: &Tensor, _ids: &Tensor) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}
