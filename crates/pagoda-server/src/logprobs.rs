//! The engine's per-token log-probabilities in the two shapes of the OpenAI API: parallel
//! arrays for completions, one object per token for chat.
//!
//! A token is named by its text, as the model's tokenizer decodes it. A byte-level token can be
//! part of a character (one byte of an emoji): its `bytes` are then the raw bytes, not UTF-8
//! on their own, and its `token` their lossy decoding with U+FFFD, as OpenAI and vLLM spell it.

use pagoda_engine::{TokenLogprob, Tokenizer};

use crate::response::{
    ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs, TopLogprobMap,
};

/// A token's text (invalid UTF-8 replaced by U+FFFD) and its raw bytes. An id the tokenizer
/// does not know stands for no text, as it does in the decoded output.
fn spell(tokenizer: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tokenizer.token_bytes(id).unwrap_or_default();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// Where the next token's text starts in a completion, in characters.
///
/// Counts the characters the tokens' bytes decode to, as the completion's text decodes them: a
/// byte sequence that can never be UTF-8 is one U+FFFD, and a token that continues a character
/// begun by earlier tokens starts where that character does. Special tokens are left out of
/// the text and take no room.
#[derive(Debug, Default)]
pub struct TextOffset {
    /// Characters decoded so far.
    chars: usize,
    /// The start of a character whose other bytes have not come yet.
    partial: Vec<u8>,
}

impl TextOffset {
    /// Where the text of a token of `bytes` starts; then moves past it.
    fn advance(&mut self, bytes: &[u8]) -> usize {
        let first = self.partial.len();
        self.partial.extend_from_slice(bytes);
        let (ends, pending) = char_ends(&self.partial);
        // The characters that end before this token's first byte were begun by earlier tokens
        // and completed, or cut short, by this one: they stand before it.
        let start = self.chars + ends.iter().filter(|&&end| end <= first).count();
        self.chars += ends.len();
        self.partial.drain(..self.partial.len() - pending);
        start
    }
}

/// Where each character that `bytes` decode to ends (a U+FFFD for each maximal invalid
/// sequence, as `String::from_utf8_lossy` decodes them), and how many bytes at the end begin a
/// character that later bytes may complete.
fn char_ends(bytes: &[u8]) -> (Vec<usize>, usize) {
    let mut ends = Vec::new();
    let mut at = 0;
    loop {
        let (valid, invalid) = match std::str::from_utf8(&bytes[at..]) {
            Ok(text) => (text, None),
            Err(error) => {
                let (valid, _) = bytes[at..].split_at(error.valid_up_to());
                // Valid by what the error says; the fallback is never taken.
                (std::str::from_utf8(valid).unwrap_or_default(), Some(error))
            }
        };
        ends.extend(valid.char_indices().map(|(i, c)| at + i + c.len_utf8()));
        at += valid.len();
        match invalid.map(|error| error.error_len()) {
            None => return (ends, 0),
            Some(None) => return (ends, bytes.len() - at),
            Some(Some(len)) => {
                at += len;
                ends.push(at);
            }
        }
    }
}

/// Appends `tokens` to completion logprobs; `offset` says where the next token's text starts
/// and moves past each token.
pub fn extend_completion(
    logprobs: &mut CompletionLogprobs,
    tokens: &[TokenLogprob],
    tokenizer: &Tokenizer,
    offset: &mut TextOffset,
) {
    for token in tokens {
        let (name, bytes) = spell(tokenizer, token.token);
        let shown: &[u8] = if tokenizer.is_special_token(token.token) {
            &[]
        } else {
            &bytes
        };
        logprobs.text_offset.push(offset.advance(shown));
        logprobs.tokens.push(name);
        logprobs.token_logprobs.push(token.logprob);
        // Two tokens can share a text (two lone bytes both read U+FFFD), and a JSON object
        // names a key once: the likelier keeps it.
        let mut top: Vec<(String, f32)> = Vec::with_capacity(token.top.len());
        for &(id, logprob) in &token.top {
            let (name, _) = spell(tokenizer, id);
            if top.iter().all(|(seen, _)| *seen != name) {
                top.push((name, logprob));
            }
        }
        logprobs.top_logprobs.push(TopLogprobMap(top));
    }
}

/// Appends `tokens` to chat logprobs.
pub fn extend_chat(logprobs: &mut ChatLogprobs, tokens: &[TokenLogprob], tokenizer: &Tokenizer) {
    logprobs.content.extend(tokens.iter().map(|token| {
        let (name, bytes) = spell(tokenizer, token.token);
        ChatTokenLogprob {
            token: name,
            bytes,
            logprob: token.logprob,
            top_logprobs: token
                .top
                .iter()
                .map(|&(id, logprob)| {
                    let (name, bytes) = spell(tokenizer, id);
                    ChatTopLogprob {
                        token: name,
                        bytes,
                        logprob,
                    }
                })
                .collect(),
        }
    }));
}

#[cfg(test)]
mod tests {
    use pagoda_engine::tokenizer::GgufVocab;

    use super::*;

    /// A byte-level vocabulary: end of text (special), the 256 byte tokens in GPT-2's
    /// alphabet, then `Ġhi` (" hi").
    fn tokenizer() -> Tokenizer {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut tokens = vec!["<|endoftext|>".to_owned()];
        let mut next = 256;
        for byte in 0..=255u8 {
            let c = if printable(byte) {
                char::from(byte)
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            };
            tokens.push(c.to_string());
        }
        tokens.extend(["Ġh".into(), "Ġhi".into()]);
        let mut token_types = vec![1; tokens.len()];
        token_types[0] = 3;
        Tokenizer::from_gguf(&GgufVocab {
            model: "gpt2".into(),
            tokens,
            token_types,
            merges: vec!["Ġ h".into(), "Ġh i".into()],
            eos_token_id: Some(0),
            ..GgufVocab::default()
        })
        .unwrap()
    }

    /// The id of the byte token for `byte`.
    fn byte(byte: u8) -> u32 {
        1 + u32::from(byte)
    }

    const HI: u32 = 258;

    fn logprob(token: u32, top: &[u32]) -> TokenLogprob {
        TokenLogprob {
            token,
            logprob: -0.5,
            top: top.iter().map(|&id| (id, -0.5)).collect(),
        }
    }

    #[test]
    fn completion_logprobs_name_tokens_by_text_and_count_characters() {
        let tokenizer = tokenizer();
        // "é" is two bytes, each a token of its own; "😀" four.
        let mut tokens: Vec<TokenLogprob> = "é".bytes().map(|b| logprob(byte(b), &[])).collect();
        tokens.push(logprob(HI, &[HI, byte(b'x')]));
        tokens.push(logprob(0, &[]));
        tokens.extend("😀".bytes().map(|b| logprob(byte(b), &[])));
        tokens.push(logprob(byte(b'!'), &[]));
        let mut logprobs = CompletionLogprobs::default();
        let mut offset = TextOffset::default();
        // In two pieces, as a stream delivers them.
        extend_completion(&mut logprobs, &tokens[..3], &tokenizer, &mut offset);
        extend_completion(&mut logprobs, &tokens[3..], &tokenizer, &mut offset);
        let json = serde_json::to_value(&logprobs).unwrap();
        let f = "\u{FFFD}";
        assert_eq!(
            json["tokens"],
            serde_json::json!([f, f, " hi", "<|endoftext|>", f, f, f, f, "!"])
        );
        // "é hi😀!": the special token takes no room.
        assert_eq!(
            json["text_offset"],
            serde_json::json!([0, 0, 1, 4, 4, 4, 4, 4, 5])
        );
        assert_eq!(
            json["top_logprobs"][2],
            serde_json::json!({" hi": -0.5, "x": -0.5})
        );
        assert_eq!(json["token_logprobs"][0], -0.5);
    }

    #[test]
    fn a_byte_that_is_never_utf8_counts_as_one_replacement_character() {
        let mut offset = TextOffset::default();
        // 0xF0 starts a 4-byte character that 'a' cuts short: "\u{FFFD}a" when decoded.
        assert_eq!(offset.advance(&[0xF0]), 0);
        assert_eq!(offset.advance(b"a"), 1);
        assert_eq!(offset.advance(b"b"), 2);
        assert_eq!(offset.advance(&[0xFF, b'c']), 3);
        assert_eq!(offset.advance(b""), 5);
        assert_eq!(
            String::from_utf8_lossy(&[0xF0, b'a', b'b', 0xFF, b'c'])
                .chars()
                .count(),
            5
        );
    }

    /// Where each token starts in the lossy decoding of all the tokens' bytes at once: the
    /// number of characters that end at or before its first byte.
    fn offsets_by_decoding_everything(tokens: &[Vec<u8>]) -> Vec<usize> {
        let all: Vec<u8> = tokens.concat();
        let text = String::from_utf8_lossy(&all);
        // Where each decoded character ends in `all`: a valid character by its length, each
        // U+FFFD by the invalid sequence `from_utf8_lossy` replaced.
        let mut ends = Vec::new();
        let mut at = 0;
        for c in text.chars() {
            at += if c == char::REPLACEMENT_CHARACTER
                && !all[at..].starts_with("\u{FFFD}".as_bytes())
            {
                let rest = &all[at..];
                let error = std::str::from_utf8(rest).unwrap_err();
                assert_eq!(error.valid_up_to(), 0);
                error.error_len().unwrap_or(rest.len())
            } else {
                c.len_utf8()
            };
            ends.push(at);
        }
        let mut start = 0;
        tokens
            .iter()
            .map(|token| {
                let offset = ends.iter().filter(|&&end| end <= start).count();
                start += token.len();
                offset
            })
            .collect()
    }

    #[test]
    fn offsets_agree_with_decoding_all_the_bytes_at_once() {
        // Bytes drawn mostly from the ones UTF-8 is made of: ASCII, lead bytes of 2-, 3- and
        // 4-byte characters, continuation bytes, and bytes that are never UTF-8.
        const BYTES: [u8; 12] = [
            b'a', b' ', 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80, 0xFF,
        ];
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for _ in 0..2000 {
            let tokens: Vec<Vec<u8>> = (0..1 + next(8))
                .map(|_| (0..1 + next(3)).map(|_| BYTES[next(BYTES.len())]).collect())
                .collect();
            let mut offset = TextOffset::default();
            let ours: Vec<usize> = tokens.iter().map(|t| offset.advance(t)).collect();
            assert_eq!(ours, offsets_by_decoding_everything(&tokens), "{tokens:x?}");
        }
    }

    #[test]
    fn chat_logprobs_carry_each_tokens_raw_bytes() {
        let tokenizer = tokenizer();
        let mut logprobs = ChatLogprobs::default();
        let tokens = [logprob(byte(0xC3), &[byte(0xC3), HI]), logprob(0, &[])];
        extend_chat(&mut logprobs, &tokens, &tokenizer);
        let json = serde_json::to_value(&logprobs).unwrap();
        assert_eq!(json["content"][0]["token"], "\u{FFFD}");
        assert_eq!(json["content"][0]["bytes"], serde_json::json!([0xC3]));
        assert_eq!(json["content"][0]["logprob"], -0.5);
        let top = &json["content"][0]["top_logprobs"];
        assert_eq!(top[1]["token"], " hi");
        assert_eq!(top[1]["bytes"], serde_json::json!(b" hi"));
        assert_eq!(json["content"][1]["token"], "<|endoftext|>");
        assert_eq!(
            json["content"][1]["bytes"],
            serde_json::json!(b"<|endoftext|>")
        );
        // An id the tokenizer lacks stands for no text.
        extend_chat(&mut logprobs, &[logprob(10_000, &[])], &tokenizer);
        let json = serde_json::to_value(&logprobs).unwrap();
        assert_eq!(json["content"][2]["token"], "");
        assert_eq!(json["content"][2]["bytes"], serde_json::json!([]));
    }
}
