//! Streaming detokenization over the fixture vocabularies: byte-level BPE, where multi-byte
//! characters are split across tokens, and SentencePiece with byte fallback, whose decoder treats
//! the first token's space differently.

use std::path::Path;

use pagoda_engine::detokenize::IncrementalDecoder;
use pagoda_engine::tokenizer::{GgufVocab, Tokenizer};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    vocabularies: Vec<Vocabulary>,
}

#[derive(Deserialize)]
struct Vocabulary {
    #[serde(default)]
    name: String,
    #[serde(default)]
    vocab: GgufVocab,
    encode: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids_with_special_tokens: Vec<u32>,
}

fn stream(tokenizer: &Tokenizer, ids: &[u32], mut decoder: IncrementalDecoder) -> Vec<String> {
    let mut deltas: Vec<String> = ids
        .iter()
        .filter_map(|&id| decoder.push(tokenizer, id).unwrap())
        .collect();
    deltas.extend(decoder.finish(tokenizer).unwrap());
    deltas
}

#[test]
fn streamed_text_equals_decoded_text_and_never_splits_a_character() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_tokenizers.json");
    let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut split_characters = 0;
    for vocabulary in &fixture.vocabularies {
        let tokenizer = Tokenizer::from_gguf(&vocabulary.vocab).unwrap();
        for case in &vocabulary.encode {
            let ids = &case.ids_with_special_tokens;
            for skip in [true, false] {
                let deltas = stream(
                    &tokenizer,
                    ids,
                    IncrementalDecoder::new().skip_special_tokens(skip),
                );
                let what = format!(
                    "{}: {:?} (skip special tokens: {skip})",
                    vocabulary.name, case.text
                );
                assert_eq!(
                    deltas.concat(),
                    tokenizer.decode(ids, skip).unwrap(),
                    "{what}"
                );
                assert!(
                    deltas.iter().all(|delta| !delta.contains('\u{FFFD}')),
                    "{what}: {deltas:?}"
                );
            }
            // Count the characters whose bytes were spread over several tokens.
            split_characters += ids
                .iter()
                .filter(|&&id| tokenizer.decode(&[id], false).unwrap().contains('\u{FFFD}'))
                .count();
        }
    }
    assert!(
        split_characters > 20,
        "the fixtures should split characters across tokens"
    );
}

#[test]
fn sentencepiece_keeps_the_spaces_between_words() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_tokenizers.json");
    let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vocabulary = fixture
        .vocabularies
        .iter()
        .find(|v| v.name == "sentencepiece_scored")
        .unwrap();
    let tokenizer = Tokenizer::from_gguf(&vocabulary.vocab).unwrap();
    let ids = tokenizer
        .encode("Hello world, 你好 😀 the end", false)
        .unwrap();
    let deltas = stream(&tokenizer, &ids, IncrementalDecoder::new());
    assert_eq!(deltas.concat(), "Hello world, 你好 😀 the end");
    // Alone, "▁world" decodes without its space; in the stream the space stays.
    assert!(
        deltas.iter().any(|delta| delta.starts_with(" w")),
        "{deltas:?}"
    );
}

#[test]
fn smollm2_streams_its_fixture_texts() {
    let Some(path) = std::env::var_os("PAGODA_SMOLLM2_GGUF") else {
        eprintln!("PAGODA_SMOLLM2_GGUF is not set; skipping the SmolLM2 streaming test");
        return;
    };
    let file = pagoda_tensor::gguf::GgufFile::open(Path::new(&path)).unwrap();
    let tokenizer = Tokenizer::from_gguf(&GgufVocab::from_gguf(&file).unwrap()).unwrap();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_tokenizer.json");
    let fixture: Vocabulary =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    for case in &fixture.encode {
        let ids = &case.ids_with_special_tokens;
        let deltas = stream(&tokenizer, ids, IncrementalDecoder::new());
        assert_eq!(
            deltas.concat(),
            tokenizer.decode(ids, true).unwrap(),
            "{:?}",
            case.text
        );
        assert!(
            deltas.iter().all(|delta| !delta.contains('\u{FFFD}')),
            "{:?}: {deltas:?}",
            case.text
        );
    }
}
