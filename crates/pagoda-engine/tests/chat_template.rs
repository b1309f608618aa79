//! Chat templates rendered byte for byte as transformers' `apply_chat_template(tokenize=False)`
//! renders them (fixture written by scripts/tokenizer_reference.py).

use std::path::Path;

use pagoda_engine::chat_template::{ChatMessage, ChatTemplate};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    bos_token: String,
    eos_token: String,
    templates: Vec<TemplateCases>,
}

#[derive(Deserialize)]
struct TemplateCases {
    name: String,
    source: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    messages: Vec<Message>,
    add_generation_prompt: bool,
    rendered: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

fn fixture() -> Fixture {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn templates_render_as_in_transformers() {
    let fixture = fixture();
    assert!(fixture.templates.iter().any(|t| t.name == "smollm2"));
    let mut errors = 0;
    for cases in &fixture.templates {
        let template = ChatTemplate::new(
            &cases.source,
            Some(fixture.bos_token.clone()),
            Some(fixture.eos_token.clone()),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", cases.name));
        for case in &cases.cases {
            let messages: Vec<ChatMessage> = case
                .messages
                .iter()
                .map(|m| ChatMessage::new(&m.role, &m.content))
                .collect();
            let result = template.render(&messages, case.add_generation_prompt);
            match (&case.rendered, &case.error) {
                (Some(expected), _) => {
                    let rendered = result.unwrap_or_else(|e| panic!("{}: {e}", cases.name));
                    assert_eq!(&rendered, expected, "{}", cases.name);
                }
                (None, Some(expected)) => {
                    errors += 1;
                    let message = result.expect_err(&cases.name).to_string();
                    assert!(
                        message.contains(expected.as_str()),
                        "{}: {message}",
                        cases.name
                    );
                }
                (None, None) => panic!("{}: a case with neither text nor error", cases.name),
            }
        }
    }
    assert!(
        errors > 0,
        "the fixture should include a template that raises"
    );
}

#[test]
fn chat_template_from_tokenizer_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenizer_config.json");
    let hi = [ChatMessage::new("user", "hi")];

    assert!(
        ChatTemplate::from_tokenizer_config(&config)
            .unwrap()
            .is_none()
    );

    std::fs::write(
        &config,
        r#"{"bos_token": "<s>", "eos_token": {"content": "</s>"}}"#,
    )
    .unwrap();
    assert!(
        ChatTemplate::from_tokenizer_config(&config)
            .unwrap()
            .is_none()
    );

    std::fs::write(
        &config,
        r#"{"bos_token": "<s>", "eos_token": {"content": "</s>", "special": true},
            "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}"}"#,
    )
    .unwrap();
    let template = ChatTemplate::from_tokenizer_config(&config)
        .unwrap()
        .unwrap();
    assert_eq!(template.render(&hi, false).unwrap(), "<s>hi</s>");

    std::fs::write(
        &config,
        r#"{"chat_template": [{"name": "tool_use", "template": "tools"},
                              {"name": "default", "template": "default {{ messages[0].role }}"}]}"#,
    )
    .unwrap();
    let template = ChatTemplate::from_tokenizer_config(&config)
        .unwrap()
        .unwrap();
    assert_eq!(template.render(&hi, false).unwrap(), "default user");

    std::fs::write(
        &config,
        r#"{"chat_template": [{"name": "tool_use", "template": "tools"}]}"#,
    )
    .unwrap();
    let message = ChatTemplate::from_tokenizer_config(&config)
        .unwrap_err()
        .to_string();
    assert!(message.contains("default"), "{message}");

    // A chat_template.jinja beside the config takes precedence over the config's template.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "from the file: {{ messages[0].content }}\n",
    )
    .unwrap();
    let template = ChatTemplate::from_tokenizer_config(&config)
        .unwrap()
        .unwrap();
    assert_eq!(template.render(&hi, false).unwrap(), "from the file: hi");

    std::fs::write(&config, "{ broken").unwrap();
    let message = ChatTemplate::from_tokenizer_config(&config)
        .unwrap_err()
        .to_string();
    assert!(message.contains("tokenizer_config.json"), "{message}");
}
