//! Every operator the pagoda models need. Each op has a CPU implementation in [`cpu`], written for
//! clarity: it is the oracle that the CUDA kernels are tested against.

pub mod cpu;
mod error;

pub use error::{Error, Result};
