//! The CUDA launchers' signatures for builds without the `cuda` feature: every function fails
//! with [`pagoda_tensor::Error::CudaNotCompiled`], so callers need no `#[cfg]`.

pub mod activation;
pub mod embedding;
pub mod flash_attention;
pub mod gemm;
pub mod kv_write;
pub mod memory;
pub mod nf4;
pub mod norm;
pub mod paged_attention;
pub mod rope;
pub mod sampling;
pub mod softmax;
