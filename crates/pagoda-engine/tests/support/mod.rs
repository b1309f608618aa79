//! Engines over the tiny random-weight checkpoints of pagoda-models' tests, with a tokenizer
//! whose every token spells plain ASCII, so that outputs are readable text.

#![allow(dead_code)]

use std::path::PathBuf;

use pagoda_engine::tokenizer::GgufVocab;
use pagoda_engine::{Engine, EngineBuilder, Tokenizer};

/// The end-of-sequence token of [`ascii_tokenizer`].
pub const EOS: u32 = 0;

/// A checkpoint of pagoda-models' test fixtures: `tiny-llama` (vocabulary 320) or
/// `tiny-gpt-neox` (256); both have 128 positions.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../pagoda-models/tests/fixtures")
        .join(name)
}

/// A byte-level vocabulary of `size` tokens: end-of-sequence, the 94 printable ASCII
/// characters, the space (`Ġ`), then two-letter lowercase tokens with their merges.
pub fn ascii_tokenizer(size: usize) -> Tokenizer {
    let mut tokens = vec!["<|endoftext|>".to_owned()];
    tokens.extend(('!'..='~').map(String::from));
    tokens.push("Ġ".into());
    let mut merges = Vec::new();
    'pairs: for a in 'a'..='z' {
        for b in 'a'..='z' {
            if tokens.len() == size {
                break 'pairs;
            }
            tokens.push(format!("{a}{b}"));
            merges.push(format!("{a} {b}"));
        }
    }
    let mut token_types = vec![1; tokens.len()];
    token_types[EOS as usize] = 3;
    Tokenizer::from_gguf(&GgufVocab {
        model: "gpt2".into(),
        tokens,
        token_types,
        merges,
        eos_token_id: Some(EOS),
        ..GgufVocab::default()
    })
    .expect("a valid vocabulary")
}

/// A builder for tiny-llama on the CPU with the ASCII tokenizer.
pub fn tiny_llama() -> EngineBuilder {
    Engine::builder()
        .model(fixture("tiny-llama"))
        .tokenizer(ascii_tokenizer(320))
}

/// A builder for tiny-gpt-neox on the CPU with the ASCII tokenizer.
pub fn tiny_gpt_neox() -> EngineBuilder {
    Engine::builder()
        .model(fixture("tiny-gpt-neox"))
        .tokenizer(ascii_tokenizer(256))
}

/// Bytes of one KV block of tiny-llama at the default 16 tokens: K and V of 2 layers, 2 KV
/// heads of 16 f32.
pub const TINY_LLAMA_BLOCK_BYTES: usize = 2 * 2 * 16 * 2 * 16 * 4;

/// A prompt of `len` ids from a small deterministic generator, different for every `seed`.
pub fn prompt(seed: u64, len: usize, vocab: u32) -> Vec<u32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Skip the end-of-sequence token.
            1 + ((state >> 33) as u32) % (vocab - 1)
        })
        .collect()
}
