//! What the engine hands back: per-step deltas of a request, and whole completions.

use pagoda_sched::RequestId;

use crate::params::FinishReason;

/// The log-probability of a chosen token and of the most likely alternatives at its position.
///
/// Log-probabilities are those of the model's own distribution (the log-softmax of the raw
/// logits, before penalties and temperature), as vLLM reports by default.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The chosen token.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The requested number of most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What one step produced for one request: the new part only, plus running totals.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestOutput {
    pub id: RequestId,
    /// New text: whole characters only, stop strings cut, and text that could still become a
    /// stop string held back until it cannot.
    pub text_delta: String,
    /// New token ids (an end-of-sequence or stop token is not among them).
    pub token_ids_delta: Vec<u32>,
    /// One entry per new token, when the request asked for logprobs.
    pub logprobs_delta: Vec<TokenLogprob>,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated so far, over all outputs of the request.
    pub completion_tokens: usize,
    /// Set on the last output of the request.
    pub finish_reason: Option<FinishReason>,
}

impl RequestOutput {
    /// An output with no new text or tokens.
    pub(crate) fn empty(id: RequestId, prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            id,
            text_delta: String::new(),
            token_ids_delta: Vec::new(),
            logprobs_delta: Vec::new(),
            prompt_tokens,
            completion_tokens,
            finish_reason: None,
        }
    }

    /// Whether this is the request's last output.
    pub fn is_finished(&self) -> bool {
        self.finish_reason.is_some()
    }
}

/// A whole request's result, the outputs of [`Engine::generate`](crate::Engine::generate)
/// joined.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub id: RequestId,
    pub text: String,
    pub token_ids: Vec<u32>,
    /// One entry per token when logprobs were asked for.
    pub logprobs: Vec<TokenLogprob>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
}

impl Completion {
    /// An empty completion of `id`, to [`push`](Self::push) its outputs onto; until the last one
    /// arrives its finish reason reads `Abort`.
    pub fn new(id: RequestId) -> Self {
        Self {
            id,
            text: String::new(),
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            prompt_tokens: 0,
            finish_reason: FinishReason::Abort,
        }
    }

    /// Appends one output of the request.
    pub fn push(&mut self, output: RequestOutput) {
        self.text.push_str(&output.text_delta);
        self.token_ids.extend(output.token_ids_delta);
        self.logprobs.extend(output.logprobs_delta);
        self.prompt_tokens = output.prompt_tokens;
        if let Some(reason) = output.finish_reason {
            self.finish_reason = reason;
        }
    }
}
