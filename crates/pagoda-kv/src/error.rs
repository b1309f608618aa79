//! Errors of the KV cache.

use crate::block_allocator::BlockId;

/// Everything that can go wrong while allocating blocks or building the page tensors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not enough free blocks for the request; nothing was allocated.
    #[error("out of KV-cache blocks: {requested} requested, {free} free")]
    OutOfBlocks {
        /// Blocks the operation needed.
        requested: usize,
        /// Blocks that were free.
        free: usize,
    },
    /// The block is not part of the pool, or (for `retain`) is not currently allocated.
    #[error("{0} is not a live block of this KV cache")]
    InvalidBlock(BlockId),
    /// The block was released more times than it was allocated and retained.
    #[error("{0} released while already free (double free)")]
    DoubleFree(BlockId),
    /// The block already has `u32::MAX` holders.
    #[error("{0} has too many holders to retain it again")]
    RefCountOverflow(BlockId),
    /// Appending would write into a partly filled block that other holders share.
    #[error("cannot append into shared {0}: call BlockTable::copy_on_write_tail first")]
    SharedTail(BlockId),
    /// The cache configuration cannot be built.
    #[error("invalid KV cache config: {0}")]
    InvalidConfig(String),
    /// Creating the page tensors failed.
    #[error("KV cache page tensors: {0}")]
    Tensor(#[from] pagoda_tensor::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
