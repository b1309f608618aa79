//! Streaming detokenization: text deltas from token ids that arrive one at a time.
//!
//! Decoding each token alone is wrong twice over: a character of several UTF-8 bytes may be split
//! across tokens (byte-level BPE, byte fallback), and some decoders look at a token's neighbours
//! (SentencePiece drops the space of the first token only). So the decoder keeps two offsets into
//! the ids it has seen, as Hugging Face text-generation-inference and vLLM do: text is decoded
//! from `prefix_offset`, the ids up to `read_offset` have been emitted, and new text is emitted
//! only once the decoded window has grown past what was emitted and does not end in U+FFFD (the
//! mark of an incomplete character).

use crate::Result;
use crate::tokenizer::Tokenizer;

/// Turns a stream of token ids into a stream of text deltas whose concatenation is the decoded
/// text of all the ids.
#[derive(Clone, Debug)]
pub struct IncrementalDecoder {
    /// The ids from `prefix_offset` on; earlier ones are never decoded again.
    ids: Vec<u32>,
    /// How many of `ids` were already emitted; `ids[..read_offset]` is the context that the next
    /// window is decoded with.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl IncrementalDecoder {
    /// A decoder that leaves special tokens out of the text (as the OpenAI-style APIs of vLLM and
    /// text-generation-inference do by default).
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            read_offset: 0,
            skip_special_tokens: true,
        }
    }

    /// Whether special tokens (`<|im_end|>`) are left out of the text; they are by default.
    pub fn skip_special_tokens(mut self, skip: bool) -> Self {
        self.skip_special_tokens = skip;
        self
    }

    /// Adds the next id. Returns the text it completes, or `None` while the ids so far end inside
    /// a character (or add no text).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let delta = self.new_text(tokenizer)?;
        match delta {
            Some(text) if !text.ends_with(char::REPLACEMENT_CHARACTER) => {
                self.advance();
                Ok(Some(text))
            }
            _ => Ok(None),
        }
    }

    /// Flushes what is left at the end of the stream: the text of trailing ids that never formed a
    /// complete character (as U+FFFD, which is what decoding all the ids at once gives too). The
    /// decoder is empty afterwards.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let delta = self.new_text(tokenizer)?;
        self.ids.clear();
        self.read_offset = 0;
        Ok(delta)
    }

    /// The text that `ids[read_offset..]` adds to the window, if it adds any.
    fn new_text(&self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let emitted = tokenizer.decode(&self.ids[..self.read_offset], self.skip_special_tokens)?;
        let window = tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        // A decoder may rewrite the start of the text once more tokens follow; until the window
        // again begins with what was emitted there is nothing safe to add.
        Ok(window
            .strip_prefix(emitted.as_str())
            .filter(|added| !added.is_empty())
            .map(str::to_owned))
    }

    /// Moves the window: the ids just emitted become the context of the next one.
    fn advance(&mut self) {
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_tokenizer::byte_level;

    fn stream(
        tokenizer: &Tokenizer,
        ids: &[u32],
        mut decoder: IncrementalDecoder,
    ) -> Vec<Option<String>> {
        let mut deltas: Vec<Option<String>> = ids
            .iter()
            .map(|&id| decoder.push(tokenizer, id).unwrap())
            .collect();
        deltas.push(decoder.finish(tokenizer).unwrap());
        deltas
    }

    #[test]
    fn multibyte_characters_wait_for_their_last_byte() {
        let tokenizer = byte_level();
        let text = "hello 😀 wo 中文!";
        let ids = tokenizer.encode(text, false).unwrap();
        // Every byte of the emoji and the CJK characters is its own token here.
        assert!(ids.len() > 14, "{ids:?}");
        let deltas = stream(&tokenizer, &ids, IncrementalDecoder::new());
        let emitted: Vec<&str> = deltas.iter().flatten().map(String::as_str).collect();
        assert_eq!(emitted, ["hello", " ", "😀", " wo", " ", "中", "文", "!"]);
        assert_eq!(emitted.concat(), text);
        // The emoji's four tokens: three silent pushes, then the whole character.
        let emoji = deltas
            .iter()
            .position(|d| d.as_deref() == Some("😀"))
            .unwrap();
        assert_eq!(
            deltas[emoji - 3..=emoji],
            [None, None, None, Some("😀".to_owned())]
        );
    }

    #[test]
    fn special_tokens_are_skipped_unless_asked_for() {
        let tokenizer = byte_level();
        let mut ids = tokenizer.encode("hello", false).unwrap();
        ids.push(1);
        let skipped: String = stream(&tokenizer, &ids, IncrementalDecoder::new())
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(skipped, "hello");
        let kept: String = stream(
            &tokenizer,
            &ids,
            IncrementalDecoder::new().skip_special_tokens(false),
        )
        .into_iter()
        .flatten()
        .collect();
        assert_eq!(kept, "hello<|im_end|>");
    }

    #[test]
    fn an_unfinished_character_is_flushed_by_finish() {
        let tokenizer = byte_level();
        let ids = tokenizer.encode("a😀", false).unwrap();
        let cut = &ids[..ids.len() - 1];
        let deltas = stream(&tokenizer, cut, IncrementalDecoder::new());
        assert_eq!(
            deltas.iter().flatten().cloned().collect::<String>(),
            tokenizer.decode(cut, true).unwrap()
        );
        assert_eq!(deltas.last().unwrap().as_deref(), Some("\u{FFFD}"));
        let mut decoder = IncrementalDecoder::new();
        assert_eq!(decoder.finish(&tokenizer).unwrap(), None);
    }

    proptest::proptest! {
        #[test]
        fn deltas_concatenate_to_the_full_decode(
            ids in proptest::collection::vec(0u32..264, 0..40),
        ) {
            let tokenizer = byte_level();
            let decoders = [IncrementalDecoder::new(), IncrementalDecoder::new().skip_special_tokens(false)];
            for decoder in decoders {
                let skip = decoder.skip_special_tokens;
                let deltas = stream(&tokenizer, &ids, decoder);
                for delta in deltas.iter().take(ids.len()).flatten() {
                    proptest::prop_assert!(!delta.ends_with(char::REPLACEMENT_CHARACTER));
                }
                let streamed: String = deltas.into_iter().flatten().collect();
                proptest::prop_assert_eq!(streamed, tokenizer.decode(&ids, skip).unwrap());
            }
        }
    }
}
