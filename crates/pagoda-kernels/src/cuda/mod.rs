//! CUDA launchers, one module per `kernels/<name>.cu` (same name), plus [`gemm`] on cuBLAS.
//!
//! Every launcher takes and returns contiguous tensors on one CUDA device, checks dtypes, shapes
//! and devices and returns an error rather than panicking; math inside the kernels is f32.

pub mod activation;
pub mod embedding;
pub mod flash_attention;
pub mod gemm;
pub(crate) mod gemv;
pub mod kv_write;
pub(crate) mod launch;
pub mod memory;
pub mod nf4;
pub mod norm;
pub mod paged_attention;
pub mod registry;
pub mod rope;
pub mod sampling;
pub mod softmax;
pub(crate) mod tensor_access;

pub use registry::{KernelModule, function};
