//! Without the `cuda` feature: the signatures of `cuda::softmax`, failing with
//! [`pagoda_tensor::Error::CudaNotCompiled`] where a device is needed.

use pagoda_tensor::Tensor;

use crate::{Error, Result};

/// How a row is spread over the GPU (see the `cuda` build).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftmaxForm {
    Held {
        blocks: usize,
        per_thread: usize,
    },
    Online {
        threads: u32,
    },
    Streamed {
        blocks: usize,
        stages: usize,
        threads: u32,
    },
}

/// Softmax over the last dimension on the GPU; always fails without the `cuda` feature.
pub fn softmax_rows(_x: &Tensor) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// Softmax through a given form; always fails without the `cuda` feature.
pub fn softmax_rows_with(_x: &Tensor, _form: SoftmaxForm) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}
