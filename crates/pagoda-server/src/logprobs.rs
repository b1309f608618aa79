//! The engine's per-token log-probabilities in the two shapes of the OpenAI API: parallel
//! arrays for completions, one object per token for chat.

use pagoda_engine::TokenLogprob;

use crate::response::{
    ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs, TopLogprobMap,
};

/// How a token is named in logprobs. The server holds no tokenizer, so a token is named by
/// its id in vLLM's `token_id:<id>` spelling (its `return_tokens_as_token_ids` option), which
/// clients can map back with the model's vocabulary.
pub fn token_name(id: u32) -> String {
    format!("token_id:{id}")
}

/// Appends `tokens` to completion logprobs; `offset` is where the next token's text starts
/// (in characters) and moves past each token.
pub fn extend_completion(
    logprobs: &mut CompletionLogprobs,
    tokens: &[TokenLogprob],
    offset: &mut usize,
) {
    for token in tokens {
        let name = token_name(token.token);
        logprobs.text_offset.push(*offset);
        *offset += name.chars().count();
        logprobs.tokens.push(name);
        logprobs.token_logprobs.push(token.logprob);
        logprobs.top_logprobs.push(TopLogprobMap(
            token
                .top
                .iter()
                .map(|&(id, logprob)| (token_name(id), logprob))
                .collect(),
        ));
    }
}

/// Appends `tokens` to chat logprobs.
pub fn extend_chat(logprobs: &mut ChatLogprobs, tokens: &[TokenLogprob]) {
    logprobs.content.extend(tokens.iter().map(|token| {
        let name = token_name(token.token);
        ChatTokenLogprob {
            bytes: name.as_bytes().to_vec(),
            token: name,
            logprob: token.logprob,
            top_logprobs: token
                .top
                .iter()
                .map(|&(id, logprob)| {
                    let name = token_name(id);
                    ChatTopLogprob {
                        bytes: name.as_bytes().to_vec(),
                        token: name,
                        logprob,
                    }
                })
                .collect(),
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Vec<TokenLogprob> {
        vec![
            TokenLogprob {
                token: 5,
                logprob: -0.25,
                top: vec![(5, -0.25), (9, -1.5)],
            },
            TokenLogprob {
                token: 12,
                logprob: -2.0,
                top: vec![(3, -0.5), (12, -2.0)],
            },
        ]
    }

    #[test]
    fn completion_logprobs_are_parallel_arrays() {
        let mut logprobs = CompletionLogprobs::default();
        let mut offset = 0;
        extend_completion(&mut logprobs, &tokens(), &mut offset);
        assert_eq!(
            serde_json::to_value(&logprobs).unwrap(),
            serde_json::json!({
                "tokens": ["token_id:5", "token_id:12"],
                "token_logprobs": [-0.25, -2.0],
                "top_logprobs": [{"token_id:5": -0.25, "token_id:9": -1.5},
                                 {"token_id:3": -0.5, "token_id:12": -2.0}],
                "text_offset": [0, 10],
            })
        );
        assert_eq!(offset, 21);
    }

    #[test]
    fn chat_logprobs_name_each_token_with_its_bytes() {
        let mut logprobs = ChatLogprobs::default();
        extend_chat(&mut logprobs, &tokens());
        let json = serde_json::to_value(&logprobs).unwrap();
        assert_eq!(json["content"][1]["token"], "token_id:12");
        assert_eq!(json["content"][1]["logprob"], -2.0);
        assert_eq!(json["content"][1]["top_logprobs"][0]["token"], "token_id:3");
        assert_eq!(
            json["content"][0]["bytes"],
            serde_json::json!("token_id:5".as_bytes())
        );
    }
}
