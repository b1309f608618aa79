//! Tensors for pagoda: dtypes, shapes and strided views, CPU and CUDA storage,
//! and readers for safetensors and GGUF checkpoints.
//!
//! This crate holds data; it does no math beyond what storage needs (dtype
//! conversion, contiguous copies, dequantization of GGUF blocks). The ops
//! live in `pagoda-kernels`.
//!
//! CUDA support sits behind the `cuda` feature. Without it the same types
//! exist and every GPU operation returns [`Error::CudaNotCompiled`], so
//! callers need no `#[cfg]`.

mod device;
mod dtype;
mod error;
mod layout;
mod mapped;
mod shape;
mod storage;
mod tensor;

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub mod cuda;

pub mod gguf;
pub mod safetensors;

pub use cuda::{CudaDevice, CudaStorage, DeviceGraph, PinnedUpload};
/// The cudarc version this crate's CUDA types come from, so that kernels use the same one.
#[cfg(feature = "cuda")]
pub use cudarc;
pub use device::Device;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use layout::{Layout, StridedBlocks};
pub use mapped::MappedBytes;
pub use shape::Shape;
pub use storage::{CpuStorage, Storage};
pub use tensor::Tensor;
