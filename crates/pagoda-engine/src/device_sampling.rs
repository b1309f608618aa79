//! Picking a step's tokens on the GPU, so that only the chosen ids (and the logprobs a request
//! asked for) cross back to the host instead of whole rows of logits.
//!
//! The rows go through the same stages as on the host ([`RequestSampler::sample`]): penalties
//! into a copy of the logits (the raw row stays for the logprobs), then temperature and the
//! filters with each request's own random draw, then the log-softmax of the raw row at the
//! chosen token. A step whose requests are all greedy and unpenalised is one argmax launch.

use pagoda_kernels::cuda::sampling::{
    DevicePenalties, DeviceSamplingParams, NO_TOKEN, apply_penalties, argmax, logprobs, sample,
};
use pagoda_tensor::{CudaDevice, Device, Tensor};

use crate::output::TokenLogprob;
use crate::sampler::{RequestSampler, Sample};
use crate::{Error, Result};

/// One row of a step's logits and the request it samples for.
pub(crate) struct DeviceRow<'a> {
    pub sampler: &'a mut RequestSampler,
    pub prompt: &'a [u32],
    pub output: &'a [u32],
}

/// Samples one token for each row of `logits` (`[rows.len(), vocab]` on a CUDA device), with
/// `rows[i]`'s settings for row `i`. A row with no token to give (every logit NaN, or none above
/// `-inf` when sampling) gets an error of its own; the others are unaffected.
pub(crate) fn sample_rows(
    logits: &Tensor,
    rows: &mut [DeviceRow<'_>],
) -> Result<Vec<Result<Sample>>> {
    let Device::Cuda(ordinal) = logits.device() else {
        return Err(Error::Internal(format!(
            "device sampling got logits on {:?}",
            logits.device()
        )));
    };
    let &[count, vocab] = logits.dims() else {
        return Err(Error::Internal(format!(
            "logits of shape {:?}, expected [rows, vocab]",
            logits.dims()
        )));
    };
    if count != rows.len() {
        return Err(Error::Internal(format!(
            "{count} rows of logits for {} requests",
            rows.len()
        )));
    }
    if count == 0 {
        return Ok(Vec::new());
    }
    let device = CudaDevice::get(ordinal)?;
    let plain = rows
        .iter()
        .all(|r| r.sampler.config().is_greedy() && r.sampler.penalties().is_off());
    let tokens = if plain {
        argmax(logits)?
    } else {
        let penalties: Vec<_> = rows
            .iter()
            .map(|r| (r.sampler.penalties(), r.prompt, r.output))
            .collect();
        let penalties = DevicePenalties::new(&penalties, vocab, &device)?;
        let penalised = if penalties.any() {
            Some(apply_penalties(logits, &penalties)?)
        } else {
            None
        };
        let configs: Vec<_> = rows.iter().map(|r| r.sampler.config().clone()).collect();
        let params = DeviceSamplingParams::new(&configs, &device)?;
        // Greedy rows draw nothing (as on the host); the kernel ignores their number.
        let uniforms: Vec<f32> = rows
            .iter_mut()
            .map(|r| r.sampler.draw().unwrap_or(0.0))
            .collect();
        let uniforms = Tensor::from_vec(uniforms, count)?.to_device(&logits.device())?;
        sample(penalised.as_ref().unwrap_or(logits), &params, &uniforms)?
    };
    let tokens: Vec<u32> = tokens.to_vec()?;
    let mut top = top_logprobs(logits, rows, &tokens, vocab)?.into_iter();
    Ok(tokens
        .iter()
        .zip(rows.iter())
        .map(|(&token, row)| {
            if token == NO_TOKEN {
                return Err(Error::InvalidRequest(
                    "no token to sample: the model's logits are NaN or -inf".into(),
                ));
            }
            let logprob = match row.sampler.logprobs() {
                Some(_) => match top.next() {
                    // As on the host, a row without a logit above -inf has no logprobs.
                    Some(found) if found.logprob.is_nan() => {
                        return Err(Error::InvalidRequest(
                            "no logprobs: the model's logits are NaN or -inf".into(),
                        ));
                    }
                    found => found,
                },
                None => None,
            };
            Ok(Sample { token, logprob })
        })
        .collect())
}

/// The logprobs of the rows that asked for them, in row order: one launch over those rows with
/// the largest `top_n` asked, each row's list then cut to its own.
fn top_logprobs(
    logits: &Tensor,
    rows: &[DeviceRow<'_>],
    tokens: &[u32],
    vocab: usize,
) -> Result<Vec<TokenLogprob>> {
    let wanted: Vec<(u32, u32, usize)> = rows
        .iter()
        .zip(tokens)
        .enumerate()
        .filter_map(|(i, (row, &token))| {
            // A vocabulary smaller than n has only that many tokens to list.
            let n = row.sampler.logprobs()?.min(vocab);
            // A row without a token gets an error instead; ask about token 0 to keep its place.
            let token = if token == NO_TOKEN { 0 } else { token };
            Some((i as u32, token, n))
        })
        .collect();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let top_n = wanted.iter().map(|w| w.2).max().unwrap_or(0);
    let upload = |values: Vec<u32>| -> Result<Tensor> {
        let len = values.len();
        Ok(Tensor::from_vec(values, len)?.to_device(&logits.device())?)
    };
    let found = logprobs(
        logits,
        &upload(wanted.iter().map(|w| w.0).collect())?,
        &upload(wanted.iter().map(|w| w.1).collect())?,
        top_n,
    )?;
    let chosen: Vec<f32> = found.chosen.to_vec()?;
    let top_ids: Vec<u32> = found.top_ids.to_vec()?;
    let top_logprobs: Vec<f32> = found.top_logprobs.to_vec()?;
    Ok(wanted
        .iter()
        .enumerate()
        .map(|(i, &(_, token, n))| {
            let range = i * top_n..i * top_n + n;
            TokenLogprob {
                token,
                logprob: chosen[i],
                top: top_ids[range.clone()]
                    .iter()
                    .copied()
                    .zip(top_logprobs[range].iter().copied())
                    .collect(),
            }
        })
        .collect())
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use pagoda_tensor::DType;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::params::SamplingParams;

    /// The GPU, or `None` (the test then passes vacuously) unless `PAGODA_REQUIRE_GPU=1`.
    fn gpu() -> Option<Device> {
        match CudaDevice::get(0) {
            Ok(_) => Some(Device::Cuda(0)),
            Err(e) if std::env::var("PAGODA_REQUIRE_GPU").as_deref() == Ok("1") => {
                panic!("PAGODA_REQUIRE_GPU=1 but no GPU: {e}")
            }
            Err(_) => {
                eprintln!("skipped: no GPU");
                None
            }
        }
    }

    /// Settings that cover every stage: greedy, each filter, each penalty, logprobs.
    fn settings(row: usize) -> SamplingParams {
        let base = SamplingParams::default();
        match row % 8 {
            0 => base,
            1 => SamplingParams {
                temperature: 0.8,
                ..base
            },
            2 => SamplingParams {
                temperature: 1.2,
                top_k: 20,
                logprobs: Some(5),
                ..base
            },
            3 => SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                presence_penalty: 0.6,
                ..base
            },
            4 => SamplingParams {
                temperature: 1.0,
                min_p: 0.05,
                frequency_penalty: 1.1,
                logprobs: Some(0),
                ..base
            },
            5 => SamplingParams {
                repetition_penalty: 1.3,
                logprobs: Some(20),
                ..base
            },
            6 => SamplingParams {
                temperature: 0.9,
                top_k: 50,
                top_p: 0.8,
                repetition_penalty: 0.8,
                presence_penalty: -0.5,
                frequency_penalty: 0.4,
                logprobs: Some(3),
                ..base
            },
            _ => SamplingParams {
                logprobs: Some(1),
                ..base
            },
        }
    }

    /// The device sampler picks what the host sampler picks from the same logits and draws,
    /// and reports the same logprobs, for every dtype the model may produce logits in.
    #[test]
    fn device_sampling_matches_the_host_sampler() {
        let Some(device) = gpu() else { return };
        let seed: u64 = rand::rng().random();
        eprintln!("seed {seed}");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for vocab in [1, 7, 1003, 32000] {
                let rows = 37;
                let values: Vec<f32> = (0..rows * vocab)
                    .map(|_| rng.random_range(-8.0f32..8.0))
                    .collect();
                let logits = Tensor::from_vec(values, [rows, vocab])
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(&device)
                    .unwrap();
                // The host sees the logits exactly as the device holds them.
                let host_logits = logits.to_vec_f32().unwrap();
                let sequences: Vec<(Vec<u32>, Vec<u32>)> = (0..rows)
                    .map(|_| {
                        let prompt_len = rng.random_range(1..40);
                        let output_len = rng.random_range(0..40);
                        let mut token = || rng.random_range(0..vocab as u32);
                        (
                            (0..prompt_len).map(|_| token()).collect(),
                            (0..output_len).map(|_| token()).collect(),
                        )
                    })
                    .collect();
                let mut host: Vec<RequestSampler> = (0..rows)
                    .map(|r| RequestSampler::new(&settings(r), seed ^ r as u64).unwrap())
                    .collect();
                let mut on_device = host.clone();
                let mut device_rows: Vec<DeviceRow<'_>> = on_device
                    .iter_mut()
                    .zip(&sequences)
                    .map(|(sampler, (prompt, output))| DeviceRow {
                        sampler,
                        prompt,
                        output,
                    })
                    .collect();
                let picked = sample_rows(&logits, &mut device_rows).unwrap();
                for (r, (sampler, (prompt, output))) in host.iter_mut().zip(&sequences).enumerate()
                {
                    let mut row = host_logits[r * vocab..(r + 1) * vocab].to_vec();
                    let expected = sampler.sample(&mut row, prompt, output).unwrap();
                    let got = picked[r].as_ref().unwrap();
                    let context = format!("{dtype} vocab {vocab} row {r} ({:?})", settings(r));
                    assert_eq!(got.token, expected.token, "{context}");
                    match (&got.logprob, &expected.logprob) {
                        (None, None) => {}
                        (Some(got), Some(expected)) => {
                            assert_eq!(got.token, expected.token, "{context}");
                            assert!(
                                (got.logprob - expected.logprob).abs() <= 1e-5,
                                "{context}: {got:?} vs {expected:?}"
                            );
                            let ids =
                                |t: &TokenLogprob| t.top.iter().map(|p| p.0).collect::<Vec<_>>();
                            assert_eq!(ids(got), ids(expected), "{context}");
                            for (g, e) in got.top.iter().zip(&expected.top) {
                                assert!(
                                    (g.1 - e.1).abs() <= 1e-5,
                                    "{context}: {got:?} vs {expected:?}"
                                );
                            }
                        }
                        _ => panic!(
                            "{context}: logprobs {:?} vs {:?}",
                            got.logprob, expected.logprob
                        ),
                    }
                }
            }
        }
    }

    /// A row whose logits are all NaN fails alone; the rows beside it get their tokens.
    #[test]
    fn a_row_without_a_token_fails_alone() {
        let Some(device) = gpu() else { return };
        let vocab = 5;
        let mut values = vec![0.0f32, 1.0, 4.0, 2.0, 3.0];
        values.extend([f32::NAN; 5]);
        values.extend([9.0, 1.0, 0.0, 2.0, 3.0]);
        let logits = Tensor::from_vec(values, [3, vocab])
            .unwrap()
            .to_device(&device)
            .unwrap();
        let mut samplers: Vec<RequestSampler> = (0..3)
            .map(|_| RequestSampler::new(&SamplingParams::default(), 0).unwrap())
            .collect();
        let mut rows: Vec<DeviceRow<'_>> = samplers
            .iter_mut()
            .map(|sampler| DeviceRow {
                sampler,
                prompt: &[],
                output: &[],
            })
            .collect();
        let picked = sample_rows(&logits, &mut rows).unwrap();
        assert_eq!(picked[0].as_ref().unwrap().token, 2);
        assert!(matches!(picked[1], Err(Error::InvalidRequest(_))));
        assert_eq!(picked[2].as_ref().unwrap().token, 0);
    }
}
