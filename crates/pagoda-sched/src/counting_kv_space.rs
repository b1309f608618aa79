//! A [`KvSpace`] that only counts blocks, with an optional simulated prefix cache.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::error::{Error, Result};
use crate::kv_space::KvSpace;
use crate::request::RequestId;

/// Block bookkeeping without K/V tensors: for tests, simulations, and engines without a prefix
/// cache of their own.
///
/// Every block has a reference count. With prefix caching on, a block that a request fills with
/// known tokens (the tokens given to [`reserve_prefix`](KvSpace::reserve_prefix)) is registered
/// under the chained hash of its prefix; when its last holder releases it, it stays cached and
/// evictable (least recently released first) until an allocation needs it, and
/// `reserve_prefix` hands it to the next request that starts with the same tokens. Hashes are
/// 64-bit and not checked against the tokens: a collision would only make this type count two
/// prefixes as one, since it holds no K/V.
#[derive(Debug, Clone)]
pub struct CountingKvSpace {
    block_size: usize,
    prefix_caching: bool,
    blocks: Vec<Block>,
    /// Unreferenced blocks without cached contents.
    free: Vec<usize>,
    /// Unreferenced blocks with cached contents, by release time (oldest first).
    evictable: BTreeMap<u64, usize>,
    /// Block holding each cached prefix hash.
    cached: HashMap<u64, usize>,
    holdings: HashMap<RequestId, Holding>,
    clock: u64,
}

#[derive(Debug, Clone, Default)]
struct Block {
    refs: u32,
    hash: Option<u64>,
    released_at: u64,
}

#[derive(Debug, Clone, Default)]
struct Holding {
    blocks: Vec<usize>,
    num_tokens: usize,
    /// Chained hashes of the full blocks of the tokens passed to `reserve_prefix`.
    hashes: Vec<u64>,
}

impl CountingKvSpace {
    /// `num_blocks` blocks of `block_size` tokens, no prefix cache.
    ///
    /// # Errors
    /// [`Error::UnusableKvSpace`] when either is zero.
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 {
            return Err(Error::UnusableKvSpace {
                block_size,
                total_blocks: num_blocks,
            });
        }
        Ok(Self {
            block_size,
            prefix_caching: false,
            blocks: vec![Block::default(); num_blocks],
            // Reversed so that blocks are handed out from 0 upwards.
            free: (0..num_blocks).rev().collect(),
            evictable: BTreeMap::new(),
            cached: HashMap::new(),
            holdings: HashMap::new(),
            clock: 0,
        })
    }

    /// Like [`new`](Self::new), with the simulated prefix cache on.
    ///
    /// # Errors
    /// [`Error::UnusableKvSpace`] when either is zero.
    pub fn with_prefix_caching(num_blocks: usize, block_size: usize) -> Result<Self> {
        let mut space = Self::new(num_blocks, block_size)?;
        space.prefix_caching = true;
        Ok(space)
    }

    /// Whether the simulated prefix cache is on.
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// Blocks `id` holds.
    pub fn num_held_blocks(&self, id: RequestId) -> usize {
        self.holdings.get(&id).map_or(0, |h| h.blocks.len())
    }

    /// Tokens `id` holds slots for.
    pub fn num_held_tokens(&self, id: RequestId) -> usize {
        self.holdings.get(&id).map_or(0, |h| h.num_tokens)
    }

    /// Requests holding blocks, in no particular order.
    pub fn holders(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.holdings.keys().copied()
    }

    /// Blocks with at least one holder.
    pub fn num_used_blocks(&self) -> usize {
        self.blocks.len() - self.free.len() - self.evictable.len()
    }

    /// Blocks whose contents are registered in the prefix cache, held or not.
    pub fn num_cached_blocks(&self) -> usize {
        self.cached.len()
    }

    fn allocate(&mut self) -> Option<usize> {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                let (_, index) = self.evictable.pop_first()?;
                if let Some(hash) = self.blocks[index].hash.take() {
                    self.cached.remove(&hash);
                }
                index
            }
        };
        self.blocks[index].refs = 1;
        Some(index)
    }

    /// Takes one more reference to a cached block, pulling it out of the evictable set.
    fn retain(&mut self, index: usize) {
        let block = &mut self.blocks[index];
        if block.refs == 0 {
            self.evictable.remove(&block.released_at);
        }
        block.refs += 1;
    }

    fn chained_hashes(&self, tokens: &[u32]) -> Vec<u64> {
        let mut parent = 0u64;
        tokens
            .chunks_exact(self.block_size)
            .map(|block| {
                let mut hasher = DefaultHasher::new();
                parent.hash(&mut hasher);
                block.hash(&mut hasher);
                parent = hasher.finish();
                parent
            })
            .collect()
    }
}

impl KvSpace for CountingKvSpace {
    fn block_size(&self) -> usize {
        self.block_size
    }

    fn num_free_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    fn num_total_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// A request that already holds blocks gives them up first.
    fn reserve_prefix(&mut self, id: RequestId, tokens: &[u32]) -> usize {
        self.release(id);
        if !self.prefix_caching {
            return 0;
        }
        let hashes = self.chained_hashes(tokens);
        // At least the last token is left to compute: its logits give the next token.
        let max_hit_blocks = tokens.len().saturating_sub(1) / self.block_size;
        let hits: Vec<usize> = hashes
            .iter()
            .take(max_hit_blocks)
            .map_while(|hash| self.cached.get(hash).copied())
            .collect();
        for &index in &hits {
            self.retain(index);
        }
        let num_tokens = hits.len() * self.block_size;
        self.holdings.insert(
            id,
            Holding {
                blocks: hits,
                num_tokens,
                hashes,
            },
        );
        num_tokens
    }

    fn grow(&mut self, id: RequestId, num_tokens: usize) -> bool {
        let held = self.num_held_blocks(id);
        let needed = num_tokens.div_ceil(self.block_size).saturating_sub(held);
        if needed > self.num_free_blocks() {
            return false;
        }
        let mut new_blocks = Vec::with_capacity(needed);
        for _ in 0..needed {
            // Cannot fail: `needed` blocks were counted free above.
            if let Some(index) = self.allocate() {
                new_blocks.push(index);
            }
        }
        let holding = self.holdings.entry(id).or_default();
        holding.blocks.extend(new_blocks);
        holding.num_tokens = holding.num_tokens.max(num_tokens);
        if self.prefix_caching {
            // Register every block that is now full of known tokens, unless another block already
            // caches the same prefix.
            let full = (holding.num_tokens / self.block_size).min(holding.hashes.len());
            for (&index, &hash) in holding.blocks.iter().zip(&holding.hashes).take(full) {
                if self.blocks[index].hash.is_none() && !self.cached.contains_key(&hash) {
                    self.blocks[index].hash = Some(hash);
                    self.cached.insert(hash, index);
                }
            }
        }
        true
    }

    fn release(&mut self, id: RequestId) {
        let Some(holding) = self.holdings.remove(&id) else {
            return;
        };
        // The tail goes first, so that it is evicted before the prefix it extends.
        for &index in holding.blocks.iter().rev() {
            let block = &mut self.blocks[index];
            block.refs -= 1;
            if block.refs > 0 {
                continue;
            }
            if block.hash.is_some() {
                self.clock += 1;
                block.released_at = self.clock;
                self.evictable.insert(self.clock, index);
            } else {
                self.free.push(index);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: RequestId = RequestId(1);
    const B: RequestId = RequestId(2);

    #[test]
    fn zero_sizes_are_refused() {
        assert!(matches!(
            CountingKvSpace::new(0, 16),
            Err(Error::UnusableKvSpace { .. })
        ));
        assert!(matches!(
            CountingKvSpace::new(4, 0),
            Err(Error::UnusableKvSpace { .. })
        ));
    }

    #[test]
    fn grow_counts_blocks_and_fails_without_change() {
        let mut kv = CountingKvSpace::new(4, 4).unwrap();
        assert!(kv.grow(A, 5));
        assert_eq!(kv.num_held_blocks(A), 2);
        assert_eq!(kv.num_free_blocks(), 2);
        // Growing within the held blocks takes nothing.
        assert!(kv.grow(A, 8));
        assert_eq!(kv.num_free_blocks(), 2);
        assert!(!kv.grow(B, 9));
        assert_eq!(kv.num_held_blocks(B), 0);
        assert_eq!(kv.num_free_blocks(), 2);
        kv.release(A);
        assert_eq!(kv.num_free_blocks(), 4);
        assert_eq!(kv.num_used_blocks(), 0);
        assert_eq!(kv.holders().count(), 0);
    }

    #[test]
    fn without_prefix_caching_nothing_is_reused() {
        let mut kv = CountingKvSpace::new(8, 2).unwrap();
        let tokens = [1, 2, 3, 4, 5];
        assert_eq!(kv.reserve_prefix(A, &tokens), 0);
        assert!(kv.grow(A, 5));
        kv.release(A);
        assert_eq!(kv.reserve_prefix(B, &tokens), 0);
        assert_eq!(kv.num_cached_blocks(), 0);
    }

    #[test]
    fn cached_prefix_is_shared_then_evicted_last_block_first() {
        let mut kv = CountingKvSpace::with_prefix_caching(4, 2).unwrap();
        let tokens = [1, 2, 3, 4, 5];
        assert_eq!(kv.reserve_prefix(A, &tokens), 0);
        assert!(kv.grow(A, 5));
        assert_eq!(kv.num_cached_blocks(), 2);

        // Shared while A runs: B takes A's two full blocks and needs one block of its own.
        assert_eq!(kv.reserve_prefix(B, &tokens), 4);
        assert_eq!(kv.num_free_blocks(), 1);
        assert!(kv.grow(B, 5));
        assert_eq!(kv.num_free_blocks(), 0);
        kv.release(A);
        kv.release(B);
        assert_eq!(kv.num_free_blocks(), 4);
        assert_eq!(kv.num_used_blocks(), 0);

        // A prefix hit never covers the last token.
        assert_eq!(kv.reserve_prefix(A, &tokens[..4]), 2);
        kv.release(A);

        // Three fresh blocks evict the two cached ones, the second (released first) first.
        assert!(kv.grow(B, 6));
        assert_eq!(kv.num_cached_blocks(), 1);
        assert_eq!(kv.reserve_prefix(A, &tokens), 2);
        kv.release(A);
        kv.release(B);
        assert_eq!(kv.num_free_blocks(), 4);
    }
}
