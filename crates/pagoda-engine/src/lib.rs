//! The pagoda engine: loads a model with its tokenizer and chat template, and serves many
//! requests at once by continuous batching over a paged KV cache.
//!
//! - [`Engine`] (built by [`EngineBuilder`]) queues requests ([`Engine::add_request`]), runs
//!   steps ([`Engine::step`] returns [`RequestOutput`] deltas) and aborts them;
//!   [`Engine::generate`] runs a list of prompts to completion.
//! - [`Engine::spawn`] moves it onto its own thread behind an [`EngineHandle`], whose
//!   [`RequestStream`]s deliver each request's outputs to blocking or async callers.
//! - [`SamplingParams`] say how to pick tokens and when to stop; [`Metrics`] report what the
//!   engine did.

pub mod chat_template;
mod decode_graphs;
pub mod detokenize;
mod device_sampling;
mod engine;
mod error;
mod handle;
mod intake;
mod kv_space;
mod metrics;
mod output;
mod params;
mod sampler;
mod step_batch;
#[cfg(test)]
mod test_tokenizer;
mod text_stream;
pub mod tokenizer;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use engine::{Engine, EngineBuilder};
pub use error::{Error, Result};
pub use handle::{EngineHandle, RequestStream};
pub use intake::Prompt;
pub use kv_space::ManagedKvSpace;
pub use metrics::{Histogram, Metrics};
pub use output::{Completion, RequestOutput, TokenLogprob};
pub use pagoda_kernels::cpu::sampling::SamplingConfig;
pub use pagoda_models::{LoadEvent, LoadProgress};
pub use pagoda_sched::RequestId;
pub use pagoda_tensor::{DType, Device};
pub use params::{FinishReason, MAX_LOGPROBS, SamplingParams};
pub use tokenizer::Tokenizer;

// The README's embedding example is compiled as a doc test, so it cannot drift from the API.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
struct ReadmeDoctests;
