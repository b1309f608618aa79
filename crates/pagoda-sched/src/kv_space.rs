//! The KV-cache space the scheduler plans with.

use crate::request::RequestId;

/// Block accounting of a paged KV cache, as far as the scheduler needs it.
///
/// The scheduler owns one and calls it for every request it admits, grows, preempts or finishes;
/// the engine implements it over its block manager (which may share cached prefix blocks between
/// requests). [`CountingKvSpace`](crate::CountingKvSpace) implements it by plain counting.
pub trait KvSpace {
    /// Tokens per block.
    fn block_size(&self) -> usize;

    /// Blocks that an allocation could use now (free plus evictable cached ones).
    fn num_free_blocks(&self) -> usize;

    /// Blocks in the whole space.
    fn num_total_blocks(&self) -> usize;

    /// Called when the scheduler tries to admit `id` (first admission, and readmission after a
    /// preemption): reserves for `id` the longest cached prefix of `tokens` and returns its length
    /// in tokens (a multiple of block_size, always < tokens.len()); 0 without prefix caching.
    ///
    /// When the admission then fails (too few blocks or no token budget left this step) the
    /// scheduler calls [`release`](Self::release) for `id` and tries again in a later step.
    fn reserve_prefix(&mut self, id: RequestId, tokens: &[u32]) -> usize;

    /// Makes `id` hold slots for its first `num_tokens` tokens. Returns false, changing
    /// nothing, when there are not enough free blocks.
    fn grow(&mut self, id: RequestId, num_tokens: usize) -> bool;

    /// Releases every block `id` holds.
    fn release(&mut self, id: RequestId);
}
