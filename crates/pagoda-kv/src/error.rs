//! Errors of the KV cache.

use crate::block_allocator::BlockId;
use crate::block_manager::SeqId;

/// Everything that can go wrong while allocating blocks, managing sequences or building the page tensors.
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
    /// The block manager has no sequence with this id.
    #[error("{0} is not tracked by the KV block manager")]
    UnknownSequence(SeqId),
    /// The block manager already tracks a sequence with this id.
    #[error("{0} already has a block table")]
    SequenceExists(SeqId),
    /// More tokens were committed than the sequence has slots for.
    #[error("{seq}: cannot commit {tokens} tokens, its block table holds {slots}")]
    CommitBeyondTable {
        /// The sequence.
        seq: SeqId,
        /// Tokens passed to `commit`.
        tokens: usize,
        /// Tokens the sequence's block table has slots for.
        slots: usize,
    },
    /// A fork would share slots the parent reserved but has not committed: both sequences would write
    /// their own tokens into the same pages.
    #[error(
        "cannot fork {seq}: {committed} of its {slots} reserved slots are committed; \
         fork between forward passes, after commit"
    )]
    UncommittedSlots {
        /// The sequence to fork.
        seq: SeqId,
        /// Tokens its block table has slots for.
        slots: usize,
        /// Tokens committed so far.
        committed: usize,
    },
    /// The cache configuration cannot be built.
    #[error("invalid KV cache config: {0}")]
    InvalidConfig(String),
    /// A layer's page tensors no longer have the layout the cache was built with.
    #[cfg(feature = "pages")]
    #[error("KV cache pages: {0}")]
    InvalidPages(String),
    /// Creating or accessing the page tensors failed.
    #[cfg(feature = "pages")]
    #[error("KV cache page tensors: {0}")]
    Tensor(#[from] pagoda_tensor::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
