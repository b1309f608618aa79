//! The scheduler's view of KV memory ([`pagoda_sched::KvSpace`]) over pagoda-kv's
//! [`KvBlockManager`]: admitting a request reserves the cached blocks its prompt starts with,
//! growing it allocates slots, releasing it frees its blocks (full ones stay in the prefix cache).
//!
//! Requests and sequences share their numbers: request `n` is sequence `n` of the manager.

use pagoda_kv::{KvBlockManager, SeqId};
use pagoda_sched::{KvSpace, RequestId};

/// A [`KvBlockManager`] as the scheduler plans with it.
///
/// The engine also drives the manager directly, through [`Self::manager_mut`]: it commits each
/// request's computed tokens after a forward pass (which is what fills the prefix cache) and
/// applies the copy-on-write copies the manager queues.
pub struct ManagedKvSpace {
    manager: KvBlockManager,
    prefix_caching: bool,
}

impl ManagedKvSpace {
    /// A space that reuses cached prompt prefixes.
    pub fn new(manager: KvBlockManager) -> Self {
        Self {
            manager,
            prefix_caching: true,
        }
    }

    /// A space that never looks prefixes up: every request computes its whole prompt.
    pub fn without_prefix_caching(manager: KvBlockManager) -> Self {
        Self {
            manager,
            prefix_caching: false,
        }
    }

    /// Whether admissions reuse cached prefixes.
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    pub fn manager(&self) -> &KvBlockManager {
        &self.manager
    }

    pub fn manager_mut(&mut self) -> &mut KvBlockManager {
        &mut self.manager
    }
}

fn sequence(id: RequestId) -> SeqId {
    SeqId(id.0)
}

impl KvSpace for ManagedKvSpace {
    fn block_size(&self) -> usize {
        self.manager.block_size()
    }

    fn num_free_blocks(&self) -> usize {
        self.manager.num_free_blocks()
    }

    fn num_total_blocks(&self) -> usize {
        self.manager.num_blocks()
    }

    fn reserve_prefix(&mut self, id: RequestId, tokens: &[u32]) -> usize {
        let seq = sequence(id);
        // Reserved already (the scheduler releases a request before reserving it again, so only
        // a caller driving the manager itself gets here): what its table holds is reserved.
        if let Some(table) = self.manager.table(seq) {
            return table.num_tokens();
        }
        if !self.prefix_caching {
            // Tracked already is excluded above, so adding cannot fail.
            let _ = self.manager.add_sequence(seq);
            return 0;
        }
        // match_prefix fails only for a tracked sequence, excluded above; should the pool refuse
        // a cached block anyway, the request starts from nothing instead.
        match self.manager.match_prefix(seq, tokens) {
            Ok(cached) => cached,
            Err(_) => {
                let _ = self.manager.add_sequence(seq);
                0
            }
        }
    }

    fn grow(&mut self, id: RequestId, num_tokens: usize) -> bool {
        let seq = sequence(id);
        if !self.manager.contains(seq) && self.manager.add_sequence(seq).is_err() {
            return false;
        }
        self.manager.grow(seq, num_tokens).is_ok()
    }

    fn release(&mut self, id: RequestId) {
        // An unknown request holds nothing: nothing to release.
        let _ = self.manager.free(sequence(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(blocks: usize) -> ManagedKvSpace {
        ManagedKvSpace::new(KvBlockManager::new(blocks, 16).expect("a valid pool"))
    }

    #[test]
    fn growth_takes_blocks_and_release_returns_them() {
        let mut kv = space(8);
        assert_eq!((kv.num_total_blocks(), kv.num_free_blocks()), (8, 8));
        assert_eq!(kv.reserve_prefix(RequestId(1), &[5; 40]), 0);
        assert!(kv.grow(RequestId(1), 40));
        assert_eq!(kv.num_free_blocks(), 5);
        // More than the pool holds: refused, nothing taken.
        assert!(!kv.grow(RequestId(2), 16 * 6));
        assert_eq!(kv.num_free_blocks(), 5);
        kv.release(RequestId(1));
        kv.release(RequestId(2));
        assert_eq!(kv.num_free_blocks(), 8);
    }

    #[test]
    fn a_committed_prompt_is_reused_by_the_next_request() {
        let mut kv = space(8);
        let prompt: Vec<u32> = (0..40).collect();
        kv.reserve_prefix(RequestId(1), &prompt);
        assert!(kv.grow(RequestId(1), prompt.len()));
        kv.manager_mut()
            .commit(SeqId(1), &prompt)
            .expect("the table covers the prompt");
        kv.release(RequestId(1));
        // Two full blocks are cached; the third is partial, and the last token is always computed.
        assert_eq!(kv.reserve_prefix(RequestId(2), &prompt), 32);
        assert_eq!(kv.manager().stats().prefix_hit_tokens, 32);
        // A prompt that differs in its first block shares nothing.
        let other: Vec<u32> = (1..41).collect();
        assert_eq!(kv.reserve_prefix(RequestId(3), &other), 0);
    }

    #[test]
    fn without_prefix_caching_nothing_is_reused() {
        let manager = KvBlockManager::new(8, 16).expect("a valid pool");
        let mut kv = ManagedKvSpace::without_prefix_caching(manager);
        let prompt: Vec<u32> = (0..40).collect();
        kv.reserve_prefix(RequestId(1), &prompt);
        assert!(kv.grow(RequestId(1), prompt.len()));
        kv.manager_mut()
            .commit(SeqId(1), &prompt)
            .expect("committed");
        kv.release(RequestId(1));
        assert_eq!(kv.reserve_prefix(RequestId(2), &prompt), 0);
        assert_eq!(kv.manager().stats().prefix_queries, 0);
        assert!(!kv.prefix_caching());
    }
}
