//! Every operator the pagoda models need. Each op has a CPU implementation in [`cpu`], written for
//! clarity: it is the oracle that the CUDA kernels are tested against.

pub mod cpu;
/// CUDA launchers, one per `kernels/<name>.cu`; without the `cuda` feature the same functions
/// exist and return [`pagoda_tensor::Error::CudaNotCompiled`].
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub/mod.rs"]
pub mod cuda;
mod error;
pub mod ops;
pub mod profile;

pub use error::{Error, Result};
