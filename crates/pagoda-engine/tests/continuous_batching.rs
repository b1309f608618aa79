//! The engine serving many requests at once on the tiny random-weight models: outputs must not
//! depend on the batch, on preemption or on chunking; stop conditions, aborts, seeds, streaming
//! and refusals must behave as documented.

mod support;

use std::collections::HashMap;

use pagoda_engine::{
    Completion, Engine, Error, FinishReason, Prompt, RequestId, RequestOutput, SamplingParams,
};
use support::{EOS, TINY_LLAMA_BLOCK_BYTES, prompt, tiny_gpt_neox, tiny_llama};

/// Steps until every request has finished; returns each request's outputs in order.
fn run_to_end(engine: &mut Engine) -> HashMap<RequestId, Vec<RequestOutput>> {
    let mut outputs: HashMap<RequestId, Vec<RequestOutput>> = HashMap::new();
    while engine.has_unfinished() {
        for output in engine.step().expect("a step") {
            outputs.entry(output.id).or_default().push(output);
        }
    }
    outputs
}

fn join(id: RequestId, outputs: &[RequestOutput]) -> Completion {
    let mut completion = Completion::new(id);
    for output in outputs {
        completion.push(output.clone());
    }
    completion
}

/// 64 prompts of 1 to 100 tokens, a third of them starting with a shared 40-token prefix, each
/// with its own output length.
fn mixed_requests() -> Vec<(Vec<u32>, SamplingParams)> {
    let shared = prompt(999, 40, 320);
    (0..64u64)
        .map(|i| {
            let len = 1 + (i as usize * 37) % 100;
            let mut ids = prompt(i, len, 320);
            if i % 3 == 0 && len > 40 {
                ids[..40].copy_from_slice(&shared);
            }
            let params = SamplingParams {
                max_tokens: 1 + (i as usize * 7) % 24,
                ignore_eos: true,
                logprobs: Some(3),
                ..SamplingParams::default()
            };
            (ids, params)
        })
        .collect()
}

/// Runs each request alone, one after another, on `engine`.
fn alone(engine: &mut Engine, requests: &[(Vec<u32>, SamplingParams)]) -> Vec<Completion> {
    requests
        .iter()
        .map(|(ids, params)| {
            engine
                .generate(vec![Prompt::Tokens(ids.clone())], params)
                .expect("generation")
                .remove(0)
        })
        .collect()
}

/// Adds every request at once and runs them together.
fn together(engine: &mut Engine, requests: &[(Vec<u32>, SamplingParams)]) -> Vec<Completion> {
    let ids: Vec<RequestId> = requests
        .iter()
        .map(|(ids, params)| {
            engine
                .add_request(Prompt::Tokens(ids.clone()), params.clone())
                .expect("accepted")
        })
        .collect();
    let outputs = run_to_end(engine);
    ids.iter().map(|id| join(*id, &outputs[id])).collect()
}

/// A token, its logprob and its top alternatives, as bits.
type LogprobBits = (u32, u32, Vec<(u32, u32)>);

/// Token ids, text, finish reason and the exact bits of every logprob.
fn assert_same(expected: &[Completion], actual: &[Completion]) {
    assert_eq!(expected.len(), actual.len());
    for (i, (e, a)) in expected.iter().zip(actual).enumerate() {
        assert_eq!(e.token_ids, a.token_ids, "request {i}: tokens");
        assert_eq!(e.text, a.text, "request {i}: text");
        assert_eq!(
            e.finish_reason, a.finish_reason,
            "request {i}: finish reason"
        );
        assert_eq!(
            e.prompt_tokens, a.prompt_tokens,
            "request {i}: prompt tokens"
        );
        let bits = |c: &Completion| -> Vec<LogprobBits> {
            c.logprobs
                .iter()
                .map(|l| {
                    let top = l.top.iter().map(|&(t, p)| (t, p.to_bits())).collect();
                    (l.token, l.logprob.to_bits(), top)
                })
                .collect()
        };
        assert_eq!(
            bits(e),
            bits(a),
            "request {i}: logprobs differ in their bits"
        );
    }
}

#[test]
fn greedy_outputs_do_not_depend_on_the_batch() {
    let requests = mixed_requests();
    let mut engine = tiny_llama()
        .max_batch_tokens(96)
        .max_num_seqs(64)
        .build()
        .expect("engine");
    let single = alone(&mut engine, &requests);
    for (completion, (_, params)) in single.iter().zip(&requests) {
        assert_eq!(completion.token_ids.len(), params.max_tokens);
        assert_eq!(completion.finish_reason, FinishReason::Length);
        assert_eq!(completion.logprobs.len(), params.max_tokens);
    }
    let batched = together(&mut engine, &requests);
    assert_same(&single, &batched);
    let metrics = engine.metrics();
    assert!(
        metrics.prefix_cache_hit_rate > 0.0,
        "the shared prefix is reused"
    );
    assert_eq!(metrics.requests_finished_total, 128);
    assert_eq!(metrics.kv_usage, 0.0, "every block is back");

    // Without prefix caching, and on the other architecture, likewise.
    let mut engine = tiny_gpt_neox()
        .max_batch_tokens(50)
        .prefix_caching(false)
        .build()
        .expect("engine");
    let requests: Vec<_> = mixed_requests()
        .into_iter()
        .step_by(3)
        .map(|(ids, params)| (ids.into_iter().map(|t| t % 256).collect(), params))
        .collect();
    let single = alone(&mut engine, &requests);
    assert_same(&single, &together(&mut engine, &requests));
    assert_eq!(engine.metrics().prefix_cache_hit_rate, 0.0);
}

#[test]
fn preempted_requests_are_recomputed_without_loss() {
    let requests: Vec<_> = (0..12u64)
        .map(|i| {
            let params = SamplingParams {
                max_tokens: 30 + i as usize,
                ignore_eos: true,
                logprobs: Some(1),
                ..SamplingParams::default()
            };
            (prompt(100 + i, 20 + 5 * i as usize, 320), params)
        })
        .collect();
    let mut roomy = tiny_llama().build().expect("engine");
    let expected = together(&mut roomy, &requests);
    assert_eq!(roomy.metrics().preemptions_total, 0);

    // 10 blocks: the longest request (85 prompt + 41 output tokens) needs 8 on its own.
    let mut tight = tiny_llama()
        .kv_cache_memory(10 * TINY_LLAMA_BLOCK_BYTES)
        .build()
        .expect("engine");
    let preempted = together(&mut tight, &requests);
    let metrics = tight.metrics();
    assert!(
        metrics.preemptions_total > 0,
        "the budget forces preemption"
    );
    assert_same(&expected, &preempted);
    assert_eq!(metrics.kv_usage, 0.0);
    assert_eq!(metrics.num_preempted, 0);
}

#[test]
fn a_budget_too_small_for_one_sequence_is_refused() {
    let err = tiny_llama()
        .kv_cache_memory(7 * TINY_LLAMA_BLOCK_BYTES)
        .build()
        .err()
        .expect("8 blocks are needed for 128 positions");
    assert!(matches!(err, Error::Config(_)), "{err}");
    assert!(err.to_string().contains("max_context_tokens"), "{err}");
    tiny_llama()
        .kv_cache_memory(7 * TINY_LLAMA_BLOCK_BYTES)
        .max_context_tokens(112)
        .build()
        .expect("7 blocks hold 112 tokens");
}

/// The greedy completion of `ids` without stop conditions.
fn greedy(engine: &mut Engine, ids: &[u32], max_tokens: usize) -> Completion {
    let params = SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    engine
        .generate(vec![Prompt::Tokens(ids.to_vec())], &params)
        .expect("generation")
        .remove(0)
}

#[test]
fn stop_strings_spanning_tokens_end_the_text_before_them() {
    let mut engine = tiny_llama().build().expect("engine");
    let mut checked = 0;
    for seed in 0..8 {
        let ids = prompt(seed, 12, 320);
        let full = greedy(&mut engine, &ids, 40);
        let text = &full.text;
        // Three characters starting half way: every token spells one or two, so the stop
        // string spans at least two tokens.
        let Some(stop) = text.get(text.len() / 2..text.len() / 2 + 3) else {
            continue;
        };
        let cut = text.find(stop).expect("the stop string is in the text");
        let params = SamplingParams {
            max_tokens: 40,
            ignore_eos: true,
            stop: vec!["never there\u{1}".into(), stop.to_owned()],
            ..SamplingParams::default()
        };
        let id = engine
            .add_request(Prompt::Tokens(ids.clone()), params)
            .expect("accepted");
        let outputs = run_to_end(&mut engine).remove(&id).expect("outputs");
        let stopped = join(id, &outputs);
        assert_eq!(
            stopped.text,
            text[..cut],
            "seed {seed}: text before {stop:?}"
        );
        assert_eq!(stopped.finish_reason, FinishReason::Stop);
        // The token that completed the stop string is the last one; it stays in the ids.
        assert!(stopped.token_ids.len() < full.token_ids.len());
        assert_eq!(stopped.token_ids, full.token_ids[..stopped.token_ids.len()]);
        let spelled: String = engine
            .tokenizer()
            .decode(&stopped.token_ids, true)
            .expect("decoding");
        assert!(spelled.contains(stop), "the last token completes {stop:?}");
        // No delta ever carried part of the stop string past the cut.
        let mut streamed = String::new();
        for output in &outputs {
            streamed.push_str(&output.text_delta);
            assert!(text[..cut].starts_with(&streamed), "{streamed:?}");
        }
        checked += 1;
    }
    assert!(checked >= 6, "most seeds give a long enough text");
}

#[test]
fn streamed_deltas_make_the_decoded_text() {
    let mut engine = tiny_llama().build().expect("engine");
    let params = SamplingParams {
        max_tokens: 30,
        temperature: 0.8,
        seed: Some(3),
        ..SamplingParams::default()
    };
    let ids: Vec<RequestId> = (0..4)
        .map(|i| {
            engine
                .add_request(
                    Prompt::Text(format!("story {i}: once upon a time")),
                    params.clone(),
                )
                .expect("accepted")
        })
        .collect();
    let outputs = run_to_end(&mut engine);
    for id in ids {
        let outputs = &outputs[&id];
        let completion = join(id, outputs);
        let decoded = engine
            .tokenizer()
            .decode(&completion.token_ids, true)
            .expect("decoding");
        assert_eq!(completion.text, decoded);
        assert_eq!(
            outputs.iter().filter(|o| o.finish_reason.is_some()).count(),
            1,
            "one last output"
        );
        assert!(outputs.last().is_some_and(RequestOutput::is_finished));
        let counts: Vec<usize> = outputs.iter().map(|o| o.completion_tokens).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(counts.last(), Some(&completion.token_ids.len()));
        assert!(completion.token_ids.iter().all(|&t| t != EOS));
        if completion.finish_reason == FinishReason::Length {
            assert_eq!(completion.token_ids.len(), 30);
        }
    }
}

#[test]
fn stop_tokens_and_end_of_sequence_end_requests_without_appearing() {
    let mut engine = tiny_llama().build().expect("engine");
    let ids = prompt(42, 10, 320);
    let full = greedy(&mut engine, &ids, 20);
    let stop_at = 6;
    let stop_token = full.token_ids[stop_at];
    let first = full
        .token_ids
        .iter()
        .position(|&t| t == stop_token)
        .expect("present");
    let params = SamplingParams {
        max_tokens: 20,
        stop_token_ids: vec![stop_token],
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let out = engine
        .generate(vec![Prompt::Tokens(ids.clone())], &params)
        .expect("generation")
        .remove(0);
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.token_ids, full.token_ids[..first]);

    // Without ignore_eos, end-of-sequence ends a request (after what came before it) and is
    // not part of the output.
    let with_eos = SamplingParams::greedy(60);
    let mut ended_by_eos = 0;
    for seed in 0..16 {
        let ids = prompt(seed, 6, 320);
        let full = greedy(&mut engine, &ids, 60);
        let out = engine
            .generate(vec![Prompt::Tokens(ids)], &with_eos)
            .expect("generation")
            .remove(0);
        match full.token_ids.iter().position(|&t| t == EOS) {
            Some(at) => {
                assert_eq!(out.token_ids, full.token_ids[..at]);
                assert_eq!(out.finish_reason, FinishReason::Stop);
                ended_by_eos += 1;
            }
            None => assert_eq!(out.token_ids, full.token_ids),
        }
    }
    assert!(
        ended_by_eos > 0,
        "some greedy continuation reaches end-of-sequence"
    );
}

#[test]
fn max_tokens_bounds_the_output() {
    let mut engine = tiny_gpt_neox().build().expect("engine");
    for max_tokens in [1, 2, 17] {
        let out = greedy(&mut engine, &prompt(5, 9, 256), max_tokens);
        assert_eq!(out.token_ids.len(), max_tokens);
        assert_eq!(out.finish_reason, FinishReason::Length);
        assert_eq!(out.prompt_tokens, 9);
    }
}

#[test]
fn aborting_frees_blocks_at_once() {
    let mut engine = tiny_llama().max_batch_tokens(32).build().expect("engine");
    let params = SamplingParams {
        max_tokens: 20,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let long = engine
        .add_request(Prompt::Tokens(prompt(1, 90, 320)), params.clone())
        .expect("accepted");
    let other = engine
        .add_request(Prompt::Tokens(prompt(2, 10, 320)), params.clone())
        .expect("accepted");
    // The first step prefills 32 of the long prompt's tokens: 2 blocks of 16.
    assert!(engine.step().expect("a step").is_empty());
    let held = engine.metrics().kv_usage;
    assert!(held > 0.0);
    assert!(engine.abort(long));
    assert!(!engine.abort(long), "already aborted");
    assert!(!engine.abort(RequestId(12345)));
    let metrics = engine.metrics();
    assert_eq!(
        metrics.kv_usage, 0.0,
        "its blocks are free before the next step"
    );
    assert_eq!(metrics.requests_aborted_total, 1);
    assert_eq!(metrics.num_running + metrics.num_waiting, 1);

    let outputs = run_to_end(&mut engine);
    let last = outputs[&long].last().expect("the aborted request reports");
    assert_eq!(last.finish_reason, Some(FinishReason::Abort));
    assert!(last.token_ids_delta.is_empty());
    assert_eq!(outputs[&long].len(), 1);
    assert_eq!(join(other, &outputs[&other]).token_ids.len(), 20);
    let metrics = engine.metrics();
    assert_eq!(metrics.requests_finished_total, 1);
    assert_eq!(metrics.kv_usage, 0.0);
}

#[test]
fn seeded_sampling_is_reproducible_in_any_batch() {
    let mut engine = tiny_llama().build().expect("engine");
    let sampled = |seed| SamplingParams {
        temperature: 1.0,
        top_k: 50,
        top_p: 0.95,
        repetition_penalty: 1.1,
        frequency_penalty: 0.2,
        seed: Some(seed),
        max_tokens: 24,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let ids = prompt(77, 15, 320);
    let request = vec![(ids.clone(), sampled(7))];
    let single = alone(&mut engine, &request);
    let mut crowd: Vec<_> = (0..10)
        .map(|i| (prompt(i, 5 + 3 * i as usize, 320), sampled(i)))
        .collect();
    crowd.insert(4, (ids.clone(), sampled(7)));
    let batched = together(&mut engine, &crowd);
    assert_eq!(single[0].token_ids, batched[4].token_ids);
    assert_eq!(single[0].text, batched[4].text);
    let reseeded = alone(&mut engine, &[(ids, sampled(8))]);
    assert_ne!(single[0].token_ids, reseeded[0].token_ids);
}

#[test]
fn invalid_requests_are_refused_with_typed_errors() {
    let mut engine = tiny_llama().build().expect("engine");
    let ok = SamplingParams::greedy(4);
    let refused = |engine: &mut Engine, prompt: Prompt, params: SamplingParams| match engine
        .add_request(prompt, params)
    {
        Err(Error::InvalidRequest(message)) => message,
        other => panic!("accepted or failed otherwise: {other:?}"),
    };
    let message = refused(&mut engine, Prompt::Tokens(vec![]), ok.clone());
    assert!(message.contains("empty"), "{message}");
    let message = refused(&mut engine, Prompt::Text(String::new()), ok.clone());
    assert!(message.contains("empty"), "{message}");
    let message = refused(&mut engine, Prompt::Tokens(vec![5; 125]), ok.clone());
    assert!(
        message.contains("125") && message.contains("128"),
        "{message}"
    );
    refused(&mut engine, Prompt::Tokens(vec![320]), ok.clone());
    let bad_values = [
        SamplingParams::greedy(0),
        SamplingParams {
            temperature: f32::NAN,
            ..ok.clone()
        },
        SamplingParams {
            top_p: 1.5,
            ..ok.clone()
        },
        SamplingParams {
            repetition_penalty: -1.0,
            ..ok.clone()
        },
        SamplingParams {
            frequency_penalty: 2.5,
            ..ok.clone()
        },
        SamplingParams {
            logprobs: Some(21),
            ..ok.clone()
        },
        SamplingParams {
            stop: vec![String::new()],
            ..ok.clone()
        },
        SamplingParams {
            stop_token_ids: vec![1000],
            ..ok.clone()
        },
    ];
    for params in bad_values {
        refused(&mut engine, Prompt::Tokens(vec![5; 3]), params);
    }
    let metrics = engine.metrics();
    assert_eq!((metrics.num_waiting, metrics.prompt_tokens_total), (0, 0));
    assert!(!engine.has_unfinished());
    // At the limit exactly is fine.
    engine
        .add_request(Prompt::Tokens(vec![5; 124]), ok)
        .expect("124 + 4 tokens fit 128");
}

#[test]
fn metrics_count_tokens_and_latencies() {
    let mut engine = tiny_llama().build().expect("engine");
    let params = SamplingParams {
        max_tokens: 6,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let prompts = (0..3).map(|i| Prompt::Tokens(prompt(i, 8, 320))).collect();
    engine.generate(prompts, &params).expect("generation");
    let metrics = engine.metrics();
    assert_eq!(metrics.prompt_tokens_total, 24);
    assert_eq!(metrics.generation_tokens_total, 18);
    assert_eq!(metrics.requests_finished_total, 3);
    assert_eq!(metrics.time_to_first_token.count, 3);
    assert_eq!(metrics.queue_time.count, 3);
    assert_eq!(metrics.e2e_latency.count, 3);
    assert_eq!(metrics.time_per_output_token.count, 15);
    let last = metrics.e2e_latency.buckets.last().expect("a +inf bucket");
    assert_eq!(*last, (f64::INFINITY, 3));
    assert_eq!((metrics.num_running, metrics.num_waiting), (0, 0));
    assert_eq!(metrics.step_errors_total, 0);
}
