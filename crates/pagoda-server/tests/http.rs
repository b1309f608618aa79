//! The server over real HTTP on loopback, with a tiny random Llama: responses parsed by a real
//! client, streams, concurrency, disconnects, bad requests and overload.

mod common;

use std::time::{Duration, Instant};

use common::{JsonBody, TestServer};
use pagoda_server::ServerConfig;
use serde_json::{Value, json};

/// Context of the tiny model in most tests.
const CONTEXT: usize = 256;

async fn server() -> TestServer {
    TestServer::tiny(CONTEXT, ServerConfig::default()).await
}

/// A greedy completion of `prompt` of exactly `max_tokens` tokens.
fn greedy(prompt: &str, max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

fn assert_openai_error(status: u16, body: &Value, expected_status: u16, param: Option<&str>) {
    assert_eq!(status, expected_status, "{body}");
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(error.get("code").is_some(), "{body}");
    assert_eq!(error["param"].as_str(), param, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_whole_and_streamed_agree() {
    let server = server().await;
    let (status, whole) = server
        .post("/v1/completions", &greedy("Hello there", 8))
        .await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    assert!(whole["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(whole["model"], server.model_name.as_str());
    let choice = &whole["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "length");
    assert!(choice["logprobs"].is_null());
    // The byte-level tokenizer makes one token per byte.
    assert_eq!(
        whole["usage"],
        json!({"prompt_tokens": 11, "completion_tokens": 8, "total_tokens": 19})
    );
    let text = choice["text"].as_str().unwrap();

    let mut request = greedy("Hello there", 8);
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let stream = server.stream("/v1/completions", &request).await;
    assert_eq!(stream.status, 200);
    assert_eq!(stream.content_type, "text/event-stream");
    assert!(stream.done, "the stream ends with [DONE]");
    assert_eq!(stream.text(), text, "the stream carries the same text");
    assert_eq!(stream.finish_reason().as_deref(), Some("length"));
    let (last, chunks) = stream.events.split_last().unwrap();
    assert_eq!(last["choices"], json!([]), "the usage chunk has no choices");
    assert_eq!(last["usage"], whole["usage"]);
    for chunk in chunks {
        assert_eq!(chunk["object"], "text_completion");
        assert!(chunk.get("usage").is_none(), "{chunk}");
    }

    // Without include_usage no chunk carries usage.
    request["stream_options"] = Value::Null;
    let plain = server.stream("/v1/completions", &request).await;
    assert!(plain.done);
    assert_eq!(plain.text(), text);
    assert!(plain.events.iter().all(|e| e.get("usage").is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_applies_the_template_and_streams_deltas() {
    let server = server().await;
    let messages = json!([{"role": "user", "content": "hi"}]);
    let request =
        json!({"messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": true});
    let (status, whole) = server.post("/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &whole["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "length");
    // "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n": three special tokens and
    // 18 bytes.
    assert_eq!(whole["usage"]["prompt_tokens"], 21);
    assert_eq!(whole["usage"]["completion_tokens"], 6);
    let content = choice["message"]["content"].as_str().unwrap();

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let stream = server.stream("/v1/chat/completions", &streamed).await;
    assert_eq!(stream.status, 200);
    assert!(stream.done);
    let first = &stream.events[0]["choices"][0];
    assert_eq!(first["delta"], json!({"role": "assistant", "content": ""}));
    assert!(
        stream.events[1..]
            .iter()
            .all(|e| e["choices"][0]["delta"].get("role").is_none()),
        "the role comes once"
    );
    assert!(
        stream
            .events
            .iter()
            .all(|e| e["object"] == "chat.completion.chunk")
    );
    assert_eq!(stream.text(), content);
    assert_eq!(stream.finish_reason().as_deref(), Some("length"));

    // Without a token limit a chat reply may run to the end of the context.
    let unlimited = json!({"messages": messages, "temperature": 0, "ignore_eos": true});
    let (status, body) = server.post("/v1/chat/completions", &unlimited).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], CONTEXT - 21);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_match_their_unbatched_output() {
    let server = server().await;
    let prompts = ["The", "A quick fox", "1, 2, 3,", "Once upon a time"];
    let mut alone = Vec::new();
    for prompt in prompts {
        let (status, body) = server.post("/v1/completions", &greedy(prompt, 6)).await;
        assert_eq!(status, 200, "{body}");
        alone.push(body["choices"][0]["text"].as_str().unwrap().to_owned());
    }
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (client, url) = (server.client.clone(), server.url("/v1/completions"));
            let mut request = greedy(prompts[i % prompts.len()], 6);
            request["stream"] = json!(true);
            request["stream_options"] = json!({"include_usage": true});
            tokio::spawn(async move {
                let response = client.post(url).json_body(&request).send().await.unwrap();
                common::Stream::read(response).await
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("a well-formed stream"));
    }
    for (i, stream) in results.iter().enumerate() {
        assert_eq!(stream.status, 200, "request {i}");
        assert!(stream.done, "request {i} ends with [DONE]");
        assert_eq!(stream.text(), alone[i % prompts.len()], "request {i}");
        assert_eq!(
            stream.events.last().unwrap()["usage"]["completion_tokens"],
            6
        );
    }
    assert_eq!(server.metric("pagoda_server_pending_requests").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_aborts_its_request_and_frees_its_blocks() {
    // A long context, so the request is far from done when the client leaves.
    let server = TestServer::tiny(4096, ServerConfig::default()).await;
    let mut request = greedy("Tell me everything.", 4000);
    request["stream"] = json!(true);
    let mut response = server
        .client
        .post(server.url("/v1/completions"))
        .json_body(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut parser = common::EventParser::default();
    let mut events = 0;
    while events < 3 {
        let bytes = response.chunk().await.unwrap().expect("more of the stream");
        events += parser.push(&bytes).len();
    }
    assert!(server.metric("pagoda_kv_cache_usage_ratio").await > 0.0);
    assert_eq!(server.metric("pagoda_num_requests_running").await, 1.0);
    drop(response);

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = server.get("/metrics").await.text().await.unwrap();
        let usage = common::metric_value(&text, "pagoda_kv_cache_usage_ratio");
        let running = common::metric_value(&text, "pagoda_num_requests_running");
        if usage == 0.0 && running == 0.0 {
            assert_eq!(
                common::metric_value(&text, "pagoda_requests_aborted_total"),
                1.0
            );
            assert_eq!(
                common::metric_value(&text, "pagoda_requests_finished_total"),
                0.0
            );
            assert_eq!(
                common::metric_value(&text, "pagoda_server_pending_requests"),
                0.0
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blocks still held 20 s after the client left:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_400_with_an_openai_error_body() {
    let server = server().await;
    let cases: [(&str, &str, Option<&str>); 14] = [
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 2"#,
            None,
        ),
        ("/v1/completions", "not json at all", None),
        ("/v1/completions", "", None),
        ("/v1/completions", r#"{"max_tokens": 2}"#, Some("prompt")),
        ("/v1/completions", r#"{"prompt": "x", "n": 2}"#, Some("n")),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 0}"#,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "temperature": "hot"}"#,
            None,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "temperature": -1}"#,
            None,
        ),
        ("/v1/completions", r#"{"prompt": "x", "top_p": 0}"#, None),
        (
            "/v1/completions",
            r#"{"prompt": "", "max_tokens": 2}"#,
            None,
        ),
        (
            "/v1/completions",
            r#"{"prompt": [5, 320], "max_tokens": 2}"#,
            None,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "echo": true}"#,
            Some("echo"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": []}"#,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}"#,
            Some("tools"),
        ),
    ];
    for (path, body, param) in cases {
        let (status, json) = server.post_raw(path, body).await;
        assert_openai_error(status, &json, 400, param);
        assert_eq!(json["error"]["type"], "invalid_request_error", "{body}");
    }

    // Fields the server does not know are ignored.
    let mut request = greedy("x", 2);
    request["user"] = json!("someone");
    request["frobnicate"] = json!({"deep": [1, 2]});
    let (status, body) = server.post("/v1/completions", &request).await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = server.post("/v1/no/such/route", &json!({})).await;
    assert_openai_error(status, &body, 404, None);
    let wrong_method = server.get("/v1/completions").await;
    assert_eq!(wrong_method.status(), 405);
    let body: Value = serde_json::from_str(&wrong_method.text().await.unwrap()).unwrap();
    assert!(body["error"]["message"].is_string());
    // The server is still well after all that.
    assert_eq!(server.get("/health").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_prompts_and_bodies_are_refused() {
    let server = TestServer::tiny(
        CONTEXT,
        ServerConfig {
            max_body_bytes: 64 * 1024,
            ..ServerConfig::default()
        },
    )
    .await;
    let long = "y".repeat(CONTEXT + 10);
    let (status, body) = server.post("/v1/completions", &greedy(&long, 1)).await;
    assert_openai_error(status, &body, 400, None);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("266"),
        "{body}"
    );
    // The prompt fits, but not with the tokens asked for.
    let (status, body) = server
        .post("/v1/completions", &greedy(&"y".repeat(200), 100))
        .await;
    assert_openai_error(status, &body, 400, None);
    let chat = json!({"messages": [{"role": "user", "content": long}]});
    let (status, body) = server.post("/v1/chat/completions", &chat).await;
    assert_openai_error(status, &body, 400, Some("messages"));

    let huge = greedy(&"z".repeat(100 * 1024), 1);
    let (status, body) = server.post("/v1/completions", &huge).await;
    assert_openai_error(status, &body, 413, None);

    let (status, body) = server.post("/v1/completions", &greedy("fits", 4)).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_field_must_name_the_served_model_if_present() {
    let server = TestServer::tiny(
        CONTEXT,
        ServerConfig {
            model_name: Some("tiny".into()),
            ..ServerConfig::default()
        },
    )
    .await;
    let models: Value =
        serde_json::from_str(&server.get("/v1/models").await.text().await.unwrap()).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["max_model_len"], CONTEXT);

    let mut request = greedy("x", 2);
    request["model"] = json!("gpt-4");
    let (status, body) = server.post("/v1/completions", &request).await;
    assert_openai_error(status, &body, 404, Some("model"));
    assert_eq!(body["error"]["code"], "model_not_found");
    request["model"] = json!("tiny");
    let (status, body) = server.post("/v1/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "tiny");
    request["model"] = Value::Null;
    assert_eq!(server.post("/v1/completions", &request).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_pending_limit_requests_get_429_until_a_slot_frees() {
    let server = TestServer::tiny(
        1024,
        ServerConfig {
            max_pending_requests: 1,
            ..ServerConfig::default()
        },
    )
    .await;
    let mut request = greedy("busy", 900);
    request["stream"] = json!(true);
    let attempts = (0..10).map(|_| {
        let (client, url, request) = (
            server.client.clone(),
            server.url("/v1/completions"),
            request.clone(),
        );
        tokio::spawn(async move {
            let response = client.post(url).json_body(&request).send().await.unwrap();
            let status = response.status().as_u16();
            if status == 200 {
                let stream = common::Stream::read(response).await;
                assert!(stream.done);
                (status, Value::Null)
            } else {
                let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
                (status, body)
            }
        })
    });
    let mut admitted = 0;
    let mut refused = 0;
    for attempt in attempts.collect::<Vec<_>>() {
        let (status, body) = attempt.await.unwrap();
        match status {
            200 => admitted += 1,
            429 => {
                refused += 1;
                assert_openai_error(status, &body, 429, None);
                assert_eq!(body["error"]["type"], "rate_limit_error");
            }
            other => panic!("status {other}: {body}"),
        }
    }
    assert!(
        admitted >= 1 && refused >= 1,
        "{admitted} admitted, {refused} refused"
    );
    assert_eq!(
        server.metric("pagoda_server_rejected_requests_total").await,
        f64::from(refused)
    );
    // With the slot free again, the next request goes through.
    assert_eq!(
        server.post("/v1/completions", &greedy("again", 2)).await.0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_report_the_engine() {
    let server = server().await;
    let health = server.get("/health").await;
    assert_eq!(health.status(), 200);
    let (status, _) = server.post("/v1/completions", &greedy("count me", 5)).await;
    assert_eq!(status, 200);
    let metrics = server.get("/metrics").await;
    assert_eq!(metrics.status(), 200);
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = server
        .metrics_once("pagoda_requests_finished_total", 1.0)
        .await;
    for family in [
        "# TYPE pagoda_time_to_first_token_seconds histogram",
        "# TYPE pagoda_time_per_output_token_seconds histogram",
        "# TYPE pagoda_e2e_request_latency_seconds histogram",
        "# TYPE pagoda_num_requests_waiting gauge",
        "# TYPE pagoda_kv_cache_usage_ratio gauge",
        "# TYPE pagoda_preemptions_total counter",
    ] {
        assert!(text.contains(family), "{family} missing from\n{text}");
    }
    let value = |series| common::metric_value(&text, series);
    assert_eq!(value("pagoda_generation_tokens_total"), 5.0);
    assert_eq!(value("pagoda_prompt_tokens_total"), 8.0);
    assert_eq!(value("pagoda_time_to_first_token_seconds_count"), 1.0);
    assert_eq!(value("pagoda_e2e_request_latency_seconds_count"), 1.0);
    assert_eq!(value("pagoda_kv_cache_usage_ratio"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text_and_logprobs_cover_every_token() {
    let server = server().await;
    let (_, full) = server.post("/v1/completions", &greedy("abc", 24)).await;
    let text = full["choices"][0]["text"].as_str().unwrap().to_owned();
    // A stop string taken from the middle of the greedy text: the same request with it stops
    // right before its first occurrence.
    let chars: Vec<char> = text.chars().collect();
    let start = (chars.len() / 3..chars.len() - 1)
        .find(|&i| chars[i].is_ascii_graphic() && chars[i + 1].is_ascii_graphic())
        .unwrap_or_else(|| panic!("no two printable characters in a row in {text:?}"));
    let stop: String = chars[start..start + 2].iter().collect();
    let mut request = greedy("abc", 24);
    request["stop"] = json!([stop]);
    let (status, cut) = server.post("/v1/completions", &request).await;
    assert_eq!(status, 200, "{cut}");
    let expected = &text[..text.find(&stop).unwrap()];
    assert_eq!(
        cut["choices"][0]["text"], expected,
        "stop {stop:?} in {text:?}"
    );
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");

    let mut request = greedy("abc", 5);
    request["logprobs"] = json!(2);
    let (status, body) = server.post("/v1/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    let logprobs = &body["choices"][0]["logprobs"];
    assert_eq!(logprobs["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(logprobs["text_offset"].as_array().unwrap().len(), 5);
    for (top, chosen) in logprobs["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(logprobs["token_logprobs"].as_array().unwrap())
    {
        let top = top.as_object().unwrap();
        // Two alternatives with the same text (two lone bytes both read U+FFFD) share a key.
        assert!((1..=2).contains(&top.len()), "{top:?}");
        // Greedy picks the most likely token, so its logprob is the best of the top.
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!((best - chosen.as_f64().unwrap()).abs() < 1e-5);
        assert!(best <= 0.0);
    }

    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                      "temperature": 0, "ignore_eos": true, "logprobs": true, "top_logprobs": 3});
    let (status, body) = server.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 4);
    assert!(
        content
            .iter()
            .all(|t| t["top_logprobs"].as_array().unwrap().len() == 3)
    );
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}),
        )
        .await;
    assert_openai_error(status, &body, 400, Some("top_logprobs"));
}

/// The tokens of completion logprobs and their offsets, from a whole response or every
/// chunk of a stream.
fn completion_logprobs(choices: &[&Value]) -> (Vec<String>, Vec<usize>) {
    let mut tokens = Vec::new();
    let mut offsets = Vec::new();
    for choice in choices {
        let logprobs = &choice["logprobs"];
        if logprobs.is_null() {
            continue;
        }
        for token in logprobs["tokens"].as_array().unwrap() {
            tokens.push(token.as_str().unwrap().to_owned());
        }
        for offset in logprobs["text_offset"].as_array().unwrap() {
            offsets.push(offset.as_u64().unwrap() as usize);
        }
    }
    (tokens, offsets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_name_tokens_by_their_text() {
    let server = server().await;
    let specials = ["<|endoftext|>", common::IM_START, common::IM_END];
    // The random model picks byte tokens that are parts of characters or no UTF-8 at all, so
    // these checks meet partial characters as well as whole ones.
    let mut request = greedy("abc", 32);
    request["logprobs"] = json!(2);
    let (status, body) = server.post("/v1/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    let text: Vec<char> = choice["text"].as_str().unwrap().chars().collect();
    let (tokens, offsets) = completion_logprobs(&[choice]);
    assert_eq!((tokens.len(), offsets.len()), (32, 32));
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    assert!(*offsets.last().unwrap() <= text.len());
    for (token, &offset) in tokens.iter().zip(&offsets) {
        assert!(!token.starts_with("token_id:"), "{token:?}");
        if token.contains('\u{FFFD}') || specials.contains(&token.as_str()) {
            continue;
        }
        // A token that is whole characters stands in the text at its offset.
        let at: String = text[offset..].iter().take(token.chars().count()).collect();
        assert_eq!(&at, token, "offset {offset} of {tokens:?} in {text:?}");
    }
    for (top, token) in choice["logprobs"]["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&tokens)
    {
        assert!(top.get(token).is_some(), "greedy {token:?} is among {top}");
    }

    // A stream names the same tokens, its offsets running on from chunk to chunk.
    request["stream"] = json!(true);
    let stream = server.stream("/v1/completions", &request).await;
    let choices: Vec<&Value> = stream
        .events
        .iter()
        .flat_map(|e| e["choices"].as_array().unwrap())
        .collect();
    assert_eq!(completion_logprobs(&choices), (tokens, offsets));

    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32,
                      "temperature": 0, "ignore_eos": true, "logprobs": true, "top_logprobs": 2});
    let (status, body) = server.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{body}");
    let bytes = |entry: &Value| -> Vec<u8> {
        entry["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect()
    };
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    let mut text_bytes = Vec::new();
    for entry in content {
        let token = entry["token"].as_str().unwrap();
        assert_eq!(token, String::from_utf8_lossy(&bytes(entry)), "{entry}");
        if !specials.contains(&token) {
            text_bytes.extend(bytes(entry));
        }
        let top = entry["top_logprobs"].as_array().unwrap();
        assert!(top.iter().any(|alt| bytes(alt) == bytes(entry)), "{entry}");
        for alt in top {
            assert_eq!(alt["token"], *String::from_utf8_lossy(&bytes(alt)), "{alt}");
        }
    }
    // The tokens' bytes, special tokens left out, are the reply.
    assert_eq!(
        String::from_utf8_lossy(&text_bytes),
        body["choices"][0]["message"]["content"].as_str().unwrap()
    );
}
