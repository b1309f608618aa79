//! Text to token ids and back: from a Hugging Face `tokenizer.json`, or from the vocabulary that a
//! GGUF file stores in its `tokenizer.ggml.*` metadata.
//!
//! A GGUF file has no `tokenizer.json`, only the pieces of one. [`Tokenizer::from_gguf`] rebuilds
//! the tokenizer that Hugging Face transformers builds from the same file
//! (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, `transformers/integrations/gguf`), so
//! that pagoda and transformers give the same ids for the same GGUF.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::OnceLock;

use pagoda_tensor::gguf::{GgufFile, GgufValue};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, Model as _, SplitDelimiterBehavior};

use crate::{Error, Result};

/// Turns text into token ids and token ids into text, and knows the model's special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    add_bos_token: bool,
    spelling: TokenSpelling,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("add_bos_token", &self.add_bos_token)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    ///
    /// The special tokens come from the files beside it, where present: `tokenizer_config.json`
    /// (`bos_token`, `eos_token`, `add_bos_token`, `add_eos_token`), `generation_config.json` and
    /// `config.json` (`bos_token_id`, `eos_token_id`, a number or a list). Every end-of-sequence id
    /// named by any of them stops generation. As in transformers 5, an explicit `add_bos_token` or
    /// `add_eos_token` in `tokenizer_config.json` decides which special tokens `encode` adds,
    /// over the post-processor of `tokenizer.json`.
    pub fn from_file(tokenizer_json: &Path) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
        let dir = tokenizer_json.parent().unwrap_or(Path::new("."));
        let tokenizer_config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let generation_config = read_json_if_present(&dir.join("generation_config.json"))?;
        let model_config = read_json_if_present(&dir.join("config.json"))?;

        let config_token = |key: &str| {
            let token = tokenizer_config
                .as_ref()
                .and_then(|config| token_content(config.get(key)?))?;
            inner.token_to_id(&token).map(|id| (token, id))
        };
        let config_ids = |config: &Option<Json>, key: &str| -> Vec<u32> {
            config
                .as_ref()
                .and_then(|config| config.get(key))
                .map(token_ids)
                .unwrap_or_default()
        };

        let bos = config_token("bos_token");
        let eos = config_token("eos_token");
        let bos_token_id = bos.as_ref().map(|(_, id)| *id).or_else(|| {
            [&generation_config, &model_config]
                .into_iter()
                .find_map(|config| config_ids(config, "bos_token_id").first().copied())
        });
        let mut eos_token_ids = Vec::new();
        for id in config_ids(&generation_config, "eos_token_id")
            .into_iter()
            .chain(config_ids(&model_config, "eos_token_id"))
            .chain(eos.as_ref().map(|(_, id)| *id))
        {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }

        let flag = |key: &str| {
            tokenizer_config
                .as_ref()
                .and_then(|config| config.get(key)?.as_bool())
        };
        let (add_bos, add_eos) = (flag("add_bos_token"), flag("add_eos_token"));
        if add_bos.is_some() || add_eos.is_some() {
            let bos = bos.filter(|_| add_bos == Some(true));
            let eos = eos.filter(|_| add_eos == Some(true));
            inner.with_post_processor(Some(bos_eos_template(bos, eos)?));
        }
        Self::finish(inner, bos_token_id, eos_token_ids)
    }

    /// Builds the tokenizer that a GGUF file describes, the way transformers does.
    ///
    /// Supported `tokenizer.ggml.model`s: `"gpt2"` (byte-level BPE, with the split regex that
    /// transformers picks for `tokenizer.ggml.pre`, GPT-2's otherwise) and `"llama"`
    /// (SentencePiece-style BPE with byte fallback; merges derived from the scores when the file
    /// has none). Tokens of type control become special tokens, user-defined ones plain added
    /// tokens.
    pub fn from_gguf(vocab: &GgufVocab) -> Result<Self> {
        vocab.check_lengths()?;
        let (mut inner, add_bos_default) = match vocab.model.as_str() {
            "gpt2" => (byte_level_bpe(vocab)?, false),
            "llama" => (sentencepiece_bpe(vocab)?, true),
            other => {
                return Err(Error::Tokenizer(format!(
                    "tokenizer.ggml.model {other:?} is not supported (supported: \"gpt2\", \"llama\")"
                )));
            }
        };
        add_gguf_added_tokens(&mut inner, vocab)?;

        // transformers adds the named special tokens that are not added tokens yet as special
        // tokens too, and looks their ids up by content afterwards.
        let named = |key: &str, id: Option<u32>| -> Result<Option<String>> {
            id.map(|id| {
                vocab.tokens.get(id as usize).cloned().ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "tokenizer.ggml.{key} is {id}, outside the {} tokens of the vocabulary",
                        vocab.tokens.len()
                    ))
                })
            })
            .transpose()
        };
        let bos = named("bos_token_id", vocab.bos_token_id)?;
        let eos = named("eos_token_id", vocab.eos_token_id)?;
        let unk = named("unknown_token_id", vocab.unknown_token_id)?;
        let pad = named("padding_token_id", vocab.padding_token_id)?;
        let added: HashSet<String> = inner
            .get_added_tokens_decoder()
            .into_values()
            .map(|t| t.content)
            .collect();
        let mut missing: Vec<AddedToken> = Vec::new();
        for token in [&bos, &eos, &unk, &pad].into_iter().flatten() {
            if !added.contains(token) && !missing.iter().any(|t| &t.content == token) {
                missing.push(AddedToken::from(token.clone(), true).normalized(false));
            }
        }
        inner
            .add_tokens(missing)
            .map_err(|e| Error::Tokenizer(format!("adding special tokens: {e}")))?;

        let lookup =
            |token: Option<String>| token.and_then(|t| inner.token_to_id(&t).map(|id| (t, id)));
        let (bos, eos) = (lookup(bos), lookup(eos));
        let add_bos = vocab.add_bos_token.unwrap_or(add_bos_default);
        let add_eos = vocab.add_eos_token.unwrap_or(false);
        let bos_token_id = bos.as_ref().map(|(_, id)| *id);
        let eos_token_ids = eos.iter().map(|(_, id)| *id).collect();
        inner.with_post_processor(Some(bos_eos_template(
            bos.filter(|_| add_bos),
            eos.filter(|_| add_eos),
        )?));
        Self::finish(inner, bos_token_id, eos_token_ids)
    }

    fn finish(
        inner: tokenizers::Tokenizer,
        bos_token_id: Option<u32>,
        eos_token_ids: Vec<u32>,
    ) -> Result<Self> {
        let spelling = TokenSpelling::of(inner.get_decoder());
        let mut tokenizer = Self {
            inner,
            bos_token_id,
            eos_token_ids,
            add_bos_token: false,
            spelling,
        };
        // Whatever the post-processor adds around a sequence, it adds around the empty one.
        let empty = tokenizer.encode("", true)?;
        tokenizer.add_bos_token = bos_token_id.is_some() && empty.first().copied() == bos_token_id;
        Ok(tokenizer)
    }

    /// The ids of `text`. Special tokens written in the text (`<|im_start|>`) are always
    /// recognised; `add_special_tokens` adds the ones the tokenizer puts around a sequence (BOS,
    /// for many models).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("encoding {:?}: {e}", abbreviate(text))))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`. Ids outside the vocabulary decode to nothing (as in transformers);
    /// bytes that do not form valid UTF-8 decode to U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decoding {} ids: {e}", ids.len())))
    }

    /// The number of distinct tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The beginning-of-sequence token, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// Whether `encode(text, true)` starts with the beginning-of-sequence token.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }

    /// Every token that ends a sequence.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The id of a token, spelled as in the vocabulary (byte-level vocabularies spell a leading
    /// space `Ġ`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// A token as spelled in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a special token (BOS, EOS, chat markers), left out of generated text.
    pub fn is_special_token(&self, id: u32) -> bool {
        self.inner
            .get_added_vocabulary()
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|token| token.special)
    }

    /// The bytes token `id` stands for in decoded text, or `None` outside the vocabulary.
    ///
    /// The vocabulary's spelling is undone as the tokenizer's decoder would: GPT-2's byte-level
    /// alphabet (`Ġt` is `b" t"`), SentencePiece's `▁` for a space and its `<0xNN>` byte
    /// tokens. A special token stands for its text. A token can be part of a character (one
    /// byte of a 4-byte emoji), so the bytes need not be UTF-8 on their own. Unlike
    /// [`decode`](Self::decode) of the single token, nothing is stripped: a SentencePiece
    /// `▁Hello` is `b" Hello"` wherever it stands.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let added = self.inner.get_added_vocabulary();
        if let Some(token) = added.get_added_tokens_decoder().get(&id)
            && token.special
        {
            return Some(token.content.clone().into_bytes());
        }
        // An added token that the normalizer rewrites is decoded from its normalized form.
        let token = added
            .simple_id_to_token(id)
            .or_else(|| self.inner.get_model().id_to_token(id))?;
        Some(self.spelling.bytes(&token))
    }
}

/// How the tokens of a vocabulary spell the bytes they stand for, read off the tokenizer's
/// decoder (in tokenizer.json's form, which names each step and its settings).
#[derive(Clone, Debug, Default, PartialEq)]
struct TokenSpelling {
    /// `<0xNN>` stands for the byte `NN` (SentencePiece's byte fallback).
    byte_fallback: bool,
    /// Strings the decoder replaces, in its order: `▁` by a space for SentencePiece vocabularies.
    replacements: Vec<(String, String)>,
    /// Tokens are spelled in GPT-2's byte alphabet (see [`bytes_to_unicode`]).
    byte_level: bool,
}

impl TokenSpelling {
    fn of(decoder: Option<&DecoderWrapper>) -> Self {
        let mut spelling = Self::default();
        if let Some(json) = decoder.and_then(|d| serde_json::to_value(d).ok()) {
            spelling.read(&json);
        }
        spelling
    }

    fn read(&mut self, decoder: &Json) {
        let text = |key: &str| decoder.get(key).and_then(Json::as_str);
        match text("type") {
            Some("Sequence") => {
                for step in decoder
                    .get("decoders")
                    .and_then(Json::as_array)
                    .into_iter()
                    .flatten()
                {
                    self.read(step);
                }
            }
            Some("ByteLevel") => self.byte_level = true,
            Some("ByteFallback") => self.byte_fallback = true,
            Some("Metaspace") => {
                if let Some(replacement) = text("replacement") {
                    self.replacements.push((replacement.into(), " ".into()));
                }
            }
            // Regex patterns are left out: no vocabulary pagoda reads spells with one.
            Some("Replace") => {
                let pattern = decoder
                    .get("pattern")
                    .and_then(|p| p.get("String"))
                    .and_then(Json::as_str);
                if let (Some(pattern), Some(content)) = (pattern, text("content"))
                    && !pattern.is_empty()
                {
                    self.replacements.push((pattern.into(), content.into()));
                }
            }
            _ => {}
        }
    }

    fn bytes(&self, token: &str) -> Vec<u8> {
        if self.byte_fallback
            && let Some(byte) = fallback_byte(token)
        {
            return vec![byte];
        }
        let mut text = token.to_owned();
        for (pattern, content) in &self.replacements {
            text = text.replace(pattern.as_str(), content);
        }
        if self.byte_level {
            // As tokenizers' ByteLevel decoder: a token with a character outside the alphabet
            // (an added token) stands for its own text.
            let table = unicode_to_bytes();
            if let Some(bytes) = text.chars().map(|c| table.get(&c).copied()).collect() {
                return bytes;
            }
        }
        text.into_bytes()
    }
}

/// The byte of a SentencePiece byte token `<0xNN>`.
fn fallback_byte(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The inverse of [`bytes_to_unicode`].
fn unicode_to_bytes() -> &'static HashMap<char, u8> {
    static TABLE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let spelling = bytes_to_unicode();
        (0..=255u8).map(|b| (spelling[b as usize], b)).collect()
    })
}

/// What a GGUF file says about its tokenizer (`tokenizer.ggml.*` metadata), as plain data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece-style).
    pub model: String,
    /// `tokenizer.ggml.pre`: llama.cpp's name for the pre-tokenizer (`"llama-bpe"`, `"qwen2"`).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: every token's text; a token's id is its index.
    pub tokens: Vec<String>,
    /// llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i32>,
    /// BPE merges, "left right", best first.
    pub merges: Vec<String>,
    /// SentencePiece scores, one per token.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.bos_token_id` and the three keys after it.
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`; when absent, "llama" vocabularies add BOS and "gpt2" ones
    /// do not (as in transformers).
    pub add_bos_token: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`; when absent, no EOS is added.
    pub add_eos_token: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

/// llama.cpp's token type of a control token (`llama_token_type` in llama.cpp's `llama.h`).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// llama.cpp's token type of a user-defined token.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

impl GgufVocab {
    /// Reads the `tokenizer.ggml.*` keys and `tokenizer.chat_template` of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let required = |key: &str| {
            file.get(key).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: the GGUF metadata has no {key}",
                    file.path().display()
                ))
            })
        };
        let mismatch = |key: &str, expected: &str, value: &GgufValue| {
            Error::Tokenizer(format!(
                "{}: {key} should be {expected}, not {}",
                file.path().display(),
                value.type_name()
            ))
        };
        let string = |key: &str, value: &GgufValue| -> Result<String> {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| mismatch(key, "a string", value))
        };
        let optional_string = |key: &str| file.get(key).map(|value| string(key, value)).transpose();
        let array = |key: &str| -> Result<Option<&[GgufValue]>> {
            file.get(key)
                .map(|value| {
                    value
                        .as_array()
                        .ok_or_else(|| mismatch(key, "an array", value))
                })
                .transpose()
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            array(key)?
                .unwrap_or_default()
                .iter()
                .map(|value| string(key, value))
                .collect()
        };
        let id = |key: &str| -> Result<Option<u32>> {
            file.get(key)
                .map(|value| {
                    value
                        .as_u32()
                        .ok_or_else(|| mismatch(key, "a token id", value))
                })
                .transpose()
        };
        let flag = |key: &str| -> Result<Option<bool>> {
            file.get(key)
                .map(|value| {
                    value
                        .as_bool()
                        .ok_or_else(|| mismatch(key, "a bool", value))
                })
                .transpose()
        };

        const TOKENS: &str = "tokenizer.ggml.tokens";
        let model_key = "tokenizer.ggml.model";
        let model = string(model_key, required(model_key)?)?;
        required(TOKENS)?;
        let token_types = array("tokenizer.ggml.token_type")?
            .unwrap_or_default()
            .iter()
            .map(|value| {
                value
                    .as_i64()
                    .and_then(|t| i32::try_from(t).ok())
                    .ok_or_else(|| mismatch("tokenizer.ggml.token_type", "an array of i32", value))
            })
            .collect::<Result<_>>()?;
        let scores = array("tokenizer.ggml.scores")?
            .unwrap_or_default()
            .iter()
            .map(|value| {
                value
                    .as_f32()
                    .ok_or_else(|| mismatch("tokenizer.ggml.scores", "an array of f32", value))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            model,
            pre: optional_string("tokenizer.ggml.pre")?,
            tokens: strings(TOKENS)?,
            token_types,
            merges: strings("tokenizer.ggml.merges")?,
            scores,
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: id("tokenizer.ggml.eos_token_id")?,
            unknown_token_id: id("tokenizer.ggml.unknown_token_id")?,
            padding_token_id: id("tokenizer.ggml.padding_token_id")?,
            add_bos_token: flag("tokenizer.ggml.add_bos_token")?,
            add_eos_token: flag("tokenizer.ggml.add_eos_token")?,
            chat_template: optional_string("tokenizer.chat_template")?,
        })
    }

    fn check_lengths(&self) -> Result<()> {
        let tokens = self.tokens.len();
        if tokens == 0 {
            return Err(Error::Tokenizer("tokenizer.ggml.tokens is empty".into()));
        }
        for (key, len) in [
            ("token_type", self.token_types.len()),
            ("scores", self.scores.len()),
        ] {
            if len != 0 && len != tokens {
                return Err(Error::Tokenizer(format!(
                    "tokenizer.ggml.{key} has {len} entries for {tokens} tokens"
                )));
            }
        }
        if u32::try_from(tokens).is_err() {
            return Err(Error::Tokenizer(format!(
                "{tokens} tokens do not fit in u32 token ids"
            )));
        }
        Ok(())
    }

    fn token_type(&self, id: usize) -> Option<i32> {
        self.token_types.get(id).copied()
    }
}

/// GPT-2's map from bytes to the printable characters that byte-level BPE vocabularies are spelled
/// in (`bytes_to_unicode` in openai/gpt-2 `encoder.py`): printable Latin-1 bytes stand for
/// themselves, the others for the characters from U+0100 on, in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for byte in 0..=255u8 {
        table[byte as usize] = if printable(byte) {
            char::from(byte)
        } else {
            let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
            next += 1;
            c
        };
    }
    table
}

/// Pre-tokenizer split patterns for the `tokenizer.ggml.pre` values whose regex differs from
/// GPT-2's, as in transformers' `GGUF_PRE_TOKENIZER_SPLITS` (the patterns are those of the models'
/// own `tokenizer.json` files).
fn split_pattern(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = concat!(
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    );
    const GPT4O: &str = concat!(
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    );
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "tekken" => TEKKEN,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

/// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`).
fn byte_level_bpe(vocab: &GgufVocab) -> Result<tokenizers::Tokenizer> {
    let spelling = bytes_to_unicode();
    let alphabet: HashSet<char> = spelling.iter().copied().collect();
    // A token spelled outside the byte alphabet (a raw "€") is respelled as the characters of its
    // UTF-8 bytes, which is how the BPE model will meet it. On duplicates the later id wins.
    let mut ids = Vocab::default();
    for (id, token) in vocab.tokens.iter().enumerate() {
        let spelled = if token.chars().all(|c| alphabet.contains(&c)) {
            token.clone()
        } else {
            token.bytes().map(|b| spelling[b as usize]).collect()
        };
        ids.insert(spelled, id as u32);
    }
    let merges = parse_merges(&vocab.merges)?;
    let model = BPE::builder()
        .vocab_and_merges(ids, merges)
        .build()
        .map_err(|e| Error::Tokenizer(format!("byte-level BPE from the GGUF vocabulary: {e}")))?;

    let mut tokenizer = tokenizers::Tokenizer::new(model);
    let pre_tokenizer: PreTokenizerWrapper = match vocab.pre.as_deref().and_then(split_pattern) {
        Some(pattern) => {
            let split = Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| {
                Error::Tokenizer(format!(
                    "split regex for pre-tokenizer {:?}: {e}",
                    vocab.pre
                ))
            })?;
            PreTokenizerSequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        None => ByteLevel::new(false, true, true).into(),
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// SentencePiece-style BPE with byte fallback (`tokenizer.ggml.model = "llama"`), as
/// transformers' `LlamaTokenizer` builds it: a `▁` before the first word and in place of spaces.
fn sentencepiece_bpe(vocab: &GgufVocab) -> Result<tokenizers::Tokenizer> {
    let mut ids = Vocab::default();
    for (id, token) in vocab.tokens.iter().enumerate() {
        ids.insert(token.clone(), id as u32);
    }
    let merges = if vocab.merges.is_empty() {
        if vocab.scores.is_empty() {
            return Err(Error::Tokenizer(
                "a \"llama\" GGUF vocabulary needs tokenizer.ggml.merges or tokenizer.ggml.scores"
                    .into(),
            ));
        }
        merges_from_scores(&vocab.tokens, &vocab.scores, &ids)
    } else {
        parse_merges(&vocab.merges)?
    };
    let model = BPE::builder()
        .vocab_and_merges(ids, merges)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| {
            Error::Tokenizer(format!("SentencePiece BPE from the GGUF vocabulary: {e}"))
        })?;

    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
    let replace = Replace::new("▁", " ").map_err(|e| Error::Tokenizer(format!("decoder: {e}")))?;
    let decoders: Vec<DecoderWrapper> = vec![
        replace.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ];
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

fn parse_merges(merges: &[String]) -> Result<Vec<(String, String)>> {
    merges
        .iter()
        .enumerate()
        .map(|(index, merge)| match merge.split_once(' ') {
            Some((left, right)) if !right.contains(' ') => Ok((left.to_owned(), right.to_owned())),
            _ => Err(Error::Tokenizer(format!(
                "tokenizer.ggml.merges[{index}] = {merge:?} is not two tokens separated by a space"
            ))),
        })
        .collect()
}

/// The merges a SentencePiece vocabulary implies, as transformers' `generate_merges` derives
/// them: every split of a token into two tokens of the vocabulary, ordered by the score of the
/// merged token (highest first), then by the lengths of the two halves in characters (longest
/// first), then by the merged token's place in the vocabulary. (transformers also orders the
/// splits of one token by the ids of their halves, but two splits of one token never tie on the
/// left half's length.)
fn merges_from_scores(tokens: &[String], scores: &[f32], ids: &Vocab) -> Vec<(String, String)> {
    // One entry per distinct token, in order of first appearance, with the score of its last one.
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    for (token, &score) in tokens.iter().zip(scores) {
        if score_of.insert(token.as_str(), score).is_none() {
            order.push(token);
        }
    }

    struct Candidate<'a> {
        left: &'a str,
        right: &'a str,
        score: f32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut merges = Vec::new();
    for token in order {
        let score = score_of[token];
        for (at, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(at);
            if ids.contains_key(left) && ids.contains_key(right) {
                merges.push(Candidate {
                    left,
                    right,
                    score,
                    left_chars: left.chars().count(),
                    right_chars: right.chars().count(),
                });
            }
        }
    }
    // Stable, so equal keys keep the order above.
    merges.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    merges
        .into_iter()
        .map(|m| (m.left.to_owned(), m.right.to_owned()))
        .collect()
}

/// Control tokens become special added tokens and user-defined tokens plain added tokens, so
/// that both are matched whole in text instead of being cut into pieces.
fn add_gguf_added_tokens(tokenizer: &mut tokenizers::Tokenizer, vocab: &GgufVocab) -> Result<()> {
    // In a byte-level vocabulary every real token is spelled in the byte alphabet; a control
    // token that is not is mislabelled, and transformers leaves it out.
    let alphabet: Option<HashSet<char>> =
        (vocab.model == "gpt2").then(|| bytes_to_unicode().into_iter().collect());
    let in_alphabet = |token: &str| {
        alphabet
            .as_ref()
            .is_none_or(|a| token.chars().all(|c| a.contains(&c)))
    };
    let control: Vec<AddedToken> = vocab
        .tokens
        .iter()
        .enumerate()
        .filter(|&(id, token)| {
            vocab.token_type(id) == Some(TOKEN_TYPE_CONTROL) && in_alphabet(token)
        })
        .map(|(_, token)| AddedToken::from(token.clone(), true).normalized(false))
        .collect();
    tokenizer
        .add_special_tokens(control)
        .map_err(|e| Error::Tokenizer(format!("adding control tokens: {e}")))?;

    let known = tokenizer.get_vocab(true);
    let user_defined: Vec<AddedToken> = vocab
        .tokens
        .iter()
        .enumerate()
        .filter(|&(id, token)| {
            vocab.token_type(id) == Some(TOKEN_TYPE_USER_DEFINED) && known.contains_key(token)
        })
        .map(|(_, token)| AddedToken::from(token.clone(), false).normalized(false))
        .collect();
    tokenizer
        .add_tokens(user_defined)
        .map_err(|e| Error::Tokenizer(format!("adding user-defined tokens: {e}")))?;
    Ok(())
}

/// A post-processor that puts `bos` before and `eos` after a sequence (either may be absent).
fn bos_eos_template(
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
) -> Result<TemplateProcessing> {
    // The names in a template are keys into its special tokens, not the tokens' text, so that a
    // token containing ':' or ' ' cannot break the template syntax.
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special_tokens = Vec::new();
    if let Some((content, id)) = &bos {
        special_tokens.push(special_token("bos", *id, content)?);
    }
    if let Some((content, id)) = &eos {
        special_tokens.push(special_token("eos", *id, content)?);
    }
    for (sequence, type_id) in [("$A", 0), ("$B", 1)] {
        let mut pieces = Vec::new();
        if bos.is_some() {
            pieces.push(format!("bos:{type_id}"));
        }
        pieces.push(format!("{sequence}:{type_id}"));
        if eos.is_some() {
            pieces.push(format!("eos:{type_id}"));
        }
        if type_id == 0 {
            single = pieces.clone();
        }
        pair.extend(pieces);
    }
    TemplateProcessing::builder()
        .try_single(single)
        .and_then(|builder| builder.try_pair(pair))
        .map_err(|e| Error::Tokenizer(format!("post-processor template: {e}")))?
        .special_tokens(special_tokens)
        .build()
        .map_err(|e| Error::Tokenizer(format!("post-processor template: {e}")))
}

fn special_token(key: &str, id: u32, content: &str) -> Result<SpecialToken> {
    SpecialToken::new(key.into(), vec![id], vec![content.into()])
        .map_err(|e| Error::Tokenizer(format!("special token {content:?}: {e}")))
}

fn read_json_if_present(path: &Path) -> Result<Option<Json>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Tokenizer(format!("{}: {e}", path.display()))),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
}

/// A special token in `tokenizer_config.json`: a string, or an `AddedToken` object with `content`.
fn token_content(value: &Json) -> Option<String> {
    match value {
        Json::String(token) => Some(token.clone()),
        Json::Object(fields) => fields.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// A token id or a list of them, as `config.json` and `generation_config.json` write them.
fn token_ids(value: &Json) -> Vec<u32> {
    let id = |value: &Json| value.as_u64().and_then(|id| u32::try_from(id).ok());
    match value {
        Json::Array(values) => values.iter().filter_map(id).collect(),
        value => id(value).into_iter().collect(),
    }
}

/// The start of a long text, for error messages.
fn abbreviate(text: &str) -> String {
    const MAX_CHARS: usize = 40;
    match text.char_indices().nth(MAX_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}
