use pagoda_tensor::CudaDevice;

use crate::{Error, Result};

pub fn copy_bandwidth(_device: &CudaDevice, _bytes: usize, _reps: usize) -> Result<f64> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}
