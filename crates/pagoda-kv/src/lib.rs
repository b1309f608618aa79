//! Paged KV cache for pagoda.
//!
//! Keys and values of every sequence live in fixed-size *blocks* of a shared pool, as in vLLM's
//! PagedAttention (Kwon et al., 2023): a sequence grows one block at a time, never needs contiguous
//! memory, and sequences can share blocks (forks, common prefixes) by reference counting.
//!
//! - [`BlockAllocator`] hands out block ids and counts their holders.
//! - [`BlockTable`] lists one sequence's blocks and maps token positions to flat slots.
//! - [`KvCache`] owns the per-layer page tensors ([`LayerPages`]) together with an allocator.
//!
//! The allocator and block tables are plain bookkeeping with no tensor types, so a scheduler can plan
//! with them without touching device memory.
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
mod block_table;
mod error;
mod pages;

pub use block_allocator::{BlockAllocator, BlockId};
pub use block_table::{BlockCopy, BlockTable};
pub use error::{Error, Result};
pub use pages::{KvCache, KvCacheConfig, LayerPages};
