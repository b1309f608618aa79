//! The blocks that hold one sequence's keys and values, in token order.
//!
//! Token `p` of a sequence lives in block `blocks[p / block_size]` at offset `p % block_size`; attention
//! kernels address it through the flat *slot* `block * block_size + offset`.

use crate::block_allocator::{BlockAllocator, BlockId};
use crate::error::{Error, Result};

/// A page copy the owner of the page tensors must perform: every layer's K and V rows of `src` into `dst`.
///
/// Produced by [`BlockTable::copy_on_write_tail`] when a sequence is about to write into a block that
/// another holder still reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCopy {
    /// The shared block whose contents are copied.
    pub src: BlockId,
    /// The freshly allocated block that replaces `src` in the table.
    pub dst: BlockId,
}

/// The blocks of one sequence and the number of tokens stored in them.
///
/// A table owns one reference to each of its blocks: [`append`](Self::append) allocates them,
/// [`fork`](Self::fork) shares them and [`free`](Self::free) releases them. It is deliberately not
/// `Clone`, since a copy that did not retain its blocks would release them twice.
#[derive(Debug, PartialEq, Eq)]
pub struct BlockTable {
    block_size: usize,
    blocks: Vec<BlockId>,
    num_tokens: usize,
}

impl BlockTable {
    /// Creates an empty table for blocks of `block_size` tokens.
    ///
    /// # Panics
    ///
    /// If `block_size` is 0.
    pub fn new(block_size: usize) -> Self {
        assert!(block_size > 0, "BlockTable::new: block_size must be > 0");
        Self {
            block_size,
            blocks: Vec::new(),
            num_tokens: 0,
        }
    }

    /// A table over blocks whose references the caller hands to it, holding `num_tokens` tokens.
    pub(crate) fn from_blocks(block_size: usize, blocks: Vec<BlockId>, num_tokens: usize) -> Self {
        debug_assert_eq!(blocks.len(), num_tokens.div_ceil(block_size));
        Self {
            block_size,
            blocks,
            num_tokens,
        }
    }

    /// The sequence's blocks, in token order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Number of tokens whose keys and values the table has room reserved for.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Whether the table holds no tokens (and therefore no blocks).
    pub fn is_empty(&self) -> bool {
        self.num_tokens == 0
    }

    /// Number of tokens the current blocks can hold without allocating.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * self.block_size
    }

    /// Number of new blocks that appending `extra_tokens` tokens allocates.
    ///
    /// Does not count the extra block of a copy-on-write; see [`needs_copy_on_write`](Self::needs_copy_on_write).
    pub fn blocks_needed(&self, extra_tokens: usize) -> usize {
        self.num_tokens
            .saturating_add(extra_tokens)
            .div_ceil(self.block_size)
            - self.blocks.len()
    }

    /// Whether the last block is partly filled and shared, so that appending to it would write into
    /// pages another holder reads. Resolve with [`copy_on_write_tail`](Self::copy_on_write_tail).
    pub fn needs_copy_on_write(&self, allocator: &BlockAllocator) -> bool {
        self.shared_partial_tail(allocator).is_some()
    }

    fn shared_partial_tail(&self, allocator: &BlockAllocator) -> Option<BlockId> {
        let tail = *self.blocks.last()?;
        let tail_is_partial = self.num_tokens < self.capacity();
        (tail_is_partial && allocator.ref_count(tail) > 1).then_some(tail)
    }

    /// Grows the sequence by `n` tokens, allocating the blocks they need.
    ///
    /// On error the table and the allocator are unchanged. Fails with [`Error::OutOfBlocks`] when the
    /// allocator has too few free blocks, and with [`Error::SharedTail`] when `n > 0` and the new tokens
    /// would land in a shared block (call [`copy_on_write_tail`](Self::copy_on_write_tail) first).
    pub fn append(&mut self, n: usize, allocator: &mut BlockAllocator) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if let Some(tail) = self.shared_partial_tail(allocator) {
            return Err(Error::SharedTail(tail));
        }
        // A token count past usize::MAX could never be backed by blocks.
        let total = self.num_tokens.checked_add(n).ok_or(Error::OutOfBlocks {
            requested: usize::MAX,
            free: allocator.num_free(),
        })?;
        let new_blocks = allocator.allocate_many(self.blocks_needed(n))?;
        self.blocks.extend(new_blocks);
        self.num_tokens = total;
        Ok(())
    }

    /// Makes the last block exclusive to this table if it is partly filled and shared: allocates a
    /// replacement, drops this table's reference to the shared block and returns the copy the caller
    /// must perform on the pages before writing. Returns `None` when nothing needs copying.
    ///
    /// On error (no free block) the table and the allocator are unchanged.
    pub fn copy_on_write_tail(
        &mut self,
        allocator: &mut BlockAllocator,
    ) -> Result<Option<BlockCopy>> {
        let Some(src) = self.shared_partial_tail(allocator) else {
            return Ok(None);
        };
        let dst = allocator.allocate()?;
        // `src` has at least two holders, so this only decrements its count.
        allocator.release(src)?;
        if let Some(tail) = self.blocks.last_mut() {
            *tail = dst;
        }
        Ok(Some(BlockCopy { src, dst }))
    }

    /// A new table holding the same tokens in the same blocks, each block retained once more.
    ///
    /// Used to branch a sequence (parallel sampling, beam search) without copying its cache. On error no
    /// reference count is changed.
    pub fn fork(&self, allocator: &mut BlockAllocator) -> Result<BlockTable> {
        for (i, &block) in self.blocks.iter().enumerate() {
            if let Err(err) = allocator.retain(block) {
                for &retained in &self.blocks[..i] {
                    // Each of these was retained just above, so it is live with a count of at least 2.
                    allocator.release(retained)?;
                }
                return Err(err);
            }
        }
        Ok(BlockTable {
            block_size: self.block_size,
            blocks: self.blocks.clone(),
            num_tokens: self.num_tokens,
        })
    }

    /// Flat slot of token `position`: `block * block_size + position % block_size`.
    ///
    /// `None` if `position >= num_tokens`, or if the slot does not fit in a `u32` (a pool that large is
    /// rejected by `KvCacheConfig::validate`).
    pub fn slot(&self, position: usize) -> Option<u32> {
        if position >= self.num_tokens {
            return None;
        }
        let block = self.blocks.get(position / self.block_size)?;
        let slot = (block.0 as usize)
            .checked_mul(self.block_size)?
            .checked_add(position % self.block_size)?;
        u32::try_from(slot).ok()
    }

    /// The block ids as plain `u32`s, the form attention kernels read.
    pub fn block_ids_u32(&self) -> Vec<u32> {
        self.blocks.iter().map(|block| block.0).collect()
    }

    /// Releases every block and empties the table.
    ///
    /// Blocks are released last to first. Cached blocks thereby join the eviction order with the
    /// sequence's later blocks ahead of its earlier ones, which matters because a cached block is only
    /// reachable through the blocks before it: evicting an early block first would strand the later ones.
    ///
    /// The table is empty afterwards even on error; the error is the first failed release (a block the
    /// allocator did not consider held by this table, i.e. a bookkeeping bug elsewhere).
    pub fn free(&mut self, allocator: &mut BlockAllocator) -> Result<()> {
        self.num_tokens = 0;
        let mut first_error = None;
        for block in self.blocks.drain(..).rev() {
            if let Err(err) = allocator.release(block) {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_needed_rounds_up_to_whole_blocks() {
        let mut allocator = BlockAllocator::new(16);
        let mut table = BlockTable::new(4);
        assert_eq!(table.blocks_needed(0), 0);
        assert_eq!(table.blocks_needed(1), 1);
        assert_eq!(table.blocks_needed(4), 1);
        assert_eq!(table.blocks_needed(5), 2);
        assert_eq!(table.blocks_needed(9), 3);
        table.append(3, &mut allocator).unwrap();
        assert_eq!(table.blocks().len(), 1);
        // One free slot is left in the first block.
        assert_eq!(table.blocks_needed(1), 0);
        assert_eq!(table.blocks_needed(2), 1);
        assert_eq!(table.blocks_needed(5), 1);
        assert_eq!(table.blocks_needed(6), 2);
        table.append(1, &mut allocator).unwrap();
        assert_eq!(table.blocks().len(), 1);
        assert_eq!(table.blocks_needed(1), 1);
    }

    #[test]
    fn slots_follow_blocks_across_boundaries() {
        let block_size = 4;
        let mut allocator = BlockAllocator::new(8);
        // Interleave two sequences so that neither owns consecutive block ids.
        let mut a = BlockTable::new(block_size);
        let mut b = BlockTable::new(block_size);
        a.append(3, &mut allocator).unwrap(); // a: [0]
        b.append(5, &mut allocator).unwrap(); // b: [1, 2]
        a.append(6, &mut allocator).unwrap(); // a: [0, 3, 4]
        assert_eq!(a.blocks(), [BlockId(0), BlockId(3), BlockId(4)]);
        assert_eq!(a.num_tokens(), 9);
        let expected_a = [0, 1, 2, 3, 12, 13, 14, 15, 16];
        for (position, &slot) in expected_a.iter().enumerate() {
            assert_eq!(a.slot(position), Some(slot), "position {position}");
        }
        assert_eq!(a.slot(9), None);
        let expected_b = [4, 5, 6, 7, 8];
        for (position, &slot) in expected_b.iter().enumerate() {
            assert_eq!(b.slot(position), Some(slot), "position {position}");
        }
        assert_eq!(b.slot(5), None);
        assert_eq!(a.block_ids_u32(), [0, 3, 4]);
    }

    #[test]
    fn slot_of_an_empty_table_is_none() {
        let table = BlockTable::new(16);
        assert_eq!(table.slot(0), None);
        assert!(table.is_empty());
    }

    #[test]
    fn block_size_one_maps_positions_to_blocks() {
        let mut allocator = BlockAllocator::new(3);
        let mut table = BlockTable::new(1);
        table.append(3, &mut allocator).unwrap();
        assert_eq!(table.blocks_needed(1), 1);
        assert_eq!(
            (0..3).map(|p| table.slot(p)).collect::<Vec<_>>(),
            [Some(0), Some(1), Some(2)]
        );
    }

    #[test]
    fn failed_append_changes_nothing() {
        let mut allocator = BlockAllocator::new(3);
        let mut table = BlockTable::new(4);
        table.append(6, &mut allocator).unwrap();
        let err = table.append(11, &mut allocator).unwrap_err();
        assert!(matches!(
            err,
            Error::OutOfBlocks {
                requested: 3,
                free: 1
            }
        ));
        assert_eq!(table.num_tokens(), 6);
        assert_eq!(table.blocks(), [BlockId(0), BlockId(1)]);
        assert_eq!(allocator.num_free(), 1);
        // What still fits does.
        table.append(6, &mut allocator).unwrap();
        assert_eq!(table.num_tokens(), 12);
        assert_eq!(allocator.num_free(), 0);
    }

    #[test]
    fn append_overflowing_the_token_count_fails_cleanly() {
        let mut allocator = BlockAllocator::new(2);
        let mut table = BlockTable::new(2);
        table.append(1, &mut allocator).unwrap();
        assert!(matches!(
            table.append(usize::MAX, &mut allocator),
            Err(Error::OutOfBlocks { .. })
        ));
        assert_eq!(table.num_tokens(), 1);
        assert_eq!(allocator.num_free(), 1);
    }

    #[test]
    fn free_returns_every_block_and_empties_the_table() {
        let mut allocator = BlockAllocator::new(4);
        let mut table = BlockTable::new(2);
        table.append(7, &mut allocator).unwrap();
        assert_eq!(allocator.num_free(), 0);
        table.free(&mut allocator).unwrap();
        assert!(table.is_empty());
        assert!(table.blocks().is_empty());
        assert_eq!(allocator.num_free(), 4);
        // Freeing an empty table is a no-op, not a double free.
        table.free(&mut allocator).unwrap();
        assert_eq!(allocator.num_free(), 4);
    }

    #[test]
    fn free_reports_blocks_released_behind_its_back() {
        let mut allocator = BlockAllocator::new(4);
        let mut table = BlockTable::new(2);
        table.append(3, &mut allocator).unwrap();
        allocator.release(table.blocks()[0]).unwrap();
        assert!(matches!(
            table.free(&mut allocator),
            Err(Error::DoubleFree(BlockId(0)))
        ));
        assert!(table.is_empty());
        assert_eq!(allocator.num_free(), 4);
    }

    #[test]
    fn fork_shares_blocks_until_both_are_freed() {
        let mut allocator = BlockAllocator::new(4);
        let mut parent = BlockTable::new(4);
        parent.append(8, &mut allocator).unwrap();
        let mut child = parent.fork(&mut allocator).unwrap();
        assert_eq!(child.blocks(), parent.blocks());
        assert_eq!(child.num_tokens(), 8);
        assert!(parent.blocks().iter().all(|&b| allocator.ref_count(b) == 2));
        assert_eq!(allocator.num_free(), 2);
        parent.free(&mut allocator).unwrap();
        assert_eq!(allocator.num_free(), 2);
        assert!(child.blocks().iter().all(|&b| allocator.ref_count(b) == 1));
        child.free(&mut allocator).unwrap();
        assert_eq!(allocator.num_free(), 4);
    }

    #[test]
    fn full_shared_tail_needs_no_copy() {
        let mut allocator = BlockAllocator::new(4);
        let mut parent = BlockTable::new(4);
        parent.append(4, &mut allocator).unwrap();
        let mut child = parent.fork(&mut allocator).unwrap();
        assert!(!child.needs_copy_on_write(&allocator));
        assert_eq!(child.copy_on_write_tail(&mut allocator).unwrap(), None);
        child.append(1, &mut allocator).unwrap();
        assert_eq!(child.blocks(), [BlockId(0), BlockId(1)]);
    }

    #[test]
    fn partial_shared_tail_is_copied_before_writing() {
        let mut allocator = BlockAllocator::new(4);
        let mut parent = BlockTable::new(4);
        parent.append(6, &mut allocator).unwrap(); // [0, 1], block 1 half full
        let mut child = parent.fork(&mut allocator).unwrap();
        assert!(child.needs_copy_on_write(&allocator));
        assert!(matches!(
            child.append(1, &mut allocator),
            Err(Error::SharedTail(BlockId(1)))
        ));
        assert_eq!(child.num_tokens(), 6);
        // Appending nothing writes nothing and is allowed.
        child.append(0, &mut allocator).unwrap();

        let copy = child.copy_on_write_tail(&mut allocator).unwrap();
        assert_eq!(
            copy,
            Some(BlockCopy {
                src: BlockId(1),
                dst: BlockId(2)
            })
        );
        assert_eq!(child.blocks(), [BlockId(0), BlockId(2)]);
        assert_eq!(allocator.ref_count(BlockId(0)), 2);
        assert_eq!(allocator.ref_count(BlockId(1)), 1);
        assert_eq!(allocator.ref_count(BlockId(2)), 1);
        // Both sequences now own their tails and may write.
        child.append(1, &mut allocator).unwrap();
        parent.append(1, &mut allocator).unwrap();
        assert_eq!(child.slot(6), Some(10));
        assert_eq!(parent.slot(6), Some(6));
    }

    #[test]
    fn copy_on_write_without_free_blocks_changes_nothing() {
        let mut allocator = BlockAllocator::new(1);
        let mut parent = BlockTable::new(4);
        parent.append(2, &mut allocator).unwrap();
        let mut child = parent.fork(&mut allocator).unwrap();
        assert!(matches!(
            child.copy_on_write_tail(&mut allocator),
            Err(Error::OutOfBlocks { .. })
        ));
        assert_eq!(child.blocks(), [BlockId(0)]);
        assert_eq!(allocator.ref_count(BlockId(0)), 2);
    }

    #[test]
    fn fork_of_a_table_with_a_dead_block_changes_no_count() {
        let mut allocator = BlockAllocator::new(4);
        let mut table = BlockTable::new(1);
        table.append(3, &mut allocator).unwrap();
        allocator.release(BlockId(2)).unwrap();
        assert!(matches!(
            table.fork(&mut allocator),
            Err(Error::InvalidBlock(BlockId(2)))
        ));
        assert_eq!(allocator.ref_count(BlockId(0)), 1);
        assert_eq!(allocator.ref_count(BlockId(1)), 1);
    }
}
