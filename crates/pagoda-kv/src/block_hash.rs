//! Chained hashes that name full blocks of tokens in the prefix cache.
//!
//! The hash of a sequence's block `i` covers the block's own tokens and, through the hash of block `i - 1`,
//! every token before it, so one hash stands for a whole prefix and a prompt is looked up block by block
//! without rehashing what came before.

use std::fmt;

/// Hash of one full block of tokens, chained onto the hash of the block before it.
///
/// The function is defined here with fixed constants (no per-process seed), so a hash means the same in
/// every process, on every platform and across releases of this crate unless its changelog says otherwise.
/// It is fast and well mixed but not cryptographic: the prefix cache never trusts a hash alone (see
/// [`KvBlockManager`](crate::KvBlockManager)), so a collision can only cost a cache hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

/// State a chain starts from when a block has no parent (the first block of a sequence):
/// 2^64 / golden ratio, the usual odd constant with no structure in its bits.
const ROOT: u64 = 0x9e37_79b9_7f4a_7c15;

/// Stafford's "mix13" finalizer (D. Stafford, "Better Bit Mixing", 2011; the SplitMix64 output function):
/// a bijection on `u64` in which every input bit flips each output bit with probability close to 1/2.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl BlockHash {
    /// The hash of a block holding `tokens` whose preceding block hashed to `parent` (`None` for a
    /// sequence's first block).
    ///
    /// Absorbs the token count and then the tokens two per 64-bit word, mixing after each word with a
    /// bijection, so inputs that differ only in their last word never collide; the count keeps blocks of
    /// different lengths (such as `[a]` and `[a, 0]`) apart.
    pub fn chained(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        let mut state = mix(parent.map_or(ROOT, |p| p.0) ^ tokens.len() as u64);
        let mut words = tokens.chunks_exact(2);
        for pair in &mut words {
            state = mix(state ^ (u64::from(pair[0]) | (u64::from(pair[1]) << 32)));
        }
        if let [last] = words.remainder() {
            state = mix(state ^ u64::from(*last));
        }
        BlockHash(state)
    }

    /// The hashes of every full block of `tokens`, in order: entry `i` covers `tokens[..(i + 1) * block_size]`.
    ///
    /// A trailing partial block gets no hash; `block_size == 0` gives none at all.
    pub fn prefix_chain(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
        if block_size == 0 {
            return Vec::new();
        }
        let mut parent = None;
        tokens
            .chunks_exact(block_size)
            .map(|block| {
                let hash = BlockHash::chained(parent, block);
                parent = Some(hash);
                hash
            })
            .collect()
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn mix_matches_splitmix64_reference_outputs() {
        // SplitMix64 with seed 0 yields mix(0x9e3779b97f4a7c15) first (Vigna's reference splitmix64.c).
        assert_eq!(mix(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
        assert_eq!(mix(0), 0);
    }

    #[test]
    fn hashes_are_pinned_across_processes_and_releases() {
        // Fixed values: a change here changes every stored or logged block hash.
        let first = BlockHash::chained(None, &[1, 2, 3, 4]);
        let second = BlockHash::chained(Some(first), &[5, 6, 7]);
        assert_eq!(first, BlockHash(PINNED_FIRST));
        assert_eq!(second, BlockHash(PINNED_SECOND));
        assert_eq!(first.to_string(), format!("{PINNED_FIRST:016x}"));
    }

    const PINNED_FIRST: u64 = 0x4aee_9939_6b73_3686;
    const PINNED_SECOND: u64 = 0x09f2_3819_313e_abe9;

    #[test]
    fn the_chain_depends_on_every_earlier_token() {
        let a = BlockHash::prefix_chain(&[1, 2, 3, 4, 5, 6], 2);
        let b = BlockHash::prefix_chain(&[9, 2, 3, 4, 5, 6], 2);
        assert_eq!(a.len(), 3);
        // Same tokens in blocks 1 and 2, different first block: every hash differs.
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert_eq!(a[0], BlockHash::chained(None, &[1, 2]));
        assert_eq!(a[2], BlockHash::chained(Some(a[1]), &[5, 6]));
    }

    #[test]
    fn partial_blocks_and_zero_block_size_get_no_hash() {
        assert_eq!(BlockHash::prefix_chain(&[1, 2, 3], 2).len(), 1);
        assert!(BlockHash::prefix_chain(&[1], 2).is_empty());
        assert!(BlockHash::prefix_chain(&[1, 2, 3], 0).is_empty());
    }

    #[test]
    fn padding_and_order_change_the_hash() {
        let base = BlockHash::chained(None, &[7]);
        assert_ne!(base, BlockHash::chained(None, &[7, 0]));
        assert_ne!(base, BlockHash::chained(None, &[]));
        assert_ne!(
            BlockHash::chained(None, &[1, 2]),
            BlockHash::chained(None, &[2, 1])
        );
        assert_ne!(
            BlockHash::chained(None, &[1, 2]),
            BlockHash::chained(Some(BlockHash(0)), &[1, 2])
        );
    }

    #[test]
    fn nearby_inputs_spread_over_the_whole_range() {
        // Every block [i, j] of small token ids: no collisions, and the top bits (what a hash table
        // indexes by) take all 256 values about equally often.
        let mut seen = HashSet::new();
        let mut top_byte = [0u32; 256];
        for i in 0..256u32 {
            for j in 0..256u32 {
                let hash = BlockHash::chained(None, &[i, j]).0;
                assert!(seen.insert(hash), "collision at [{i}, {j}]");
                top_byte[(hash >> 56) as usize] += 1;
            }
        }
        // 65536 samples over 256 buckets: 256 expected per bucket, standard deviation 16.
        assert!(
            top_byte.iter().all(|&n| (160..=352).contains(&n)),
            "{top_byte:?}"
        );
    }
}
