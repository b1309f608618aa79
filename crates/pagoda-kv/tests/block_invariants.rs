//! Property tests of the block allocator and block tables under random interleavings of everything a
//! scheduler does to them: growing sequences, forking, copy-on-write, freeing, and outside holders
//! (such as a prefix cache) retaining and releasing blocks.

use pagoda_kv::{BlockAllocator, BlockId, BlockTable, Error};
use proptest::prelude::*;

/// Sequence slots the operations pick from.
const NUM_SEQS: usize = 5;

#[derive(Clone, Debug)]
enum Op {
    /// Grow sequence `seq` by `n` tokens.
    Append { seq: usize, n: usize },
    /// Free sequence `seq`'s blocks.
    Free { seq: usize },
    /// Replace sequence `dst` by a fork of sequence `src`.
    Fork { src: usize, dst: usize },
    /// Make sequence `seq`'s tail block exclusive.
    CopyOnWrite { seq: usize },
    /// An outside holder allocates a block of its own.
    AllocateHeld,
    /// An outside holder retains one of sequence `seq`'s blocks.
    RetainHeld { seq: usize, index: usize },
    /// An outside holder releases one of its blocks.
    ReleaseHeld { index: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let seq = 0..NUM_SEQS;
    prop_oneof![
        4 => (seq.clone(), 0usize..12).prop_map(|(seq, n)| Op::Append { seq, n }),
        1 => seq.clone().prop_map(|seq| Op::Free { seq }),
        1 => (seq.clone(), seq.clone()).prop_map(|(src, dst)| Op::Fork { src, dst }),
        1 => seq.clone().prop_map(|seq| Op::CopyOnWrite { seq }),
        1 => Just(Op::AllocateHeld),
        1 => (seq, any::<usize>()).prop_map(|(seq, index)| Op::RetainHeld { seq, index }),
        1 => any::<usize>().prop_map(|index| Op::ReleaseHeld { index }),
    ]
}

/// The allocator and tables under test, plus the blocks outside holders own (one entry per reference).
struct World {
    allocator: BlockAllocator,
    tables: Vec<BlockTable>,
    held: Vec<BlockId>,
}

impl World {
    fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            allocator: BlockAllocator::new(num_blocks),
            tables: (0..NUM_SEQS).map(|_| BlockTable::new(block_size)).collect(),
            held: Vec::new(),
        }
    }

    /// Reference count every block should have: one per table naming it, one per outside reference.
    fn expected_ref_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.allocator.num_blocks()];
        let table_blocks = self.tables.iter().flat_map(|t| t.blocks());
        for block in table_blocks.chain(&self.held) {
            counts[block.0 as usize] += 1;
        }
        counts
    }

    fn ref_counts(&self) -> Vec<u32> {
        (0..self.allocator.num_blocks())
            .map(|id| self.allocator.ref_count(BlockId(id as u32)))
            .collect()
    }

    fn shared_partial_tail(&self, seq: usize) -> Option<BlockId> {
        let table = &self.tables[seq];
        let tail = *table.blocks().last()?;
        let partial = !table.num_tokens().is_multiple_of(table.block_size());
        (partial && self.allocator.ref_count(tail) > 1).then_some(tail)
    }

    fn check_invariants(&self) -> Result<(), TestCaseError> {
        let counts = self.ref_counts();
        prop_assert_eq!(&counts, &self.expected_ref_counts());
        let live = counts.iter().filter(|&&c| c > 0).count();
        prop_assert_eq!(
            self.allocator.num_free() + live,
            self.allocator.num_blocks()
        );
        for table in &self.tables {
            for block in table.blocks() {
                prop_assert!(self.allocator.is_live(*block), "table names dead {block}");
            }
            let mut distinct = table.blocks().to_vec();
            distinct.sort();
            distinct.dedup();
            prop_assert_eq!(
                distinct.len(),
                table.blocks().len(),
                "table names a block twice"
            );
            prop_assert_eq!(
                table.blocks().len(),
                table.num_tokens().div_ceil(table.block_size())
            );
        }
        Ok(())
    }

    /// Blocks that became live during an operation must have been free before it.
    fn check_fresh(before: &[u32], after: &[u32]) -> Result<(), TestCaseError> {
        for (id, (&b, &a)) in before.iter().zip(after).enumerate() {
            prop_assert!(
                b > 0 || a <= 1,
                "free block {id} handed out {a} times in one operation"
            );
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let before = self.ref_counts();
        match *op {
            Op::Append { seq, n } => {
                let old_blocks = self.tables[seq].blocks().to_vec();
                let old_tokens = self.tables[seq].num_tokens();
                let needed = self.tables[seq].blocks_needed(n);
                let shared_tail = self.shared_partial_tail(seq).filter(|_| n > 0);
                let free = self.allocator.num_free();
                let result = self.tables[seq].append(n, &mut self.allocator);
                match (shared_tail, result) {
                    (Some(tail), Err(Error::SharedTail(b))) => prop_assert_eq!(b, tail),
                    (None, Ok(())) => {
                        prop_assert!(needed <= free);
                        let table = &self.tables[seq];
                        prop_assert_eq!(table.num_tokens(), old_tokens + n);
                        prop_assert_eq!(&table.blocks()[..old_blocks.len()], &old_blocks[..]);
                        for block in &table.blocks()[old_blocks.len()..] {
                            prop_assert_eq!(before[block.0 as usize], 0, "{} was live", block);
                        }
                    }
                    (
                        None,
                        Err(Error::OutOfBlocks {
                            requested,
                            free: reported,
                        }),
                    ) => {
                        prop_assert!(needed > free);
                        prop_assert_eq!((requested, reported), (needed, free));
                    }
                    (expected, got) => {
                        return Err(TestCaseError::fail(format!(
                            "append({n}): expected shared tail {expected:?}, got {got:?}"
                        )));
                    }
                }
                if self.tables[seq].num_tokens() == old_tokens {
                    // A failed (or empty) append leaves everything as it was.
                    prop_assert_eq!(self.tables[seq].blocks(), &old_blocks[..]);
                    prop_assert_eq!(self.ref_counts(), before.clone());
                    prop_assert_eq!(self.allocator.num_free(), free);
                }
            }
            Op::Free { seq } => {
                self.tables[seq]
                    .free(&mut self.allocator)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(self.tables[seq].is_empty());
            }
            Op::Fork { src, dst } => {
                if src != dst {
                    self.tables[dst]
                        .free(&mut self.allocator)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let fork = self.tables[src]
                        .fork(&mut self.allocator)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(fork.blocks(), self.tables[src].blocks());
                    prop_assert_eq!(fork.num_tokens(), self.tables[src].num_tokens());
                    self.tables[dst] = fork;
                }
            }
            Op::CopyOnWrite { seq } => {
                let shared_tail = self.shared_partial_tail(seq);
                let old_blocks = self.tables[seq].blocks().to_vec();
                let free = self.allocator.num_free();
                match self.tables[seq].copy_on_write_tail(&mut self.allocator) {
                    Ok(None) => prop_assert_eq!(shared_tail, None),
                    Ok(Some(copy)) => {
                        prop_assert_eq!(Some(copy.src), shared_tail);
                        prop_assert_eq!(before[copy.dst.0 as usize], 0);
                        let blocks = self.tables[seq].blocks();
                        prop_assert_eq!(blocks.last(), Some(&copy.dst));
                        prop_assert_eq!(
                            &blocks[..blocks.len() - 1],
                            &old_blocks[..old_blocks.len() - 1]
                        );
                        prop_assert!(self.shared_partial_tail(seq).is_none());
                    }
                    Err(Error::OutOfBlocks { .. }) => {
                        prop_assert!(shared_tail.is_some() && free == 0);
                        prop_assert_eq!(self.tables[seq].blocks(), &old_blocks[..]);
                        prop_assert_eq!(self.ref_counts(), before.clone());
                    }
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
            Op::AllocateHeld => {
                let free = self.allocator.num_free();
                match self.allocator.allocate() {
                    Ok(block) => {
                        prop_assert_eq!(before[block.0 as usize], 0, "{} was live", block);
                        self.held.push(block);
                    }
                    Err(Error::OutOfBlocks { .. }) => prop_assert_eq!(free, 0),
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
            Op::RetainHeld { seq, index } => {
                let blocks = self.tables[seq].blocks();
                if !blocks.is_empty() {
                    let block = blocks[index % blocks.len()];
                    self.allocator
                        .retain(block)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    self.held.push(block);
                }
            }
            Op::ReleaseHeld { index } => {
                if !self.held.is_empty() {
                    let block = self.held.swap_remove(index % self.held.len());
                    self.allocator
                        .release(block)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
            }
        }
        Self::check_fresh(&before, &self.ref_counts())
    }

    /// Frees every table and outside reference; afterwards the whole pool must be free.
    fn release_everything(&mut self) -> Result<(), TestCaseError> {
        for table in &mut self.tables {
            table
                .free(&mut self.allocator)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        for block in self.held.drain(..) {
            self.allocator
                .release(block)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        prop_assert_eq!(self.allocator.num_free(), self.allocator.num_blocks());
        prop_assert!(self.ref_counts().iter().all(|&c| c == 0));
        // Every block can be handed out again, each exactly once.
        let mut all = self
            .allocator
            .allocate_many(self.allocator.num_blocks())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        all.sort();
        let ids: Vec<u32> = all.iter().map(|b| b.0).collect();
        prop_assert_eq!(
            ids,
            (0..self.allocator.num_blocks() as u32).collect::<Vec<_>>()
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn allocator_and_tables_keep_their_invariants(
        num_blocks in 0usize..24,
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

    #[test]
    fn slots_of_live_tokens_are_never_shared_by_writers(
        num_blocks in 1usize..16,
        block_size in 1usize..5,
        appends in prop::collection::vec((0..NUM_SEQS, 1usize..9), 0..40),
    ) {
        // Without forks every table owns its blocks, so no two tokens may map to the same slot.
        let mut world = World::new(num_blocks, block_size);
        for &(seq, n) in &appends {
            let _ = world.tables[seq].append(n, &mut world.allocator);
        }
        let mut slots = Vec::new();
        for table in &world.tables {
            for position in 0..table.num_tokens() {
                let slot = table.slot(position);
                prop_assert!(slot.is_some());
                slots.extend(slot);
            }
            prop_assert_eq!(table.slot(table.num_tokens()), None);
        }
        let total = slots.len();
        slots.sort_unstable();
        slots.dedup();
        prop_assert_eq!(slots.len(), total);
        prop_assert!(slots.iter().all(|&s| (s as usize) < num_blocks * block_size));
    }
}
