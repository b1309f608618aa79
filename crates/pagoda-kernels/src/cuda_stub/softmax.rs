//! Without the `cuda` feature: the signature of `cuda::softmax`, failing with
//! [`pagoda_tensor::Error::CudaNotCompiled`].

use pagoda_tensor::Tensor;

use crate::{Error, Result};

/// Softmax over the last dimension on the GPU; always fails without the `cuda` feature.
pub fn softmax_rows(_x: &Tensor) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}
