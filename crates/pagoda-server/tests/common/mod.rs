//! A real server on a loopback port over a tiny random Llama (the pagoda-models fixture) with a
//! byte-level tokenizer, and a real HTTP client to talk to it.

#![allow(dead_code)] // Each test file uses a different part of this module.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pagoda_engine::Engine;
use pagoda_server::ServerConfig;
use serde_json::{Value, json};

/// The tiny random Llama of the pagoda-models parity tests: 2 layers, hidden size 64,
/// vocabulary 320.
pub fn tiny_llama_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pagoda-models/tests/fixtures/tiny-llama")
}

/// Vocabulary of the tiny model: 256 byte tokens, 3 special tokens and filler tokens up to 320.
const VOCAB_SIZE: usize = 320;
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";

/// ChatML, as SmolLM2 and many others spell it.
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A model directory: the tiny Llama's weights with its context widened to `context` positions
/// (RoPE needs no trained positions), a byte-level `tokenizer.json` and a
/// `tokenizer_config.json` with `<|im_end|>` as end of sequence and a ChatML template.
pub fn tiny_model_dir(context: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let fixture = tiny_llama_fixture();
    for entry in std::fs::read_dir(&fixture).expect("the tiny-llama fixture") {
        let path = entry.expect("a fixture file").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
            std::fs::copy(&path, dir.path().join(&name)).expect("copying a fixture file");
        }
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["vocab_size"], VOCAB_SIZE);
    config["max_position_embeddings"] = json!(context);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        tokenizer_json().to_string(),
    )
    .unwrap();
    let tokenizer_config = json!({
        "bos_token": null,
        "eos_token": IM_END,
        "add_bos_token": false,
        "chat_template": CHAT_TEMPLATE,
    });
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();
    dir
}

/// The character GPT-2's byte-level alphabet spells `byte` with.
fn byte_char(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        char::from(byte)
    } else {
        let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
        char::from_u32(256 + rank).unwrap()
    }
}

/// A byte-level BPE without merges: every byte is a token (ids 0-255), then the special
/// tokens, then two-letter fillers that only the model can produce.
fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for byte in 0..=255u8 {
        vocab.insert(byte_char(byte).to_string(), json!(byte));
    }
    let specials = ["<|endoftext|>", IM_START, IM_END];
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let id = 256 + i;
            vocab.insert((*token).to_owned(), json!(id));
            json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let letters = b'a'..=b'z';
    let fillers = letters.clone().flat_map(|a| {
        letters
            .clone()
            .map(move |b| format!("{}{}", a as char, b as char))
    });
    for (id, filler) in (vocab.len()..VOCAB_SIZE).zip(fillers) {
        vocab.insert(filler, json!(id));
    }
    assert_eq!(vocab.len(), VOCAB_SIZE);
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "vocab": vocab, "merges": [],
        }
    })
}

/// A server listening on a loopback port; stops when dropped.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub model_name: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    // Keeps the model files for as long as the server runs.
    _model_dir: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Serves the tiny model with a context of `context` tokens.
    pub async fn tiny(context: usize, config: ServerConfig) -> Self {
        let dir = tiny_model_dir(context);
        let engine = Engine::builder()
            .model(dir.path())
            .build()
            .expect("the tiny model loads");
        Self::start(engine, config, Some(dir)).await
    }

    pub async fn start(
        engine: Engine,
        config: ServerConfig,
        model_dir: Option<tempfile::TempDir>,
    ) -> Self {
        let handle = engine.spawn();
        let model_name = config
            .model_name
            .clone()
            .unwrap_or_else(|| handle.model_name().to_owned());
        let app = pagoda_server::router(handle, config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(pagoda_server::serve(listener, app, async move {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        Self {
            base,
            client,
            model_name,
            shutdown: Some(shutdown),
            _model_dir: model_dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs `body` (JSON text) to `path`; returns the status and the parsed JSON body.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("the server answers");
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path} answered {status} with non-JSON ({e}): {text}"));
        (status, json)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string()).await
    }

    /// POSTs a streaming request and reads the whole event stream.
    pub async fn stream(&self, path: &str, body: &Value) -> Stream {
        let response = self
            .client
            .post(self.url(path))
            .json_body(body)
            .send()
            .await
            .expect("the server answers");
        Stream::read(response).await
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("the server answers")
    }

    /// The `/metrics` text once `series` reads `value`. The engine publishes its metrics after
    /// each step, a moment after the step's outputs reach their streams, so a client may see a
    /// response before the metrics count it.
    pub async fn metrics_once(&self, series: &str, value: f64) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.get("/metrics").await.text().await.unwrap();
            if metric_value(&text, series) == value {
                return text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{series} is not {value} after 20 s:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The value of the `/metrics` sample whose name and labels start with `series`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        metric_value(&text, series)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// The value of the first sample in a Prometheus exposition whose series starts with `series`.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

/// Sets a JSON body without reqwest's `json` feature.
pub trait JsonBody {
    fn json_body(self, body: &Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, body: &Value) -> Self {
        self.header("content-type", "application/json")
            .body(body.to_string())
    }
}

/// A whole event stream as received.
#[derive(Debug)]
pub struct Stream {
    pub status: u16,
    pub content_type: String,
    /// The JSON of each `data:` event before `[DONE]`.
    pub events: Vec<Value>,
    /// Whether the last event was `data: [DONE]`.
    pub done: bool,
}

impl Stream {
    pub async fn read(mut response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut parser = EventParser::default();
        let mut events = Vec::new();
        let mut done = false;
        while let Some(bytes) = response.chunk().await.expect("the stream reads") {
            for data in parser.push(&bytes) {
                assert!(!done, "an event after [DONE]: {data}");
                if data == "[DONE]" {
                    done = true;
                } else {
                    events.push(
                        serde_json::from_str(&data)
                            .unwrap_or_else(|e| panic!("an event that is not JSON ({e}): {data}")),
                    );
                }
            }
        }
        assert!(parser.is_empty(), "bytes after the last event");
        Self {
            status,
            content_type,
            events,
            done,
        }
    }

    /// The text of the stream's choices, joined: `text` for completions, `delta.content`
    /// for chat.
    pub fn text(&self) -> String {
        self.events
            .iter()
            .flat_map(|e| e["choices"].as_array().cloned().unwrap_or_default())
            .map(|c| {
                c["text"]
                    .as_str()
                    .or(c["delta"]["content"].as_str())
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    }

    /// The finish reason of the stream (set on exactly one chunk).
    pub fn finish_reason(&self) -> Option<String> {
        let reasons: Vec<String> = self
            .events
            .iter()
            .flat_map(|e| e["choices"].as_array().cloned().unwrap_or_default())
            .filter_map(|c| c["finish_reason"].as_str().map(str::to_owned))
            .collect();
        assert!(reasons.len() <= 1, "finish reasons {reasons:?}");
        reasons.into_iter().next()
    }
}

/// Splits Server-Sent Events the way a browser does: events end at a blank line.
#[derive(Default)]
pub struct EventParser {
    buffer: Vec<u8>,
}

impl EventParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
            let event = String::from_utf8(self.buffer[..end].to_vec()).expect("UTF-8 events");
            self.buffer.drain(..end + 2);
            for line in event.lines() {
                let data = line
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("a line that is not `data: ...`: {line:?}"));
                events.push(data.to_owned());
            }
        }
        events
    }

    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }
}
