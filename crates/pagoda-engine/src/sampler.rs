//! Picking one request's next token from its row of logits, on the host.
//!
//! [`RequestSampler::sample`] is the one place a row of logits on the host becomes a token:
//! penalties, the seeded draw and the logprobs. On a GPU, `device_sampling` does the same for a
//! whole step from the sampler's settings and draws ([`RequestSampler::draw`]), and returns the
//! same [`Sample`]s.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use pagoda_kernels::cpu::sampling::{Penalties, Sampler, SamplingConfig, logprobs};

use crate::Result;
use crate::output::TokenLogprob;
use crate::params::SamplingParams;

/// One sampled token, with its logprobs when the request asked for them.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Sample {
    pub token: u32,
    pub logprob: Option<TokenLogprob>,
}

/// A request's sampling state: its filters, penalties and its own random stream, so that its
/// tokens depend on its seed and logits alone, not on the other requests of a batch.
#[derive(Clone, Debug)]
pub(crate) struct RequestSampler {
    sampler: Sampler,
    penalties: Penalties,
    logprobs: Option<usize>,
}

impl RequestSampler {
    /// A sampler for `params` (validated) whose random stream starts from `seed`.
    pub fn new(params: &SamplingParams, seed: u64) -> Result<Self> {
        Ok(Self {
            sampler: Sampler::new(params.sampling_config(), seed)?,
            penalties: params.penalties(),
            logprobs: params.logprobs,
        })
    }

    /// The filters and temperature the request samples with.
    pub fn config(&self) -> &SamplingConfig {
        self.sampler.config()
    }

    /// The penalties applied to the logits before sampling.
    pub fn penalties(&self) -> Penalties {
        self.penalties
    }

    /// How many most likely tokens to report with each token's logprob, when logprobs are
    /// wanted.
    pub fn logprobs(&self) -> Option<usize> {
        self.logprobs
    }

    /// The random number for the next token when the request samples (see
    /// [`Sampler::draw`]), in `[0, 1)` as an `f32` for the GPU sampler; `None` for greedy
    /// requests, which draw nothing, as on the host.
    pub fn draw(&mut self) -> Option<f32> {
        if self.config().is_greedy() {
            return None;
        }
        // Rounding to f32 may reach 1.0, which is outside the interval the sampler expects.
        const BELOW_ONE: f32 = 1.0 - f32::EPSILON / 2.0;
        Some((self.sampler.draw() as f32).min(BELOW_ONE))
    }

    /// Picks the next token of a sequence whose prompt is `prompt` and whose output so far is
    /// `output`, from `logits` (its row; the penalties are applied to it in place).
    pub fn sample(&mut self, logits: &mut [f32], prompt: &[u32], output: &[u32]) -> Result<Sample> {
        // Logprobs describe the model's own distribution: keep the row as it came when the
        // penalties would change it.
        let raw = (self.logprobs.is_some() && !self.penalties.is_off()).then(|| logits.to_vec());
        self.penalties.apply(logits, prompt, output)?;
        let token = self.sampler.sample(logits)?;
        let logprob = match self.logprobs {
            Some(n) => {
                let row = raw.as_deref().unwrap_or(logits);
                let found = logprobs(row, token, n)?;
                Some(TokenLogprob {
                    token,
                    logprob: found.logprob,
                    top: found.top,
                })
            }
            None => None,
        };
        Ok(Sample { token, logprob })
    }
}

/// A seed for a request that brought none: different in every process and for every request.
pub(crate) fn fresh_seed(request: u64) -> u64 {
    // The standard library seeds every RandomState from the operating system's randomness.
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(request);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_picks_the_argmax_after_penalties() {
        let mut plain = RequestSampler::new(&params(0.0), 0).unwrap();
        let mut logits = [1.0, 3.0, 2.9];
        assert_eq!(plain.sample(&mut logits, &[], &[]).unwrap().token, 1);

        // Token 1 was generated before: a presence penalty moves the choice to token 2.
        let penalised = SamplingParams {
            presence_penalty: 0.5,
            ..params(0.0)
        };
        let mut sampler = RequestSampler::new(&penalised, 0).unwrap();
        let mut logits = [1.0, 3.0, 2.9];
        assert_eq!(sampler.sample(&mut logits, &[], &[1]).unwrap().token, 2);
        assert_eq!(logits, [1.0, 2.5, 2.9]);
    }

    #[test]
    fn logprobs_come_from_the_raw_logits() {
        let with_logprobs = SamplingParams {
            presence_penalty: 2.0,
            logprobs: Some(2),
            ..params(0.0)
        };
        let mut sampler = RequestSampler::new(&with_logprobs, 0).unwrap();
        let raw = [0.0f32, 3.0, 2.0];
        let mut logits = raw;
        let sample = sampler.sample(&mut logits, &[], &[1]).unwrap();
        assert_eq!(sample.token, 2);
        let expected = logprobs(&raw, 2, 2).unwrap();
        let logprob = sample.logprob.unwrap();
        assert_eq!(logprob.logprob, expected.logprob);
        assert_eq!(logprob.top, expected.top);
        assert_eq!(
            logprob.top[0].0, 1,
            "the raw distribution still ranks token 1 first"
        );
    }

    #[test]
    fn draws_follow_the_host_samplers_stream() {
        let mut host = Sampler::new(params(0.7).sampling_config(), 9).unwrap();
        let mut device = RequestSampler::new(&params(0.7), 9).unwrap();
        for _ in 0..1000 {
            let draw = device.draw().unwrap();
            assert!((0.0..1.0).contains(&draw));
            assert!((f64::from(draw) - host.draw()).abs() < 1e-7);
        }
        let mut greedy = RequestSampler::new(&params(0.0), 9).unwrap();
        assert_eq!(greedy.draw(), None);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f32> = (0..64).map(|i| (i % 7) as f32 * 0.4).collect();
        let draw = |seed| {
            let mut sampler = RequestSampler::new(&params(1.0), seed).unwrap();
            (0..32)
                .map(|_| sampler.sample(&mut logits.clone(), &[], &[]).unwrap().token)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
        assert_ne!(
            fresh_seed(1),
            fresh_seed(1),
            "fresh seeds differ every time"
        );
    }
}
