//! The pagoda engine: loads a model with its tokenizer and chat template, and generates text.

pub mod chat_template;
pub mod detokenize;
mod engine;
mod error;
mod kv_space;
mod params;
pub mod tokenizer;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use engine::{Engine, EngineBuilder, Generation, Prompt};
pub use error::{Error, Result};
pub use kv_space::ManagedKvSpace;
pub use pagoda_kernels::cpu::sampling::SamplingConfig;
pub use pagoda_tensor::{DType, Device};
pub use params::{FinishReason, GenerationParams};
pub use tokenizer::Tokenizer;

// The README's embedding example is compiled as a doc test, so it cannot drift from the API.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
struct ReadmeDoctests;
