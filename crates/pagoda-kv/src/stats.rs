//! A snapshot of KV-cache occupancy and prefix-cache effectiveness, for metrics and admission decisions.

/// Block counts and prefix-cache counters of a [`KvBlockManager`](crate::KvBlockManager) at one moment.
///
/// Every block is exactly one of used, evictable or free, so
/// `used_blocks + evictable_blocks + free_blocks == num_blocks`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvStats {
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Blocks held by at least one sequence.
    pub used_blocks: usize,
    /// Blocks no sequence holds but whose contents the prefix cache keeps for reuse; allocatable.
    pub evictable_blocks: usize,
    /// Blocks neither held nor cached.
    pub free_blocks: usize,
    /// Blocks in the prefix cache, held or evictable.
    pub cached_blocks: usize,
    /// Sequences with a block table.
    pub num_sequences: usize,
    /// Prompts looked up in the prefix cache (`match_prefix` calls).
    pub prefix_queries: u64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_query_tokens: u64,
    /// Prompt tokens found in the prefix cache, whose prefill could be skipped.
    pub prefix_hit_tokens: u64,
    /// Cached blocks evicted to make room for new ones.
    pub evictions: u64,
}

impl KvStats {
    /// Fraction of the pool held by sequences, in `[0, 1]`; 0 for an empty pool. Evictable blocks count
    /// as available, since allocation reclaims them.
    pub fn usage(&self) -> f64 {
        ratio(self.used_blocks as f64, self.num_blocks as f64)
    }

    /// Fraction of looked-up prompt tokens that were found in the prefix cache, in `[0, 1]`; 0 before the
    /// first lookup.
    pub fn prefix_hit_rate(&self) -> f64 {
        ratio(
            self.prefix_hit_tokens as f64,
            self.prefix_query_tokens as f64,
        )
    }

    /// Blocks allocation can hand out: free plus evictable.
    pub fn allocatable_blocks(&self) -> usize {
        self.free_blocks + self.evictable_blocks
    }
}

fn ratio(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { part / whole } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_of_empty_pools_and_no_queries_are_zero() {
        let stats = KvStats::default();
        assert_eq!(stats.usage(), 0.0);
        assert_eq!(stats.prefix_hit_rate(), 0.0);
    }

    #[test]
    fn fractions_divide_by_the_totals() {
        let stats = KvStats {
            num_blocks: 8,
            used_blocks: 2,
            evictable_blocks: 3,
            free_blocks: 3,
            prefix_query_tokens: 40,
            prefix_hit_tokens: 10,
            ..KvStats::default()
        };
        assert_eq!(stats.usage(), 0.25);
        assert_eq!(stats.prefix_hit_rate(), 0.25);
        assert_eq!(stats.allocatable_blocks(), 6);
    }
}
