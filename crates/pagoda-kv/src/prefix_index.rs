//! The prefix cache's index: which block holds which full block of tokens, and after which cached block.
//!
//! A hash alone is not trusted. Each entry keeps its block's tokens and a reference to the *entry* of the
//! block before it (not that block's hash), and every entry gets a serial number that is never reused.
//! A lookup for block `i` of a prompt succeeds only if the entry's tokens equal the prompt's block `i` and
//! its parent reference names exactly the entry matched for block `i - 1`. By induction the matched
//! blocks hold the prompt's own tokens from the first one on, whatever the hashes do: a collision or a
//! parent that was evicted and replaced makes a lookup miss, never return the wrong keys and values.

use std::collections::HashMap;

use crate::block_allocator::BlockId;
use crate::block_hash::BlockHash;

/// One registration of a block in the cache. A block that is evicted and cached again gets a new serial,
/// so a reference to its old entry stops matching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryRef {
    pub(crate) block: BlockId,
    serial: u64,
}

/// What the cache knows about one cached block.
#[derive(Clone, Debug)]
struct Entry {
    hash: BlockHash,
    /// The entry of the block before this one in the sequence that cached it; `None` for a first block.
    parent: Option<EntryRef>,
    tokens: Box<[u32]>,
    serial: u64,
}

/// The outcome of looking a block up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// A block with exactly these tokens after exactly this parent entry is cached.
    Hit(EntryRef),
    /// Nothing is cached under the hash.
    Vacant,
    /// The hash belongs to a block whose parent entry is gone (evicted): unreachable by any lookup, so it
    /// may be replaced.
    Stale(BlockId),
    /// The hash belongs to a different, still reachable block: a hash collision (or inconsistent tokens).
    Conflict,
}

/// Cached blocks by hash, with the tokens and parent of each.
#[derive(Clone, Debug)]
pub(crate) struct PrefixIndex {
    by_hash: HashMap<BlockHash, BlockId>,
    /// Indexed by block id; `None` for blocks that are not cached.
    entries: Vec<Option<Entry>>,
    next_serial: u64,
}

impl PrefixIndex {
    /// An empty index over blocks `0..num_blocks`.
    pub(crate) fn new(num_blocks: usize) -> Self {
        Self {
            by_hash: HashMap::new(),
            entries: vec![None; num_blocks],
            next_serial: 0,
        }
    }

    /// Number of cached blocks.
    pub(crate) fn len(&self) -> usize {
        self.by_hash.len()
    }

    fn entry(&self, block: BlockId) -> Option<&Entry> {
        self.entries.get(block.0 as usize)?.as_ref()
    }

    /// Whether `block` is cached.
    pub(crate) fn contains(&self, block: BlockId) -> bool {
        self.entry(block).is_some()
    }

    /// The hash `block` is cached under.
    pub(crate) fn hash(&self, block: BlockId) -> Option<BlockHash> {
        self.entry(block).map(|e| e.hash)
    }

    /// The tokens `block` was cached with.
    pub(crate) fn tokens(&self, block: BlockId) -> Option<&[u32]> {
        self.entry(block).map(|e| &*e.tokens)
    }

    /// Whether `entry` is still the registration of its block.
    pub(crate) fn is_current(&self, entry: EntryRef) -> bool {
        self.entry(entry.block)
            .is_some_and(|e| e.serial == entry.serial)
    }

    /// Looks up the block cached under `hash` and checks that it holds `tokens` after `parent`.
    pub(crate) fn find(&self, hash: BlockHash, parent: Option<EntryRef>, tokens: &[u32]) -> Lookup {
        let Some((&block, entry)) = self
            .by_hash
            .get(&hash)
            .and_then(|block| Some((block, self.entry(*block)?)))
        else {
            return Lookup::Vacant;
        };
        if entry.parent == parent && *entry.tokens == *tokens {
            Lookup::Hit(EntryRef {
                block,
                serial: entry.serial,
            })
        } else if entry.parent.is_some_and(|p| !self.is_current(p)) {
            Lookup::Stale(block)
        } else {
            Lookup::Conflict
        }
    }

    /// Caches `block` under `hash`. Returns `None` (and changes nothing) if the block is already cached,
    /// the hash is taken, or the block is outside the index.
    pub(crate) fn insert(
        &mut self,
        block: BlockId,
        hash: BlockHash,
        parent: Option<EntryRef>,
        tokens: &[u32],
    ) -> Option<EntryRef> {
        let slot = self.entries.get_mut(block.0 as usize)?;
        if slot.is_some() || self.by_hash.contains_key(&hash) {
            return None;
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        *slot = Some(Entry {
            hash,
            parent,
            tokens: tokens.into(),
            serial,
        });
        self.by_hash.insert(hash, block);
        Some(EntryRef { block, serial })
    }

    /// Forgets `block`'s entry. Returns whether it was cached.
    pub(crate) fn remove(&mut self, block: BlockId) -> bool {
        let Some(entry) = self
            .entries
            .get_mut(block.0 as usize)
            .and_then(Option::take)
        else {
            return false;
        };
        self.by_hash.remove(&entry.hash);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hit_needs_the_same_tokens_after_the_same_parent() {
        let mut index = PrefixIndex::new(4);
        let h0 = BlockHash::chained(None, &[1, 2]);
        let root = index.insert(BlockId(2), h0, None, &[1, 2]).unwrap();
        assert_eq!(index.find(h0, None, &[1, 2]), Lookup::Hit(root));
        assert_eq!(root.block, BlockId(2));
        // The same hash with other tokens or another parent is a collision, not a hit.
        assert_eq!(index.find(h0, None, &[1, 3]), Lookup::Conflict);
        assert_eq!(index.find(h0, Some(root), &[1, 2]), Lookup::Conflict);
        assert_eq!(index.find(BlockHash(5), None, &[1, 2]), Lookup::Vacant);
        assert_eq!(index.len(), 1);
        assert_eq!(index.tokens(BlockId(2)), Some(&[1, 2][..]));
        assert_eq!(index.hash(BlockId(2)), Some(h0));
    }

    #[test]
    fn an_entry_whose_parent_is_gone_is_stale() {
        let mut index = PrefixIndex::new(4);
        let h0 = BlockHash::chained(None, &[1]);
        let h1 = BlockHash::chained(Some(h0), &[2]);
        let parent = index.insert(BlockId(0), h0, None, &[1]).unwrap();
        let child = index.insert(BlockId(1), h1, Some(parent), &[2]).unwrap();
        assert_eq!(index.find(h1, Some(parent), &[2]), Lookup::Hit(child));
        assert!(index.remove(BlockId(0)));
        assert!(!index.is_current(parent));
        // Block 0 cached again with the same tokens is a new registration: the child no longer matches it.
        let again = index.insert(BlockId(0), h0, None, &[1]).unwrap();
        assert_ne!(again, parent);
        assert_eq!(index.find(h1, Some(again), &[2]), Lookup::Stale(BlockId(1)));
    }

    #[test]
    fn insert_refuses_taken_blocks_and_hashes() {
        let mut index = PrefixIndex::new(2);
        let h = BlockHash(7);
        assert!(index.insert(BlockId(0), h, None, &[1]).is_some());
        assert!(index.insert(BlockId(0), BlockHash(8), None, &[1]).is_none());
        assert!(index.insert(BlockId(1), h, None, &[1]).is_none());
        assert!(index.insert(BlockId(2), BlockHash(9), None, &[1]).is_none());
        assert!(!index.remove(BlockId(1)));
        assert!(!index.remove(BlockId(9)));
        assert!(index.remove(BlockId(0)));
        assert_eq!(index.len(), 0);
        assert!(!index.contains(BlockId(0)));
    }
}
