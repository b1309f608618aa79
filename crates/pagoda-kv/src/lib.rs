//! Paged KV cache for pagoda.
//!
//! Keys and values of every sequence live in fixed-size *blocks* of a shared pool, as in vLLM's
//! PagedAttention (Kwon et al., 2023): a sequence grows one block at a time, never needs contiguous
//! memory, and sequences can share blocks (forks, common prefixes) by reference counting.
//!
//! - [`BlockAllocator`] hands out block ids, counts their holders, and evicts cached blocks no one holds
//!   (least recently released first) when no free block is left.
//! - [`BlockTable`] lists one sequence's blocks and maps token positions to flat slots.
//! - [`KvBlockManager`] is what a scheduler and an engine drive: one table per [`SeqId`], prefix caching
//!   of full blocks by chained [`BlockHash`]es, copy-on-write after forks, and [`KvStats`].
//! - `KvCache` owns the per-layer page tensors (`LayerPages`, shaped by `KvCacheConfig`) and applies
//!   copy-on-write [`BlockCopy`]s to them. These three exist with the `pages` feature, on by default.
//!
//! Everything but the page tensors is plain bookkeeping with no tensor types; built with
//! `default-features = false` the crate does not depend on `pagoda-tensor` at all, so a scheduler can
//! plan with it without touching device memory.
//!
//! A second request with the same prompt prefix skips the prefill of the cached blocks:
//!
//! ```
//! use pagoda_kv::{KvBlockManager, SeqId};
//!
//! let mut kv = KvBlockManager::new(16, 4)?;
//! let prompt: Vec<u32> = (100..110).collect(); // two full blocks of 4 and two more tokens
//!
//! // The first request finds nothing cached, reserves slots for its prompt, and after the forward pass
//! // commits the computed tokens, which caches the two full blocks.
//! assert_eq!(kv.match_prefix(SeqId(1), &prompt)?, 0);
//! kv.grow(SeqId(1), prompt.len())?;
//! kv.commit(SeqId(1), &prompt)?;
//! kv.free(SeqId(1))?; // the cached blocks stay, evictable
//!
//! // The second request reuses them: only tokens 8 and 9 need a prefill.
//! let cached = kv.match_prefix(SeqId(2), &prompt)?;
//! assert_eq!(cached, 8);
//! kv.grow(SeqId(2), prompt.len())?;
//! assert_eq!(kv.table(SeqId(2)).map(|t| t.num_tokens()), Some(10));
//! let stats = kv.stats();
//! assert_eq!((stats.prefix_hit_tokens, stats.prefix_query_tokens), (8, 20));
//! assert_eq!(stats.used_blocks, 3);
//! # Ok::<(), pagoda_kv::Error>(())
//! ```
//!
//! The allocator and block tables can also be used directly:
//!
//! ```
//! use pagoda_kv::{BlockAllocator, BlockTable};
//!
//! let mut allocator = BlockAllocator::new(8);
//! let mut table = BlockTable::new(16);
//! assert_eq!(table.blocks_needed(20), 2);
//! table.append(20, &mut allocator)?;
//! assert_eq!(allocator.num_free(), 6);
//! // Token 17 sits at offset 1 of the table's second block (block 1).
//! assert_eq!(table.slot(17), Some(16 + 1));
//! table.free(&mut allocator)?;
//! assert_eq!(allocator.num_free(), 8);
//! # Ok::<(), pagoda_kv::Error>(())
//! ```

mod block_allocator;
mod block_hash;
mod block_manager;
mod block_table;
mod error;
mod lru_list;
#[cfg(feature = "pages")]
mod pages;
mod prefix_index;
mod stats;

pub use block_allocator::{BlockAllocator, BlockId, BlockState};
pub use block_hash::BlockHash;
pub use block_manager::{KvBlockManager, SeqId};
pub use block_table::{BlockCopy, BlockTable};
pub use error::{Error, Result};
#[cfg(feature = "pages")]
pub use pages::{KvCache, KvCacheConfig, LayerPages};
pub use stats::KvStats;
