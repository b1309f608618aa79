//! The page tensors that hold keys and values, and the cache that ties them to a block allocator.
//!
//! Every layer has one K and one V tensor of shape `[num_blocks, block_size, num_kv_heads, head_dim]`,
//! contiguous, so the keys of slot `s` (see [`BlockTable::slot`]) start at element
//! `s * num_kv_heads * head_dim`. Attention kernels rely on this layout.

use pagoda_tensor::{CpuStorage, DType, Device, Storage, Tensor};

use crate::block_allocator::BlockAllocator;
use crate::block_table::{BlockCopy, BlockTable};
use crate::error::{Error, Result};

/// Geometry, element type and placement of a paged KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Transformer layers, each with its own K and V pages.
    pub num_layers: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads per layer (fewer than query heads under grouped-query attention).
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Element type of the pages.
    pub dtype: DType,
    /// Where the pages live.
    pub device: Device,
}

impl KvCacheConfig {
    /// Dimensions of each layer's K (and V) tensor: `[num_blocks, block_size, num_kv_heads, head_dim]`.
    pub fn page_shape(&self) -> [usize; 4] {
        [
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
        ]
    }

    /// Bytes one block occupies across K and V of every layer (saturating at `usize::MAX`).
    pub fn bytes_per_block(&self) -> usize {
        [
            2,
            self.num_layers,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            self.dtype.size_in_bytes(),
        ]
        .into_iter()
        .fold(1, usize::saturating_mul)
    }

    /// Bytes of all page tensors together (saturating at `usize::MAX`).
    pub fn total_bytes(&self) -> usize {
        self.bytes_per_block().saturating_mul(self.num_blocks)
    }

    /// Largest `num_blocks` this geometry allows: block ids are `u32`, and so are slots
    /// (`block * block_size + offset`), which is what attention kernels index pages with.
    pub fn max_num_blocks(&self) -> usize {
        let slots = u32::MAX as usize + 1;
        BlockAllocator::max_blocks().min(slots / self.block_size.max(1))
    }

    /// How many blocks of this geometry fit in `budget_bytes` (the `num_blocks` field is ignored),
    /// capped at [`max_num_blocks`](Self::max_num_blocks). 0 if a single block does not fit or the
    /// geometry has a zero dimension.
    pub fn blocks_for_budget(&self, budget_bytes: usize) -> usize {
        budget_bytes
            .checked_div(self.bytes_per_block())
            .unwrap_or(0)
            .min(self.max_num_blocks())
    }

    /// Checks that a cache of this configuration can be built and addressed.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("num_layers", self.num_layers),
            ("num_blocks", self.num_blocks),
            ("block_size", self.block_size),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, value)| *value == 0) {
            return Err(Error::InvalidConfig(format!("{name} must be > 0")));
        }
        if self.num_blocks > self.max_num_blocks() {
            return Err(Error::InvalidConfig(format!(
                "{} blocks of {} tokens exceed the u32 slot range (at most {} blocks)",
                self.num_blocks,
                self.block_size,
                self.max_num_blocks()
            )));
        }
        let page_bytes = self
            .page_shape()
            .into_iter()
            .try_fold(self.dtype.size_in_bytes(), usize::checked_mul);
        if page_bytes.is_none() {
            return Err(Error::InvalidConfig(format!(
                "a page tensor of shape {:?} and dtype {} overflows usize bytes",
                self.page_shape(),
                self.dtype
            )));
        }
        Ok(())
    }
}

/// The key and value pages of one layer, each `[num_blocks, block_size, num_kv_heads, head_dim]`.
#[derive(Clone, Debug)]
pub struct LayerPages {
    /// Key pages.
    pub k: Tensor,
    /// Value pages.
    pub v: Tensor,
}

/// A paged KV cache: the page tensors of every layer and the allocator that hands out their blocks.
///
/// Sequences keep their own [`BlockTable`]s and grow them through [`allocator`](Self::allocator); the
/// cache does not track which sequence holds which block. An engine that wants prefix caching and
/// copy-on-write uses a [`KvBlockManager`](crate::KvBlockManager) for the bookkeeping instead: it
/// builds the pages with [`pages_only`](Self::pages_only), so that the manager is the one owner of
/// every block id, and applies the manager's copies with [`copy_blocks`](Self::copy_blocks).
#[derive(Debug)]
pub struct KvCache {
    config: KvCacheConfig,
    layers: Vec<LayerPages>,
    allocator: BlockAllocator,
}

impl KvCache {
    /// Validates `config` and allocates zero-filled K and V pages for every layer on `config.device`.
    pub fn new(config: KvCacheConfig) -> Result<Self> {
        config.validate()?;
        let shape = config.page_shape();
        let layers = (0..config.num_layers)
            .map(|_| {
                Ok(LayerPages {
                    k: Tensor::zeros(shape, config.dtype, &config.device)?,
                    v: Tensor::zeros(shape, config.dtype, &config.device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            layers,
            allocator: BlockAllocator::new(config.num_blocks),
        })
    }

    /// Like [`new`](Self::new), for pages whose blocks are handed out elsewhere (by a
    /// [`KvBlockManager`](crate::KvBlockManager) over at most `config.num_blocks` blocks): the cache's
    /// own allocator holds no blocks, so a block table grown through [`allocator`](Self::allocator)
    /// fails with [`Error::OutOfBlocks`] instead of taking a block the manager has given to a sequence.
    pub fn pages_only(config: KvCacheConfig) -> Result<Self> {
        let mut cache = Self::new(config)?;
        cache.allocator = BlockAllocator::new(0);
        Ok(cache)
    }

    /// The configuration the cache was built with.
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    /// The block allocator, for growing and freeing block tables.
    pub fn allocator(&mut self) -> &mut BlockAllocator {
        &mut self.allocator
    }

    /// The block allocator, read-only (free-block accounting).
    pub fn allocator_ref(&self) -> &BlockAllocator {
        &self.allocator
    }

    /// An empty block table for this cache's block size.
    pub fn new_block_table(&self) -> BlockTable {
        BlockTable::new(self.config.block_size)
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The pages of layer `i`.
    ///
    /// # Panics
    ///
    /// If `i >= num_layers()`; use [`layers`](Self::layers) for checked access.
    pub fn layer(&self, i: usize) -> &LayerPages {
        &self.layers[i]
    }

    /// The pages of layer `i`, mutably.
    ///
    /// # Panics
    ///
    /// If `i >= num_layers()`; use [`layers_mut`](Self::layers_mut) for checked access.
    pub fn layer_mut(&mut self, i: usize) -> &mut LayerPages {
        &mut self.layers[i]
    }

    /// The pages of every layer, in layer order.
    pub fn layers(&self) -> &[LayerPages] {
        &self.layers
    }

    /// The pages of every layer, mutably.
    pub fn layers_mut(&mut self) -> &mut [LayerPages] {
        &mut self.layers
    }

    /// Copies every layer's K and V rows of each `copy.src` block into its `copy.dst` block, in the
    /// order given (a later copy may read a block an earlier one wrote), as copy-on-write requires.
    ///
    /// On a GPU the copies are queued on the device's stream, in order, and the call returns without
    /// waiting for them; every later kernel on that stream sees them done.
    ///
    /// Fails with [`Error::InvalidBlock`] for a block outside the pool and [`Error::InvalidPages`] for
    /// page tensors no longer of the configured shape, contiguous layout and device, before copying
    /// anything; and with [`Error::Tensor`] if a layer's pages share their storage with another tensor
    /// (a clone) or are read-only, or a device copy fails. In the last case earlier layers are already
    /// copied; running the same copies again is harmless.
    pub fn copy_blocks(&mut self, copies: &[BlockCopy]) -> Result<()> {
        if copies.is_empty() {
            return Ok(());
        }
        let num_blocks = self.config.num_blocks;
        if let Some(bad) = copies
            .iter()
            .flat_map(|copy| [copy.src, copy.dst])
            .find(|block| block.0 as usize >= num_blocks)
        {
            return Err(Error::InvalidBlock(bad));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, pages) in [("K", &layer.k), ("V", &layer.v)] {
                self.check_pages(pages)
                    .map_err(|why| Error::InvalidPages(format!("layer {i} {name} pages {why}")))?;
            }
        }
        let [_, block_size, heads, head_dim] = self.config.page_shape();
        let block_len = block_size * heads * head_dim;
        for layer in &mut self.layers {
            for pages in [&mut layer.k, &mut layer.v] {
                copy_block_rows(pages, block_len, copies)?;
            }
        }
        Ok(())
    }

    /// Why `pages` cannot be addressed as this cache's pages, if it cannot.
    fn check_pages(&self, pages: &Tensor) -> std::result::Result<(), String> {
        let shape = self.config.page_shape();
        if pages.dims() != shape {
            return Err(format!("have shape {:?}, expected {shape:?}", pages.dims()));
        }
        if !pages.is_contiguous() {
            return Err("are not contiguous".into());
        }
        if pages.dtype() != self.config.dtype || pages.device() != self.config.device {
            return Err(format!(
                "are {} on {}, expected {} on {}",
                pages.dtype(),
                pages.device(),
                self.config.dtype,
                self.config.device
            ));
        }
        Ok(())
    }
}

/// Copies block rows of `block_len` elements within one contiguous page tensor, on the host or,
/// queued on the device's stream, on a GPU.
fn copy_block_rows(pages: &mut Tensor, block_len: usize, copies: &[BlockCopy]) -> Result<()> {
    let offset = pages.layout().offset();
    let len = pages.elem_count();
    match pages.storage_mut()? {
        Storage::Cpu(storage) => match storage {
            CpuStorage::F32(v) => copy_within(v, offset, len, block_len, copies),
            CpuStorage::F16(v) => copy_within(v, offset, len, block_len, copies),
            CpuStorage::BF16(v) => copy_within(v, offset, len, block_len, copies),
            CpuStorage::U8(v) => copy_within(v, offset, len, block_len, copies),
            CpuStorage::I32(v) => copy_within(v, offset, len, block_len, copies),
            CpuStorage::U32(v) => copy_within(v, offset, len, block_len, copies),
            CpuStorage::Mapped(_) => Err(Error::Tensor(pagoda_tensor::Error::NotMutable {
                reason: "the storage is a read-only memory map",
            })),
        },
        Storage::Cuda(storage) => {
            for copy in copies {
                let (src, dst) = block_ranges(copy, block_len, len)?;
                storage.copy_within(offset + src.start..offset + src.end, offset + dst.start)?;
            }
            Ok(())
        }
    }
}

/// The element ranges of `copy`'s source and destination blocks within `len` elements of pages.
fn block_ranges(
    copy: &BlockCopy,
    block_len: usize,
    len: usize,
) -> Result<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let src = copy.src.0 as usize * block_len;
    let dst = copy.dst.0 as usize * block_len;
    if src + block_len > len || dst + block_len > len {
        return Err(Error::InvalidBlock(copy.src.max(copy.dst)));
    }
    Ok((src..src + block_len, dst..dst + block_len))
}

/// Copies element runs `src * block_len..` to `dst * block_len..` of `elements[offset..offset + len]`.
fn copy_within<T: Copy>(
    elements: &mut [T],
    offset: usize,
    len: usize,
    block_len: usize,
    copies: &[BlockCopy],
) -> Result<()> {
    let pages = elements
        .get_mut(offset..offset + len)
        .ok_or_else(|| Error::InvalidPages(format!("storage is shorter than {len} elements")))?;
    for copy in copies {
        let (src, dst) = block_ranges(copy, block_len, pages.len())?;
        pages.copy_within(src, dst.start);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_allocator::BlockId;

    fn config() -> KvCacheConfig {
        KvCacheConfig {
            num_layers: 2,
            num_blocks: 5,
            block_size: 4,
            num_kv_heads: 3,
            head_dim: 2,
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }

    #[test]
    fn bytes_per_block_counts_k_and_v_of_every_layer() {
        // Pythia-160M: 12 layers, 12 heads of 64, f16, 16-token blocks.
        let pythia = KvCacheConfig {
            num_layers: 12,
            num_blocks: 1000,
            block_size: 16,
            num_kv_heads: 12,
            head_dim: 64,
            dtype: DType::F16,
            device: Device::Cpu,
        };
        assert_eq!(pythia.bytes_per_block(), 2 * 12 * 16 * 12 * 64 * 2);
        assert_eq!(pythia.bytes_per_block(), 589_824);
        assert_eq!(pythia.total_bytes(), 589_824_000);
        assert_eq!(config().bytes_per_block(), 2 * 2 * 4 * 3 * 2 * 4);
    }

    #[test]
    fn blocks_for_budget_rounds_down() {
        let config = config(); // 384 bytes per block
        assert_eq!(config.blocks_for_budget(0), 0);
        assert_eq!(config.blocks_for_budget(383), 0);
        assert_eq!(config.blocks_for_budget(384), 1);
        assert_eq!(config.blocks_for_budget(384 * 7 + 383), 7);
        let empty = KvCacheConfig {
            head_dim: 0,
            ..config
        };
        assert_eq!(empty.blocks_for_budget(1 << 20), 0);
    }

    #[test]
    fn blocks_for_budget_stays_within_the_slot_range() {
        let config = KvCacheConfig {
            num_layers: 1,
            block_size: 1 << 16,
            num_kv_heads: 1,
            head_dim: 1,
            dtype: DType::U8,
            ..config()
        };
        assert_eq!(config.max_num_blocks(), 1 << 16);
        assert_eq!(config.blocks_for_budget(usize::MAX), 1 << 16);
        let fitted = KvCacheConfig {
            num_blocks: config.blocks_for_budget(usize::MAX),
            ..config
        };
        assert!(fitted.validate().is_ok());
    }

    #[test]
    fn new_allocates_zeroed_pages_of_the_configured_shape() {
        let cache = KvCache::new(config()).unwrap();
        assert_eq!(cache.num_layers(), 2);
        assert_eq!(cache.layers().len(), 2);
        assert_eq!(cache.allocator_ref().num_blocks(), 5);
        assert_eq!(cache.allocator_ref().num_free(), 5);
        for layer in cache.layers() {
            for pages in [&layer.k, &layer.v] {
                assert_eq!(pages.dims(), [5, 4, 3, 2]);
                assert_eq!(pages.dtype(), DType::F32);
                assert!(pages.as_slice::<f32>().unwrap().iter().all(|&x| x == 0.0));
            }
        }
        assert_eq!(cache.config(), &config());
    }

    #[test]
    fn pages_only_hands_out_no_blocks() {
        let mut cache = KvCache::pages_only(config()).unwrap();
        assert_eq!(cache.layer(0).k.dims(), [5, 4, 3, 2]);
        assert_eq!(cache.allocator_ref().num_blocks(), 0);
        let mut table = cache.new_block_table();
        assert!(matches!(
            table.append(1, cache.allocator()),
            Err(Error::OutOfBlocks { .. })
        ));
        assert!(table.is_empty());
        // Copies address every page block, whoever hands the blocks out.
        cache.copy_blocks(&[copy(4, 0)]).unwrap();
    }

    #[test]
    fn pages_of_each_layer_are_independent() {
        let mut cache = KvCache::new(config()).unwrap();
        cache.layer_mut(1).k.as_mut_slice::<f32>().unwrap()[7] = 1.5;
        assert_eq!(cache.layer(1).k.as_slice::<f32>().unwrap()[7], 1.5);
        assert_eq!(cache.layer(1).v.as_slice::<f32>().unwrap()[7], 0.0);
        assert_eq!(cache.layer(0).k.as_slice::<f32>().unwrap()[7], 0.0);
    }

    #[test]
    fn a_slot_addresses_one_row_of_heads_in_the_pages() {
        let mut cache = KvCache::new(config()).unwrap();
        let row = 3 * 2; // num_kv_heads * head_dim
        let mut other = cache.new_block_table();
        other.append(1, cache.allocator()).unwrap(); // takes block 0
        let mut table = cache.new_block_table();
        table.append(6, cache.allocator()).unwrap(); // blocks 1 and 2
        assert_eq!(table.blocks(), [BlockId(1), BlockId(2)]);

        // Position 5 is offset 1 of block 2: element [2, 1, h, d] of the pages.
        let slot = table.slot(5).unwrap() as usize;
        assert_eq!(slot, 2 * 4 + 1);
        let k = cache.layer_mut(0).k.as_mut_slice::<f32>().unwrap();
        for (i, x) in k[slot * row..(slot + 1) * row].iter_mut().enumerate() {
            *x = i as f32 + 1.0;
        }
        let k = cache.layer(0).k.as_slice::<f32>().unwrap();
        let [_, block_size, heads, dim] = cache.config().page_shape();
        for h in 0..heads {
            for d in 0..dim {
                let index = ((2 * block_size + 1) * heads + h) * dim + d;
                assert_eq!(k[index], (h * dim + d) as f32 + 1.0);
            }
        }
        assert_eq!(k.iter().filter(|&&x| x != 0.0).count(), row);
    }

    #[test]
    fn zero_dimensions_are_rejected() {
        for broken in [
            KvCacheConfig {
                num_layers: 0,
                ..config()
            },
            KvCacheConfig {
                num_blocks: 0,
                ..config()
            },
            KvCacheConfig {
                block_size: 0,
                ..config()
            },
            KvCacheConfig {
                num_kv_heads: 0,
                ..config()
            },
            KvCacheConfig {
                head_dim: 0,
                ..config()
            },
        ] {
            assert!(matches!(KvCache::new(broken), Err(Error::InvalidConfig(_))));
        }
    }

    #[test]
    fn pools_beyond_the_u32_slot_range_are_rejected() {
        let too_many = KvCacheConfig {
            num_blocks: (1 << 28) + 1,
            block_size: 16,
            ..config()
        };
        let err = too_many.validate().unwrap_err();
        assert!(err.to_string().contains("u32 slot range"), "{err}");
        assert!(
            KvCacheConfig {
                num_blocks: 1 << 28,
                ..too_many
            }
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn page_tensors_too_large_to_address_are_rejected() {
        let huge = KvCacheConfig {
            num_blocks: 1 << 20,
            block_size: 1 << 10,
            num_kv_heads: 1 << 20,
            head_dim: 1 << 20,
            ..config()
        };
        let err = huge.validate().unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
    }

    /// Fills every page element with a value unique to (layer, K or V, element index).
    fn fill_distinct(cache: &mut KvCache) {
        for (l, layer) in cache.layers_mut().iter_mut().enumerate() {
            for (kv, pages) in [&mut layer.k, &mut layer.v].into_iter().enumerate() {
                for (i, x) in pages.as_mut_slice::<f32>().unwrap().iter_mut().enumerate() {
                    *x = (l * 10_000 + kv * 1000 + i) as f32;
                }
            }
        }
    }

    fn copy(src: u32, dst: u32) -> BlockCopy {
        BlockCopy {
            src: BlockId(src),
            dst: BlockId(dst),
        }
    }

    #[test]
    fn copy_blocks_copies_every_layer_k_and_v_in_order() {
        let mut cache = KvCache::new(config()).unwrap();
        fill_distinct(&mut cache);
        let before: Vec<Vec<f32>> = cache
            .layers()
            .iter()
            .flat_map(|l| [l.k.to_vec::<f32>().unwrap(), l.v.to_vec::<f32>().unwrap()])
            .collect();
        // 1 -> 3, then 3 -> 4 reads what the first copy wrote; 0 -> 0 changes nothing.
        let copies = [copy(1, 3), copy(3, 4), copy(0, 0)];
        cache.copy_blocks(&copies).unwrap();

        let block_len = 4 * 3 * 2;
        let mut expected = before.clone();
        for pages in &mut expected {
            // Naive reference: one element at a time, copies applied in order.
            for c in &copies {
                for i in 0..block_len {
                    pages[c.dst.0 as usize * block_len + i] =
                        pages[c.src.0 as usize * block_len + i];
                }
            }
        }
        let after: Vec<Vec<f32>> = cache
            .layers()
            .iter()
            .flat_map(|l| [l.k.to_vec::<f32>().unwrap(), l.v.to_vec::<f32>().unwrap()])
            .collect();
        assert_eq!(after, expected);
        // Blocks 3 and 4 now hold block 1's rows; blocks 0, 1 and 2 are untouched.
        for (pages, original) in after.iter().zip(&before) {
            let block = |data: &[f32], b: usize| data[b * block_len..(b + 1) * block_len].to_vec();
            assert_eq!(block(pages, 3), block(original, 1));
            assert_eq!(block(pages, 4), block(original, 1));
            for b in 0..3 {
                assert_eq!(block(pages, b), block(original, b));
            }
        }
    }

    #[test]
    fn copy_blocks_handles_half_precision_pages() {
        let mut cache = KvCache::new(KvCacheConfig {
            dtype: DType::F16,
            ..config()
        })
        .unwrap();
        let block_len = 4 * 3 * 2;
        let values: Vec<f32> = (0..5 * block_len).map(|i| i as f32).collect();
        let pages = Tensor::from_slice(&values, config().page_shape())
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        cache.layer_mut(1).v = pages;
        cache.copy_blocks(&[copy(2, 0)]).unwrap();
        let v = cache.layer(1).v.to_vec_f32().unwrap();
        assert_eq!(v[..block_len], values[2 * block_len..3 * block_len]);
        assert_eq!(v[block_len..], values[block_len..]);
        assert!(
            cache
                .layer(0)
                .k
                .to_vec_f32()
                .unwrap()
                .iter()
                .all(|&x| x == 0.0)
        );
    }

    #[test]
    fn copy_blocks_rejects_bad_blocks_and_pages_before_copying() {
        let mut cache = KvCache::new(config()).unwrap();
        fill_distinct(&mut cache);
        let snapshot = cache.layer(0).k.to_vec::<f32>().unwrap();
        assert!(matches!(
            cache.copy_blocks(&[copy(1, 2), copy(0, 5)]),
            Err(Error::InvalidBlock(BlockId(5)))
        ));
        assert_eq!(cache.layer(0).k.to_vec::<f32>().unwrap(), snapshot);

        // Pages swapped for a tensor of another shape are refused for every layer before any copy.
        let original = cache.layer(1).v.clone();
        cache.layer_mut(1).v = original.narrow(0, 0, 4).unwrap();
        let err = cache.copy_blocks(&[copy(1, 2)]).unwrap_err();
        assert!(matches!(err, Error::InvalidPages(_)), "{err}");
        assert!(err.to_string().contains("layer 1 V"), "{err}");
        assert_eq!(cache.layer(0).k.to_vec::<f32>().unwrap(), snapshot);

        // Pages whose storage another tensor shares cannot be written.
        cache.layer_mut(1).v = original;
        let alias = cache.layer(0).k.clone();
        assert!(matches!(
            cache.copy_blocks(&[copy(1, 2)]),
            Err(Error::Tensor(pagoda_tensor::Error::NotMutable { .. }))
        ));
        drop(alias);
        cache.copy_blocks(&[copy(1, 2)]).unwrap();
        cache.copy_blocks(&[]).unwrap();
    }
}
