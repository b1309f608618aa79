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

/// The device memory of a CUDA tensor.
pub fn device_slice(tensor: &Tensor) -> &CudaSlice<u8> {
    let Storage::Cuda(storage) = tensor.storage() else {
        panic!("{tensor:?} is not on a GPU")
    };
    storage.slice()
}
