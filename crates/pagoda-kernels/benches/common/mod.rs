//! Timing helpers shared by the CUDA benches: they time the GPU, not the launch, by
//! synchronising the device around the calls.

#![allow(dead_code)] // Each bench uses the helpers it needs.

use std::time::{Duration, Instant};

use pagoda_tensor::cudarc::driver::CudaSlice;
use pagoda_tensor::{CudaDevice, DType, Device, Storage, Tensor};

/// Times `iters` calls of `f` between device synchronisations.
pub fn time_gpu(device: &CudaDevice, iters: u64, mut f: impl FnMut()) -> Duration {
    device.synchronize().expect("synchronising before timing");
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    device.synchronize().expect("synchronising after timing");
    start.elapsed()
}

/// The median over `runs` samples of the time per call, each sample timing `calls` calls between
/// two synchronisations (after warm-up calls), in seconds. Several calls per sample keep the
/// synchronisation out of the figure, as in criterion's samples.
pub fn median_seconds(device: &CudaDevice, runs: usize, calls: u64, mut f: impl FnMut()) -> f64 {
    time_gpu(device, 3, &mut f);
    let mut times: Vec<f64> = (0..runs)
        .map(|_| time_gpu(device, calls, &mut f).as_secs_f64() / calls as f64)
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

/// A tensor of `dims` on the GPU holding a cheap deterministic pattern in [-1, 1): the values do
/// not matter for timing, only that they are not all zero.
pub fn pattern(dims: &[usize], dtype: DType, device: &CudaDevice) -> Tensor {
    let len: usize = dims.iter().product();
    let values: Vec<f32> = (0..len)
        .map(|i| ((i * 7919) % 2048) as f32 / 1024.0 - 1.0)
        .collect();
    Tensor::from_slice(&values, dims.to_vec())
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.to_device(&Device::Cuda(device.ordinal())))
        .expect("uploading a benchmark input")
}

/// f16 values on the device, pseudo-random in [-1, 1) from `seed` (a hash of each index): distinct
/// seeds give unrelated tensors, so rotated copies do not share cache lines, and nothing is zero
/// (which would make attention scores all equal).
pub fn seeded_f16(dims: &[usize], seed: u64, device: &CudaDevice) -> Tensor {
    let len = dims.iter().product::<usize>();
    let host: Vec<half::f16> = (0..len as u64)
        .map(|i| {
            let mut h = (i ^ seed.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            h ^= h >> 29;
            half::f16::from_f32((h % 2048) as f32 / 1024.0 - 1.0)
        })
        .collect();
    Tensor::from_vec(host, dims.to_vec())
        .and_then(|t| t.to_device(&Device::Cuda(device.ordinal())))
        .expect("uploading benchmark values")
}

/// The device memory of a CUDA tensor.
pub fn device_slice(tensor: &Tensor) -> &CudaSlice<u8> {
    let Storage::Cuda(storage) = tensor.storage() else {
        panic!("{tensor:?} is not on a GPU")
    };
    storage.slice()
}

/// Block ids `0..num_blocks` in a fixed scattered order, for block tables read in turn: a
/// multiplication modulo `num_blocks` by a unit near `num_blocks / phi` spreads each sequence's
/// blocks over the whole cache in non-monotonic order.
pub fn scattered_block_ids(num_blocks: usize) -> Vec<u32> {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let step = (num_blocks * 618 / 1000..)
        .find(|&s| gcd(s, num_blocks) == 1)
        .unwrap_or(1);
    (0..num_blocks)
        .map(|i| ((i * step) % num_blocks) as u32)
        .collect()
}
