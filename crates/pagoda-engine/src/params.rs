//! What a caller asks of one request: how to pick each token and when to stop.

use pagoda_kernels::cpu::sampling::{Penalties, SamplingConfig};

use crate::{Error, Result};

/// Most alternatives [`SamplingParams::logprobs`] may ask for per token, as in the OpenAI API.
pub const MAX_LOGPROBS: usize = 20;

/// Per-request sampling and stopping. The default is greedy decoding of up to 256 tokens.
///
/// Sampling applies, in order: the penalties (on tokens already seen), temperature, top-k, top-p
/// and min-p (see [`pagoda_kernels::cpu::sampling`]); each filter has an "off" value.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Logits are divided by it before the softmax; 0 is greedy (always the most likely token).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 is off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probabilities reach `top_p`; 1 is off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 is off.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of tokens in the prompt or the output; 1
    /// is off.
    pub repetition_penalty: f32,
    /// Subtracted from the logits of tokens that occur in the output, in `[-2, 2]`; 0 is off.
    pub presence_penalty: f32,
    /// Subtracted once per occurrence in the output, in `[-2, 2]`; 0 is off.
    pub frequency_penalty: f32,
    /// Seed of the request's own random stream: the same seed, prompt and parameters give the
    /// same output whatever else the engine runs. `None` draws a fresh seed.
    pub seed: Option<u64>,
    /// Most tokens to generate; at least 1.
    pub max_tokens: usize,
    /// Tokens that end the request (besides end-of-sequence); they are not part of the output.
    pub stop_token_ids: Vec<u32>,
    /// Texts that end the request, matched across token boundaries and cut from the output
    /// text (the token that completes one stays in the token ids).
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (for benchmarks).
    pub ignore_eos: bool,
    /// Report the log-probability of each chosen token and of this many most likely
    /// alternatives (`0..=20`); `None` reports nothing.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 256,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            ..Self::default()
        }
    }

    /// Checks every value on its own (the engine checks the rest against the model: the length
    /// against the context, stop token ids against the vocabulary).
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(Error::InvalidRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        self.sampling_config()
            .validate()
            .and_then(|()| self.penalties().validate())
            .map_err(|e| match e {
                pagoda_kernels::Error::InvalidSampling(message) => Error::InvalidRequest(message),
                other => Error::InvalidRequest(other.to_string()),
            })?;
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_LOGPROBS) {
            return Err(Error::InvalidRequest(format!(
                "logprobs must be at most {MAX_LOGPROBS}, got {n}"
            )));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::InvalidRequest(
                "stop strings must not be empty".into(),
            ));
        }
        Ok(())
    }

    /// The filters of the sampler.
    pub fn sampling_config(&self) -> SamplingConfig {
        SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
        }
    }

    /// The penalties on tokens already seen.
    pub fn penalties(&self) -> Penalties {
        Penalties {
            repetition: self.repetition_penalty,
            presence: self.presence_penalty,
            frequency: self.frequency_penalty,
        }
    }
}

/// Why a request finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens` tokens were generated.
    Length,
    /// Aborted by the caller, or failed inside the engine.
    Abort,
}

impl FinishReason {
    /// The OpenAI API's name: `"stop"`, `"length"` or `"abort"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_valid_greedy_decoding() {
        let params = SamplingParams::default();
        params.validate().unwrap();
        assert!(params.sampling_config().is_greedy());
        assert!(params.penalties().is_off());
        assert_eq!(params.max_tokens, 256);
        assert_eq!(SamplingParams::greedy(7).max_tokens, 7);
    }

    #[test]
    fn bad_values_are_invalid_requests_naming_the_field() {
        let base = SamplingParams::default();
        let cases = [
            (
                SamplingParams {
                    max_tokens: 0,
                    ..base.clone()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    temperature: -1.0,
                    ..base.clone()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..base.clone()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: 1.5,
                    ..base.clone()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..base.clone()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: 3.0,
                    ..base.clone()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: f32::NAN,
                    ..base.clone()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    logprobs: Some(21),
                    ..base.clone()
                },
                "logprobs",
            ),
            (
                SamplingParams {
                    stop: vec!["ok".into(), String::new()],
                    ..base.clone()
                },
                "stop",
            ),
        ];
        for (params, field) in cases {
            match params.validate() {
                Err(Error::InvalidRequest(message)) => {
                    assert!(message.contains(field), "{message:?} does not name {field}")
                }
                other => panic!("{params:?} gave {other:?}"),
            }
        }
        SamplingParams {
            logprobs: Some(20),
            presence_penalty: -2.0,
            ..base
        }
        .validate()
        .unwrap();
    }
}
