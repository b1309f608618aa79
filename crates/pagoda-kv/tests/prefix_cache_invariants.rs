//! Property tests of the block manager under random interleavings of what a scheduler and an engine do:
//! admitting prompts with prefix lookups, growing tables (with copy-on-write after forks), computing and
//! committing tokens, forking, freeing, and allocating under pressure so that cached blocks are evicted.
//!
//! Besides the block accounting, the test keeps a model of the pages: every slot records the exact token
//! prefix whose keys and values an engine would have written there. After every operation, each computed
//! position of each sequence must read the prefix that position really has. That single check covers
//! prefix hits (reused blocks hold the prompt's own prefix), copy-on-write (no write lands in a block
//! another sequence reads) and eviction (a reallocated block is never still served from the cache).

use std::collections::BTreeMap;

use pagoda_kv::{BlockCopy, BlockId, BlockState, Error, KvBlockManager, KvStats, SeqId};
use proptest::prelude::*;

/// Sequence ids the operations pick from.
const NUM_SEQS: u64 = 6;

/// Prompt `k` of length `len`. Prompts 0 and 1 share their first 6 tokens, prompt 2 shares nothing, so
/// depending on the block size admissions hit whole prompts, a block or two, or nothing.
fn prompt(k: usize, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| match k {
            0 => i,
            1 if i < 6 => i,
            1 => 500 + i,
            _ => 900 + i,
        })
        .collect()
}

/// Token sequence `seq` generates at `position`: distinct per sequence, so forks diverge.
fn generated(seq: SeqId, position: usize) -> u32 {
    3000 + 100 * seq.0 as u32 + position as u32
}

#[derive(Clone, Debug)]
enum Op {
    /// Admit `seq` with prompt `prompt` cut to `len` tokens, reusing cached blocks.
    Admit {
        seq: u64,
        prompt: usize,
        len: usize,
    },
    /// Reserve `extra` more slots for `seq`.
    Grow {
        seq: u64,
        extra: usize,
    },
    /// Write the keys and values of up to `n` reserved, uncomputed tokens of `seq`, then commit.
    Compute {
        seq: u64,
        n: usize,
    },
    /// One engine step for `seq`: reserve `n` more slots, then compute every reserved token.
    Step {
        seq: u64,
        n: usize,
    },
    Fork {
        parent: u64,
        child: u64,
    },
    Free {
        seq: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let seq = 0..NUM_SEQS;
    prop_oneof![
        3 => (seq.clone(), 0usize..3, 0usize..20)
            .prop_map(|(seq, prompt, len)| Op::Admit { seq, prompt, len }),
        4 => (seq.clone(), 1usize..12).prop_map(|(seq, n)| Op::Step { seq, n }),
        1 => (seq.clone(), 0usize..12).prop_map(|(seq, extra)| Op::Grow { seq, extra }),
        1 => (seq.clone(), 1usize..16).prop_map(|(seq, n)| Op::Compute { seq, n }),
        3 => (seq.clone(), seq.clone()).prop_map(|(parent, child)| Op::Fork { parent, child }),
        2 => seq.prop_map(|seq| Op::Free { seq }),
    ]
}

/// What the engine knows about one sequence.
#[derive(Clone, Debug)]
struct SeqModel {
    /// The sequence's tokens: its prompt, then generated tokens as far as slots were reserved.
    tokens: Vec<u32>,
    /// Leading tokens whose keys and values are in the pages.
    computed: usize,
}

/// Everything one operation may change, to check that failed operations change nothing.
#[derive(Debug, PartialEq)]
struct Snapshot {
    tables: Vec<(SeqId, Vec<BlockId>, usize)>,
    blocks: Vec<(Option<BlockState>, u32, bool)>,
    stats: KvStats,
    copies: Vec<BlockCopy>,
}

struct World {
    manager: KvBlockManager,
    block_size: usize,
    seqs: BTreeMap<SeqId, SeqModel>,
    /// Per slot, the token prefix whose keys and values the slot holds.
    pages: Vec<Option<Vec<u32>>>,
    /// Expected prefix-cache counters.
    queries: u64,
    query_tokens: u64,
    hit_tokens: u64,
}

/// Slots `seq`'s table holds (0 if it has none).
fn model_slots(manager: &KvBlockManager, seq: SeqId) -> usize {
    manager.table(seq).map_or(0, |t| t.num_tokens())
}

fn fail(err: Error) -> TestCaseError {
    TestCaseError::fail(err.to_string())
}

impl World {
    fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            manager: KvBlockManager::new(num_blocks, block_size).expect("valid geometry"),
            block_size,
            seqs: BTreeMap::new(),
            pages: vec![None; num_blocks * block_size],
            queries: 0,
            query_tokens: 0,
            hit_tokens: 0,
        }
    }

    fn snapshot(&self) -> Snapshot {
        let allocator = self.manager.allocator();
        let mut tables: Vec<_> = self
            .manager
            .sequences()
            .map(|(id, t)| (id, t.blocks().to_vec(), t.num_tokens()))
            .collect();
        tables.sort();
        Snapshot {
            tables,
            blocks: (0..self.manager.num_blocks() as u32)
                .map(BlockId)
                .map(|b| {
                    (
                        allocator.state(b),
                        allocator.ref_count(b),
                        allocator.is_cached(b),
                    )
                })
                .collect(),
            stats: self.manager.stats(),
            copies: self.manager.pending_copies().to_vec(),
        }
    }

    /// The pages as they will be once the queued copies are applied.
    fn pages_after_copies(&self, copies: &[BlockCopy]) -> Vec<Option<Vec<u32>>> {
        let mut pages = self.pages.clone();
        for copy in copies {
            for offset in 0..self.block_size {
                let src = copy.src.0 as usize * self.block_size + offset;
                let dst = copy.dst.0 as usize * self.block_size + offset;
                pages[dst] = pages[src].clone();
            }
        }
        pages
    }

    fn check_invariants(&self) -> Result<(), TestCaseError> {
        let manager = &self.manager;
        let allocator = manager.allocator();
        let num_blocks = manager.num_blocks();
        prop_assert_eq!(self.manager.num_sequences(), self.seqs.len());

        // A block's reference count is the number of tables naming it.
        let mut holders = vec![0u32; num_blocks];
        for (id, table) in manager.sequences() {
            prop_assert!(self.seqs.contains_key(&id));
            let mut distinct = table.blocks().to_vec();
            distinct.sort();
            distinct.dedup();
            prop_assert_eq!(
                distinct.len(),
                table.blocks().len(),
                "{} names a block twice",
                id
            );
            prop_assert_eq!(
                table.blocks().len(),
                table.num_tokens().div_ceil(self.block_size)
            );
            for block in table.blocks() {
                holders[block.0 as usize] += 1;
            }
        }

        // Every block is exactly one of free, evictable or held, and the counts agree.
        let (mut free, mut evictable, mut held, mut cached) = (0, 0, 0, 0);
        for (id, &count) in holders.iter().enumerate() {
            let block = BlockId(id as u32);
            prop_assert_eq!(allocator.ref_count(block), count, "{}", block);
            let is_cached = allocator.is_cached(block);
            cached += usize::from(is_cached);
            match allocator.state(block) {
                Some(BlockState::Held) => {
                    prop_assert!(count > 0);
                    held += 1;
                }
                Some(BlockState::Evictable) => {
                    prop_assert!(
                        count == 0 && is_cached,
                        "{} evictable but held or uncached",
                        block
                    );
                    evictable += 1;
                }
                Some(BlockState::Free) => {
                    prop_assert!(
                        count == 0 && !is_cached,
                        "{} free but held or cached",
                        block
                    );
                    free += 1;
                }
                None => return Err(TestCaseError::fail(format!("{block} has no state"))),
            }
        }
        prop_assert_eq!(free + evictable + held, num_blocks);
        prop_assert_eq!(held, allocator.num_used());
        prop_assert_eq!(evictable, allocator.num_evictable());
        prop_assert_eq!(free + evictable, manager.num_free_blocks());

        // Statistics agree with a recount.
        let stats = manager.stats();
        prop_assert_eq!(
            stats,
            KvStats {
                num_blocks,
                used_blocks: held,
                evictable_blocks: evictable,
                free_blocks: free,
                cached_blocks: cached,
                num_sequences: self.seqs.len(),
                prefix_queries: self.queries,
                prefix_query_tokens: self.query_tokens,
                prefix_hit_tokens: self.hit_tokens,
                evictions: stats.evictions,
            }
        );

        // Queued copies go from a block into a fresh one that some table holds.
        for copy in manager.pending_copies() {
            prop_assert_ne!(copy.src, copy.dst);
            prop_assert!(
                holders[copy.dst.0 as usize] > 0,
                "copy into unheld {}",
                copy.dst
            );
        }

        // Cached blocks hold the tokens of their position, and every computed position reads its own
        // prefix from the pages.
        let pages = self.pages_after_copies(manager.pending_copies());
        for (&id, model) in &self.seqs {
            let table = manager
                .table(id)
                .ok_or_else(|| TestCaseError::fail("table missing"))?;
            prop_assert!(model.computed <= table.num_tokens());
            prop_assert!(table.num_tokens() <= model.tokens.len());
            for (i, &block) in table.blocks().iter().enumerate() {
                if let Some(tokens) = allocator.cached_tokens(block) {
                    let end = (i + 1) * self.block_size;
                    prop_assert!(
                        end <= model.computed,
                        "{} cached before it was computed",
                        block
                    );
                    prop_assert_eq!(tokens, &model.tokens[i * self.block_size..end]);
                }
            }
            for position in 0..model.computed {
                let slot = table
                    .slot(position)
                    .ok_or_else(|| TestCaseError::fail("no slot"))?;
                prop_assert_eq!(
                    pages[slot as usize].as_deref(),
                    Some(&model.tokens[..=position]),
                    "{} position {} reads another prefix",
                    id,
                    position
                );
            }
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let before = self.snapshot();
        match *op {
            Op::Step { seq, n } => {
                self.apply(&Op::Grow { seq, extra: n })?;
                self.check_invariants()?;
                self.apply(&Op::Compute { seq, n: usize::MAX })?;
            }
            Op::Admit {
                seq,
                prompt: k,
                len,
            } => {
                let seq = SeqId(seq);
                let prompt = prompt(k, len);
                let expected = self.manager.cached_prefix_len(&prompt);
                match self.manager.match_prefix(seq, &prompt) {
                    Err(Error::SequenceExists(s)) => {
                        prop_assert_eq!(s, seq);
                        prop_assert!(self.seqs.contains_key(&seq));
                        prop_assert_eq!(self.snapshot(), before);
                    }
                    Ok(hit) => {
                        prop_assert!(!self.seqs.contains_key(&seq));
                        prop_assert_eq!(hit, expected);
                        prop_assert_eq!(hit % self.block_size, 0);
                        prop_assert!(
                            hit < len || hit == 0,
                            "whole prompt of {} reported cached",
                            len
                        );
                        let table = self
                            .manager
                            .table(seq)
                            .ok_or_else(|| TestCaseError::fail("no table"))?;
                        prop_assert_eq!(table.num_tokens(), hit);
                        // Every reused block was registered with exactly the prompt's tokens.
                        for (i, &block) in table.blocks().iter().enumerate() {
                            let tokens = &prompt[i * self.block_size..(i + 1) * self.block_size];
                            prop_assert_eq!(
                                self.manager.allocator().cached_tokens(block),
                                Some(tokens)
                            );
                        }
                        self.queries += 1;
                        self.query_tokens += len as u64;
                        self.hit_tokens += hit as u64;
                        self.seqs.insert(
                            seq,
                            SeqModel {
                                tokens: prompt,
                                computed: hit,
                            },
                        );
                    }
                    Err(e) => return Err(fail(e)),
                }
            }
            Op::Grow { seq, extra } => {
                let seq = SeqId(seq);
                let Some(table) = self.manager.table(seq) else {
                    prop_assert!(matches!(
                        self.manager.grow(seq, extra),
                        Err(Error::UnknownSequence(_))
                    ));
                    return Ok(());
                };
                let allocator = self.manager.allocator();
                let old_blocks = table.blocks().to_vec();
                let old_tokens = table.num_tokens();
                let total = old_tokens + extra;
                let shared_partial_tail = old_blocks
                    .last()
                    .filter(|&&tail| {
                        old_tokens % self.block_size != 0 && allocator.ref_count(tail) > 1
                    })
                    .copied();
                let copy_on_write = extra > 0 && shared_partial_tail.is_some();
                let needed =
                    total.div_ceil(self.block_size) - old_blocks.len() + usize::from(copy_on_write);
                prop_assert_eq!(
                    self.manager.blocks_needed(seq, total).map_err(fail)?,
                    needed
                );
                let free = self.manager.num_free_blocks();
                match self.manager.grow(seq, total) {
                    Ok(()) => {
                        prop_assert!(needed <= free);
                        let table = self
                            .manager
                            .table(seq)
                            .ok_or_else(|| TestCaseError::fail("no table"))?;
                        prop_assert_eq!(table.num_tokens(), total);
                        let kept = old_blocks.len() - usize::from(copy_on_write);
                        prop_assert_eq!(&table.blocks()[..kept], &old_blocks[..kept]);
                        if copy_on_write {
                            let copy = self.manager.pending_copies().last().copied();
                            prop_assert_eq!(copy.map(|c| c.src), shared_partial_tail);
                            prop_assert_eq!(copy.map(|c| c.dst), Some(table.blocks()[kept]));
                        }
                        for block in &table.blocks()[old_blocks.len()..] {
                            prop_assert_eq!(
                                before.blocks[block.0 as usize].1,
                                0,
                                "{} was held",
                                block
                            );
                        }
                        let model = self
                            .seqs
                            .get_mut(&seq)
                            .ok_or_else(|| TestCaseError::fail("no model"))?;
                        while model.tokens.len() < total {
                            let position = model.tokens.len();
                            model.tokens.push(generated(seq, position));
                        }
                    }
                    Err(Error::OutOfBlocks {
                        requested,
                        free: reported,
                    }) => {
                        prop_assert!(needed > free);
                        prop_assert_eq!((requested, reported), (needed, free));
                        prop_assert_eq!(self.snapshot(), before);
                    }
                    Err(e) => return Err(fail(e)),
                }
            }
            Op::Compute { seq, n } => {
                let seq = SeqId(seq);
                let Some(model) = self.seqs.get(&seq) else {
                    prop_assert!(matches!(
                        self.manager.commit(seq, &[]),
                        Err(Error::UnknownSequence(_))
                    ));
                    return Ok(());
                };
                // The engine applies queued copies before the forward pass writes anything.
                let copies = self.manager.take_copies();
                self.pages = self.pages_after_copies(&copies);
                let table = self
                    .manager
                    .table(seq)
                    .ok_or_else(|| TestCaseError::fail("no table"))?;
                let end = model.computed.saturating_add(n).min(table.num_tokens());
                for position in model.computed..end {
                    let slot = table
                        .slot(position)
                        .ok_or_else(|| TestCaseError::fail("no slot"))?;
                    self.pages[slot as usize] = Some(model.tokens[..=position].to_vec());
                }
                let tokens = model.tokens[..end].to_vec();
                self.manager.commit(seq, &tokens).map_err(fail)?;
                if let Some(model) = self.seqs.get_mut(&seq) {
                    model.computed = end;
                }
            }
            Op::Fork { parent, child } => {
                let (parent, child) = (SeqId(parent), SeqId(child));
                let result = self.manager.fork(parent, child);
                match (
                    self.seqs.get(&parent).cloned(),
                    self.seqs.contains_key(&child),
                ) {
                    (_, true) => {
                        prop_assert!(matches!(result, Err(Error::SequenceExists(s)) if s == child));
                        prop_assert_eq!(self.snapshot(), before);
                    }
                    (None, false) => {
                        prop_assert!(
                            matches!(result, Err(Error::UnknownSequence(s)) if s == parent)
                        );
                        prop_assert_eq!(self.snapshot(), before);
                    }
                    (Some(model), false) if model.computed < model_slots(&self.manager, parent) => {
                        let refused = matches!(
                            result,
                            Err(Error::UncommittedSlots { seq, committed, .. })
                                if seq == parent && committed == model.computed
                        );
                        prop_assert!(refused, "fork with uncommitted slots: {:?}", result);
                        prop_assert_eq!(self.snapshot(), before);
                    }
                    (Some(model), false) => {
                        result.map_err(fail)?;
                        let (p, c) = (self.manager.table(parent), self.manager.table(child));
                        prop_assert_eq!(p.map(|t| t.blocks()), c.map(|t| t.blocks()));
                        self.seqs.insert(child, model);
                    }
                }
            }
            Op::Free { seq } => {
                let seq = SeqId(seq);
                match self.manager.free(seq) {
                    Ok(()) => {
                        prop_assert!(self.seqs.remove(&seq).is_some());
                        prop_assert!(self.manager.table(seq).is_none());
                    }
                    Err(Error::UnknownSequence(s)) => {
                        prop_assert_eq!(s, seq);
                        prop_assert!(!self.seqs.contains_key(&seq));
                    }
                    Err(e) => return Err(fail(e)),
                }
            }
        }
        Ok(())
    }

    /// Frees every sequence: all blocks must be free or evictable, and all of them allocatable again,
    /// each exactly once, evicting every cached block.
    fn release_everything(&mut self) -> Result<(), TestCaseError> {
        let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        for id in ids {
            self.manager.free(id).map_err(fail)?;
            self.seqs.remove(&id);
        }
        self.check_invariants()?;
        let num_blocks = self.manager.num_blocks();
        let stats = self.manager.stats();
        prop_assert_eq!(stats.used_blocks, 0);
        prop_assert_eq!(stats.allocatable_blocks(), num_blocks);
        prop_assert!(self.manager.pending_copies().is_empty());

        let everything = SeqId(NUM_SEQS);
        self.manager.add_sequence(everything).map_err(fail)?;
        self.manager
            .grow(everything, num_blocks * self.block_size)
            .map_err(fail)?;
        let table = self
            .manager
            .table(everything)
            .ok_or_else(|| TestCaseError::fail("no table"))?;
        let mut ids: Vec<u32> = table.blocks().iter().map(|b| b.0).collect();
        ids.sort_unstable();
        prop_assert_eq!(ids, (0..num_blocks as u32).collect::<Vec<_>>());
        let after = self.manager.stats();
        prop_assert_eq!(after.cached_blocks, 0);
        prop_assert_eq!(
            after.evictions,
            stats.evictions + stats.evictable_blocks as u64
        );
        prop_assert!(!self.manager.can_allocate(1) || num_blocks == 0);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn block_manager_keeps_its_invariants(
        num_blocks in 0usize..32,
        block_size in 1usize..5,
        ops in prop::collection::vec(op(), 0..80),
    ) {
        let mut world = World::new(num_blocks, block_size);
        for op in &ops {
            world.apply(op)?;
            world.check_invariants()?;
        }
        world.release_everything()?;
    }
}
