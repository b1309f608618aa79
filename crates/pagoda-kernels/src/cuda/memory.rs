//! What the card's memory can do: the copy bandwidth every speed figure is a fraction of.

use std::time::Instant;

use pagoda_tensor::CudaDevice;

use crate::{Error, Result};

/// Device-to-device copy bandwidth in bytes per second (bytes read plus bytes written), the
/// median of `reps` copies of a `bytes`-sized buffer after one warm-up copy. The buffer should
/// be several times the L2 cache (hundreds of MB) so that it measures DRAM, not cache.
pub fn copy_bandwidth(device: &CudaDevice, bytes: usize, reps: usize) -> Result<f64> {
    const OP: &str = "copy_bandwidth";
    let stream = device.stream();
    let cuda = |e: pagoda_tensor::cudarc::driver::DriverError| Error::Cuda {
        op: OP,
        message: e.to_string(),
    };
    let src = stream.alloc_zeros::<u8>(bytes).map_err(cuda)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes).map_err(cuda)?;
    let mut seconds = Vec::with_capacity(reps);
    for rep in 0..=reps {
        stream.synchronize().map_err(cuda)?;
        let start = Instant::now();
        stream.memcpy_dtod(&src, &mut dst).map_err(cuda)?;
        stream.synchronize().map_err(cuda)?;
        if rep > 0 {
            seconds.push(start.elapsed().as_secs_f64());
        }
    }
    seconds.sort_by(f64::total_cmp);
    let median = seconds
        .get(seconds.len() / 2)
        .copied()
        .ok_or_else(|| Error::Cuda {
            op: OP,
            message: "reps must be at least 1".into(),
        })?;
    Ok(2.0 * bytes as f64 / median)
}
