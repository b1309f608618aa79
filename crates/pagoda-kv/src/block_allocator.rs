//! Reference-counted allocator of fixed-size KV-cache blocks.
//!
//! Pure bookkeeping over block ids: it knows nothing about what a block stores, so the scheduler can use it
//! to plan admissions and the page tensors can be laid out by whoever owns the memory.

use std::fmt;

use crate::error::{Error, Result};

/// Index of one block of the KV cache: row `id` of every layer's page tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}", self.0)
    }
}

/// Hands out block ids from a fixed pool and counts how many holders share each one.
///
/// A block is *live* while its reference count is positive and *free* otherwise. Sharing (forked
/// sequences, cached prefixes) is expressed by [`retain`](Self::retain); a block returns to the free list
/// when its last holder calls [`release`](Self::release).
#[derive(Clone, Debug)]
pub struct BlockAllocator {
    /// Reference count of every block, indexed by `BlockId.0`; 0 means free.
    ref_counts: Vec<u32>,
    /// Free block ids. Popped from the back: the most recently released block is reused first, while its
    /// pages are still likely to be in cache.
    free: Vec<BlockId>,
}

impl BlockAllocator {
    /// Creates an allocator over blocks `0..num_blocks`, all free.
    ///
    /// Fresh allocators hand out blocks in increasing id order.
    ///
    /// # Panics
    ///
    /// If `num_blocks` exceeds the number of distinct `u32` ids (`u32::MAX as usize + 1`). Callers that
    /// take the count from user input should check with [`BlockAllocator::max_blocks`] first.
    pub fn new(num_blocks: usize) -> Self {
        assert!(
            num_blocks <= Self::max_blocks(),
            "BlockAllocator::new: {num_blocks} blocks do not fit in u32 block ids"
        );
        // `num_blocks <= u32::MAX + 1`, so every id below it fits in a u32.
        let free = (0..num_blocks).rev().map(|id| BlockId(id as u32)).collect();
        Self {
            ref_counts: vec![0; num_blocks],
            free,
        }
    }

    /// Largest pool size [`BlockAllocator::new`] accepts: one block per `u32` id.
    pub const fn max_blocks() -> usize {
        u32::MAX as usize + 1
    }

    /// Total number of blocks in the pool, live or free.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Number of blocks that [`allocate`](Self::allocate) can still hand out.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Number of live blocks (reference count > 0).
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Whether `n` more blocks can be allocated right now.
    pub fn can_allocate(&self, n: usize) -> bool {
        n <= self.num_free()
    }

    /// Takes a free block; its reference count becomes 1.
    ///
    /// Fails with [`Error::OutOfBlocks`] when none is free.
    pub fn allocate(&mut self) -> Result<BlockId> {
        let block = self.free.pop().ok_or(Error::OutOfBlocks {
            requested: 1,
            free: 0,
        })?;
        self.ref_counts[block.0 as usize] = 1;
        Ok(block)
    }

    /// Takes `n` free blocks at once, or none: on [`Error::OutOfBlocks`] the allocator is unchanged.
    pub fn allocate_many(&mut self, n: usize) -> Result<Vec<BlockId>> {
        if !self.can_allocate(n) {
            return Err(Error::OutOfBlocks {
                requested: n,
                free: self.num_free(),
            });
        }
        let start = self.free.len() - n;
        // Reverse so that blocks come out in the order `n` single `allocate` calls would give.
        let blocks: Vec<BlockId> = self.free.drain(start..).rev().collect();
        for block in &blocks {
            self.ref_counts[block.0 as usize] = 1;
        }
        Ok(blocks)
    }

    /// Adds a holder to a live block (reference count + 1).
    ///
    /// Fails with [`Error::InvalidBlock`] if `block` is free or not part of this pool, and with
    /// [`Error::RefCountOverflow`] if the count would exceed `u32::MAX`.
    pub fn retain(&mut self, block: BlockId) -> Result<()> {
        let count = self
            .ref_counts
            .get_mut(block.0 as usize)
            .filter(|count| **count > 0)
            .ok_or(Error::InvalidBlock(block))?;
        *count = count.checked_add(1).ok_or(Error::RefCountOverflow(block))?;
        Ok(())
    }

    /// Drops one holder of a live block (reference count - 1); at 0 the block is free again.
    ///
    /// Fails with [`Error::DoubleFree`] if `block` is already free, and with [`Error::InvalidBlock`] if it
    /// is not part of this pool.
    pub fn release(&mut self, block: BlockId) -> Result<()> {
        let count = self
            .ref_counts
            .get_mut(block.0 as usize)
            .ok_or(Error::InvalidBlock(block))?;
        match *count {
            0 => Err(Error::DoubleFree(block)),
            1 => {
                *count = 0;
                self.free.push(block);
                Ok(())
            }
            _ => {
                *count -= 1;
                Ok(())
            }
        }
    }

    /// Number of holders of `block`; 0 for a free block or one outside the pool.
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts.get(block.0 as usize).copied().unwrap_or(0)
    }

    /// Whether `block` belongs to this pool and has at least one holder.
    pub fn is_live(&self, block: BlockId) -> bool {
        self.ref_count(block) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_allocator_hands_out_ids_in_order() {
        let mut allocator = BlockAllocator::new(3);
        assert_eq!(allocator.num_blocks(), 3);
        assert_eq!(allocator.num_free(), 3);
        let ids: Vec<u32> = (0..3).map(|_| allocator.allocate().unwrap().0).collect();
        assert_eq!(ids, [0, 1, 2]);
        assert_eq!(allocator.num_free(), 0);
        assert_eq!(allocator.num_used(), 3);
    }

    #[test]
    fn released_block_is_reused_first() {
        let mut allocator = BlockAllocator::new(4);
        let a = allocator.allocate().unwrap();
        let b = allocator.allocate().unwrap();
        allocator.release(a).unwrap();
        allocator.release(b).unwrap();
        assert_eq!(allocator.allocate().unwrap(), b);
        assert_eq!(allocator.allocate().unwrap(), a);
    }

    #[test]
    fn out_of_blocks_reports_request_and_free_count() {
        let mut allocator = BlockAllocator::new(1);
        allocator.allocate().unwrap();
        assert!(matches!(
            allocator.allocate(),
            Err(Error::OutOfBlocks {
                requested: 1,
                free: 0
            })
        ));
        let mut empty = BlockAllocator::new(0);
        assert!(matches!(empty.allocate(), Err(Error::OutOfBlocks { .. })));
    }

    #[test]
    fn allocate_many_is_all_or_nothing() {
        let mut allocator = BlockAllocator::new(5);
        let first = allocator.allocate_many(3).unwrap();
        assert_eq!(first, [BlockId(0), BlockId(1), BlockId(2)]);
        assert!(matches!(
            allocator.allocate_many(3),
            Err(Error::OutOfBlocks {
                requested: 3,
                free: 2
            })
        ));
        assert_eq!(allocator.num_free(), 2);
        assert!(allocator.allocate_many(0).unwrap().is_empty());
        assert_eq!(
            allocator.allocate_many(2).unwrap(),
            [BlockId(3), BlockId(4)]
        );
    }

    #[test]
    fn shared_block_is_freed_by_its_last_holder() {
        let mut allocator = BlockAllocator::new(2);
        let block = allocator.allocate().unwrap();
        allocator.retain(block).unwrap();
        allocator.retain(block).unwrap();
        assert_eq!(allocator.ref_count(block), 3);
        allocator.release(block).unwrap();
        allocator.release(block).unwrap();
        assert_eq!(allocator.ref_count(block), 1);
        assert_eq!(allocator.num_free(), 1);
        allocator.release(block).unwrap();
        assert_eq!(allocator.ref_count(block), 0);
        assert_eq!(allocator.num_free(), 2);
    }

    #[test]
    fn double_free_is_an_error_and_changes_nothing() {
        let mut allocator = BlockAllocator::new(2);
        let block = allocator.allocate().unwrap();
        allocator.release(block).unwrap();
        assert!(matches!(allocator.release(block), Err(Error::DoubleFree(b)) if b == block));
        assert_eq!(allocator.num_free(), 2);
        // Releasing a block that was never allocated is the same mistake.
        assert!(matches!(
            allocator.release(BlockId(1)),
            Err(Error::DoubleFree(BlockId(1)))
        ));
    }

    #[test]
    fn unknown_blocks_are_rejected() {
        let mut allocator = BlockAllocator::new(2);
        assert!(matches!(
            allocator.release(BlockId(2)),
            Err(Error::InvalidBlock(BlockId(2)))
        ));
        assert!(matches!(
            allocator.retain(BlockId(7)),
            Err(Error::InvalidBlock(BlockId(7)))
        ));
        assert_eq!(allocator.ref_count(BlockId(7)), 0);
        assert!(!allocator.is_live(BlockId(7)));
    }

    #[test]
    fn retain_of_a_free_block_is_rejected() {
        let mut allocator = BlockAllocator::new(2);
        assert!(matches!(
            allocator.retain(BlockId(0)),
            Err(Error::InvalidBlock(BlockId(0)))
        ));
        assert_eq!(allocator.num_free(), 2);
    }
}
