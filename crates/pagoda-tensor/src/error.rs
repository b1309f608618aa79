//! The crate's error type.

use std::path::PathBuf;

use crate::{DType, Device, Shape};

/// Everything that can go wrong in `pagoda-tensor`.
///
/// Every variant carries enough context (the operation, tensor, file or
/// dimension involved) to be understood without a backtrace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor or element type did not have the dtype an operation needs.
    #[error("dtype mismatch: expected {expected}, got {got}")]
    DTypeMismatch {
        /// The dtype the operation needs.
        expected: DType,
        /// The dtype it was given.
        got: DType,
    },

    /// Two shapes that must agree do not.
    #[error("shape mismatch in {op}: {lhs} vs {rhs}")]
    ShapeMismatch {
        /// The operation that compared the shapes.
        op: &'static str,
        /// The shape the operation started from (or expected).
        lhs: Shape,
        /// The shape it was asked for (or given).
        rhs: Shape,
    },

    /// A buffer's length does not match the element count of its shape.
    #[error("buffer of {len} elements does not fit shape {shape} ({} elements)", shape.elem_count())]
    ElementCountMismatch {
        /// The shape the buffer was meant to have.
        shape: Shape,
        /// The buffer's length in elements.
        len: usize,
    },

    /// A shape's size in bytes does not fit in the address space.
    #[error("shape {shape} of {dtype} is too large to allocate")]
    ShapeTooLarge {
        /// The shape asked for.
        shape: Shape,
        /// The element type.
        dtype: DType,
    },

    /// A view reaches past the end of its storage.
    #[error("view needs {needed} elements but its storage holds {len}")]
    StorageTooSmall {
        /// Elements the view needs (one past its highest position).
        needed: usize,
        /// Elements the storage holds.
        len: usize,
    },

    /// A byte buffer is not a whole number of elements.
    #[error("{len} bytes is not a whole number of {dtype} elements")]
    BadByteLength {
        /// The element type.
        dtype: DType,
        /// The buffer's length in bytes.
        len: usize,
    },

    /// A dimension index was not below the rank.
    #[error("{op}: dimension {dim} out of range for rank {rank}")]
    DimOutOfRange {
        /// The operation that received the dimension.
        op: &'static str,
        /// The dimension asked for.
        dim: usize,
        /// The tensor's rank.
        rank: usize,
    },

    /// `narrow` asked for a range that does not lie inside the dimension.
    #[error(
        "narrow: range {start}..{start}+{len} out of bounds for dimension {dim} of size {size}"
    )]
    NarrowOutOfRange {
        /// The dimension being narrowed.
        dim: usize,
        /// First index of the range.
        start: usize,
        /// Length of the range.
        len: usize,
        /// Size of the dimension.
        size: usize,
    },

    /// `permute` was given something that is not a permutation of `0..rank`.
    #[error("permute: {dims:?} is not a permutation of 0..{rank}")]
    InvalidPermutation {
        /// The dimension order given.
        dims: Vec<usize>,
        /// The tensor's rank.
        rank: usize,
    },

    /// An operation needs a contiguous (row-major, dense) tensor.
    #[error("{op} needs a contiguous tensor; call `contiguous()` first")]
    NotContiguous {
        /// The operation that needs contiguous data.
        op: &'static str,
    },

    /// An operation needs the tensor's data in host memory.
    #[error("{op} needs a CPU tensor, but this one is on {device}")]
    NotOnCpu {
        /// The operation that needs host data.
        op: &'static str,
        /// Where the tensor lives.
        device: Device,
    },

    /// Mutable access was asked for but the storage cannot be written in place.
    #[error("cannot borrow tensor data mutably: {reason}")]
    NotMutable {
        /// Why (shared storage, memory-mapped file, ...).
        reason: &'static str,
    },

    /// A host buffer is not aligned for its element type.
    #[error("buffer of dtype {dtype} at byte offset {offset} is not aligned to {align} bytes")]
    Misaligned {
        /// The element type.
        dtype: DType,
        /// Byte offset of the buffer (within its file, for mapped data).
        offset: usize,
        /// The alignment the element type needs.
        align: usize,
    },

    /// A file could not be opened, mapped or read.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A safetensors file (or its shard index) is malformed.
    #[error("invalid safetensors file {}: {message}", path.display())]
    SafeTensors {
        /// The file (or index) involved.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A GGUF file is malformed or uses something this reader does not support.
    #[error("invalid GGUF file {}: {message}", path.display())]
    Gguf {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A tensor name is not present in a checkpoint.
    #[error("tensor '{name}' not found in {}", file.display())]
    MissingTensor {
        /// The tensor asked for.
        name: String,
        /// The file or directory searched.
        file: PathBuf,
    },

    /// A dtype (from a file, or asked for) that this crate cannot represent or produce.
    #[error("unsupported dtype {dtype}: {context}")]
    UnsupportedDType {
        /// The dtype's name as the source spells it (e.g. `F64`, `Q4_K`).
        dtype: String,
        /// Where it was met (tensor, file, operation).
        context: String,
    },

    /// A CUDA device was asked for but the crate was built without the `cuda` feature.
    #[error("CUDA support is not compiled in; rebuild with the `cuda` feature")]
    CudaNotCompiled,

    /// The CUDA driver reported an error; the message says which operation and device.
    #[error("CUDA error: {0}")]
    Cuda(String),
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
