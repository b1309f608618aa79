//! Errors of the scheduler.

use crate::request::RequestId;

/// Everything the scheduler refuses: a bad configuration, a request it cannot serve, or a step
/// reported out of turn.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A limit of the configuration is zero.
    #[error("scheduler config: {name} must be at least 1")]
    ZeroLimit {
        /// The field that is zero.
        name: &'static str,
    },
    /// Without chunked prefill a whole (re)computed prompt must fit in one step's token budget.
    #[error(
        "scheduler config: without chunked prefill max_batch_tokens ({max_batch_tokens}) must be at \
         least max_model_len ({max_model_len})"
    )]
    BatchTokensBelowModelLen {
        /// The configured token budget per step.
        max_batch_tokens: usize,
        /// The configured longest request.
        max_model_len: usize,
    },
    /// The KV space reports a zero block size or no blocks at all.
    #[error(
        "KV space has block size {block_size} and {total_blocks} blocks; both must be at least 1"
    )]
    UnusableKvSpace {
        /// Tokens per block reported by the KV space.
        block_size: usize,
        /// Blocks reported by the KV space.
        total_blocks: usize,
    },
    /// The watermark would keep every block free.
    #[error(
        "watermark of {watermark_blocks} blocks must be below the {total_blocks} blocks of the KV space"
    )]
    WatermarkTooLarge {
        /// The configured watermark.
        watermark_blocks: usize,
        /// Blocks of the KV space.
        total_blocks: usize,
    },
    /// The request has no prompt tokens.
    #[error("{0}: empty prompt")]
    EmptyPrompt(RequestId),
    /// The request asks for no output tokens.
    #[error("{0}: max_tokens must be at least 1")]
    ZeroMaxTokens(RequestId),
    /// Prompt plus output would exceed the model's context.
    #[error(
        "{id}: prompt of {prompt_len} tokens plus max_tokens {max_tokens} exceeds max_model_len \
         {max_model_len}"
    )]
    TooLong {
        /// The request.
        id: RequestId,
        /// Tokens in its prompt.
        prompt_len: usize,
        /// Output tokens it asked for.
        max_tokens: usize,
        /// The configured longest request.
        max_model_len: usize,
    },
    /// Even with the whole KV space to itself the request could not hold all its tokens.
    #[error(
        "{id}: {tokens} tokens need {blocks_needed} KV blocks, but the KV space has only \
         {total_blocks}"
    )]
    ExceedsKvSpace {
        /// The request.
        id: RequestId,
        /// Tokens whose K/V the request holds at its longest (prompt plus max_tokens, less the
        /// last sampled token, which is never fed back).
        tokens: usize,
        /// Blocks those tokens take.
        blocks_needed: usize,
        /// Blocks of the KV space.
        total_blocks: usize,
    },
    /// A request with this id is already known (queued, running, or finished but not yet reported).
    #[error("{0} already exists")]
    DuplicateRequest(RequestId),
    /// `schedule` was called again before `update` reported the previous step.
    #[error("a scheduled step is still waiting for its update")]
    StepInFlight,
    /// `update` got samples, but no step is waiting for them.
    #[error("update called with samples, but no step is in flight")]
    NoStepInFlight,
    /// A request whose step ends its prefill or decodes got no sampled token.
    #[error("{0} was scheduled to produce a token, but no sample came back for it")]
    MissingSample(RequestId),
    /// A sample came back for a request that was not scheduled to produce a token.
    #[error("a sample came back for {0}, which was not scheduled to produce a token")]
    UnexpectedSample(RequestId),
    /// Two samples came back for one request.
    #[error("two samples came back for {0}")]
    DuplicateSample(RequestId),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
