//! `KvCache::copy_blocks` on a GPU against the same copies made on the host. Built only with the
//! `cuda` feature; skipped (with a message) when no CUDA device can be opened, unless
//! `PAGODA_REQUIRE_GPU=1`, which makes a missing GPU a failure.
#![cfg(feature = "cuda")]

use pagoda_kv::{BlockCopy, BlockId, Error, KvCache, KvCacheConfig};
use pagoda_tensor::{CudaDevice, DType, Device, Tensor};

fn gpu(test: &str) -> Option<Device> {
    match CudaDevice::get(0) {
        Ok(device) => Some(Device::Cuda(device.ordinal())),
        Err(err) if std::env::var("PAGODA_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("{test}: PAGODA_REQUIRE_GPU=1 but no GPU is usable: {err}")
        }
        Err(err) => {
            eprintln!("{test}: skipped: no GPU ({err})");
            None
        }
    }
}

fn config(device: Device, dtype: DType) -> KvCacheConfig {
    KvCacheConfig {
        num_layers: 3,
        num_blocks: 9,
        block_size: 16,
        num_kv_heads: 2,
        head_dim: 24,
        dtype,
        device,
    }
}

fn copy(src: u32, dst: u32) -> BlockCopy {
    BlockCopy {
        src: BlockId(src),
        dst: BlockId(dst),
    }
}

/// Values that differ between neighbouring elements and between (layer, K or V); the reference
/// is built from what the pages hold after the upload, so rounding to the dtype does not matter.
fn pattern(layer: usize, kv: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((layer * 701 + kv * 313 + i) % 2039) as f32)
        .collect()
}

/// The copies applied in order, one element at a time.
fn reference(mut pages: Vec<f32>, block_len: usize, copies: &[BlockCopy]) -> Vec<f32> {
    for c in copies {
        for i in 0..block_len {
            pages[c.dst.0 as usize * block_len + i] = pages[c.src.0 as usize * block_len + i];
        }
    }
    pages
}

#[test]
fn copy_blocks_on_the_gpu_matches_the_host() {
    let Some(device) = gpu("copy_blocks_on_the_gpu_matches_the_host") else {
        return;
    };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let mut cache = KvCache::new(config(device, dtype)).unwrap();
        let shape = cache.config().page_shape();
        let len: usize = shape.iter().product();
        let block_len = len / shape[0];
        let mut before = Vec::new();
        for (l, layer) in cache.layers_mut().iter_mut().enumerate() {
            for (kv, pages) in [&mut layer.k, &mut layer.v].into_iter().enumerate() {
                *pages = Tensor::from_slice(&pattern(l, kv, len), shape)
                    .and_then(|t| t.to_dtype(dtype))
                    .and_then(|t| t.to_device(&device))
                    .unwrap();
                before.push(pages.to_vec_f32().unwrap());
            }
        }
        // 2 -> 7, then 7 -> 0 reads what the first copy wrote; 4 -> 4 changes nothing; the last
        // block (8) is a destination too.
        let copies = [copy(2, 7), copy(7, 0), copy(4, 4), copy(5, 8)];
        cache.copy_blocks(&copies).unwrap();
        let after: Vec<Vec<f32>> = cache
            .layers()
            .iter()
            .flat_map(|l| [l.k.to_vec_f32().unwrap(), l.v.to_vec_f32().unwrap()])
            .collect();
        for (i, (got, original)) in after.into_iter().zip(before).enumerate() {
            assert_eq!(
                got,
                reference(original, block_len, &copies),
                "{dtype}: layer {} {}",
                i / 2,
                ["K", "V"][i % 2]
            );
        }
    }
}

#[test]
fn copy_blocks_on_the_gpu_rejects_bad_blocks_before_copying() {
    let Some(device) = gpu("copy_blocks_on_the_gpu_rejects_bad_blocks_before_copying") else {
        return;
    };
    let mut cache = KvCache::new(config(device, DType::F16)).unwrap();
    let shape = cache.config().page_shape();
    let len: usize = shape.iter().product();
    cache.layer_mut(0).k = Tensor::from_slice(&pattern(0, 0, len), shape)
        .and_then(|t| t.to_dtype(DType::F16))
        .and_then(|t| t.to_device(&device))
        .unwrap();
    let snapshot = cache.layer(0).k.to_vec_f32().unwrap();
    assert!(matches!(
        cache.copy_blocks(&[copy(1, 2), copy(0, 9)]),
        Err(Error::InvalidBlock(BlockId(9)))
    ));
    assert_eq!(cache.layer(0).k.to_vec_f32().unwrap(), snapshot);
    // Pages another tensor shares cannot be written, on the GPU as on the host.
    let alias = cache.layer(0).k.clone();
    assert!(matches!(
        cache.copy_blocks(&[copy(1, 2)]),
        Err(Error::Tensor(pagoda_tensor::Error::NotMutable { .. }))
    ));
    drop(alias);
    cache.copy_blocks(&[copy(1, 2)]).unwrap();
    let k = cache.layer(0).k.to_vec_f32().unwrap();
    let block_len = len / shape[0];
    assert_eq!(
        k[2 * block_len..3 * block_len],
        snapshot[block_len..2 * block_len]
    );
}
