//! SmolLM2-135M-Instruct (GGUF, Q4_1) end to end: tokenization, chat template, prefill and greedy
//! decode must reproduce what Hugging Face transformers does with the same file
//! (`scripts/make_fixtures.py` wrote the reference).
//!
//! The model is read from `PAGODA_SMOLLM2_GGUF` (`scripts/fetch-smollm2.sh` fetches it). Without
//! it these tests skip, unless `PAGODA_REQUIRE_MODELS=1`, as in CI, where they must run.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use std::collections::HashMap;

use pagoda_engine::{
    ChatMessage, Completion, Engine, Error, FinishReason, Prompt, RequestId, SamplingParams,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    kind: String,
    prompt: String,
    #[serde(default)]
    messages: Vec<Message>,
    input_ids: Vec<u32>,
    greedy: Vec<u32>,
    stopped_on_eos: bool,
    completion_text: String,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
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

/// One engine for all tests of this file: loading dequantizes 135M weights.
fn engine() -> Option<&'static Mutex<Engine>> {
    static ENGINE: OnceLock<Option<Mutex<Engine>>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let path = model_path()?;
            let engine = Engine::builder()
                .model(&path)
                .max_context_tokens(512)
                .build()
                .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
            Some(Mutex::new(engine))
        })
        .as_ref()
}

fn reference() -> Reference {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/smollm2_reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams::greedy(max_tokens)
}

/// The prompt of a reference case.
fn case_prompt(case: &Case) -> Prompt {
    match case.kind.as_str() {
        "raw" => Prompt::Text(case.prompt.clone()),
        "chat" => Prompt::Chat(
            case.messages
                .iter()
                .map(|m| ChatMessage {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect(),
        ),
        other => panic!("unknown case kind {other}"),
    }
}

/// transformers keeps the end-of-sequence token in its output; pagoda stops before it.
fn expected_tokens(case: &Case) -> (Vec<u32>, FinishReason) {
    let mut expected = case.greedy.clone();
    if case.stopped_on_eos {
        expected.pop();
        (expected, FinishReason::Stop)
    } else {
        (expected, FinishReason::Length)
    }
}

/// Runs every request the engine holds to its end; returns the streamed text and the joined
/// completion of each.
fn run_to_end(engine: &mut Engine) -> HashMap<RequestId, (String, Completion)> {
    let mut done: HashMap<RequestId, (String, Completion)> = HashMap::new();
    while engine.has_unfinished() {
        for output in engine.step().unwrap() {
            let (streamed, completion) = done
                .entry(output.id)
                .or_insert_with(|| (String::new(), Completion::new(output.id)));
            streamed.push_str(&output.text_delta);
            completion.push(output);
        }
    }
    done
}

#[test]
fn greedy_continuations_match_transformers() {
    let Some(engine) = engine() else { return };
    let mut engine = engine.lock().unwrap();
    for case in reference().cases {
        let prompt = case_prompt(&case);
        if let Prompt::Chat(messages) = &prompt {
            assert_eq!(
                engine.render_chat(messages).unwrap(),
                case.prompt,
                "chat template"
            );
        }
        assert_eq!(
            engine.prompt_tokens(&prompt).unwrap(),
            case.input_ids,
            "tokens of {:?}",
            case.prompt
        );
        let id = engine
            .add_request(prompt, greedy(case.greedy.len()))
            .unwrap();
        let (streamed, out) = run_to_end(&mut engine).remove(&id).unwrap();
        let (expected, reason) = expected_tokens(&case);
        assert_eq!(out.token_ids, expected, "continuation of {:?}", case.prompt);
        assert_eq!(out.finish_reason, reason);
        assert_eq!(out.text, case.completion_text);
        assert_eq!(streamed, out.text, "the stream carries exactly the text");
    }
}

#[test]
fn every_case_at_once_matches_transformers() {
    let Some(engine) = engine() else { return };
    let mut engine = engine.lock().unwrap();
    let cases = reference().cases;
    // Twice each, so that the second copy of a prompt finds the first's blocks cached.
    let ids: Vec<(RequestId, usize)> = (0..2)
        .flat_map(|_| 0..cases.len())
        .map(|i| {
            let params = greedy(cases[i].greedy.len());
            (
                engine.add_request(case_prompt(&cases[i]), params).unwrap(),
                i,
            )
        })
        .collect();
    let mut done = run_to_end(&mut engine);
    for (id, i) in ids {
        let (_, out) = done.remove(&id).unwrap();
        let (expected, reason) = expected_tokens(&cases[i]);
        assert_eq!(
            out.token_ids, expected,
            "continuation of {:?}",
            cases[i].prompt
        );
        assert_eq!(out.finish_reason, reason);
        assert_eq!(out.text, cases[i].completion_text);
    }
    assert_eq!(engine.metrics().kv_usage, 0.0);
}

#[test]
fn a_stop_string_cuts_real_text() {
    let Some(engine) = engine() else { return };
    let mut engine = engine.lock().unwrap();
    let case = reference()
        .cases
        .into_iter()
        .find(|c| c.completion_text.chars().count() > 20)
        .expect("a case with a long completion");
    let text = &case.completion_text;
    let start = text.char_indices().nth(10).map(|(i, _)| i).unwrap();
    let end = text.char_indices().nth(14).map(|(i, _)| i).unwrap();
    let stop = text[start..end].to_owned();
    let cut = text.find(&stop).unwrap();
    let params = SamplingParams {
        stop: vec![stop.clone()],
        ..greedy(case.greedy.len())
    };
    let id = engine.add_request(case_prompt(&case), params).unwrap();
    let (streamed, out) = run_to_end(&mut engine).remove(&id).unwrap();
    assert_eq!(out.text, text[..cut], "cut before {stop:?}");
    assert_eq!(streamed, out.text);
    assert_eq!(out.finish_reason, FinishReason::Stop);
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let Some(engine) = engine() else { return };
    let mut engine = engine.lock().unwrap();
    let prompt = Prompt::Text("Once upon a time".into());
    let params = |seed| SamplingParams {
        max_tokens: 12,
        temperature: 0.9,
        top_k: 50,
        top_p: 0.95,
        seed: Some(seed),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let mut generate = |seed| {
        engine
            .generate(vec![prompt.clone()], &params(seed))
            .unwrap()
            .remove(0)
            .token_ids
    };
    let a = generate(7);
    assert_eq!(a, generate(7));
    assert_eq!(a.len(), 12);
    let others: Vec<Vec<u32>> = (8..12).map(&mut generate).collect();
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds should not all agree"
    );
}

#[test]
fn bad_requests_are_refused_with_a_reason() {
    let Some(engine) = engine() else { return };
    let mut engine = engine.lock().unwrap();
    let mut refused =
        |prompt: Prompt, params: SamplingParams| match engine.add_request(prompt, params) {
            Err(Error::InvalidRequest(message)) => message,
            other => panic!("not refused as invalid: {other:?}"),
        };
    assert!(refused(Prompt::Text(String::new()), greedy(4)).contains("empty"));
    let message = refused(Prompt::Tokens(vec![504; 600]), greedy(4));
    assert!(
        message.contains("600") && message.contains("512"),
        "{message}"
    );
    refused(Prompt::Tokens(vec![504; 500]), greedy(13));
    refused(Prompt::Tokens(vec![49_152]), greedy(4));
    let prompt = Prompt::Text("Hello".into());
    refused(prompt.clone(), greedy(0));
    for params in [
        SamplingParams {
            temperature: -1.0,
            ..greedy(4)
        },
        SamplingParams {
            temperature: f32::NAN,
            ..greedy(4)
        },
        SamplingParams {
            top_p: 0.0,
            ..greedy(4)
        },
        SamplingParams {
            top_p: 1.5,
            ..greedy(4)
        },
        SamplingParams {
            min_p: 2.0,
            ..greedy(4)
        },
    ] {
        refused(prompt.clone(), params);
    }

    // Refused and finished requests leave no blocks behind: a prompt filling the whole context
    // still fits afterwards.
    let full = Prompt::Tokens(vec![504; 511]);
    let out = engine.generate(vec![full], &greedy(1)).unwrap().remove(0);
    assert_eq!(
        out.token_ids.len() + usize::from(out.finish_reason == FinishReason::Stop),
        1
    );
}
