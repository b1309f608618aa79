//! Block bookkeeping for every sequence of an engine: block tables, prefix caching, copy-on-write.
//!
//! [`KvBlockManager`] is what a scheduler and an engine drive. It owns the [`BlockAllocator`] and one
//! [`BlockTable`] per sequence, caches the full blocks of finished prefills and decodes so that later
//! prompts starting with the same tokens skip their prefill, and queues the page copies that
//! copy-on-write needs. It never touches tensors: the engine applies the copies to the pages (with
//! `KvCache::copy_blocks` under the `pages` feature) and runs the model.

use std::collections::HashMap;
use std::fmt;

use crate::block_allocator::{BlockAllocator, BlockId};
use crate::block_hash::BlockHash;
use crate::block_table::{BlockCopy, BlockTable};
use crate::error::{Error, Result};
use crate::prefix_index::{EntryRef, Lookup};
use crate::stats::KvStats;

/// Identifies a sequence (a request, or one branch of a forked request) in a [`KvBlockManager`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sequence {}", self.0)
    }
}

/// The cache entry a sequence's next cached block chains onto.
#[derive(Clone, Copy, Debug)]
struct CachedTip {
    hash: BlockHash,
    entry: EntryRef,
}

/// One sequence's blocks and how far its leading blocks are in the prefix cache.
#[derive(Debug)]
struct Sequence {
    table: BlockTable,
    /// Entry of the last of the leading blocks counted by `cached_blocks`: the sequence's own block, or
    /// a block with the same contents that another sequence cached first.
    tip: Option<CachedTip>,
    /// Leading full blocks that were in the prefix cache when they were matched or committed.
    cached_blocks: usize,
    /// Full blocks [`KvBlockManager::commit`] has seen. Blocks from `cached_blocks` on could not be
    /// cached, and neither can any later block, since a cache entry needs its parent's.
    committed_blocks: usize,
    /// Tokens whose keys and values are known to be in the pages: the longest commit, or the prefix hit.
    committed_tokens: usize,
}

impl Sequence {
    fn new(table: BlockTable, tip: Option<CachedTip>, cached_blocks: usize) -> Self {
        let committed_tokens = table.num_tokens();
        Self {
            table,
            tip,
            cached_blocks,
            committed_blocks: cached_blocks,
            committed_tokens,
        }
    }
}

/// Block tables of every sequence over one pool of KV-cache blocks, with a prefix cache.
///
/// The life of a sequence:
///
/// 1. [`match_prefix`](Self::match_prefix) admits it with a prompt and reuses the cached blocks the prompt
///    starts with; it returns how many prompt tokens are already in the cache and need no prefill.
///    ([`add_sequence`](Self::add_sequence) admits one without looking anything up.)
/// 2. Before each forward pass, [`grow`](Self::grow) gives it slots for the tokens the pass computes, and
///    [`take_copies`](Self::take_copies) hands over the block copies copy-on-write requires, which must be
///    applied to the pages before the pass writes anything.
/// 3. The pass reads and writes keys and values through [`table`](Self::table).
/// 4. After the pass, [`commit`](Self::commit) puts every block its tokens filled into the prefix cache.
/// 5. [`fork`](Self::fork) branches it (parallel sampling) without copying; [`free`](Self::free) ends it
///    (finished, or preempted for recompute). Its cached blocks outlive it until evicted.
///
/// # The prefix cache
///
/// A full block is cached under [`BlockHash::chained`] of its parent's hash and its tokens. Lookups do
/// not trust hashes: an entry matches only if its tokens equal the prompt's block and its recorded
/// parent is exactly the entry matched for the previous block, so a hash collision costs a cache hit and
/// never returns another prefix's keys and values. A cached block that no sequence holds stays cached
/// but is allocatable; allocation takes never-cached free blocks first and then evicts cached ones, least
/// recently released first. Every operation is O(1) or proportional to the blocks it touches.
///
/// When two sequences with the same prefix are prefilled before either commits, both compute the same
/// blocks: the first to commit caches its block, the other keeps its copy uncached, and later blocks of
/// either chain onto the cached one.
#[derive(Debug)]
pub struct KvBlockManager {
    allocator: BlockAllocator,
    block_size: usize,
    sequences: HashMap<SeqId, Sequence>,
    pending_copies: Vec<BlockCopy>,
    prefix_queries: u64,
    prefix_query_tokens: u64,
    prefix_hit_tokens: u64,
}

impl KvBlockManager {
    /// A manager over `num_blocks` blocks of `block_size` tokens, all free, tracking no sequence.
    ///
    /// Fails with [`Error::InvalidConfig`] if `block_size` is 0 or `num_blocks` exceeds
    /// [`BlockAllocator::max_blocks`].
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::InvalidConfig("block_size must be > 0".into()));
        }
        if num_blocks > BlockAllocator::max_blocks() {
            return Err(Error::InvalidConfig(format!(
                "{num_blocks} blocks do not fit in u32 block ids"
            )));
        }
        Ok(Self {
            allocator: BlockAllocator::new(num_blocks),
            block_size,
            sequences: HashMap::new(),
            pending_copies: Vec::new(),
            prefix_queries: 0,
            prefix_query_tokens: 0,
            prefix_hit_tokens: 0,
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.allocator.num_blocks()
    }

    /// Blocks that can be allocated now: free ones plus cached ones no sequence holds.
    pub fn num_free_blocks(&self) -> usize {
        self.allocator.num_free()
    }

    /// Whether `n` more blocks can be allocated now.
    pub fn can_allocate(&self, n: usize) -> bool {
        self.allocator.can_allocate(n)
    }

    /// The allocator, read-only: per-block reference counts, states and cache entries.
    pub fn allocator(&self) -> &BlockAllocator {
        &self.allocator
    }

    /// Whether `seq` has a block table.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.sequences.contains_key(&seq)
    }

    /// Number of sequences with a block table.
    pub fn num_sequences(&self) -> usize {
        self.sequences.len()
    }

    /// The block table of `seq`, for building a batch's attention metadata.
    pub fn table(&self, seq: SeqId) -> Option<&BlockTable> {
        self.sequences.get(&seq).map(|s| &s.table)
    }

    /// Every sequence and its block table, in no particular order.
    pub fn sequences(&self) -> impl Iterator<Item = (SeqId, &BlockTable)> {
        self.sequences.iter().map(|(&id, s)| (id, &s.table))
    }

    fn sequence(&self, seq: SeqId) -> Result<&Sequence> {
        self.sequences.get(&seq).ok_or(Error::UnknownSequence(seq))
    }

    /// Starts tracking `seq` with an empty block table, without a prefix lookup.
    ///
    /// Fails with [`Error::SequenceExists`] if `seq` is tracked already.
    pub fn add_sequence(&mut self, seq: SeqId) -> Result<()> {
        if self.contains(seq) {
            return Err(Error::SequenceExists(seq));
        }
        let table = BlockTable::new(self.block_size);
        self.sequences.insert(seq, Sequence::new(table, None, 0));
        Ok(())
    }

    /// The cached blocks `prompt` starts with and the entry of the last one.
    ///
    /// Stops one token short of the prompt's end: the engine needs the logits of the last prompt token,
    /// so at least that token must be computed.
    fn lookup_prefix(&self, prompt: &[u32]) -> (Vec<BlockId>, Option<CachedTip>) {
        let max_blocks = prompt.len().saturating_sub(1) / self.block_size;
        let index = self.allocator.prefix_index();
        let mut blocks = Vec::new();
        let mut tip: Option<CachedTip> = None;
        for tokens in prompt.chunks_exact(self.block_size).take(max_blocks) {
            let hash = BlockHash::chained(tip.map(|t| t.hash), tokens);
            let Lookup::Hit(entry) = index.find(hash, tip.map(|t| t.entry), tokens) else {
                break;
            };
            blocks.push(entry.block);
            tip = Some(CachedTip { hash, entry });
        }
        (blocks, tip)
    }

    /// How many leading tokens of `prompt` [`match_prefix`](Self::match_prefix) would find cached now,
    /// without reusing anything or counting a query.
    pub fn cached_prefix_len(&self, prompt: &[u32]) -> usize {
        self.lookup_prefix(prompt).0.len() * self.block_size
    }

    /// Starts tracking `seq`, whose prompt is `prompt`, reusing the cached blocks the prompt starts with.
    ///
    /// Returns the number of prompt tokens whose keys and values are already in those blocks, a multiple
    /// of the block size and always less than `prompt.len()` (the last prompt token must be computed for
    /// its logits), or 0 for an empty prompt. The table holds exactly those tokens; grow it for the rest.
    ///
    /// Fails with [`Error::SequenceExists`] if `seq` is tracked already; then nothing changes.
    pub fn match_prefix(&mut self, seq: SeqId, prompt: &[u32]) -> Result<usize> {
        if self.contains(seq) {
            return Err(Error::SequenceExists(seq));
        }
        let (blocks, tip) = self.lookup_prefix(prompt);
        for (i, &block) in blocks.iter().enumerate() {
            if let Err(err) = self.allocator.acquire_cached(block) {
                for &taken in blocks[..i].iter().rev() {
                    self.allocator.release(taken)?;
                }
                return Err(err);
            }
        }
        let cached_tokens = blocks.len() * self.block_size;
        self.prefix_queries += 1;
        self.prefix_query_tokens += prompt.len() as u64;
        self.prefix_hit_tokens += cached_tokens as u64;
        let cached_blocks = blocks.len();
        let table = BlockTable::from_blocks(self.block_size, blocks, cached_tokens);
        self.sequences
            .insert(seq, Sequence::new(table, tip, cached_blocks));
        Ok(cached_tokens)
    }

    /// New blocks `grow` would take from the pool, and whether one of them replaces a shared tail.
    fn growth(table: &BlockTable, allocator: &BlockAllocator, num_tokens: usize) -> (usize, bool) {
        let extra = num_tokens.saturating_sub(table.num_tokens());
        if extra == 0 {
            return (0, false);
        }
        let copy_on_write = table.needs_copy_on_write(allocator);
        (
            table
                .blocks_needed(extra)
                .saturating_add(usize::from(copy_on_write)),
            copy_on_write,
        )
    }

    /// Blocks [`grow`](Self::grow)`(seq, num_tokens)` would allocate, counting a copy-on-write block.
    pub fn blocks_needed(&self, seq: SeqId, num_tokens: usize) -> Result<usize> {
        let sequence = self.sequence(seq)?;
        Ok(Self::growth(&sequence.table, &self.allocator, num_tokens).0)
    }

    /// Makes `seq`'s table hold slots for `num_tokens` tokens in total (nothing happens if it already
    /// does; tables never shrink).
    ///
    /// If the new tokens start inside a partly filled last block that another sequence shares (after a
    /// [`fork`](Self::fork)), the block is replaced by a fresh copy first, and the copy is queued for
    /// [`take_copies`](Self::take_copies).
    ///
    /// Fails with [`Error::UnknownSequence`], or with [`Error::OutOfBlocks`] when the pool cannot supply
    /// the blocks; on error nothing changes.
    pub fn grow(&mut self, seq: SeqId, num_tokens: usize) -> Result<()> {
        let sequence = self
            .sequences
            .get_mut(&seq)
            .ok_or(Error::UnknownSequence(seq))?;
        if num_tokens <= sequence.table.num_tokens() {
            return Ok(());
        }
        let allocator = &mut self.allocator;
        let (needed, copy_on_write) = Self::growth(&sequence.table, allocator, num_tokens);
        if !allocator.can_allocate(needed) {
            return Err(Error::OutOfBlocks {
                requested: needed,
                free: allocator.num_free(),
            });
        }
        // Both steps below fit in the blocks counted above, so neither can fail half way.
        if copy_on_write && let Some(copy) = sequence.table.copy_on_write_tail(allocator)? {
            self.pending_copies.push(copy);
        }
        let extra = num_tokens - sequence.table.num_tokens();
        sequence.table.append(extra, allocator)
    }

    /// Records that the keys and values of `tokens` (the sequence's tokens from position 0, as far as
    /// they have been computed) are in `seq`'s pages, and puts every block they fill that is not cached
    /// yet into the prefix cache.
    ///
    /// Call after the forward pass that wrote them. Tokens of blocks committed before must be the same
    /// as then; a trailing partial block is left for a later commit.
    ///
    /// Fails with [`Error::UnknownSequence`], or with [`Error::CommitBeyondTable`] if `tokens` is longer
    /// than the table; on error nothing changes.
    pub fn commit(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        let block_size = self.block_size;
        let sequence = self
            .sequences
            .get_mut(&seq)
            .ok_or(Error::UnknownSequence(seq))?;
        let slots = sequence.table.num_tokens();
        if tokens.len() > slots {
            return Err(Error::CommitBeyondTable {
                seq,
                tokens: tokens.len(),
                slots,
            });
        }
        sequence.committed_tokens = sequence.committed_tokens.max(tokens.len());
        let first = sequence.committed_blocks;
        sequence.committed_blocks = first.max(tokens.len() / block_size);
        if sequence.cached_blocks != first {
            // An earlier block could not be cached, so no later one can chain onto it.
            return Ok(());
        }
        let full_blocks = tokens.chunks_exact(block_size).zip(sequence.table.blocks());
        for (i, (block_tokens, &block)) in full_blocks.enumerate().skip(first) {
            let Some(tip) = cache_block(&mut self.allocator, sequence.tip, block, block_tokens)
            else {
                break;
            };
            sequence.tip = Some(tip);
            sequence.cached_blocks = i + 1;
        }
        Ok(())
    }

    /// Starts tracking `child` as a copy of `parent` that shares all of its blocks.
    ///
    /// The first of the two to grow into a shared, partly filled last block gets its own copy of it (see
    /// [`grow`](Self::grow)). Copy-on-write happens when slots are reserved, so the parent must have
    /// committed every slot it reserved (fork between forward passes, after [`commit`](Self::commit)):
    /// otherwise both sequences would later write their own tokens into the same reserved slots.
    ///
    /// Fails with [`Error::UnknownSequence`], [`Error::SequenceExists`] or
    /// [`Error::UncommittedSlots`]; on error nothing changes.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<()> {
        if self.contains(child) {
            return Err(Error::SequenceExists(child));
        }
        let source = self
            .sequences
            .get(&parent)
            .ok_or(Error::UnknownSequence(parent))?;
        let slots = source.table.num_tokens();
        if source.committed_tokens < slots {
            return Err(Error::UncommittedSlots {
                seq: parent,
                slots,
                committed: source.committed_tokens,
            });
        }
        let sequence = Sequence {
            table: source.table.fork(&mut self.allocator)?,
            tip: source.tip,
            cached_blocks: source.cached_blocks,
            committed_blocks: source.committed_blocks,
            committed_tokens: source.committed_tokens,
        };
        self.sequences.insert(child, sequence);
        Ok(())
    }

    /// Stops tracking `seq` and releases all of its blocks at once. Cached blocks no other sequence holds
    /// stay in the prefix cache (evictable); the rest become free. Queued copies into blocks that are
    /// now free are dropped.
    ///
    /// Fails with [`Error::UnknownSequence`].
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        let mut sequence = self
            .sequences
            .remove(&seq)
            .ok_or(Error::UnknownSequence(seq))?;
        let released = sequence.table.free(&mut self.allocator);
        let allocator = &self.allocator;
        self.pending_copies
            .retain(|copy| allocator.is_live(copy.dst));
        released
    }

    /// Block copies queued by copy-on-write that the engine has not taken yet, oldest first.
    pub fn pending_copies(&self) -> &[BlockCopy] {
        &self.pending_copies
    }

    /// Takes the queued block copies. Apply them to the pages in order (a later copy may read a block an
    /// earlier one wrote), before the next forward pass writes into any block.
    pub fn take_copies(&mut self) -> Vec<BlockCopy> {
        std::mem::take(&mut self.pending_copies)
    }

    /// Block counts and prefix-cache counters now.
    pub fn stats(&self) -> KvStats {
        let allocator = &self.allocator;
        KvStats {
            num_blocks: allocator.num_blocks(),
            used_blocks: allocator.num_used(),
            evictable_blocks: allocator.num_evictable(),
            free_blocks: allocator.num_free() - allocator.num_evictable(),
            cached_blocks: allocator.num_cached(),
            num_sequences: self.sequences.len(),
            prefix_queries: self.prefix_queries,
            prefix_query_tokens: self.prefix_query_tokens,
            prefix_hit_tokens: self.prefix_hit_tokens,
            evictions: allocator.evictions(),
        }
    }
}

/// Puts a sequence's next full block, holding `tokens` after the blocks up to `parent`, into the prefix
/// cache, and returns the entry that now stands for those contents: the block's own, or an identical
/// block's that was cached first. `None` if the contents cannot be cached (parent evicted, hash taken by
/// other contents, or the block cached with other contents).
fn cache_block(
    allocator: &mut BlockAllocator,
    parent: Option<CachedTip>,
    block: BlockId,
    tokens: &[u32],
) -> Option<CachedTip> {
    let index = allocator.prefix_index();
    // An entry under an evicted parent could never be reached by a lookup.
    if parent.is_some_and(|p| !index.is_current(p.entry)) {
        return None;
    }
    let hash = BlockHash::chained(parent.map(|p| p.hash), tokens);
    let parent_entry = parent.map(|p| p.entry);
    let entry = match index.find(hash, parent_entry, tokens) {
        Lookup::Hit(entry) => entry,
        Lookup::Vacant => allocator.cache_block(block, hash, parent_entry, tokens)?,
        Lookup::Stale(stale) => {
            allocator.uncache_block(stale);
            allocator.cache_block(block, hash, parent_entry, tokens)?
        }
        Lookup::Conflict => return None,
    };
    Some(CachedTip { hash, entry })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_allocator::BlockState;

    const A: SeqId = SeqId(1);
    const B: SeqId = SeqId(2);
    const C: SeqId = SeqId(3);

    /// Admits `seq` with `prompt`, computes all of it and commits it, as an engine's prefill would.
    fn prefill(manager: &mut KvBlockManager, seq: SeqId, prompt: &[u32]) -> usize {
        let cached = manager.match_prefix(seq, prompt).unwrap();
        manager.grow(seq, prompt.len()).unwrap();
        manager.commit(seq, prompt).unwrap();
        cached
    }

    fn blocks(manager: &KvBlockManager, seq: SeqId) -> Vec<BlockId> {
        manager.table(seq).unwrap().blocks().to_vec()
    }

    #[test]
    fn a_repeated_prompt_reuses_its_full_blocks() {
        let mut manager = KvBlockManager::new(8, 4).unwrap();
        let prompt: Vec<u32> = (100..110).collect(); // 2 full blocks + 2 tokens
        assert_eq!(prefill(&mut manager, A, &prompt), 0);
        let first = blocks(&manager, A);
        assert_eq!(manager.stats().cached_blocks, 2);

        assert_eq!(prefill(&mut manager, B, &prompt), 8);
        let second = blocks(&manager, B);
        assert_eq!(second[..2], first[..2]);
        assert_ne!(second[2], first[2], "the partial block is never shared");
        assert_eq!(manager.allocator().ref_count(first[0]), 2);
        assert_eq!(manager.table(B).unwrap().num_tokens(), 10);

        let stats = manager.stats();
        assert_eq!(stats.prefix_queries, 2);
        assert_eq!(stats.prefix_query_tokens, 20);
        assert_eq!(stats.prefix_hit_tokens, 8);
        assert_eq!(stats.prefix_hit_rate(), 0.4);
        assert_eq!(stats.used_blocks, 4);
    }

    #[test]
    fn the_last_prompt_token_is_never_reported_cached() {
        let mut manager = KvBlockManager::new(8, 4).unwrap();
        let prompt: Vec<u32> = (0..8).collect();
        prefill(&mut manager, A, &prompt);
        assert_eq!(manager.stats().cached_blocks, 2);
        // Both blocks are cached, but an exact multiple of the block size leaves its last block to compute.
        assert_eq!(manager.cached_prefix_len(&prompt), 4);
        assert_eq!(manager.match_prefix(B, &prompt).unwrap(), 4);
        assert_eq!(manager.match_prefix(C, &prompt[..5]).unwrap(), 4);
        assert_eq!(manager.match_prefix(SeqId(4), &prompt[..4]).unwrap(), 0);
        assert_eq!(manager.match_prefix(SeqId(5), &[]).unwrap(), 0);
        assert!(manager.table(SeqId(5)).unwrap().is_empty());
    }

    #[test]
    fn prompts_share_blocks_up_to_where_they_differ() {
        let mut manager = KvBlockManager::new(8, 2).unwrap();
        prefill(&mut manager, A, &[1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(manager.cached_prefix_len(&[1, 2, 3, 9, 5, 6, 7]), 2);
        assert_eq!(manager.cached_prefix_len(&[9, 2, 3, 4, 5, 6, 7]), 0);
        // The same tokens at another position have another parent, so they are another block.
        assert_eq!(manager.cached_prefix_len(&[3, 4, 5, 6, 7]), 0);
        assert_eq!(manager.cached_prefix_len(&[1, 2, 3, 4, 5, 6, 7, 8]), 6);
    }

    #[test]
    fn freed_cached_blocks_stay_reusable_until_evicted() {
        let mut manager = KvBlockManager::new(4, 2).unwrap();
        prefill(&mut manager, A, &[1, 2, 3, 4, 5]);
        let cached = blocks(&manager, A)[..2].to_vec();
        manager.free(A).unwrap();
        let stats = manager.stats();
        assert_eq!(
            (stats.used_blocks, stats.evictable_blocks, stats.free_blocks),
            (0, 2, 2)
        );
        assert_eq!(manager.num_free_blocks(), 4);
        for &block in &cached {
            assert_eq!(
                manager.allocator().state(block),
                Some(BlockState::Evictable)
            );
        }

        // A hit takes them back without allocating.
        assert_eq!(manager.match_prefix(B, &[1, 2, 3, 4, 9]).unwrap(), 4);
        assert_eq!(blocks(&manager, B), cached);
        manager.free(B).unwrap();

        // Pressure: 4 blocks for C take the 2 free ones first, then evict the cached ones, the later
        // block of the prefix first.
        manager.add_sequence(C).unwrap();
        manager.grow(C, 6).unwrap();
        assert_eq!(manager.stats().evictions, 1);
        assert!(manager.allocator().is_cached(cached[0]));
        assert!(!manager.allocator().is_cached(cached[1]));
        manager.grow(C, 8).unwrap();
        assert_eq!(manager.stats().evictions, 2);
        assert_eq!(manager.stats().cached_blocks, 0);
        manager.free(C).unwrap();
        assert_eq!(manager.cached_prefix_len(&[1, 2, 3, 4, 9]), 0);
    }

    #[test]
    fn failed_grow_changes_nothing() {
        let mut manager = KvBlockManager::new(3, 4).unwrap();
        manager.add_sequence(A).unwrap();
        manager.grow(A, 6).unwrap();
        let before = (blocks(&manager, A), manager.stats());
        assert_eq!(manager.blocks_needed(A, 13).unwrap(), 2);
        assert!(matches!(
            manager.grow(A, 13),
            Err(Error::OutOfBlocks {
                requested: 2,
                free: 1
            })
        ));
        assert_eq!((blocks(&manager, A), manager.stats()), before);
        assert_eq!(manager.table(A).unwrap().num_tokens(), 6);
        // Growing to fewer tokens than the table holds is a no-op, not a shrink.
        manager.grow(A, 2).unwrap();
        assert_eq!(manager.table(A).unwrap().num_tokens(), 6);
        assert_eq!(manager.blocks_needed(A, 2).unwrap(), 0);
    }

    #[test]
    fn forks_copy_a_shared_partial_tail_before_writing_into_it() {
        let mut manager = KvBlockManager::new(6, 4).unwrap();
        prefill(&mut manager, A, &[1, 2, 3, 4, 5, 6]);
        manager.fork(A, B).unwrap();
        assert_eq!(blocks(&manager, A), blocks(&manager, B));
        let [head, tail] = blocks(&manager, A)[..] else {
            panic!("two blocks expected");
        };
        assert_eq!(manager.blocks_needed(B, 7).unwrap(), 1);
        manager.grow(B, 7).unwrap();
        let copies = manager.pending_copies().to_vec();
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].src, tail);
        assert_eq!(blocks(&manager, B), [head, copies[0].dst]);
        // A's tail is its own again: it grows in place without a copy.
        manager.grow(A, 7).unwrap();
        assert_eq!(blocks(&manager, A), [head, tail]);
        assert_eq!(manager.take_copies(), copies);
        assert!(manager.pending_copies().is_empty());
        assert_eq!(manager.allocator().ref_count(head), 2);
        assert_eq!(manager.allocator().ref_count(tail), 1);
    }

    #[test]
    fn copies_into_freed_blocks_are_dropped() {
        let mut manager = KvBlockManager::new(6, 4).unwrap();
        prefill(&mut manager, A, &[1, 2]);
        manager.fork(A, B).unwrap();
        manager.fork(A, C).unwrap();
        manager.grow(B, 3).unwrap();
        manager.grow(C, 3).unwrap();
        assert_eq!(manager.pending_copies().len(), 2);
        manager.free(B).unwrap();
        let left = manager.pending_copies();
        assert_eq!(left.len(), 1);
        assert_eq!(blocks(&manager, C), [left[0].dst]);
    }

    #[test]
    fn concurrent_prefills_of_one_prompt_cache_it_once_and_chain_on() {
        let mut manager = KvBlockManager::new(10, 2).unwrap();
        let prompt = [1, 2, 3, 4, 5];
        // Both are admitted before either commits: neither finds anything cached.
        assert_eq!(manager.match_prefix(A, &prompt).unwrap(), 0);
        assert_eq!(manager.match_prefix(B, &prompt).unwrap(), 0);
        manager.grow(A, 5).unwrap();
        manager.grow(B, 5).unwrap();
        manager.commit(A, &prompt).unwrap();
        manager.commit(B, &prompt).unwrap();
        assert_eq!(manager.stats().cached_blocks, 2);
        let (a, b) = (blocks(&manager, A), blocks(&manager, B));
        assert!(a[..2].iter().all(|&x| manager.allocator().is_cached(x)));
        assert!(b[..2].iter().all(|&x| !manager.allocator().is_cached(x)));

        // B's next block chains onto A's cached blocks, so a longer prompt hits A's blocks then B's.
        let longer = [1, 2, 3, 4, 5, 6, 7];
        manager.grow(B, 6).unwrap();
        manager.commit(B, &longer[..6]).unwrap();
        assert!(manager.allocator().is_cached(b[2]));
        assert_eq!(manager.match_prefix(C, &longer).unwrap(), 6);
        assert_eq!(blocks(&manager, C), [a[0], a[1], b[2]]);
    }

    #[test]
    fn an_entry_stranded_by_its_parents_eviction_is_replaced() {
        let mut manager = KvBlockManager::new(6, 2).unwrap();
        let prompt = [1, 2, 3, 4, 5];
        manager.match_prefix(A, &prompt).unwrap();
        manager.match_prefix(B, &prompt).unwrap();
        manager.grow(A, 5).unwrap();
        manager.grow(B, 5).unwrap();
        manager.commit(A, &prompt[..2]).unwrap(); // A caches block 0
        manager.commit(B, &prompt).unwrap(); // B's block 1 chains onto A's block 0
        let (a, b) = (blocks(&manager, A), blocks(&manager, B));
        assert!(manager.allocator().is_cached(b[1]));
        // A goes and its block 0 is evicted by pressure while B still holds its block 1.
        manager.free(A).unwrap();
        manager.add_sequence(C).unwrap();
        manager.grow(C, 6).unwrap();
        assert!(!manager.allocator().is_cached(a[0]));
        assert_eq!(manager.cached_prefix_len(&prompt), 0);
        manager.free(C).unwrap();

        // A new prefill caches block 0 afresh and takes over the stranded entry's hash for block 1.
        assert_eq!(prefill(&mut manager, SeqId(4), &prompt), 0);
        let d = blocks(&manager, SeqId(4));
        assert!(!manager.allocator().is_cached(b[1]));
        assert!(manager.allocator().is_cached(d[1]));
        assert_eq!(manager.cached_prefix_len(&[1, 2, 3, 4, 5, 6]), 4);
        // B's chain hangs off the evicted entry, so its later blocks are not cached.
        manager.grow(B, 6).unwrap();
        manager.commit(B, &[1, 2, 3, 4, 5, 6]).unwrap();
        assert!(!manager.allocator().is_cached(blocks(&manager, B)[2]));
    }

    #[test]
    fn commit_is_incremental_and_bounded_by_the_table() {
        let mut manager = KvBlockManager::new(8, 2).unwrap();
        manager.add_sequence(A).unwrap();
        manager.grow(A, 3).unwrap();
        assert!(matches!(
            manager.commit(A, &[1, 2, 3, 4]),
            Err(Error::CommitBeyondTable {
                seq: A,
                tokens: 4,
                slots: 3
            })
        ));
        assert_eq!(manager.stats().cached_blocks, 0);
        manager.commit(A, &[1]).unwrap();
        assert_eq!(manager.stats().cached_blocks, 0);
        manager.commit(A, &[1, 2, 3]).unwrap();
        assert_eq!(manager.stats().cached_blocks, 1);
        // Committing the same tokens again changes nothing.
        manager.commit(A, &[1, 2, 3]).unwrap();
        manager.grow(A, 6).unwrap();
        manager.commit(A, &[1, 2, 3, 4, 5, 6]).unwrap();
        assert_eq!(manager.stats().cached_blocks, 3);
        assert_eq!(manager.cached_prefix_len(&[1, 2, 3, 4, 5, 6, 7]), 6);
        let table = manager.table(A).unwrap();
        for (i, &block) in table.blocks().iter().enumerate() {
            let expected = [2 * i as u32 + 1, 2 * i as u32 + 2];
            assert_eq!(
                manager.allocator().cached_tokens(block),
                Some(&expected[..])
            );
        }
    }

    #[test]
    fn unknown_and_duplicate_sequences_are_typed_errors() {
        let mut manager = KvBlockManager::new(4, 2).unwrap();
        let unknown = SeqId(42);
        assert!(matches!(manager.grow(unknown, 1), Err(Error::UnknownSequence(s)) if s == unknown));
        assert!(matches!(
            manager.commit(unknown, &[]),
            Err(Error::UnknownSequence(_))
        ));
        assert!(matches!(
            manager.free(unknown),
            Err(Error::UnknownSequence(_))
        ));
        assert!(matches!(
            manager.fork(unknown, A),
            Err(Error::UnknownSequence(_))
        ));
        assert!(matches!(
            manager.blocks_needed(unknown, 1),
            Err(Error::UnknownSequence(_))
        ));
        assert!(manager.table(unknown).is_none());
        manager.add_sequence(A).unwrap();
        assert!(matches!(
            manager.add_sequence(A),
            Err(Error::SequenceExists(A))
        ));
        assert!(matches!(
            manager.match_prefix(A, &[1]),
            Err(Error::SequenceExists(A))
        ));
        assert!(matches!(manager.fork(A, A), Err(Error::SequenceExists(A))));
        assert_eq!(manager.stats().prefix_queries, 0);
        assert_eq!(manager.num_sequences(), 1);
        assert_eq!(
            Error::UnknownSequence(unknown).to_string(),
            "sequence 42 is not tracked by the KV block manager"
        );
    }

    #[test]
    fn invalid_geometry_is_rejected() {
        assert!(matches!(
            KvBlockManager::new(4, 0),
            Err(Error::InvalidConfig(_))
        ));
        let empty = KvBlockManager::new(0, 16).unwrap();
        assert_eq!(empty.num_free_blocks(), 0);
        assert!(empty.can_allocate(0));
        assert!(!empty.can_allocate(1));
        assert_eq!(empty.stats().usage(), 0.0);
    }
}
