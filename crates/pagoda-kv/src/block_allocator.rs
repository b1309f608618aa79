//! Reference-counted allocator of fixed-size KV-cache blocks, with the prefix cache's eviction pool.
//!
//! Pure bookkeeping over block ids: it knows nothing about what a block stores, so the scheduler can use it
//! to plan admissions and the page tensors can be laid out by whoever owns the memory.
//!
//! Every block is in exactly one of three states (see [`BlockState`]): *held* by one or more owners,
//! *evictable* (unreferenced, but its contents are in the prefix cache and may still be reused), or
//! *free* (unreferenced and not cached). Allocation takes free blocks first and then evicts evictable ones,
//! least recently released first.

use std::fmt;

use crate::block_hash::BlockHash;
use crate::error::{Error, Result};
use crate::lru_list::LruList;
use crate::prefix_index::{EntryRef, PrefixIndex};

/// Index of one block of the KV cache: row `id` of every layer's page tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}", self.0)
    }
}

/// Where a block stands in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockState {
    /// Unreferenced and not cached: allocation hands these out first.
    Free,
    /// Unreferenced but in the prefix cache: a prefix hit can reuse it, and allocation evicts it (least
    /// recently released first) once no free block is left.
    Evictable,
    /// Referenced by at least one owner (see [`BlockAllocator::ref_count`]); it may be cached as well.
    Held,
}

/// Hands out block ids from a fixed pool and counts how many holders share each one.
///
/// A block is *live* while its reference count is positive. Sharing (forked sequences, prefix-cache hits)
/// is expressed by [`retain`](Self::retain); when the last holder calls [`release`](Self::release) the block
/// becomes free, or evictable if it is in the prefix cache. Without a prefix cache (blocks are cached only
/// through [`KvBlockManager`](crate::KvBlockManager)) this is a plain reference-counted free list.
#[derive(Clone, Debug)]
pub struct BlockAllocator {
    /// Reference count of every block, indexed by `BlockId.0`; 0 means free or evictable.
    ref_counts: Vec<u32>,
    /// Free block ids. Popped from the back: the most recently released block is reused first, while its
    /// pages are still likely to be in cache.
    free: Vec<BlockId>,
    /// Evictable blocks, least recently released first.
    evictable: LruList,
    /// The prefix cache's entries; a block is evictable exactly when it has an entry and no holder.
    cache: PrefixIndex,
    /// Cached blocks evicted so far to satisfy allocations.
    evictions: u64,
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
            evictable: LruList::new(num_blocks),
            cache: PrefixIndex::new(num_blocks),
            evictions: 0,
        }
    }

    /// Largest pool size [`BlockAllocator::new`] accepts: one block per `u32` id.
    pub const fn max_blocks() -> usize {
        u32::MAX as usize + 1
    }

    /// Total number of blocks in the pool, in any state.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Number of blocks that [`allocate`](Self::allocate) can still hand out: free plus evictable.
    pub fn num_free(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Number of unreferenced blocks kept for the prefix cache (included in [`num_free`](Self::num_free)).
    pub fn num_evictable(&self) -> usize {
        self.evictable.len()
    }

    /// Number of live blocks (reference count > 0).
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Number of blocks in the prefix cache, held or evictable.
    pub fn num_cached(&self) -> usize {
        self.cache.len()
    }

    /// How many cached blocks allocations have evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Whether `n` more blocks can be allocated right now.
    pub fn can_allocate(&self, n: usize) -> bool {
        n <= self.num_free()
    }

    /// Takes a free block, or evicts the least recently released evictable one; its reference count
    /// becomes 1.
    ///
    /// Fails with [`Error::OutOfBlocks`] when every block is held.
    pub fn allocate(&mut self) -> Result<BlockId> {
        self.take().ok_or(Error::OutOfBlocks {
            requested: 1,
            free: 0,
        })
    }

    /// Takes `n` blocks at once, as `n` calls of [`allocate`](Self::allocate) would, or none: on
    /// [`Error::OutOfBlocks`] the allocator is unchanged.
    pub fn allocate_many(&mut self, n: usize) -> Result<Vec<BlockId>> {
        if !self.can_allocate(n) {
            return Err(Error::OutOfBlocks {
                requested: n,
                free: self.num_free(),
            });
        }
        // `n <= num_free()`, so `take` yields all `n`.
        Ok(std::iter::from_fn(|| self.take()).take(n).collect())
    }

    fn take(&mut self) -> Option<BlockId> {
        let block = match self.free.pop() {
            Some(block) => block,
            None => {
                // The list holds indices below `num_blocks() <= max_blocks()`, so they fit in a u32.
                let block = BlockId(self.evictable.pop_front()? as u32);
                self.cache.remove(block);
                self.evictions += 1;
                block
            }
        };
        self.ref_counts[block.0 as usize] = 1;
        Some(block)
    }

    /// Adds a holder to a live block (reference count + 1).
    ///
    /// Fails with [`Error::InvalidBlock`] if `block` is not live (free, evictable, or not part of this
    /// pool), and with [`Error::RefCountOverflow`] if the count would exceed `u32::MAX`.
    pub fn retain(&mut self, block: BlockId) -> Result<()> {
        let count = self
            .ref_counts
            .get_mut(block.0 as usize)
            .filter(|count| **count > 0)
            .ok_or(Error::InvalidBlock(block))?;
        *count = count.checked_add(1).ok_or(Error::RefCountOverflow(block))?;
        Ok(())
    }

    /// Drops one holder of a live block (reference count - 1); at 0 the block becomes free, or evictable
    /// if it is in the prefix cache.
    ///
    /// Fails with [`Error::DoubleFree`] if `block` has no holder, and with [`Error::InvalidBlock`] if it
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
                if self.cache.contains(block) {
                    self.evictable.push_back(block.0 as usize);
                } else {
                    self.free.push(block);
                }
                Ok(())
            }
            _ => {
                *count -= 1;
                Ok(())
            }
        }
    }

    /// Number of holders of `block`; 0 for an unreferenced block or one outside the pool.
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts.get(block.0 as usize).copied().unwrap_or(0)
    }

    /// Whether `block` belongs to this pool and has at least one holder.
    pub fn is_live(&self, block: BlockId) -> bool {
        self.ref_count(block) > 0
    }

    /// The state of `block`, or `None` if it is not part of this pool.
    pub fn state(&self, block: BlockId) -> Option<BlockState> {
        let count = *self.ref_counts.get(block.0 as usize)?;
        Some(if count > 0 {
            BlockState::Held
        } else if self.evictable.contains(block.0 as usize) {
            BlockState::Evictable
        } else {
            BlockState::Free
        })
    }

    /// Whether `block` is in the prefix cache (held or evictable).
    pub fn is_cached(&self, block: BlockId) -> bool {
        self.cache.contains(block)
    }

    /// The hash `block` is cached under, if it is cached.
    pub fn cached_hash(&self, block: BlockId) -> Option<BlockHash> {
        self.cache.hash(block)
    }

    /// The tokens whose keys and values `block` holds, if it is cached.
    pub fn cached_tokens(&self, block: BlockId) -> Option<&[u32]> {
        self.cache.tokens(block)
    }

    /// The prefix cache's index, for lookups.
    pub(crate) fn prefix_index(&self) -> &PrefixIndex {
        &self.cache
    }

    /// Puts a live block into the prefix cache. `None` (nothing changed) if the block is not live, is
    /// cached already, or the hash is taken.
    pub(crate) fn cache_block(
        &mut self,
        block: BlockId,
        hash: BlockHash,
        parent: Option<EntryRef>,
        tokens: &[u32],
    ) -> Option<EntryRef> {
        if !self.is_live(block) {
            return None;
        }
        self.cache.insert(block, hash, parent, tokens)
    }

    /// Takes `block` out of the prefix cache; an evictable block becomes free.
    pub(crate) fn uncache_block(&mut self, block: BlockId) {
        if self.cache.remove(block) && self.evictable.remove(block.0 as usize) {
            self.free.push(block);
        }
    }

    /// Adds a holder to a cached block found by a prefix lookup: a held block is retained, an evictable
    /// one leaves the eviction list with a reference count of 1.
    ///
    /// Fails like [`retain`](Self::retain) for a block that is neither live nor evictable.
    pub(crate) fn acquire_cached(&mut self, block: BlockId) -> Result<()> {
        if self.evictable.remove(block.0 as usize) {
            self.ref_counts[block.0 as usize] = 1;
            Ok(())
        } else {
            self.retain(block)
        }
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

    /// Allocates `n` blocks and caches each under a distinct hash, as a committed prefix would be.
    fn cached_blocks(allocator: &mut BlockAllocator, n: usize) -> Vec<BlockId> {
        let blocks = allocator.allocate_many(n).unwrap();
        for (i, &block) in blocks.iter().enumerate() {
            let tokens = [i as u32];
            let hash = BlockHash::chained(None, &tokens);
            assert!(allocator.cache_block(block, hash, None, &tokens).is_some());
        }
        blocks
    }

    #[test]
    fn released_cached_blocks_become_evictable_not_free() {
        let mut allocator = BlockAllocator::new(4);
        let blocks = cached_blocks(&mut allocator, 2);
        assert_eq!(allocator.num_cached(), 2);
        assert_eq!(allocator.state(blocks[0]), Some(BlockState::Held));
        allocator.release(blocks[0]).unwrap();
        assert_eq!(allocator.state(blocks[0]), Some(BlockState::Evictable));
        assert_eq!(allocator.state(BlockId(3)), Some(BlockState::Free));
        assert_eq!(allocator.state(BlockId(4)), None);
        assert_eq!(allocator.num_free(), 3);
        assert_eq!(allocator.num_evictable(), 1);
        assert_eq!(allocator.num_used(), 1);
        assert!(allocator.is_cached(blocks[0]));
        assert_eq!(allocator.cached_tokens(blocks[0]), Some(&[0][..]));
        // An evictable block is not live: only a prefix hit may take it back.
        assert!(matches!(
            allocator.retain(blocks[0]),
            Err(Error::InvalidBlock(_))
        ));
        assert!(matches!(
            allocator.release(blocks[0]),
            Err(Error::DoubleFree(_))
        ));
    }

    #[test]
    fn allocation_takes_free_blocks_before_evicting_least_recent_first() {
        let mut allocator = BlockAllocator::new(5);
        let blocks = cached_blocks(&mut allocator, 3); // 0, 1, 2 cached; 3, 4 free
        for &i in &[1, 0, 2] {
            allocator.release(blocks[i]).unwrap();
        }
        assert_eq!(
            allocator.allocate_many(2).unwrap(),
            [BlockId(3), BlockId(4)]
        );
        assert_eq!(allocator.evictions(), 0);
        assert_eq!(allocator.allocate().unwrap(), BlockId(1));
        assert_eq!(allocator.evictions(), 1);
        // Eviction drops the cache entry, so the hash can name another block now.
        assert!(!allocator.is_cached(BlockId(1)));
        assert_eq!(allocator.cached_hash(BlockId(1)), None);
        assert_eq!(allocator.num_cached(), 2);
        assert_eq!(
            allocator.allocate_many(2).unwrap(),
            [BlockId(0), BlockId(2)]
        );
        assert_eq!(allocator.evictions(), 3);
        assert!(matches!(
            allocator.allocate(),
            Err(Error::OutOfBlocks { .. })
        ));
    }

    #[test]
    fn a_prefix_hit_revives_an_evictable_block() {
        let mut allocator = BlockAllocator::new(3);
        let blocks = cached_blocks(&mut allocator, 2);
        allocator.release(blocks[0]).unwrap();
        allocator.release(blocks[1]).unwrap();
        allocator.acquire_cached(blocks[0]).unwrap();
        assert_eq!(allocator.ref_count(blocks[0]), 1);
        assert_eq!(allocator.num_evictable(), 1);
        // A held cached block is simply retained.
        allocator.acquire_cached(blocks[0]).unwrap();
        assert_eq!(allocator.ref_count(blocks[0]), 2);
        // A free block is no prefix hit.
        assert!(matches!(
            allocator.acquire_cached(BlockId(2)),
            Err(Error::InvalidBlock(BlockId(2)))
        ));
        // The revived block is out of the eviction order: only block 1 can be evicted.
        assert_eq!(allocator.allocate_many(2).unwrap(), [BlockId(2), blocks[1]]);
    }

    #[test]
    fn uncaching_an_evictable_block_frees_it() {
        let mut allocator = BlockAllocator::new(2);
        let blocks = cached_blocks(&mut allocator, 2);
        allocator.release(blocks[1]).unwrap();
        allocator.uncache_block(blocks[1]);
        assert_eq!(allocator.state(blocks[1]), Some(BlockState::Free));
        allocator.uncache_block(blocks[0]);
        assert_eq!(allocator.state(blocks[0]), Some(BlockState::Held));
        assert_eq!(allocator.num_cached(), 0);
        allocator.release(blocks[0]).unwrap();
        assert_eq!(allocator.num_evictable(), 0);
        assert_eq!(allocator.num_free(), 2);
        assert_eq!(allocator.evictions(), 0);
    }

    #[test]
    fn only_live_uncached_blocks_can_be_cached() {
        let mut allocator = BlockAllocator::new(2);
        let hash = BlockHash(1);
        assert!(
            allocator
                .cache_block(BlockId(0), hash, None, &[1])
                .is_none()
        );
        let block = allocator.allocate().unwrap();
        assert!(allocator.cache_block(block, hash, None, &[1]).is_some());
        assert!(
            allocator
                .cache_block(block, BlockHash(2), None, &[1])
                .is_none()
        );
        let other = allocator.allocate().unwrap();
        assert!(allocator.cache_block(other, hash, None, &[1]).is_none());
    }
}
