//! What a caller asks of one generation.

use pagoda_kernels::cpu::sampling::SamplingConfig;

use crate::{Error, Result};

/// How much to generate and how to pick each token.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationParams {
    /// Upper bound on new tokens.
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    /// Seed of the sampler's RNG: the same seed and prompt give the same output.
    pub seed: u64,
    /// Keep going past end-of-sequence tokens (for benchmarks).
    pub ignore_eos: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingConfig::greedy(),
            seed: 0,
            ignore_eos: false,
        }
    }
}

impl GenerationParams {
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(Error::InvalidRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        Ok(self.sampling.validate()?)
    }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Stop,
    /// `max_tokens` were generated.
    Length,
}
