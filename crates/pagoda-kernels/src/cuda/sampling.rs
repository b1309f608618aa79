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

use std::collections::BTreeMap;

use pagoda_tensor::cudarc::driver::{LaunchConfig, PushKernelArg};
use pagoda_tensor::{CudaDevice, DType, Device, Tensor};

use super::registry::{KernelModule, function};
use super::tensor_access::{
    FLOAT_DTYPES, alloc_output, common_device, device_view, expect_dims, expect_dtype, into_tensor,
    kernel_name, launch_error,
};
use crate::cpu::sampling::{Penalties, SamplingConfig};
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
    rows.expect_settings(OP, "params", params.rows)?;
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

/// The most top tokens [`logprobs`] reports per row (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Per-row penalties on the device and the tokens each applies to, built on the host for one
/// step from each row's prompt and output so far.
pub struct DevicePenalties {
    repetition: Tensor,
    presence: Tensor,
    frequency: Tensor,
    /// Row r's entries are `offsets[r]..offsets[r + 1]` of `tokens` and `counts`.
    offsets: Tensor,
    tokens: Tensor,
    /// Occurrences of the token in the output (0: in the prompt only).
    counts: Tensor,
    rows: usize,
    /// The vocabulary the tokens were checked against; the logits must have as many columns.
    vocab: usize,
    any: bool,
}

impl DevicePenalties {
    /// One entry per row: its penalties (validated here), prompt and output so far. A row whose
    /// penalties are off has no entries. Fails on a token id at or past `vocab`.
    pub fn new(
        rows: &[(Penalties, &[u32], &[u32])],
        vocab: usize,
        device: &CudaDevice,
    ) -> Result<Self> {
        let mut offsets = Vec::with_capacity(rows.len() + 1);
        let mut tokens = Vec::new();
        let mut counts = Vec::new();
        offsets.push(0u32);
        for (row, (penalties, prompt, output)) in rows.iter().enumerate() {
            penalties
                .validate()
                .map_err(|e| Error::InvalidSampling(format!("row {row}: {e}")))?;
            if let Some(&bad) = prompt
                .iter()
                .chain(output.iter())
                .find(|&&t| t as usize >= vocab)
            {
                return Err(Error::InvalidSampling(format!(
                    "row {row}: token {bad} is outside the {vocab} logits"
                )));
            }
            if !penalties.is_off() {
                let mut occurrences: BTreeMap<u32, u32> = BTreeMap::new();
                for &token in output.iter() {
                    *occurrences.entry(token).or_default() += 1;
                }
                // Prompt tokens only take the repetition penalty.
                if penalties.repetition != 1.0 {
                    for &token in prompt.iter() {
                        occurrences.entry(token).or_default();
                    }
                }
                for (token, count) in occurrences {
                    tokens.push(token);
                    counts.push(count);
                }
            }
            let end = u32::try_from(tokens.len())
                .map_err(|_| Error::shape("penalties", "more than 2^32 penalised tokens"))?;
            offsets.push(end);
        }
        let any = !tokens.is_empty();
        let target = Device::Cuda(device.ordinal());
        let upload_f32 = |values: Vec<f32>| -> Result<Tensor> {
            let len = values.len();
            Ok(Tensor::from_vec(values, len)?.to_device(&target)?)
        };
        // CUDA allocations cannot be empty: a step without entries still uploads one.
        let upload_u32 = |mut values: Vec<u32>| -> Result<Tensor> {
            if values.is_empty() {
                values.push(0);
            }
            let len = values.len();
            Ok(Tensor::from_vec(values, len)?.to_device(&target)?)
        };
        Ok(Self {
            repetition: upload_f32(rows.iter().map(|r| r.0.repetition).collect())?,
            presence: upload_f32(rows.iter().map(|r| r.0.presence).collect())?,
            frequency: upload_f32(rows.iter().map(|r| r.0.frequency).collect())?,
            offsets: upload_u32(offsets)?,
            tokens: upload_u32(tokens)?,
            counts: upload_u32(counts)?,
            rows: rows.len(),
            vocab,
            any,
        })
    }

    /// The number of rows these penalties are for.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Whether any row has a token to penalise; when not, [`apply_penalties`] would only copy.
    pub fn any(&self) -> bool {
        self.any
    }
}

/// `logits` (`[rows, vocab]`, f32, f16 or bf16) as an F32 tensor with each row's penalties
/// applied, bit for bit as [`Penalties::apply`] on the row converted to f32. `logits` is left as
/// it is (logprobs describe the raw distribution).
pub fn apply_penalties(logits: &Tensor, penalties: &DevicePenalties) -> Result<Tensor> {
    const OP: &str = "apply_penalties";
    let rows = Rows::check(OP, logits)?;
    common_device(OP, &[("logits", logits), ("penalties", &penalties.offsets)])?;
    rows.expect_settings(OP, "penalties", penalties.rows)?;
    // The kernel writes at the entries' token ids, which were checked against this vocabulary.
    if penalties.vocab != rows.vocab {
        return Err(Error::shape(
            OP,
            format!(
                "penalties are for a vocabulary of {}, logits have {}",
                penalties.vocab, rows.vocab
            ),
        ));
    }
    let dims = [rows.rows, rows.vocab];
    let mut out = alloc_output(OP, &rows.device, DType::F32, &dims)?;
    if rows.rows == 0 {
        return into_tensor(out, &dims);
    }
    let name = kernel_name(OP, "penalties", logits.dtype())?;
    let kernel = function(&rows.device, KernelModule::Sampling, &name)?;
    let logits_view = device_view(OP, "logits", logits)?;
    let repetition = device_view(OP, "repetition", &penalties.repetition)?;
    let presence = device_view(OP, "presence", &penalties.presence)?;
    let frequency = device_view(OP, "frequency", &penalties.frequency)?;
    let offsets = device_view(OP, "offsets", &penalties.offsets)?;
    let tokens = device_view(OP, "tokens", &penalties.tokens)?;
    let counts = device_view(OP, "counts", &penalties.counts)?;
    let (count, vocab) = (rows.rows as u64, rows.vocab as i64);
    let stream = rows.device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch
        .arg(&logits_view)
        .arg(out.slice_mut())
        .arg(&repetition)
        .arg(&presence)
        .arg(&frequency)
        .arg(&offsets)
        .arg(&tokens)
        .arg(&counts)
        .arg(&count)
        .arg(&vocab);
    // SAFETY: the arguments follow penalties' signature in sampling.cu (logits, out, repetition,
    // presence, frequency, offsets, tokens, counts, rows, vocab); logits and out hold rows x vocab
    // elements (out f32), the per-row tensors `rows` values, offsets rows + 1 ascending bounds
    // into tokens and counts, every token below vocab (checked in DevicePenalties::new against
    // the vocabulary compared with the logits' above).
    unsafe { launch.launch(rows.config(ARGMAX_THREADS)) }
        .map_err(|e| launch_error(OP, &name, e))?;
    into_tensor(out, &dims)
}

/// What [`logprobs`] found, on the device, one row per requested row.
pub struct DeviceLogprobs {
    /// F32 `[r]`: the log-probability of the asked token; NaN when the row has no logit above
    /// `-inf` (where the CPU's `logprobs` fails) or the row or token is out of range.
    pub chosen: Tensor,
    /// U32 `[r, top_n]`: the most likely tokens, most likely first (ties by lowest id);
    /// [`NO_TOKEN`] past the vocabulary's end.
    pub top_ids: Tensor,
    /// F32 `[r, top_n]`: their log-probabilities.
    pub top_logprobs: Tensor,
}

/// For each `i`, the log-softmax of row `rows[i]` of `logits` (`[rows, vocab]`, f32, f16 or
/// bf16) at token `tokens[i]`, and the row's `top_n` (at most [`MAX_TOP_LOGPROBS`]) most likely
/// tokens, as [`crate::cpu::sampling::logprobs`] computes them (f64 log-sum-exp, NaN counted as
/// `-inf`). `rows` and `tokens` are U32 `[r]` on the device; their values cannot be checked on
/// the host without a copy back, so the kernel reads nothing outside the logits instead: a row
/// index past the logits' rows gets NaN logprobs and [`NO_TOKEN`] ids, a token past the
/// vocabulary a NaN `chosen`.
pub fn logprobs(
    logits: &Tensor,
    rows: &Tensor,
    tokens: &Tensor,
    top_n: usize,
) -> Result<DeviceLogprobs> {
    const OP: &str = "logprobs";
    let shape = Rows::check(OP, logits)?;
    common_device(
        OP,
        &[("logits", logits), ("rows", rows), ("tokens", tokens)],
    )?;
    expect_dtype(OP, "rows", rows, &[DType::U32])?;
    expect_dtype(OP, "tokens", tokens, &[DType::U32])?;
    let &[count] = rows.dims() else {
        return Err(Error::shape(
            OP,
            format!("rows has shape {:?}, expected [r]", rows.dims()),
        ));
    };
    expect_dims(OP, "tokens", tokens, &[count])?;
    if top_n > MAX_TOP_LOGPROBS {
        return Err(Error::InvalidSampling(format!(
            "at most {MAX_TOP_LOGPROBS} top logprobs per token, asked for {top_n}"
        )));
    }
    let mut chosen = alloc_output(OP, &shape.device, DType::F32, &[count])?;
    let mut top_ids = alloc_output(OP, &shape.device, DType::U32, &[count, top_n])?;
    let mut top_logprobs = alloc_output(OP, &shape.device, DType::F32, &[count, top_n])?;
    if count > 0 {
        let name = kernel_name(OP, "logprobs", logits.dtype())?;
        let kernel = function(&shape.device, KernelModule::Sampling, &name)?;
        let logits_view = device_view(OP, "logits", logits)?;
        let rows_view = device_view(OP, "rows", rows)?;
        let tokens_view = device_view(OP, "tokens", tokens)?;
        let (requested, logit_rows, vocab, n) = (
            count as u64,
            shape.rows as u64,
            shape.vocab as i64,
            top_n as u32,
        );
        let stream = shape.device.stream();
        let mut launch = stream.launch_builder(&kernel);
        launch
            .arg(&logits_view)
            .arg(&rows_view)
            .arg(&tokens_view)
            .arg(chosen.slice_mut())
            .arg(top_ids.slice_mut())
            .arg(top_logprobs.slice_mut())
            .arg(&requested)
            .arg(&logit_rows)
            .arg(&vocab)
            .arg(&n);
        let config = LaunchConfig {
            grid_dim: (count.min(i32::MAX as usize) as u32, 1, 1),
            block_dim: (SAMPLE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments follow logprobs' signature in sampling.cu (logits, rows, tokens,
        // chosen, top_ids, top_logprobs, count, logit_rows, vocab, top_n); logits holds
        // logit_rows x vocab elements, rows and tokens `count` u32 values (the kernel skips those
        // out of range), chosen `count` f32 and the top tensors count x top_n values.
        unsafe { launch.launch(config) }.map_err(|e| launch_error(OP, &name, e))?;
    }
    Ok(DeviceLogprobs {
        chosen: into_tensor(chosen, &[count])?,
        top_ids: into_tensor(top_ids, &[count, top_n])?,
        top_logprobs: into_tensor(top_logprobs, &[count, top_n])?,
    })
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

    /// Checks that per-row settings (`what`) cover exactly these rows.
    fn expect_settings(&self, op: &'static str, what: &str, settings_rows: usize) -> Result<()> {
        if settings_rows == self.rows {
            return Ok(());
        }
        Err(Error::shape(
            op,
            format!(
                "{what} are for {settings_rows} rows, logits have {}",
                self.rows
            ),
        ))
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
