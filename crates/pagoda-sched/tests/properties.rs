//! Invariants of the scheduler under random workloads, driven by a stand-in engine.

use std::collections::{HashMap, HashSet};

use pagoda_sched::{
    CountingKvSpace, FinishReason, KvSpace, NewRequest, RequestId, RequestState, SampledToken,
    Scheduler, SchedulerConfig,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// One request of a workload.
#[derive(Debug, Clone)]
struct Spec {
    /// Step at which it is added.
    arrival: usize,
    prompt: Vec<u32>,
    max_tokens: usize,
    priority: i32,
    /// Steps after arrival at which it is aborted, and whether while its step is in flight.
    abort: Option<(usize, bool)>,
    /// Output length at which the engine reports a stop.
    stop_after: Option<usize>,
}

#[derive(Debug, Clone)]
struct Workload {
    specs: Vec<Spec>,
    block_size: usize,
    num_blocks: usize,
    config: SchedulerConfig,
    prefix_caching: bool,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        0..12usize,
        0..24u32,
        vec(100..104u32, 1..24),
        1..16usize,
        0..3i32,
        proptest::option::weighted(0.2, (0..30usize, any::<bool>())),
        proptest::option::weighted(0.3, 1..16usize),
    )
        .prop_map(
            |(arrival, shared, tail, max_tokens, priority, abort, stop_after)| {
                // A common lead-in makes prefixes that a prefix cache can share.
                let prompt = (0..shared).chain(tail).collect();
                Spec {
                    arrival,
                    prompt,
                    max_tokens,
                    priority,
                    abort,
                    stop_after,
                }
            },
        )
}

fn workload() -> impl Strategy<Value = Workload> {
    (
        vec(spec(), 1..12),
        prop_oneof![Just(1usize), Just(2), Just(4), Just(16)],
        // Mostly a tight space, to force preemptions.
        prop_oneof![3 => 0..3usize, 1 => 0..40usize],
        1..6usize,
        1..48usize,
        any::<bool>(),
        0..4usize,
        any::<bool>(),
    )
        .prop_map(
            |(specs, block_size, extra_blocks, max_num_seqs, batch, chunked, watermark, prefix)| {
                let longest = |s: &Spec| s.prompt.len() + s.max_tokens;
                let max_model_len = specs.iter().map(longest).max().unwrap_or(1);
                let num_blocks = specs
                    .iter()
                    .map(|s| (longest(s) - 1).div_ceil(block_size))
                    .max()
                    .unwrap_or(1)
                    + extra_blocks;
                let config = SchedulerConfig {
                    max_num_seqs,
                    max_batch_tokens: if chunked {
                        batch
                    } else {
                        batch.max(max_model_len)
                    },
                    max_model_len,
                    watermark_blocks: watermark.min(num_blocks - 1),
                    chunked_prefill: chunked,
                };
                Workload {
                    specs,
                    block_size,
                    num_blocks,
                    config,
                    prefix_caching: prefix,
                }
            },
        )
}

/// The token the stand-in model samples for request `id` at `position`.
fn token(id: RequestId, position: usize) -> u32 {
    (id.0 as u32)
        .wrapping_mul(7919)
        .wrapping_add(position as u32)
}

#[derive(Debug, Default)]
struct Stats {
    steps: usize,
    preemptions: usize,
    cached_tokens: usize,
}

/// Runs `w` to the end, checking every invariant after each step.
fn simulate(w: &Workload) -> Result<Stats, TestCaseError> {
    let kv = if w.prefix_caching {
        CountingKvSpace::with_prefix_caching(w.num_blocks, w.block_size)
    } else {
        CountingKvSpace::new(w.num_blocks, w.block_size)
    }
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut s =
        Scheduler::new(w.config.clone(), kv).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let config = &w.config;
    let id_of = |index: usize| RequestId(index as u64 + 1);

    // Arrival order: by arrival step, then by position in the workload.
    let mut order: Vec<usize> = (0..w.specs.len()).collect();
    order.sort_by_key(|&i| w.specs[i].arrival);
    let mut arrival_rank = HashMap::new();

    let last_arrival = w.specs.iter().map(|s| s.arrival).max().unwrap_or(0);
    // The oldest running request advances by at least one token each step, and is never
    // preempted; recomputing prompt and output then decoding the rest takes at most
    // prompt + 2 * max_tokens steps.
    let bound = last_arrival
        + w.specs
            .iter()
            .map(|s| s.prompt.len() + 2 * s.max_tokens)
            .sum::<usize>()
        + 1;

    let mut outputs: HashMap<RequestId, Vec<u32>> = HashMap::new();
    let mut results: HashMap<RequestId, (FinishReason, Vec<u32>)> = HashMap::new();
    let mut admitted: HashSet<RequestId> = HashSet::new();
    let mut first_admissions: Vec<RequestId> = Vec::new();
    let mut stats = Stats::default();
    let mut next = 0;

    loop {
        while next < order.len() && w.specs[order[next]].arrival == stats.steps {
            let index = order[next];
            let spec = &w.specs[index];
            let id = id_of(index);
            s.add_request(
                NewRequest::new(id, spec.prompt.clone(), spec.max_tokens)
                    .with_priority(spec.priority),
            )
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
            arrival_rank.insert(id, next);
            outputs.insert(id, Vec::new());
            next += 1;
        }
        let aborts_now = |in_flight: bool| {
            (0..w.specs.len()).filter(move |&i| {
                w.specs[i].abort.is_some_and(|(after, mid)| {
                    mid == in_flight && w.specs[i].arrival + after == stats.steps
                })
            })
        };
        for index in aborts_now(false) {
            let id = id_of(index);
            if s.abort(id) {
                results.insert(id, (FinishReason::Aborted, outputs[&id].clone()));
            }
        }
        if next == order.len() && !s.has_unfinished() {
            break;
        }
        prop_assert!(stats.steps <= bound, "not done after {} steps", stats.steps);

        let out = s
            .schedule()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;

        // Budgets.
        let tokens: usize = out.scheduled.iter().map(|r| r.num_tokens()).sum();
        prop_assert_eq!(tokens, out.num_batched_tokens);
        prop_assert!(tokens <= config.max_batch_tokens);
        prop_assert!(out.scheduled.len() <= config.max_num_seqs);
        prop_assert!(s.num_running() <= config.max_num_seqs);
        let scheduled: HashSet<RequestId> = out.scheduled.iter().map(|r| r.id).collect();
        prop_assert_eq!(
            scheduled.len(),
            out.scheduled.len(),
            "a request scheduled twice"
        );

        for r in &out.scheduled {
            prop_assert!(r.num_tokens() > 0);
            let request = s
                .request(r.id)
                .ok_or_else(|| TestCaseError::fail("unknown id"))?;
            prop_assert_eq!(request.state(), RequestState::Running);
            prop_assert_eq!(request.num_computed_tokens(), r.start);
            prop_assert_eq!(&r.token_ids[..], &request.tokens()[r.start..r.end()]);
            prop_assert_eq!(r.produces_token, r.end() == request.num_tokens());
            prop_assert_eq!(
                request.output(),
                &outputs[&r.id][..],
                "output lost or changed"
            );
            prop_assert!(s.kv().num_held_tokens(r.id) >= r.end());
            if r.newly_admitted {
                stats.cached_tokens += r.start;
                if admitted.insert(r.id) {
                    first_admissions.push(r.id);
                }
            }
        }
        for id in &out.preempted {
            prop_assert!(
                !scheduled.contains(id),
                "{} both preempted and scheduled",
                id
            );
            let request = s
                .request(*id)
                .ok_or_else(|| TestCaseError::fail("unknown id"))?;
            prop_assert_eq!(request.state(), RequestState::Preempted);
            prop_assert_eq!(request.num_computed_tokens(), 0);
            prop_assert_eq!(request.output(), &outputs[id][..], "preemption lost output");
            prop_assert_eq!(s.kv().num_held_blocks(*id), 0);
        }
        stats.preemptions += out.preempted.len();

        for index in aborts_now(true) {
            let id = id_of(index);
            if s.abort(id) {
                results.insert(id, (FinishReason::Aborted, outputs[&id].clone()));
            }
        }

        // The stand-in engine: a token for every request whose step ends at its last token,
        // including aborted ones (the scheduler must ignore those).
        let mut samples = Vec::new();
        for r in out.scheduled.iter().filter(|r| r.produces_token) {
            let index = (r.id.0 - 1) as usize;
            let aborted = results.contains_key(&r.id);
            let output = outputs
                .get_mut(&r.id)
                .ok_or_else(|| TestCaseError::fail("no output"))?;
            let token = token(r.id, r.end());
            if !aborted {
                output.push(token);
            }
            let stopped = w.specs[index].stop_after == Some(output.len());
            samples.push(SampledToken {
                id: r.id,
                token,
                stopped,
            });
        }
        let finished = s
            .update(&samples)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (id, reason) in finished {
            let request = s
                .request(id)
                .ok_or_else(|| TestCaseError::fail("finished id gone"))?;
            prop_assert_eq!(request.state(), RequestState::Finished(reason));
            prop_assert_eq!(s.kv().num_held_blocks(id), 0);
            prop_assert!(
                results
                    .insert(id, (reason, request.output().to_vec()))
                    .is_none()
            );
        }

        // KV blocks belong to running requests only, and cover their computed tokens.
        for id in outputs.keys() {
            let Some(request) = s.request(*id) else {
                continue;
            };
            prop_assert!(request.num_computed_tokens() <= request.num_tokens());
            if request.state() == RequestState::Running {
                prop_assert!(s.kv().num_held_tokens(*id) >= request.num_computed_tokens());
            } else {
                prop_assert_eq!(s.kv().num_held_blocks(*id), 0, "{} holds blocks", id);
            }
        }
        for holder in s.kv().holders() {
            let running = s
                .request(holder)
                .is_some_and(|r| r.state() == RequestState::Running);
            prop_assert!(running, "{} holds blocks but is not running", holder);
        }
        stats.steps += 1;
    }

    // Nothing leaked.
    prop_assert_eq!(s.kv().num_free_blocks(), s.kv().num_total_blocks());
    prop_assert_eq!(s.kv().num_used_blocks(), 0);
    prop_assert_eq!(s.kv().holders().count(), 0);

    // Every request finished, for the right reason, with every token it was given once.
    for (index, spec) in w.specs.iter().enumerate() {
        let id = id_of(index);
        let (reason, output) = results
            .get(&id)
            .ok_or_else(|| TestCaseError::fail(format!("{id} never finished")))?;
        let expected: Vec<u32> = (0..output.len())
            .map(|i| token(id, spec.prompt.len() + i))
            .collect();
        prop_assert_eq!(output, &expected);
        match reason {
            FinishReason::Length => {
                prop_assert_eq!(output.len(), spec.max_tokens);
                prop_assert!(spec.stop_after.is_none_or(|n| n > spec.max_tokens));
            }
            FinishReason::Stopped => prop_assert_eq!(Some(output.len()), spec.stop_after),
            FinishReason::Aborted => prop_assert!(spec.abort.is_some()),
        }
    }

    // Among equal priorities, first admissions follow arrival order.
    for (i, a) in first_admissions.iter().enumerate() {
        for b in &first_admissions[i + 1..] {
            let (pa, pb) = (
                w.specs[(a.0 - 1) as usize].priority,
                w.specs[(b.0 - 1) as usize].priority,
            );
            if pa == pb {
                prop_assert!(
                    arrival_rank[a] < arrival_rank[b],
                    "{} admitted before {}",
                    b,
                    a
                );
            }
        }
    }
    Ok(stats)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_request_finishes_within_budgets_and_without_leaks(w in workload()) {
        simulate(&w)?;
    }
}

/// The random workloads above do reach the paths they are meant to check.
#[test]
fn a_crowded_workload_preempts_and_hits_the_prefix_cache() {
    let specs = (0..10)
        .map(|i| Spec {
            arrival: i / 3,
            prompt: (0..12).chain([100 + i as u32]).collect(),
            max_tokens: 10,
            priority: (i % 2) as i32,
            abort: (i == 4).then_some((3, true)),
            stop_after: (i == 7).then_some(5),
        })
        .collect();
    let config = SchedulerConfig {
        max_num_seqs: 6,
        max_batch_tokens: 16,
        max_model_len: 23,
        watermark_blocks: 1,
        chunked_prefill: true,
    };
    let w = Workload {
        specs,
        block_size: 4,
        num_blocks: 12,
        config,
        prefix_caching: true,
    };
    let stats = simulate(&w).unwrap();
    assert!(stats.preemptions > 0, "{stats:?}");
    assert!(stats.cached_tokens > 0, "{stats:?}");
}
