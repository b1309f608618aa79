//! The tokenizer against Hugging Face transformers: the fixtures hold the ids and texts that
//! transformers produces (scripts/tokenizer_reference.py writes them).

use std::path::{Path, PathBuf};

use pagoda_engine::tokenizer::{GgufVocab, Tokenizer};
use pagoda_tensor::gguf::GgufFile;
use serde::Deserialize;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_fixture<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let text = std::fs::read_to_string(fixture(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[derive(Deserialize)]
struct EncodeCase {
    text: String,
    ids: Vec<u32>,
    ids_with_special_tokens: Vec<u32>,
    decoded: String,
    decoded_skip_special_tokens: String,
}

#[derive(Deserialize)]
struct SmallVocabularies {
    vocabularies: Vec<SmallVocabulary>,
}

#[derive(Deserialize)]
struct SmallVocabulary {
    name: String,
    vocab: GgufVocab,
    vocab_size: usize,
    encode: Vec<EncodeCase>,
    tokens: Vec<TokenCase>,
}

#[derive(Deserialize)]
struct TokenCase {
    id: u32,
    token: String,
    decoded: String,
}

#[derive(Deserialize)]
struct PartialDecode {
    ids: Vec<u32>,
    decoded: String,
}

#[derive(Deserialize)]
struct Smollm2 {
    vocab_size: usize,
    bos_token_id: u32,
    eos_token_id: u32,
    chat_template: String,
    encode: Vec<EncodeCase>,
    partial_decode: Vec<PartialDecode>,
    pre_tokenizer_variants: std::collections::BTreeMap<String, Vec<Vec<u32>>>,
}

fn check_cases(what: &str, tokenizer: &Tokenizer, cases: &[EncodeCase]) {
    for case in cases {
        let text = &case.text;
        assert_eq!(
            tokenizer.encode(text, false).unwrap(),
            case.ids,
            "{what}: encode({text:?}, false)"
        );
        assert_eq!(
            tokenizer.encode(text, true).unwrap(),
            case.ids_with_special_tokens,
            "{what}: encode({text:?}, true)"
        );
        assert_eq!(
            tokenizer
                .decode(&case.ids_with_special_tokens, false)
                .unwrap(),
            case.decoded,
            "{what}: decode of {text:?}"
        );
        assert_eq!(
            tokenizer
                .decode(&case.ids_with_special_tokens, true)
                .unwrap(),
            case.decoded_skip_special_tokens,
            "{what}: decode of {text:?} skipping special tokens"
        );
    }
}

#[test]
fn small_gguf_vocabularies_match_transformers() {
    let fixture: SmallVocabularies = read_fixture("gguf_tokenizers.json");
    assert!(fixture.vocabularies.len() >= 3);
    for vocabulary in &fixture.vocabularies {
        let tokenizer = Tokenizer::from_gguf(&vocabulary.vocab).unwrap();
        assert_eq!(
            tokenizer.vocab_size(),
            vocabulary.vocab_size,
            "{}",
            vocabulary.name
        );
        check_cases(&vocabulary.name, &tokenizer, &vocabulary.encode);
        for case in &vocabulary.tokens {
            let what = format!("{}: token {}", vocabulary.name, case.id);
            assert_eq!(
                tokenizer.id_to_token(case.id).as_deref(),
                Some(case.token.as_str()),
                "{what}"
            );
            assert_eq!(
                tokenizer.decode(&[case.id], false).unwrap(),
                case.decoded,
                "{what}"
            );
        }
    }
}

fn small_vocabulary(name: &str) -> GgufVocab {
    let fixture: SmallVocabularies = read_fixture("gguf_tokenizers.json");
    fixture
        .vocabularies
        .into_iter()
        .find(|v| v.name == name)
        .unwrap()
        .vocab
}

#[test]
fn special_token_ids_and_bos_from_gguf() {
    let sentencepiece = Tokenizer::from_gguf(&small_vocabulary("sentencepiece")).unwrap();
    assert_eq!(sentencepiece.bos_token_id(), Some(1));
    assert_eq!(sentencepiece.eos_token_ids(), [2]);
    // SentencePiece vocabularies add BOS unless the file says otherwise.
    assert!(sentencepiece.add_bos_token());
    assert_eq!(sentencepiece.token_to_id("<s>"), Some(1));
    assert_eq!(sentencepiece.id_to_token(2).as_deref(), Some("</s>"));

    let byte_level = Tokenizer::from_gguf(&small_vocabulary("byte_level")).unwrap();
    assert_eq!(byte_level.bos_token_id(), Some(1));
    assert_eq!(byte_level.eos_token_ids(), [2]);
    assert!(!byte_level.add_bos_token());
    // A byte-level vocabulary spells a leading space as 'Ġ'.
    let space_t = byte_level.token_to_id("Ġt").unwrap();
    assert_eq!(byte_level.decode(&[space_t], false).unwrap(), " t");
    // Ids outside the vocabulary decode to nothing, as in transformers.
    assert_eq!(
        byte_level.decode(&[space_t, 1_000_000], false).unwrap(),
        " t"
    );
}

#[test]
fn unsupported_or_inconsistent_gguf_vocabularies_are_rejected() {
    let mut vocab = small_vocabulary("byte_level");
    vocab.model = "bert".into();
    let message = Tokenizer::from_gguf(&vocab).unwrap_err().to_string();
    assert!(message.contains("\"bert\""), "{message}");

    let mut vocab = small_vocabulary("byte_level");
    vocab.token_types.pop();
    let message = Tokenizer::from_gguf(&vocab).unwrap_err().to_string();
    assert!(message.contains("token_type"), "{message}");

    let mut vocab = small_vocabulary("byte_level");
    vocab.eos_token_id = Some(1 << 20);
    let message = Tokenizer::from_gguf(&vocab).unwrap_err().to_string();
    assert!(message.contains("eos_token_id"), "{message}");

    let mut vocab = small_vocabulary("byte_level");
    vocab.merges.push("nospace".into());
    let message = Tokenizer::from_gguf(&vocab).unwrap_err().to_string();
    assert!(message.contains("nospace"), "{message}");

    let mut vocab = small_vocabulary("sentencepiece");
    vocab.scores.clear();
    let message = Tokenizer::from_gguf(&vocab).unwrap_err().to_string();
    assert!(message.contains("scores"), "{message}");
}

/// A GGUF file with the given metadata and no tensors, in the layout of the GGUF spec
/// (ggml/docs/gguf.md): magic, version 3, tensor count, metadata count, then key, type, value.
fn write_gguf(path: &Path, metadata: &[(&str, Value)]) {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut bytes, key);
        bytes.extend(value.type_id().to_le_bytes());
        value.put(&mut bytes);
    }
    std::fs::write(path, bytes).unwrap();
}

enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(u32, Vec<Value>),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(..) => 9,
        }
    }

    fn put(&self, bytes: &mut Vec<u8>) {
        match self {
            Value::U32(v) => bytes.extend(v.to_le_bytes()),
            Value::I32(v) => bytes.extend(v.to_le_bytes()),
            Value::F32(v) => bytes.extend(v.to_le_bytes()),
            Value::Bool(v) => bytes.push(u8::from(*v)),
            Value::Str(s) => put_string(bytes, s),
            Value::Array(element_type, values) => {
                bytes.extend(element_type.to_le_bytes());
                bytes.extend((values.len() as u64).to_le_bytes());
                for value in values {
                    value.put(bytes);
                }
            }
        }
    }
}

fn put_string(bytes: &mut Vec<u8>, s: &str) {
    bytes.extend((s.len() as u64).to_le_bytes());
    bytes.extend(s.as_bytes());
}

fn metadata_of(vocab: &GgufVocab) -> Vec<(&'static str, Value)> {
    let strings =
        |values: &[String]| Value::Array(8, values.iter().map(|s| Value::Str(s.clone())).collect());
    let mut metadata = vec![
        ("general.architecture", Value::Str("llama".into())),
        ("tokenizer.ggml.model", Value::Str(vocab.model.clone())),
        ("tokenizer.ggml.tokens", strings(&vocab.tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(
                5,
                vocab.token_types.iter().map(|&t| Value::I32(t)).collect(),
            ),
        ),
        (
            "tokenizer.chat_template",
            Value::Str("{{ messages }}".into()),
        ),
    ];
    if let Some(pre) = &vocab.pre {
        metadata.push(("tokenizer.ggml.pre", Value::Str(pre.clone())));
    }
    if !vocab.merges.is_empty() {
        metadata.push(("tokenizer.ggml.merges", strings(&vocab.merges)));
    }
    if !vocab.scores.is_empty() {
        metadata.push((
            "tokenizer.ggml.scores",
            Value::Array(6, vocab.scores.iter().map(|&s| Value::F32(s)).collect()),
        ));
    }
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", vocab.bos_token_id),
        ("tokenizer.ggml.eos_token_id", vocab.eos_token_id),
        ("tokenizer.ggml.unknown_token_id", vocab.unknown_token_id),
        ("tokenizer.ggml.padding_token_id", vocab.padding_token_id),
    ] {
        if let Some(id) = id {
            metadata.push((key, Value::U32(id)));
        }
    }
    if let Some(add_bos) = vocab.add_bos_token {
        metadata.push(("tokenizer.ggml.add_bos_token", Value::Bool(add_bos)));
    }
    metadata
}

#[test]
fn gguf_metadata_converts_to_a_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["byte_level", "sentencepiece"] {
        let expected = small_vocabulary(name);
        let path = dir.path().join(format!("{name}.gguf"));
        write_gguf(&path, &metadata_of(&expected));
        let file = GgufFile::open(&path).unwrap();
        let vocab = GgufVocab::from_gguf(&file).unwrap();
        assert_eq!(
            vocab,
            GgufVocab {
                chat_template: Some("{{ messages }}".into()),
                ..expected
            }
        );
    }
}

#[test]
fn gguf_metadata_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    let vocab = small_vocabulary("byte_level");
    let open = |metadata: &[(&str, Value)]| {
        write_gguf(&path, metadata);
        GgufVocab::from_gguf(&GgufFile::open(&path).unwrap())
            .unwrap_err()
            .to_string()
    };

    let without_model: Vec<_> = metadata_of(&vocab)
        .into_iter()
        .filter(|(k, _)| *k != "tokenizer.ggml.model")
        .collect();
    assert!(open(&without_model).contains("tokenizer.ggml.model"));
    let without_tokens: Vec<_> = metadata_of(&vocab)
        .into_iter()
        .filter(|(k, _)| *k != "tokenizer.ggml.tokens")
        .collect();
    assert!(open(&without_tokens).contains("tokenizer.ggml.tokens"));

    let mut wrong_type = metadata_of(&vocab);
    wrong_type.retain(|(k, _)| *k != "tokenizer.ggml.bos_token_id");
    wrong_type.push(("tokenizer.ggml.bos_token_id", Value::Str("1".into())));
    let message = open(&wrong_type);
    assert!(
        message.contains("tokenizer.ggml.bos_token_id") && message.contains("string"),
        "{message}"
    );

    let mut wrong_element = metadata_of(&vocab);
    wrong_element.retain(|(k, _)| *k != "tokenizer.ggml.token_type");
    wrong_element.push((
        "tokenizer.ggml.token_type",
        Value::Array(6, vec![Value::F32(1.0)]),
    ));
    assert!(open(&wrong_element).contains("tokenizer.ggml.token_type"));
}

/// A `tokenizer.json` for the small byte-level vocabulary, without a post-processor.
fn write_tokenizer_json(dir: &Path, vocab: &GgufVocab) {
    let model_vocab: serde_json::Map<String, serde_json::Value> = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), id.into()))
        .collect();
    let added_tokens: Vec<serde_json::Value> = (0..17)
        .map(|id| {
            serde_json::json!({
                "id": id, "content": vocab.tokens[id], "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "vocab": model_vocab, "merges": vocab.merges,
        }
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
}

#[test]
fn tokenizer_json_with_sibling_configs() {
    let vocab = small_vocabulary("byte_level");
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer_json(dir.path(), &vocab);
    let path = dir.path().join("tokenizer.json");

    // Alone, it has no special tokens to speak of, and adds none.
    let bare = Tokenizer::from_file(&path).unwrap();
    assert_eq!(bare.bos_token_id(), None);
    assert!(bare.eos_token_ids().is_empty());
    let hello = bare.encode("Hello world", true).unwrap();
    assert_eq!(hello, bare.encode("Hello world", false).unwrap());
    // It tokenizes like the GGUF vocabulary it was written from.
    let from_gguf = Tokenizer::from_gguf(&vocab).unwrap();
    for text in [
        "Hello world",
        "<|im_start|>user\nhi 😀<|im_end|>",
        "  tabs\tand 12345",
    ] {
        assert_eq!(
            bare.encode(text, false).unwrap(),
            from_gguf.encode(text, false).unwrap(),
            "{text:?}"
        );
    }

    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": {"content": "<|im_start|>", "special": true}, "eos_token": "<|im_end|>",
            "add_bos_token": true, "chat_template": "{{ bos_token }}"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 0]}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"bos_token_id": 1, "eos_token_id": 5}"#,
    )
    .unwrap();
    let tokenizer = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tokenizer.bos_token_id(), Some(1));
    assert_eq!(tokenizer.eos_token_ids(), [2, 0, 5]);
    assert!(tokenizer.add_bos_token());
    assert_eq!(
        tokenizer.encode("Hello world", true).unwrap(),
        [&[1][..], &hello].concat()
    );
    assert_eq!(tokenizer.encode("Hello world", false).unwrap(), hello);

    // add_eos_token alone turns BOS off, as in transformers.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<|im_end|>", "add_eos_token": true}"#,
    )
    .unwrap();
    let tokenizer = Tokenizer::from_file(&path).unwrap();
    assert!(!tokenizer.add_bos_token());
    assert_eq!(
        tokenizer.encode("Hello world", true).unwrap(),
        [&hello[..], &[2]].concat()
    );

    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let message = Tokenizer::from_file(&path).unwrap_err().to_string();
    assert!(message.contains("config.json"), "{message}");
    let message = Tokenizer::from_file(&dir.path().join("missing.json"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("missing.json"), "{message}");
}

/// The real SmolLM2 file, when `PAGODA_SMOLLM2_GGUF` points to it (scripts/fetch-smollm2.sh).
fn smollm2_gguf() -> Option<PathBuf> {
    match std::env::var_os("PAGODA_SMOLLM2_GGUF") {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            eprintln!("PAGODA_SMOLLM2_GGUF is not set; skipping the SmolLM2 tokenizer test");
            None
        }
    }
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let Some(path) = smollm2_gguf() else { return };
    let fixture: Smollm2 = read_fixture("smollm2_tokenizer.json");
    let file = GgufFile::open(&path).unwrap();
    let vocab = GgufVocab::from_gguf(&file).unwrap();
    assert_eq!(vocab.model, "gpt2");
    assert_eq!(vocab.pre.as_deref(), Some("smollm"));
    assert_eq!(
        vocab.chat_template.as_deref(),
        Some(fixture.chat_template.as_str())
    );

    let tokenizer = Tokenizer::from_gguf(&vocab).unwrap();
    assert_eq!(tokenizer.vocab_size(), fixture.vocab_size);
    assert_eq!(tokenizer.bos_token_id(), Some(fixture.bos_token_id));
    assert_eq!(tokenizer.eos_token_ids(), [fixture.eos_token_id]);
    assert!(!tokenizer.add_bos_token());
    check_cases("SmolLM2", &tokenizer, &fixture.encode);
    for case in &fixture.partial_decode {
        assert_eq!(
            tokenizer.decode(&case.ids, false).unwrap(),
            case.decoded,
            "{:?}",
            case.ids
        );
    }

    for (pre, expected) in &fixture.pre_tokenizer_variants {
        let variant = Tokenizer::from_gguf(&GgufVocab {
            pre: Some(pre.clone()),
            ..vocab.clone()
        })
        .unwrap();
        for (case, ids) in fixture.encode.iter().zip(expected) {
            assert_eq!(
                &variant.encode(&case.text, false).unwrap(),
                ids,
                "pre {pre}: {:?}",
                case.text
            );
        }
    }
}

/// The bytes of `ids`, token by token.
fn token_bytes_of(tokenizer: &Tokenizer, ids: &[u32]) -> Vec<u8> {
    ids.iter()
        .flat_map(|&id| tokenizer.token_bytes(id).unwrap())
        .collect()
}

#[test]
fn token_bytes_add_up_to_the_decoded_text() {
    let fixture: SmallVocabularies = read_fixture("gguf_tokenizers.json");
    for vocabulary in &fixture.vocabularies {
        let tokenizer = Tokenizer::from_gguf(&vocabulary.vocab).unwrap();
        let sentencepiece = vocabulary.vocab.model == "llama";
        for case in &vocabulary.encode {
            let bytes = token_bytes_of(&tokenizer, &case.ids_with_special_tokens);
            // SentencePiece's decoder drops the space its pre-tokenizer put before the text;
            // byte-level BPE spells the text exactly.
            let bytes = match bytes.strip_prefix(b" ") {
                Some(rest) if sentencepiece => rest,
                _ => &bytes[..],
            };
            assert_eq!(
                String::from_utf8_lossy(bytes),
                case.decoded,
                "{}: {:?}",
                vocabulary.name,
                case.text
            );
        }
        let size = vocabulary.vocab.tokens.len() as u32;
        assert!(tokenizer.token_bytes(size - 1).is_some());
        assert_eq!(tokenizer.token_bytes(size), None);
        assert_eq!(tokenizer.token_bytes(u32::MAX), None);
    }
}

#[test]
fn token_bytes_undo_each_vocabulary_spelling() {
    let byte_level = Tokenizer::from_gguf(&small_vocabulary("byte_level")).unwrap();
    let id = |t: &Tokenizer, token: &str| t.token_to_id(token).unwrap();
    assert_eq!(
        byte_level.token_bytes(id(&byte_level, "Ġt")).unwrap(),
        b" t"
    );
    assert_eq!(byte_level.token_bytes(id(&byte_level, "Ċ")).unwrap(), b"\n");
    // 'ð' spells the byte 0xF0 that starts a 4-byte character: not UTF-8 alone.
    assert_eq!(
        byte_level.token_bytes(id(&byte_level, "ð")).unwrap(),
        [0xF0]
    );
    assert_eq!(
        byte_level
            .token_bytes(id(&byte_level, "<|im_start|>"))
            .unwrap(),
        b"<|im_start|>"
    );
    assert!(byte_level.is_special_token(id(&byte_level, "<|im_start|>")));
    assert!(!byte_level.is_special_token(id(&byte_level, "Ġt")));
    assert!(!byte_level.is_special_token(u32::MAX));
    // An emoji is several byte tokens whose bytes only together are UTF-8.
    let ids = byte_level.encode("😀", false).unwrap();
    assert!(ids.len() > 1);
    assert!(
        ids.iter()
            .all(|&i| std::str::from_utf8(&byte_level.token_bytes(i).unwrap()).is_err())
    );
    assert_eq!(token_bytes_of(&byte_level, &ids), "😀".as_bytes());

    let sentencepiece = Tokenizer::from_gguf(&small_vocabulary("sentencepiece")).unwrap();
    assert_eq!(
        sentencepiece
            .token_bytes(id(&sentencepiece, "<0x0A>"))
            .unwrap(),
        b"\n"
    );
    assert_eq!(
        sentencepiece
            .token_bytes(id(&sentencepiece, "<0xF0>"))
            .unwrap(),
        [0xF0]
    );
    assert_eq!(sentencepiece.token_bytes(1).unwrap(), b"<s>");
    let word = sentencepiece
        .encode("Hello world", false)
        .unwrap()
        .into_iter()
        .map(|i| sentencepiece.id_to_token(i).unwrap())
        .find(|t| t.starts_with('▁') && t.chars().count() > 1)
        .expect("a word piece with a leading ▁");
    assert_eq!(
        sentencepiece
            .token_bytes(id(&sentencepiece, &word))
            .unwrap(),
        word.replace('▁', " ").into_bytes()
    );
}

#[test]
fn token_bytes_from_tokenizer_json_match_the_gguf_vocabulary() {
    let vocab = small_vocabulary("byte_level");
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer_json(dir.path(), &vocab);
    let from_json = Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let from_gguf = Tokenizer::from_gguf(&vocab).unwrap();
    for id in 0..from_gguf.vocab_size() as u32 {
        assert_eq!(from_json.token_bytes(id), from_gguf.token_bytes(id), "{id}");
    }
}

#[test]
fn smollm2_token_bytes_spell_its_partial_characters() {
    let Some(path) = smollm2_gguf() else { return };
    let fixture: Smollm2 = read_fixture("smollm2_tokenizer.json");
    let file = GgufFile::open(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(&GgufVocab::from_gguf(&file).unwrap()).unwrap();
    for case in &fixture.partial_decode {
        let bytes = token_bytes_of(&tokenizer, &case.ids);
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            case.decoded,
            "{:?}",
            case.ids
        );
    }
    for case in &fixture.encode {
        let bytes = token_bytes_of(&tokenizer, &case.ids_with_special_tokens);
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            case.decoded,
            "{:?}",
            case.text
        );
    }
}
