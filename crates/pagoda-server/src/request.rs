//! The request bodies of `/v1/completions` and `/v1/chat/completions`, as the OpenAI API
//! defines them, plus the extensions vLLM made common (`top_k`, `min_p`, `repetition_penalty`,
//! `ignore_eos`, `stop_token_ids`).
//!
//! Every field is optional and `null` means absent, as OpenAI clients send it. Fields this
//! server does not know are ignored. Fields whose JSON type varies (`prompt`, `stop`, a
//! message's `content`) are kept as JSON values and read by the functions here, so that a
//! wrong one is refused with a sentence naming the field.

use pagoda_engine::{ChatMessage, Prompt};
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    /// A string, an array of one string, an array of token ids, or an array of one such array.
    pub prompt: Option<Value>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Completions default to 16 new tokens, as in the OpenAI API.
    pub max_tokens: Option<u64>,
    /// How many alternatives to report per token (0 reports the chosen token alone).
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<u32>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<MessageInput>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// The newer name of `max_tokens`; wins when both are given. Without either, a chat
    /// completion may run to the end of the context.
    pub max_completion_tokens: Option<u64>,
    pub max_tokens: Option<u64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub tools: Option<Value>,
    pub response_format: Option<Value>,
}

/// Sampling and stopping fields shared by both endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub n: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// -1 or 0 turn it off (vLLM uses -1).
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    /// A string or an array of strings.
    pub stop: Option<Value>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub logit_bias: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send one more chunk before `[DONE]`, with no choices and the request's token usage.
    pub include_usage: Option<bool>,
}

/// One chat message as sent: `content` is a string, an array of parts, or null.
#[derive(Debug, Deserialize)]
pub struct MessageInput {
    pub role: String,
    pub content: Option<Value>,
}

/// Parses a request body, telling broken JSON apart from JSON of the wrong shape.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::invalid_request(format!("The request body does not match the schema: {e}."))
        }
        _ => ApiError::invalid_request(format!("The request body is not valid JSON: {e}.")),
    })
}

impl StreamOptions {
    pub fn wants_usage(options: Option<&StreamOptions>) -> bool {
        options.and_then(|o| o.include_usage).unwrap_or(false)
    }
}

impl CompletionRequest {
    /// The prompt as the engine takes it. Batches of prompts are refused: one request, one
    /// completion.
    pub fn prompt(&self) -> Result<Prompt, ApiError> {
        let invalid = |message: &str| ApiError::invalid_param("prompt", message);
        let shape = "`prompt` must be a string, token ids, or an array holding one of these";
        match self.prompt.as_ref() {
            None | Some(Value::Null) => Err(invalid("`prompt` is required.")),
            Some(Value::String(text)) => Ok(Prompt::Text(text.clone())),
            Some(Value::Array(items)) => match items.as_slice() {
                [] => Err(invalid("`prompt` is an empty array.")),
                [Value::String(text)] => Ok(Prompt::Text(text.clone())),
                [Value::Array(ids)] => token_ids(ids).map(Prompt::Tokens).ok_or(invalid(shape)),
                [Value::String(_) | Value::Array(_), _, ..] => Err(invalid(
                    "This server completes one prompt per request; send the others separately.",
                )),
                ids => token_ids(ids).map(Prompt::Tokens).ok_or(invalid(shape)),
            },
            Some(_) => Err(invalid(shape)),
        }
    }
}

/// `ids` as token ids, or None if any is not a non-negative integer that fits in u32.
fn token_ids(ids: &[Value]) -> Option<Vec<u32>> {
    ids.iter()
        .map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()))
        .collect()
}

impl ChatCompletionRequest {
    /// The conversation as the engine's chat template takes it.
    pub fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        let messages = self
            .messages
            .as_deref()
            .ok_or_else(|| ApiError::invalid_param("messages", "`messages` is required."))?;
        if messages.is_empty() {
            return Err(ApiError::invalid_param(
                "messages",
                "`messages` must hold at least one message.",
            ));
        }
        messages
            .iter()
            .enumerate()
            .map(|(i, message)| {
                Ok(ChatMessage {
                    role: message.role.clone(),
                    content: message_text(message.content.as_ref()).ok_or_else(|| {
                        ApiError::invalid_param(
                            &format!("messages.[{i}].content"),
                            "A message's content must be a string, null, or an array of \
                             parts of type \"text\".",
                        )
                    })?,
                })
            })
            .collect()
    }

    /// Refuses what this server cannot honour rather than silently ignoring it.
    pub fn check_supported(&self) -> Result<(), ApiError> {
        if self
            .tools
            .as_ref()
            .is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(ApiError::invalid_param(
                "tools",
                "Tool calling is not supported by this server.",
            ));
        }
        if let Some(format) = &self.response_format {
            let kind = format.get("type").and_then(Value::as_str);
            if !format.is_null() && kind != Some("text") {
                return Err(ApiError::invalid_param(
                    "response_format",
                    "Only the \"text\" response format is supported.",
                ));
            }
        }
        Ok(())
    }
}

/// The text of a message's content: the string itself, the text parts joined, or empty for
/// null (an assistant turn that only called tools). None for anything else.
fn message_text(content: Option<&Value>) -> Option<String> {
    match content {
        None | Some(Value::Null) => Some(String::new()),
        Some(Value::String(text)) => Some(text.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|part| match part.get("type").and_then(Value::as_str) {
                Some("text") => part.get("text").and_then(Value::as_str),
                _ => None,
            })
            .collect(),
        Some(_) => None,
    }
}

impl SamplingFields {
    /// The stop strings: a string, an array of strings, or nothing.
    pub fn stop_strings(&self) -> Result<Vec<String>, ApiError> {
        let invalid =
            || ApiError::invalid_param("stop", "`stop` must be a string or an array of strings.");
        match &self.stop {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned).ok_or_else(invalid))
                .collect(),
            Some(_) => Err(invalid()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(json: &str) -> CompletionRequest {
        parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn prompts_in_every_openai_shape() {
        let text = |json| completion(json).prompt().unwrap();
        assert_eq!(text(r#"{"prompt": "hi"}"#), Prompt::Text("hi".into()));
        assert_eq!(text(r#"{"prompt": ["hi"]}"#), Prompt::Text("hi".into()));
        assert_eq!(
            text(r#"{"prompt": [1, 2, 3]}"#),
            Prompt::Tokens(vec![1, 2, 3])
        );
        assert_eq!(text(r#"{"prompt": [[4, 5]]}"#), Prompt::Tokens(vec![4, 5]));
        for bad in [
            r#"{}"#,
            r#"{"prompt": null}"#,
            r#"{"prompt": []}"#,
            r#"{"prompt": ["a", "b"]}"#,
            r#"{"prompt": [[1], [2]]}"#,
            r#"{"prompt": [1, -2]}"#,
            r#"{"prompt": [1, 5000000000]}"#,
            r#"{"prompt": [1.5]}"#,
            r#"{"prompt": 7}"#,
        ] {
            let error = completion(bad).prompt().unwrap_err();
            assert_eq!(error.body.param.as_deref(), Some("prompt"), "{bad}");
        }
    }

    #[test]
    fn unknown_fields_are_ignored_and_nulls_are_absent() {
        let request = completion(
            r#"{"prompt": "x", "user": "u1", "frobnicate": {"a": [1]}, "temperature": null,
                "stream": null, "max_tokens": 5}"#,
        );
        assert_eq!(request.sampling.temperature, None);
        assert_eq!(request.stream, None);
        assert_eq!(request.max_tokens, Some(5));
    }

    #[test]
    fn broken_json_and_wrong_types_say_which() {
        let broken = parse::<CompletionRequest>(br#"{"prompt": "x""#).unwrap_err();
        assert!(broken.body.message.contains("not valid JSON"), "{broken}");
        let wrong =
            parse::<CompletionRequest>(br#"{"prompt": "x", "temperature": "hot"}"#).unwrap_err();
        assert!(wrong.body.message.contains("schema"), "{wrong}");
        assert!(parse::<CompletionRequest>(b"[1, 2]").is_err());
    }

    #[test]
    fn stop_is_a_string_or_strings() {
        let stop = |json: &str| completion(json).sampling.stop_strings();
        assert_eq!(stop(r#"{"stop": "\n"}"#).unwrap(), vec!["\n"]);
        assert_eq!(stop(r#"{"stop": ["a", "b"]}"#).unwrap(), vec!["a", "b"]);
        assert!(stop(r#"{"stop": null}"#).unwrap().is_empty());
        assert!(stop(r#"{"stop": [1]}"#).is_err());
        assert!(stop(r#"{"stop": 1}"#).is_err());
    }

    #[test]
    fn chat_content_as_string_parts_or_null() {
        let request: ChatCompletionRequest = parse(
            br#"{"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null, "tool_calls": []}
            ]}"#,
        )
        .unwrap();
        let messages = request.messages().unwrap();
        assert_eq!(messages[0], ChatMessage::new("system", "Be brief."));
        assert_eq!(messages[1], ChatMessage::new("user", "ab"));
        assert_eq!(messages[2], ChatMessage::new("assistant", ""));

        let image: ChatCompletionRequest = parse(
            br#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}"#,
        )
        .unwrap();
        let error = image.messages().unwrap_err();
        assert_eq!(error.body.param.as_deref(), Some("messages.[0].content"));
        let empty: ChatCompletionRequest = parse(br#"{"messages": []}"#).unwrap();
        assert!(empty.messages().is_err());
    }

    #[test]
    fn tools_and_json_mode_are_refused() {
        let check = |json: &str| {
            parse::<ChatCompletionRequest>(json.as_bytes())
                .unwrap()
                .check_supported()
        };
        assert!(check(r#"{"tools": []}"#).is_ok());
        assert!(check(r#"{"response_format": {"type": "text"}}"#).is_ok());
        assert!(check(r#"{"tools": [{"type": "function"}]}"#).is_err());
        assert!(check(r#"{"response_format": {"type": "json_object"}}"#).is_err());
    }
}
