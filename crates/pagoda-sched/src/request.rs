//! Requests as the scheduler sees them: token ids, limits and progress.

use std::fmt;

/// Identifies a request. The caller chooses it; it must be unique among the scheduler's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request {}", self.0)
    }
}

impl From<u64> for RequestId {
    fn from(id: u64) -> Self {
        Self(id)
    }
}

/// What [`Scheduler::add_request`](crate::Scheduler::add_request) takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRequest {
    /// The request's id.
    pub id: RequestId,
    /// Prompt token ids; at least one.
    pub prompt: Vec<u32>,
    /// Most output tokens to generate; at least one.
    pub max_tokens: usize,
    /// Lower values are served sooner; requests of equal priority are served in arrival order.
    pub priority: i32,
}

impl NewRequest {
    /// A request of the default priority 0.
    pub fn new(id: RequestId, prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            id,
            prompt,
            max_tokens,
            priority: 0,
        }
    }

    /// The same request with `priority` (lower is sooner).
    #[must_use]
    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }
}

/// Why a request finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// It generated `max_tokens` tokens.
    Length,
    /// The engine reported a stop (end-of-sequence token, stop token or stop string).
    Stopped,
    /// It was aborted.
    Aborted,
}

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestState {
    /// Queued, never admitted yet.
    Waiting,
    /// Admitted: holds KV blocks and is scheduled each step while the budget allows.
    Running,
    /// Was running, lost its blocks to make room, and waits to be recomputed.
    Preempted,
    /// Done; holds no blocks.
    Finished(FinishReason),
}

/// A request's tokens and progress.
///
/// Its tokens are the prompt followed by the output so far. `num_computed_tokens` counts the
/// leading tokens whose K/V sit in the KV space; the tokens after them are what the next steps
/// compute. After a preemption it drops to zero, so the prompt *and* the output so far are
/// recomputed before the next token is sampled.
#[derive(Debug, Clone)]
pub struct Request {
    id: RequestId,
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    priority: i32,
    pub(crate) arrival: u64,
    pub(crate) num_computed_tokens: usize,
    pub(crate) state: RequestState,
    pub(crate) num_preemptions: usize,
}

impl Request {
    pub(crate) fn new(new: NewRequest, arrival: u64) -> Self {
        Self {
            id: new.id,
            prompt_len: new.prompt.len(),
            tokens: new.prompt,
            max_tokens: new.max_tokens,
            priority: new.priority,
            arrival,
            num_computed_tokens: 0,
            state: RequestState::Waiting,
            num_preemptions: 0,
        }
    }

    /// The request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Prompt token ids.
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    /// Output token ids generated so far (kept across preemptions).
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Prompt followed by output.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Prompt plus output length.
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Leading tokens whose K/V are computed.
    pub fn num_computed_tokens(&self) -> usize {
        self.num_computed_tokens
    }

    /// Most output tokens it may generate.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Its priority (lower is sooner).
    pub fn priority(&self) -> i32 {
        self.priority
    }

    /// Where it is in its life.
    pub fn state(&self) -> RequestState {
        self.state
    }

    /// How often it was preempted.
    pub fn num_preemptions(&self) -> usize {
        self.num_preemptions
    }

    pub(crate) fn push_output(&mut self, token: u32) {
        self.tokens.push(token);
    }

    pub(crate) fn num_output_tokens(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// The key that orders queued requests: priority, then arrival.
    pub(crate) fn queue_key(&self) -> (i32, u64) {
        (self.priority, self.arrival)
    }
}
