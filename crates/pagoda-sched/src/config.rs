//! Limits of the scheduler.

use crate::error::{Error, Result};

/// How much work one step may hold and how requests are admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most requests running at once (and so scheduled in one step).
    pub max_num_seqs: usize,
    /// Most tokens computed in one step, over all requests.
    pub max_batch_tokens: usize,
    /// Longest request: prompt plus `max_tokens` (the model's context, or less).
    pub max_model_len: usize,
    /// Blocks a new admission must leave free for the running requests to grow into, so that
    /// admitting does not cause an immediate preemption. Waived while nothing runs.
    pub watermark_blocks: usize,
    /// Whether a prompt may be computed over several steps, taking what is left of each step's
    /// token budget, so that a long prompt never holds back the running decodes. Without it a
    /// prompt waits for a step with room for all of it, and `max_batch_tokens` must be at least
    /// `max_model_len`.
    pub chunked_prefill: bool,
}

impl SchedulerConfig {
    /// Defaults for requests of up to `max_model_len` tokens: 256 sequences, 2048 tokens per
    /// step, chunked prefill, no watermark.
    pub fn new(max_model_len: usize) -> Self {
        Self {
            max_num_seqs: 256,
            max_batch_tokens: 2048,
            max_model_len,
            watermark_blocks: 0,
            chunked_prefill: true,
        }
    }

    /// Checks the limits on their own (the watermark is checked against the KV space in
    /// [`Scheduler::new`](crate::Scheduler::new)).
    ///
    /// # Errors
    /// [`Error::ZeroLimit`] for a zero limit; [`Error::BatchTokensBelowModelLen`] when chunked
    /// prefill is off and the longest request would not fit in one step.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("max_num_seqs", self.max_num_seqs),
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_model_len", self.max_model_len),
        ] {
            if value == 0 {
                return Err(Error::ZeroLimit { name });
            }
        }
        // A preempted request recomputes its prompt and output so far, up to max_model_len - 1
        // tokens, in one step.
        if !self.chunked_prefill && self.max_batch_tokens < self.max_model_len {
            return Err(Error::BatchTokensBelowModelLen {
                max_batch_tokens: self.max_batch_tokens,
                max_model_len: self.max_model_len,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(SchedulerConfig::new(4096).validate(), Ok(()));
    }

    #[test]
    fn zero_limits_are_named() {
        let mut config = SchedulerConfig::new(128);
        config.max_batch_tokens = 0;
        assert_eq!(
            config.validate(),
            Err(Error::ZeroLimit {
                name: "max_batch_tokens"
            })
        );
        let mut config = SchedulerConfig::new(0);
        config.max_num_seqs = 0;
        assert_eq!(
            config.validate(),
            Err(Error::ZeroLimit {
                name: "max_num_seqs"
            })
        );
        assert_eq!(
            SchedulerConfig::new(0).validate(),
            Err(Error::ZeroLimit {
                name: "max_model_len"
            })
        );
    }

    #[test]
    fn without_chunking_a_whole_request_must_fit_one_step() {
        let mut config = SchedulerConfig::new(4096);
        config.chunked_prefill = false;
        assert_eq!(
            config.validate(),
            Err(Error::BatchTokensBelowModelLen {
                max_batch_tokens: 2048,
                max_model_len: 4096
            })
        );
        config.max_batch_tokens = 4096;
        assert_eq!(config.validate(), Ok(()));
    }
}
