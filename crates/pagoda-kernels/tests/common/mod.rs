//! Helpers shared by the CUDA kernel tests: the GPU (or a skip), seeded random inputs that
//! print their seed when a test fails, poisoned outputs, and the relative-error check.
//!
//! Each test binary uses a subset of these.
#![allow(dead_code)]

pub mod attention;

use half::{bf16, f16};
use pagoda_tensor::{CudaDevice, DType, Device, Tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The float dtypes every activation kernel is claimed for.
pub const FLOAT_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Sizes that catch off-by-one tails, partial warps and partial 128-bit packs.
pub const ODD_SIZES: [usize; 6] = [1, 3, 67, 129, 1000, 4097];

/// GPU 0, or `None` after printing "skipped: no GPU" when there is none.
///
/// With `PAGODA_REQUIRE_GPU=1` a missing GPU fails the test instead, so that a run meant to
/// exercise the kernels cannot pass by skipping them.
pub fn gpu_or_skip(test: &str) -> Option<CudaDevice> {
    match CudaDevice::get(0) {
        Ok(device) => Some(device),
        Err(err) if std::env::var("PAGODA_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("{test}: PAGODA_REQUIRE_GPU=1 but no GPU is usable: {err}")
        }
        Err(err) => {
            eprintln!("{test}: skipped: no GPU ({err})");
            None
        }
    }
}

/// The device a test's tensors go to.
pub fn cuda(device: &CudaDevice) -> Device {
    Device::Cuda(device.ordinal())
}

/// A random number generator seeded from `PAGODA_TEST_SEED` or the clock; if the test panics
/// while it is alive, the seed is printed so the failure can be replayed.
pub struct TestRng {
    rng: ChaCha8Rng,
    seed: u64,
    test: String,
}

impl TestRng {
    pub fn new(test: &str) -> TestRng {
        let seed = std::env::var("PAGODA_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
            });
        TestRng {
            rng: ChaCha8Rng::seed_from_u64(seed),
            seed,
            test: test.to_owned(),
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// `len` values uniform in `[-scale, scale)`.
    pub fn uniform(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|_| self.rng.random_range(-scale..scale))
            .collect()
    }

    /// `len` integers uniform in `[0, bound)`.
    pub fn below(&mut self, len: usize, bound: u32) -> Vec<u32> {
        (0..len).map(|_| self.rng.random_range(0..bound)).collect()
    }
}

impl Drop for TestRng {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{}: failed with seed {}; replay with PAGODA_TEST_SEED={}",
                self.test, self.seed, self.seed
            );
        }
    }
}

/// `values` rounded to `dtype` and back: what a tensor of that dtype really holds, and so the
/// input the CPU oracle must be given.
pub fn rounded(values: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        DType::BF16 => values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        _ => values.to_vec(),
    }
}

/// A contiguous tensor of `dims` on `device` holding `values` converted to `dtype`.
pub fn upload(values: &[f32], dims: &[usize], dtype: DType, device: &CudaDevice) -> Tensor {
    Tensor::from_slice(values, dims.to_vec())
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.to_device(&cuda(device)))
        .unwrap_or_else(|e| panic!("uploading {dims:?} {dtype}: {e}"))
}

/// A random tensor (uniform in `[-scale, scale)`) and the values it holds, rounded to its dtype.
pub fn random_tensor(
    rng: &mut TestRng,
    dims: &[usize],
    dtype: DType,
    scale: f32,
    device: &CudaDevice,
) -> (Tensor, Vec<f32>) {
    let values = rounded(&rng.uniform(dims.iter().product(), scale), dtype);
    (upload(&values, dims, dtype, device), values)
}

/// A U32 tensor of `values` on `device`.
pub fn upload_u32(values: &[u32], device: &CudaDevice) -> Tensor {
    Tensor::from_slice(values, values.len())
        .and_then(|t| t.to_device(&cuda(device)))
        .unwrap_or_else(|e| panic!("uploading {} u32 values: {e}", values.len()))
}

/// A tensor of `dims` filled with NaN, for outputs written in place: any element the kernel
/// fails to write stays NaN and fails the comparison.
pub fn poisoned(dims: &[usize], dtype: DType, device: &CudaDevice) -> Tensor {
    upload(&vec![f32::NAN; dims.iter().product()], dims, dtype, device)
}

/// Fills and frees `bytes` of device memory with NaN. Kernels that return new tensors allocate
/// them uninitialised from the stream-ordered pool, which hands out recently freed memory; this
/// makes that memory NaN, so an element a kernel forgets to write shows up as NaN.
pub fn poison_pool(device: &CudaDevice, bytes: usize) {
    let words = bytes.div_ceil(4).max(1);
    drop(upload(&vec![f32::NAN; words], &[words], DType::F32, device));
}

/// The same logical values as the rank-2 `tensor`, as a non-contiguous (transposed) view.
pub fn non_contiguous(tensor: &Tensor) -> Tensor {
    let view = tensor
        .transpose(0, 1)
        .and_then(|t| t.contiguous())
        .and_then(|t| t.transpose(0, 1))
        .unwrap_or_else(|e| panic!("making a transposed view: {e}"));
    assert!(!view.is_contiguous());
    view
}

/// The elements of any tensor as f32 on the host.
pub fn download(tensor: &Tensor) -> Vec<f32> {
    tensor
        .to_vec_f32()
        .unwrap_or_else(|e| panic!("downloading {tensor:?}: {e}"))
}

/// `max |actual - expected| / max |expected|`; infinite when the lengths differ or `actual`
/// holds a NaN or infinity where `expected` is finite.
pub fn rel_error(actual: &[f32], expected: &[f32]) -> f64 {
    if actual.len() != expected.len() {
        return f64::INFINITY;
    }
    let mut max_diff = 0.0f64;
    let mut max_ref = 0.0f64;
    for (&a, &e) in actual.iter().zip(expected) {
        let (a, e) = (f64::from(a), f64::from(e));
        if !a.is_finite() && e.is_finite() {
            return f64::INFINITY;
        }
        max_diff = max_diff.max((a - e).abs());
        max_ref = max_ref.max(e.abs());
    }
    if max_diff == 0.0 {
        0.0
    } else {
        max_diff / max_ref.max(f64::MIN_POSITIVE)
    }
}

/// The relative error allowed for results stored in `dtype`.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F16 | DType::BF16 => 1e-2,
        _ => 1e-5,
    }
}

/// Fails with the worst element when `actual` is not within [`tolerance`]`(dtype)` of `expected`.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], dtype: DType) {
    let error = rel_error(actual, expected);
    if error < tolerance(dtype) {
        return;
    }
    let worst = actual
        .iter()
        .zip(expected)
        .enumerate()
        .max_by(|(_, (a, e)), (_, (b, f))| {
            let d1 = if a.is_finite() {
                (*a - *e).abs()
            } else {
                f32::INFINITY
            };
            let d2 = if b.is_finite() {
                (*b - *f).abs()
            } else {
                f32::INFINITY
            };
            d1.total_cmp(&d2)
        })
        .map(|(i, (a, e))| format!("element {i}: {a} vs {e}"))
        .unwrap_or_else(|| format!("lengths {} vs {}", actual.len(), expected.len()));
    panic!(
        "{what}: relative error {error:e} >= {} ({worst})",
        tolerance(dtype)
    );
}

/// Block tables of a batch of sequences given as `(query_len, context_len)`, for the attention
/// tests: block ids are shuffled over a pool with a few pages no sequence uses (a wrong id reads
/// data that does not belong), so each table is scattered and non-monotonic; tables are padded
/// past what each context needs with an id outside the pages, which must never be read.
pub struct ScatteredTables {
    pub query_start: Vec<u32>,
    pub context_len: Vec<u32>,
    /// `seqs.len() x max_blocks` ids, row-major.
    pub tables: Vec<u32>,
    pub num_blocks: usize,
    pub max_blocks: usize,
    pub num_tokens: usize,
}

impl ScatteredTables {
    pub fn new(rng: &mut TestRng, seqs: &[(usize, usize)], block_size: usize) -> Self {
        use rand::seq::SliceRandom;
        let needed: Vec<usize> = seqs
            .iter()
            .map(|&(_, context)| context.div_ceil(block_size))
            .collect();
        let num_blocks = needed.iter().sum::<usize>() + 3;
        let max_blocks = needed.iter().copied().max().unwrap_or(0) + 2;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.shuffle(rng.rng());
        let mut tables = vec![u32::MAX; seqs.len() * max_blocks];
        let mut query_start = vec![0u32];
        let mut context_len = Vec::new();
        let mut next_id = 0;
        for (s, (&(query_len, context), &blocks)) in seqs.iter().zip(&needed).enumerate() {
            tables[s * max_blocks..][..blocks].copy_from_slice(&ids[next_id..next_id + blocks]);
            next_id += blocks;
            query_start.push(query_start[s] + query_len as u32);
            context_len.push(context as u32);
        }
        let num_tokens = query_start[seqs.len()] as usize;
        Self {
            query_start,
            context_len,
            tables,
            num_blocks,
            max_blocks,
            num_tokens,
        }
    }
}
