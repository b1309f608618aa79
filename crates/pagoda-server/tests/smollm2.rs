//! SmolLM2-135M-Instruct over HTTP: the greedy completions and chat replies the server streams
//! and returns must be those Hugging Face transformers produced for the same file (the
//! reference of the engine's SmolLM2 tests), alone and all at once.
//!
//! The model is read from `PAGODA_SMOLLM2_GGUF` (`scripts/fetch-smollm2.sh` fetches it).
//! Without it this test skips, unless `PAGODA_REQUIRE_MODELS=1`, as in CI, where it must run.

mod common;

use std::path::PathBuf;

use common::TestServer;
use pagoda_engine::Engine;
use pagoda_server::ServerConfig;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Clone, Deserialize)]
struct Case {
    kind: String,
    prompt: String,
    #[serde(default)]
    messages: Vec<Value>,
    input_ids: Vec<u32>,
    greedy: Vec<u32>,
    stopped_on_eos: bool,
    completion_text: String,
}

fn model_path() -> Option<PathBuf> {
    match std::env::var_os("PAGODA_SMOLLM2_GGUF") {
        Some(path) => Some(PathBuf::from(path)),
        None if std::env::var("PAGODA_REQUIRE_MODELS").as_deref() == Ok("1") => {
            panic!("PAGODA_REQUIRE_MODELS=1 but PAGODA_SMOLLM2_GGUF is not set")
        }
        None => {
            eprintln!(
                "skipped: set PAGODA_SMOLLM2_GGUF to the SmolLM2 GGUF file (scripts/fetch-smollm2.sh)"
            );
            None
        }
    }
}

fn reference() -> Reference {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../pagoda-engine/tests/fixtures/smollm2_reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("the SmolLM2 reference"))
        .expect("a valid reference")
}

/// The request that replays `case` greedily, and its endpoint.
fn request(case: &Case, stream: bool) -> (&'static str, Value) {
    let mut body = json!({
        "max_tokens": case.greedy.len(),
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": stream},
    });
    match case.kind.as_str() {
        "raw" => {
            body["prompt"] = json!(case.prompt);
            ("/v1/completions", body)
        }
        "chat" => {
            body["messages"] = json!(case.messages);
            ("/v1/chat/completions", body)
        }
        other => panic!("unknown case kind {other}"),
    }
}

/// What the reference says the server must answer: text, finish reason and usage.
fn expected(case: &Case) -> (String, &'static str, Value) {
    // transformers counts the end-of-sequence token it stopped on; pagoda does not.
    let completion_tokens = case.greedy.len() - usize::from(case.stopped_on_eos);
    let reason = if case.stopped_on_eos {
        "stop"
    } else {
        "length"
    };
    let usage = json!({
        "prompt_tokens": case.input_ids.len(),
        "completion_tokens": completion_tokens,
        "total_tokens": case.input_ids.len() + completion_tokens,
    });
    (case.completion_text.clone(), reason, usage)
}

async fn check(server: &TestServer, case: &Case, stream: bool) {
    let (path, body) = request(case, stream);
    let (text, reason, usage) = expected(case);
    if stream {
        let stream = server.stream(path, &body).await;
        assert_eq!(stream.status, 200);
        assert!(stream.done);
        assert_eq!(stream.text(), text, "streamed reply to {:?}", case.prompt);
        assert_eq!(stream.finish_reason().as_deref(), Some(reason));
        assert_eq!(stream.events.last().unwrap()["usage"], usage);
    } else {
        let (status, whole) = server.post(path, &body).await;
        assert_eq!(status, 200, "{whole}");
        let choice = &whole["choices"][0];
        let got = choice["text"]
            .as_str()
            .or(choice["message"]["content"].as_str());
        assert_eq!(got, Some(text.as_str()), "reply to {:?}", case.prompt);
        assert_eq!(choice["finish_reason"], reason);
        assert_eq!(whole["usage"], usage);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_answers_over_http_as_transformers_does() {
    let Some(path) = model_path() else { return };
    let engine = tokio::task::spawn_blocking(move || {
        Engine::builder()
            .model(&path)
            .max_context_tokens(512)
            .build()
            .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
    })
    .await
    .unwrap();
    let server = TestServer::start(engine, ServerConfig::default(), None).await;
    let cases = reference().cases;

    // One at a time, whole and streamed.
    for case in &cases {
        check(&server, case, false).await;
        check(&server, case, true).await;
    }

    // All at once: batching must not change a greedy reply.
    let tasks: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, case)| {
            let (path, body) = request(case, i % 2 == 0);
            let (client, url) = (server.client.clone(), server.url(path));
            let case = case.clone();
            tokio::spawn(async move {
                let response = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                let (text, _, _) = expected(&case);
                if i % 2 == 0 {
                    let stream = common::Stream::read(response).await;
                    assert_eq!(stream.text(), text, "batched stream of {:?}", case.prompt);
                } else {
                    let whole: Value =
                        serde_json::from_str(&response.text().await.unwrap()).unwrap();
                    let choice = &whole["choices"][0];
                    let got = choice["text"]
                        .as_str()
                        .or(choice["message"]["content"].as_str());
                    assert_eq!(
                        got,
                        Some(text.as_str()),
                        "batched reply to {:?}",
                        case.prompt
                    );
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a batched request matches the reference");
    }
}
