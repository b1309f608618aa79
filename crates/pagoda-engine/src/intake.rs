//! What a caller sends, turned into what the scheduler accepts: prompts tokenized and checked
//! against the model, sampling parameters validated, request ids handed out.
//!
//! Shared by the engine and its handles, so that a handle refuses a bad request at once, on the
//! caller's thread, without a round trip to the step loop.

use std::sync::atomic::{AtomicU64, Ordering};

use pagoda_sched::RequestId;

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::params::SamplingParams;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// What to run a prompt through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// Raw text, tokenized as is (with the tokenizer's BOS, if it adds one).
    Text(String),
    /// Chat messages, rendered with the model's chat template (and a generation prompt).
    Chat(Vec<ChatMessage>),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

impl From<&str> for Prompt {
    fn from(text: &str) -> Self {
        Self::Text(text.to_owned())
    }
}

impl From<String> for Prompt {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

impl From<Vec<u32>> for Prompt {
    fn from(ids: Vec<u32>) -> Self {
        Self::Tokens(ids)
    }
}

/// The model-side facts requests are checked against, and the tokenizer and template.
pub(crate) struct Intake {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub model_name: String,
    /// Token ids must be below it.
    pub vocab_size: usize,
    /// Longest prompt plus output.
    pub max_context: usize,
    next_id: AtomicU64,
}

impl Intake {
    pub fn new(
        tokenizer: Tokenizer,
        chat_template: Option<ChatTemplate>,
        model_name: String,
        vocab_size: usize,
        max_context: usize,
    ) -> Self {
        Self {
            tokenizer,
            chat_template,
            model_name,
            vocab_size,
            max_context,
            next_id: AtomicU64::new(0),
        }
    }

    /// A request id no other request of this engine has.
    pub fn next_id(&self) -> RequestId {
        RequestId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Renders chat messages with the model's template, or ChatML when it has none.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        match &self.chat_template {
            Some(template) => template.render(messages, true),
            None => ChatTemplate::chatml().render(messages, true),
        }
    }

    /// The token ids of a prompt, unchecked.
    pub fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Text(text) => self.tokenizer.encode(text, true),
            // The template writes any BOS itself; encoding must not add a second one.
            Prompt::Chat(messages) => self.tokenizer.encode(&self.render_chat(messages)?, false),
            Prompt::Tokens(ids) => Ok(ids.clone()),
        }
    }

    /// The token ids of a prompt, refused when empty or outside the vocabulary.
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let ids = self.encode(prompt)?;
        if ids.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        self.check_vocab("prompt", &ids)?;
        Ok(ids)
    }

    /// Checks `params` for a prompt of `prompt_len` tokens.
    pub fn check(&self, prompt_len: usize, params: &SamplingParams) -> Result<()> {
        params.validate()?;
        self.check_vocab("stop_token_ids", &params.stop_token_ids)?;
        let needed = prompt_len.saturating_add(params.max_tokens);
        if needed > self.max_context {
            return Err(Error::InvalidRequest(format!(
                "the prompt has {prompt_len} tokens and up to {} more were asked for, {needed} \
                 in all, but the context holds {} tokens",
                params.max_tokens, self.max_context
            )));
        }
        Ok(())
    }

    fn check_vocab(&self, what: &str, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(bad) => Err(Error::InvalidRequest(format!(
                "{what}: token id {bad} is outside the vocabulary of {}",
                self.vocab_size
            ))),
            None => Ok(()),
        }
    }
}
