//! Launchers of `kernels/sampling.cu`: picking the next token of each row of logits on the GPU,
//! greedily or by sampling, so that only one `u32` per row crosses back to the host.
//!
//! [`sample`] follows the CPU sampler ([`crate::cpu::sampling`]) exactly: temperature, then top-k,
//! top-p and min-p, each on the distribution the previous one left, tokens ordered by descending
//! logit then ascending id, probabilities in f64. Given the uniform number the CPU [`Sampler`]
//! would draw, it picks the same token (up to the rounding of f64 sums, which matters only for a
//! draw within ~1e-15 of the boundary between two tokens).
//!
//! [`Sampler`]: crate::cpu::sampling::Sampler

use pagoda_tensor::cudarc::driver::{LaunchConfig, PushKernelArg};
use pagoda_tensor::{CudaDevice, DType, Device, Tensor};

use super::registry::{KernelModule, function};
use super::tensor_access::{
    FLOAT_DTYPES, alloc_output, common_device, device_view, expect_dims, expect_dtype, into_tensor,
    kernel_name, launch_error,
};
use crate::cpu::sampling::SamplingConfig;
use crate::{Error, Result};

/// The token id written for a row that has no token to give: every logit NaN, or, when sampling
/// (temperature > 0), every logit NaN or `-inf` (where the CPU sampler returns an error).
pub const NO_TOKEN: u32 = u32::MAX;

/// Threads per row for [`argmax`]: one pass over the row, bound by memory.
const ARGMAX_THREADS: u32 = 1024;
/// Threads per row for [`sample`]; its f64 arithmetic needs more registers per thread.
const SAMPLE_THREADS: u32 = 512;

/// The index of the largest logit of each row of `logits` (`[rows, vocab]`, f32, f16 or bf16),
/// as a U32 tensor `[rows]`. Ties go to the lowest index and NaN is ignored, as in
/// [`crate::cpu::sampling::argmax`]; a row of NaN only gives [`NO_TOKEN`].
pub fn argmax(logits: &Tensor) -> Result<Tensor> {
    const OP: &str = "argmax";
    let rows = Rows::check(OP, logits)?;
    let mut out = alloc_output(OP, &rows.device, DType::U32, &[rows.rows])?;
    if rows.rows == 0 {
        return into_tensor(out, &[rows.rows]);
    }
    let name = kernel_name(OP, "argmax", logits.dtype())?;
    let kernel = function(&rows.device, KernelModule::Sampling, &name)?;
    let logits_view = device_view(OP, "logits", logits)?;
    let (count, vocab) = (rows.rows as u64, rows.vocab as i64);
    let stream = rows.device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch
        .arg(&logits_view)
        .arg(out.slice_mut())
        .arg(&count)
        .arg(&vocab);
    // SAFETY: (logits, out, rows, vocab) is argmax's signature in sampling.cu; logits holds
    // rows x vocab elements of the dtype in the kernel name and out `rows` u32 values.
    unsafe { launch.launch(rows.config(ARGMAX_THREADS)) }
        .map_err(|e| launch_error(OP, &name, e))?;
    into_tensor(out, &[rows.rows])
}

/// Per-row sampling settings on the device, built from validated [`SamplingConfig`]s.
///
/// Build it once per batch composition and reuse it while the rows keep their settings; the
/// tensors have fixed addresses, so a captured CUDA graph can keep reading them.
pub struct DeviceSamplingParams {
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    rows: usize,
}

impl DeviceSamplingParams {
    /// One configuration per row, each validated (see [`SamplingConfig::validate`]).
    pub fn new(configs: &[SamplingConfig], device: &CudaDevice) -> Result<Self> {
        for (row, config) in configs.iter().enumerate() {
            config
                .validate()
                .map_err(|e| Error::InvalidSampling(format!("row {row}: {e}")))?;
        }
        let upload_f32 = |values: Vec<f32>| -> Result<Tensor> {
            let len = values.len();
            Ok(Tensor::from_vec(values, len)?.to_device(&Device::Cuda(device.ordinal()))?)
        };
        // A top-k at or above the vocabulary keeps everything, like 0; saturating keeps that true.
        let top_k: Vec<u32> = configs
            .iter()
            .map(|c| u32::try_from(c.top_k).unwrap_or(u32::MAX))
            .collect();
        Ok(DeviceSamplingParams {
            temperature: upload_f32(configs.iter().map(|c| c.temperature).collect())?,
            top_k: Tensor::from_vec(top_k, configs.len())?
                .to_device(&Device::Cuda(device.ordinal()))?,
            top_p: upload_f32(configs.iter().map(|c| c.top_p).collect())?,
            min_p: upload_f32(configs.iter().map(|c| c.min_p).collect())?,
            rows: configs.len(),
        })
    }

    /// The same configuration for `rows` rows.
    pub fn shared(config: &SamplingConfig, rows: usize, device: &CudaDevice) -> Result<Self> {
        Self::new(&vec![config.clone(); rows], device)
    }

    /// The number of rows these settings are for.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Draws one token per row of `logits` (`[rows, vocab]`, f32, f16 or bf16) with the row's
/// settings in `params`, using `uniforms` (F32 `[rows]`, each in `[0, 1)`) as the row's random
/// draw. Returns a U32 tensor `[rows]`; a row with no token to give yields [`NO_TOKEN`].
///
/// Rows whose temperature is 0 take the argmax and ignore their uniform number.
pub fn sample(logits: &Tensor, params: &DeviceSamplingParams, uniforms: &Tensor) -> Result<Tensor> {
    const OP: &str = "sample";
    let rows = Rows::check(OP, logits)?;
    common_device(
        OP,
        &[
            ("logits", logits),
            ("uniforms", uniforms),
            ("params", &params.temperature),
        ],
    )?;
    expect_dtype(OP, "uniforms", uniforms, &[DType::F32])?;
    expect_dims(OP, "uniforms", uniforms, &[rows.rows])?;
    if params.rows != rows.rows {
        return Err(Error::shape(
            OP,
            format!(
                "params are for {} rows, logits have {}",
                params.rows, rows.rows
            ),
        ));
    }
    let mut out = alloc_output(OP, &rows.device, DType::U32, &[rows.rows])?;
    if rows.rows == 0 {
        return into_tensor(out, &[rows.rows]);
    }
    let name = kernel_name(OP, "sample", logits.dtype())?;
    let kernel = function(&rows.device, KernelModule::Sampling, &name)?;
    let logits_view = device_view(OP, "logits", logits)?;
    let temperature = device_view(OP, "temperature", &params.temperature)?;
    let top_k = device_view(OP, "top_k", &params.top_k)?;
    let top_p = device_view(OP, "top_p", &params.top_p)?;
    let min_p = device_view(OP, "min_p", &params.min_p)?;
    let uniform = device_view(OP, "uniforms", uniforms)?;
    let (count, vocab) = (rows.rows as u64, rows.vocab as i64);
    let stream = rows.device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch
        .arg(&logits_view)
        .arg(&temperature)
        .arg(&top_k)
        .arg(&top_p)
        .arg(&min_p)
        .arg(&uniform)
        .arg(out.slice_mut())
        .arg(&count)
        .arg(&vocab);
    // SAFETY: the arguments follow sample's signature in sampling.cu (logits, temperature, top_k,
    // top_p, min_p, uniform, out, rows, vocab); logits holds rows x vocab elements of the kernel
    // name's dtype, every per-row tensor `rows` f32 (top_k: u32) values, out `rows` u32 values.
    unsafe { launch.launch(rows.config(SAMPLE_THREADS)) }
        .map_err(|e| launch_error(OP, &name, e))?;
    into_tensor(out, &[rows.rows])
}

/// The checked shape of a `[rows, vocab]` logits tensor.
struct Rows {
    device: CudaDevice,
    rows: usize,
    vocab: usize,
}

impl Rows {
    fn check(op: &'static str, logits: &Tensor) -> Result<Rows> {
        let device = common_device(op, &[("logits", logits)])?;
        expect_dtype(op, "logits", logits, &FLOAT_DTYPES)?;
        let &[rows, vocab] = logits.dims() else {
            return Err(Error::shape(
                op,
                format!(
                    "logits has shape {:?}, expected [rows, vocab]",
                    logits.dims()
                ),
            ));
        };
        // Token ids are u32 and NO_TOKEN = u32::MAX must not be one of them; keys hold the id in
        // their low 32 bits.
        if vocab == 0 || vocab >= NO_TOKEN as usize {
            return Err(Error::shape(
                op,
                format!("a vocabulary of {vocab} tokens is not in 1..{NO_TOKEN}"),
            ));
        }
        Ok(Rows {
            device,
            rows,
            vocab,
        })
    }

    /// One block per row, with a grid-stride loop past the grid's limit.
    fn config(&self, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.rows.min(i32::MAX as usize) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}
