//! A request's output text as it may be streamed: decoded token by token, cut at the first stop
//! string, and holding back any tail that could still grow into one.
//!
//! Emitted text never contains the start of a stop string, so a stop string that arrives spread
//! over several tokens is found whole in the text held back and never reaches the caller.

use crate::Result;
use crate::detokenize::IncrementalDecoder;
use crate::tokenizer::Tokenizer;

/// Text a push or finish releases, and whether a stop string ended the text there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TextDelta {
    pub text: String,
    pub stopped: bool,
}

/// The output text of one request, streamed.
#[derive(Clone, Debug)]
pub(crate) struct TextStream {
    decoder: IncrementalDecoder,
    stop: Vec<String>,
    /// Decoded text not emitted yet: a tail that is the start of some stop string.
    held: String,
}

impl TextStream {
    /// A stream that ends at the first of the (non-empty) `stop` strings to appear whole in the
    /// text; when one token completes several, at the one that starts first.
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            decoder: IncrementalDecoder::new(),
            stop,
            held: String::new(),
        }
    }

    /// Adds the next token and returns the text that can be emitted now. After a delta with
    /// `stopped` set the stream is done.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<TextDelta> {
        if let Some(text) = self.decoder.push(tokenizer, token)? {
            self.held.push_str(&text);
        }
        Ok(self.release())
    }

    /// Ends the stream: returns everything held back, with the text of trailing tokens that
    /// never formed a whole character, still cut at a stop string.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<TextDelta> {
        if let Some(text) = self.decoder.finish(tokenizer)? {
            self.held.push_str(&text);
        }
        let mut delta = self.release();
        if !delta.stopped {
            delta.text.push_str(&std::mem::take(&mut self.held));
        }
        Ok(delta)
    }

    /// Emits the held text up to the first stop string, or up to the tail that could begin one.
    fn release(&mut self) -> TextDelta {
        let first_stop = self
            .stop
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = first_stop {
            self.held.truncate(at);
            return TextDelta {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let emit = self.held.len() - self.stop_prefix_len();
        let rest = self.held.split_off(emit);
        TextDelta {
            text: std::mem::replace(&mut self.held, rest),
            stopped: false,
        }
    }

    /// Bytes of the longest tail of the held text that is a proper prefix of a stop string.
    fn stop_prefix_len(&self) -> usize {
        let held = self.held.as_bytes();
        self.stop
            .iter()
            .filter_map(|stop| {
                let stop = stop.as_bytes();
                (1..stop.len().min(held.len() + 1))
                    .rev()
                    .find(|&len| held.ends_with(&stop[..len]))
            })
            .max()
            .unwrap_or(0)
            // A tail equal to the start of a stop string begins where that string's first
            // character does, so the cut is a character boundary; this only guards the slicing.
            .min(held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_tokenizer::byte_level;
    use proptest::prelude::*;

    /// The id of a byte's own token in [`byte_level`]: the byte tokens follow two special ones.
    fn byte_token(byte: u8) -> u32 {
        2 + u32::from(byte)
    }

    /// Streams `text`, one byte token at a time, against `stop`: the deltas, then the final one.
    fn stream(text: &str, stop: &[&str]) -> (Vec<String>, bool) {
        let tokenizer = byte_level();
        let mut stream = TextStream::new(stop.iter().map(|s| s.to_string()).collect());
        let mut deltas = Vec::new();
        for byte in text.bytes() {
            let delta = stream.push(&tokenizer, byte_token(byte)).unwrap();
            deltas.push(delta.text);
            if delta.stopped {
                return (deltas, true);
            }
        }
        let last = stream.finish(&tokenizer).unwrap();
        deltas.push(last.text);
        (deltas, last.stopped)
    }

    #[test]
    fn a_stop_string_over_several_tokens_is_cut_and_never_emitted() {
        let (deltas, stopped) = stream("say hello world now", &["lo wor"]);
        assert!(stopped);
        assert_eq!(deltas.concat(), "say hel");
        assert!(deltas.iter().all(|d| !d.contains('w')), "{deltas:?}");
    }

    #[test]
    fn text_that_may_start_a_stop_string_waits_until_it_cannot() {
        let tokenizer = byte_level();
        let mut stream = TextStream::new(vec!["abc".into()]);
        let push = |stream: &mut TextStream, c: &str| {
            stream
                .push(&tokenizer, byte_token(c.as_bytes()[0]))
                .unwrap()
        };
        assert_eq!(push(&mut stream, "x").text, "x");
        assert_eq!(push(&mut stream, "a").text, "");
        assert_eq!(push(&mut stream, "b").text, "");
        // "abx" cannot become "abc" any more.
        let delta = push(&mut stream, "x");
        assert_eq!((delta.text.as_str(), delta.stopped), ("abx", false));
        assert_eq!(push(&mut stream, "a").text, "");
        // The end of the stream releases what was held.
        let end = stream.finish(&tokenizer).unwrap();
        assert_eq!((end.text.as_str(), end.stopped), ("a", false));
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let (deltas, stopped) = stream("one two three", &["three", "wo", "e t"]);
        assert!(stopped);
        assert_eq!(deltas.concat(), "on");
    }

    #[test]
    fn multibyte_stop_strings_and_characters_stay_whole() {
        let (deltas, stopped) = stream("a中文b", &["文"]);
        assert!(stopped);
        assert_eq!(deltas.concat(), "a中");
        let (deltas, stopped) = stream("a中文b", &["中x"]);
        assert!(!stopped);
        assert_eq!(deltas.concat(), "a中文b");
        // "中" shares its first two bytes with "丫"'s; holding back must not split either.
        let (deltas, _) = stream("中丫", &["丫x"]);
        assert_eq!(deltas.concat(), "中丫");
    }

    #[test]
    fn without_stop_strings_text_flows_at_once() {
        let (deltas, stopped) = stream("hi there", &[]);
        assert!(!stopped);
        assert_eq!(deltas[..8].concat(), "hi there");
        assert_eq!(deltas[8], "");
    }

    proptest! {
        #[test]
        fn streamed_text_is_the_text_before_the_first_stop(
            text in "[ab c]{0,30}",
            stops in proptest::collection::vec("[ab c]{1,4}", 0..3),
        ) {
            let stop: Vec<&str> = stops.iter().map(String::as_str).collect();
            let (deltas, stopped) = stream(&text, &stop);
            // The text is cut at the first stop string to be complete, token by token (and at
            // the earliest of those completed by the same token).
            let first = (1..=text.len())
                .find_map(|end| stop.iter().filter_map(|s| text[..end].find(s)).min());
            prop_assert_eq!(stopped, first.is_some());
            // Deltas only ever append, so this also says that nothing emitted is taken back.
            prop_assert_eq!(deltas.concat(), &text[..first.unwrap_or(text.len())]);
        }
    }
}
