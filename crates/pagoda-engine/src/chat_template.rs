//! Chat templates: the Jinja templates that models ship to turn a conversation into prompt text.
//!
//! Templates are rendered the way Hugging Face transformers renders them in
//! `apply_chat_template(..., tokenize=False)` (`transformers/utils/chat_template_utils.py`):
//! `trim_blocks` and `lstrip_blocks` on, loop controls, a `raise_exception` function, the
//! conversation as `messages`, `add_generation_prompt`, the special tokens as `bos_token` and
//! `eos_token`, `tools` and `documents` as none, and Python's string and dict methods
//! (`.strip()`, `.split()`, `.startswith()`, `.items()`, ...) through minijinja's pycompat layer.

use std::path::Path;
use std::sync::Arc;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Enumerator, Object, Value};
use minijinja::{Environment, ErrorKind};
use serde_json::Value as Json;

use crate::{Error, Result};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// `"system"`, `"user"`, `"assistant"`, or whatever else the template knows.
    pub role: String,
    /// The message's text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template and the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// ChatML, the format of OpenAI's chat models, also used by Qwen and SmolLM: each message as
/// `<|im_start|>{role}\n{content}<|im_end|>\n`.
const CHATML: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

impl ChatTemplate {
    /// Compiles a template. `bos_token` and `eos_token` are the texts of those tokens, visible to
    /// the template as `bos_token` and `eos_token` (undefined when `None`).
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Template(format!("syntax configuration: {e}")))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(template_error)?;
        Ok(Self {
            env,
            source: source.to_owned(),
            bos_token,
            eos_token,
        })
    }

    /// The ChatML template, for models that ship none.
    pub fn chatml() -> Self {
        // A constant that the tests compile; failing here would be a bug in this file.
        Self::new(CHATML, None, None).expect("the built-in ChatML template compiles")
    }

    /// The chat template of a Hugging Face checkpoint: `chat_template.jinja` beside
    /// `tokenizer_config.json` if there is one (it takes precedence, as in transformers), else the
    /// config's `chat_template` (a string, or a list of named templates of which the one named
    /// `"default"` is taken). `None` when neither exists. The special tokens come from the config's
    /// `bos_token` and `eos_token`.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>> {
        let config: Option<Json> = match std::fs::read_to_string(path) {
            Ok(text) => Some(
                serde_json::from_str(&text)
                    .map_err(|e| Error::Template(format!("{}: {e}", path.display())))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::Template(format!("{}: {e}", path.display()))),
        };
        let token = |key: &str| {
            config.as_ref().and_then(|config| match config.get(key)? {
                Json::String(token) => Some(token.clone()),
                Json::Object(fields) => fields.get("content")?.as_str().map(str::to_owned),
                _ => None,
            })
        };

        let jinja = path.with_file_name("chat_template.jinja");
        let source = match std::fs::read_to_string(&jinja) {
            Ok(source) => Some(source),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match &config {
                Some(config) => template_in_config(config, path)?,
                None => None,
            },
            Err(e) => return Err(Error::Template(format!("{}: {e}", jinja.display()))),
        };
        source
            .map(|source| Self::new(&source, token("bos_token"), token("eos_token")))
            .transpose()
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders a conversation. With `add_generation_prompt`, the text ends where the assistant's
    /// reply begins. Fails on an empty conversation (as transformers does), and with the
    /// template's own message when it calls `raise_exception`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::Template(
                "cannot render an empty conversation".into(),
            ));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        let messages: Value = messages
            .iter()
            .map(|message| Value::from_object(MessageValue(message.clone())))
            .collect();
        let mut context = vec![
            ("messages", messages),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        // Absent special tokens stay undefined, as in transformers, rather than rendering "none".
        for (name, token) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
        ] {
            if let Some(token) = token {
                context.push((name, Value::from(token.as_str())));
            }
        }
        let context: std::collections::BTreeMap<&str, Value> = context.into_iter().collect();
        template
            .render(Value::from_object(context))
            .map_err(template_error)
    }
}

/// The `chat_template` entry of a `tokenizer_config.json`.
fn template_in_config(config: &Json, path: &Path) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(source)) => Ok(Some(source.clone())),
        Some(Json::Array(named)) => {
            let default = named
                .iter()
                .find(|entry| entry.get("name").and_then(Json::as_str) == Some("default"));
            match default.and_then(|entry| entry.get("template")?.as_str()) {
                Some(source) => Ok(Some(source.to_owned())),
                None => Err(Error::Template(format!(
                    "{}: chat_template lists {} named templates but none named \"default\"",
                    path.display(),
                    named.len()
                ))),
            }
        }
        Some(other) => Err(Error::Template(format!(
            "{}: chat_template should be a string or a list of named templates, not {other}",
            path.display()
        ))),
    }
}

/// What templates call to refuse a conversation (roles that do not alternate, an unknown role).
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

fn template_error(error: minijinja::Error) -> Error {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    Error::Template(message)
}

/// A message as the template sees it: a map with `role` and `content`, in that order (as the
/// Python dict that transformers passes).
#[derive(Debug)]
struct MessageValue(ChatMessage);

impl Object for MessageValue {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.as_str())),
            "content" => Some(Value::from(self.0.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_each_message_and_the_generation_prompt() {
        let messages = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ];
        let text = ChatTemplate::chatml().render(&messages, true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let text = ChatTemplate::chatml()
            .render(&messages[1..], false)
            .unwrap();
        assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn missing_special_tokens_are_undefined() {
        let template =
            ChatTemplate::new("[{{ bos_token }}|{{ eos_token is defined }}]", None, None).unwrap();
        assert_eq!(
            template
                .render(&[ChatMessage::new("user", "x")], false)
                .unwrap(),
            "[|False]"
        );
        let template = ChatTemplate::new(
            "[{{ bos_token }}|{{ eos_token }}]",
            Some("<s>".into()),
            Some("</s>".into()),
        )
        .unwrap();
        assert_eq!(
            template
                .render(&[ChatMessage::new("user", "x")], false)
                .unwrap(),
            "[<s>|</s>]"
        );
    }

    #[test]
    fn errors_are_reported() {
        let message = ChatTemplate::new("{% for %}", None, None)
            .unwrap_err()
            .to_string();
        assert!(message.contains("syntax"), "{message}");
        let template = ChatTemplate::new(
            "{{ raise_exception('no system messages, please') }}",
            None,
            None,
        )
        .unwrap();
        let message = template
            .render(&[ChatMessage::new("system", "x")], true)
            .unwrap_err()
            .to_string();
        assert!(message.contains("no system messages, please"), "{message}");
        assert!(ChatTemplate::chatml().render(&[], true).is_err());
    }
}
