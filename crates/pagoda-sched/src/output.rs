//! What one scheduling step hands to the engine, and what the engine hands back.

use crate::request::{FinishReason, RequestId};

/// One request's share of a step: the tokens whose K/V the model computes for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledRequest {
    /// The request.
    pub id: RequestId,
    /// Position of the first token computed in this step; the tokens before it already have
    /// their K/V in the request's blocks (earlier steps or a cached prefix).
    pub start: usize,
    /// The token ids at positions `start..start + token_ids.len()` of the request's prompt
    /// followed by its output: one for a decode, a chunk for a prefill or a recomputation.
    pub token_ids: Vec<u32>,
    /// Whether the step ends at the request's last token, so that its logits are sampled and
    /// [`Scheduler::update`](crate::Scheduler::update) expects a token for it.
    pub produces_token: bool,
    /// Whether this step admitted the request from the waiting or preempted queue, i.e. the KV
    /// space has just reserved its prefix and the engine sees it for the first time since its
    /// arrival or its last preemption.
    pub newly_admitted: bool,
}

impl ScheduledRequest {
    /// Tokens computed for this request in this step.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Position after the last token computed in this step: the request's context length once
    /// the step has run.
    pub fn end(&self) -> usize {
        self.start + self.token_ids.len()
    }
}

/// The work of one engine step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    /// Requests to run, running ones first (in admission order), then newly admitted ones.
    pub scheduled: Vec<ScheduledRequest>,
    /// Requests preempted in this step: their blocks are released and they were not scheduled.
    pub preempted: Vec<RequestId>,
    /// Requests that finished since the previous step was scheduled (by
    /// [`Scheduler::update`](crate::Scheduler::update) or
    /// [`Scheduler::abort`](crate::Scheduler::abort)), so that per-request state elsewhere can be
    /// dropped. The scheduler forgets them as it reports them here.
    pub finished: Vec<(RequestId, FinishReason)>,
    /// Tokens computed in this step, over all scheduled requests.
    pub num_batched_tokens: usize,
}

impl SchedulerOutput {
    /// Whether nothing runs in this step.
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

/// The token the engine sampled for a request in a step, and whether that ends the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampledToken {
    /// The request; it must have been scheduled with `produces_token` set.
    pub id: RequestId,
    /// The sampled token id; appended to the request's output even when `stopped` is set.
    pub token: u32,
    /// Whether the engine saw a stop condition (end-of-sequence, stop token or stop string).
    pub stopped: bool,
}
