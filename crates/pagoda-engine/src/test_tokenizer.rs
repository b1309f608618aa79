//! A small byte-level tokenizer for unit tests.

use crate::tokenizer::{GgufVocab, Tokenizer};

/// A byte-level vocabulary of the 256 byte tokens, a few merges and two special tokens.
pub(crate) fn byte_level() -> Tokenizer {
    let alphabet: Vec<String> = (0..=255u8).map(byte_char).collect();
    let mut tokens = vec!["<|endoftext|>".to_owned(), "<|im_end|>".to_owned()];
    tokens.extend(alphabet);
    let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"];
    tokens.extend(["he", "ll", "hell", "hello", "Ġw", "Ġwo"].map(String::from));
    let mut token_types = vec![3, 3];
    token_types.resize(tokens.len(), 1);
    Tokenizer::from_gguf(&GgufVocab {
        model: "gpt2".into(),
        tokens,
        token_types,
        merges: merges.map(String::from).to_vec(),
        eos_token_id: Some(1),
        ..GgufVocab::default()
    })
    .unwrap()
}

/// The character GPT-2's byte-level alphabet spells a byte with.
fn byte_char(byte: u8) -> String {
    let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable {
        char::from(byte).to_string()
    } else {
        let rank = (0..byte)
            .filter(|&b| !matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF))
            .count();
        char::from_u32(256 + rank as u32).unwrap().to_string()
    }
}
