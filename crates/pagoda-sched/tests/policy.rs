//! The scheduling rules, one at a time, on small hand-checked cases.

use pagoda_sched::{
    CountingKvSpace, Error, FinishReason, KvSpace, NewRequest, RequestId, RequestState,
    SampledToken, Scheduler, SchedulerConfig, SchedulerOutput,
};

type Sched = Scheduler<CountingKvSpace>;

fn config(max_model_len: usize, max_num_seqs: usize, max_batch_tokens: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs,
        max_batch_tokens,
        ..SchedulerConfig::new(max_model_len)
    }
}

fn scheduler(config: SchedulerConfig, num_blocks: usize, block_size: usize) -> Sched {
    Scheduler::new(
        config,
        CountingKvSpace::new(num_blocks, block_size).unwrap(),
    )
    .unwrap()
}

fn add(s: &mut Sched, id: u64, prompt_len: usize, max_tokens: usize) {
    add_with_priority(s, id, prompt_len, max_tokens, 0);
}

fn add_with_priority(s: &mut Sched, id: u64, prompt_len: usize, max_tokens: usize, priority: i32) {
    let prompt = (0..prompt_len as u32).map(|t| t + 10 * id as u32).collect();
    s.add_request(NewRequest::new(RequestId(id), prompt, max_tokens).with_priority(priority))
        .unwrap();
}

/// The token the stand-in model samples for request `id` at `position`.
fn token(id: RequestId, position: usize) -> u32 {
    (id.0 * 1000) as u32 + position as u32
}

/// Schedules a step, samples a token for every request that produces one (reporting a stop for
/// those in `stops`), and updates.
fn step_with_stops(
    s: &mut Sched,
    stops: &[u64],
) -> (SchedulerOutput, Vec<(RequestId, FinishReason)>) {
    let out = s.schedule().unwrap();
    let samples: Vec<SampledToken> = out
        .scheduled
        .iter()
        .filter(|r| r.produces_token)
        .map(|r| SampledToken {
            id: r.id,
            token: token(r.id, r.end()),
            stopped: stops.contains(&r.id.0),
        })
        .collect();
    let finished = s.update(&samples).unwrap();
    (out, finished)
}

fn step(s: &mut Sched) -> (SchedulerOutput, Vec<(RequestId, FinishReason)>) {
    step_with_stops(s, &[])
}

/// `(id, start, tokens, produces_token)` of every scheduled request.
fn plan(out: &SchedulerOutput) -> Vec<(u64, usize, usize, bool)> {
    out.scheduled
        .iter()
        .map(|r| (r.id.0, r.start, r.num_tokens(), r.produces_token))
        .collect()
}

fn ids(out: &SchedulerOutput) -> Vec<u64> {
    out.scheduled.iter().map(|r| r.id.0).collect()
}

#[test]
fn chunked_prefill_takes_what_the_decodes_leave() {
    let mut s = scheduler(config(64, 8, 8), 100, 4);
    add(&mut s, 1, 3, 10);
    assert_eq!(plan(&step(&mut s).0), [(1, 0, 3, true)]);
    add(&mut s, 2, 20, 2);
    let (out, _) = step(&mut s);
    assert_eq!(plan(&out), [(1, 3, 1, true), (2, 0, 7, false)]);
    assert_eq!(out.num_batched_tokens, 8);
    assert_eq!(plan(&step(&mut s).0), [(1, 4, 1, true), (2, 7, 7, false)]);
    assert_eq!(plan(&step(&mut s).0), [(1, 5, 1, true), (2, 14, 6, true)]);
    let (out, finished) = step(&mut s);
    assert_eq!(plan(&out), [(1, 6, 1, true), (2, 20, 1, true)]);
    assert_eq!(finished, [(RequestId(2), FinishReason::Length)]);
    // The chunks carry the prompt's tokens in order.
    let request = s.request(RequestId(2)).unwrap();
    assert_eq!(
        request.output(),
        [token(RequestId(2), 20), token(RequestId(2), 21)]
    );
}

#[test]
fn chunks_carry_the_right_tokens() {
    let mut s = scheduler(config(64, 8, 5), 100, 4);
    add(&mut s, 3, 12, 1);
    let mut seen = Vec::new();
    while s.has_unfinished() {
        let (out, _) = step(&mut s);
        for r in &out.scheduled {
            assert_eq!(r.start, seen.len());
            seen.extend_from_slice(&r.token_ids);
        }
    }
    assert_eq!(seen, (30..42).collect::<Vec<u32>>());
}

#[test]
fn without_chunking_a_prompt_waits_for_a_step_with_room_and_blocks_the_queue() {
    let mut config = config(16, 8, 16);
    config.chunked_prefill = false;
    let mut s = scheduler(config, 100, 4);
    add(&mut s, 1, 1, 3);
    add(&mut s, 2, 1, 3);
    assert_eq!(plan(&step(&mut s).0), [(1, 0, 1, true), (2, 0, 1, true)]);
    add(&mut s, 3, 15, 1);
    add(&mut s, 4, 1, 1);
    // 14 tokens left after the decodes: request 3 does not fit whole, and 4 may not overtake it.
    assert_eq!(ids(&step(&mut s).0), [1, 2]);
    let (out, finished) = step(&mut s);
    assert_eq!(ids(&out), [1, 2]);
    assert_eq!(finished.len(), 2);
    assert_eq!(plan(&step(&mut s).0), [(3, 0, 15, true), (4, 0, 1, true)]);
}

#[test]
fn the_most_recently_admitted_request_is_preempted_and_keeps_its_output() {
    // Blocks of 2 tokens; each request needs up to 11 slots = 6 blocks, which is the whole space.
    let mut s = scheduler(config(12, 8, 64), 6, 2);
    for id in 1..=3 {
        add(&mut s, id, 2, 10);
    }
    for _ in 0..3 {
        let (out, _) = step(&mut s);
        assert_eq!(ids(&out), [1, 2, 3]);
        assert!(out.preempted.is_empty());
    }
    let output_of_3 = s.request(RequestId(3)).unwrap().output().to_vec();
    assert_eq!(output_of_3.len(), 3);

    // Request 1 needs a third block: request 3 goes; request 2 then fits in what 3 released.
    let (out, _) = step(&mut s);
    assert_eq!(out.preempted, [RequestId(3)]);
    assert_eq!(ids(&out), [1, 2]);
    let preempted = s.request(RequestId(3)).unwrap();
    assert_eq!(preempted.state(), RequestState::Preempted);
    assert_eq!(preempted.output(), output_of_3);
    assert_eq!(preempted.num_computed_tokens(), 0);
    assert_eq!(s.kv().num_held_blocks(RequestId(3)), 0);

    let mut preemptions = vec![RequestId(3)];
    let mut readmissions = Vec::new();
    while s.has_unfinished() {
        let (out, _) = step(&mut s);
        preemptions.extend(&out.preempted);
        for r in out.scheduled.iter().filter(|r| r.newly_admitted) {
            let request = s.request(r.id).unwrap();
            // Recomputes prompt and output so far, and samples only once caught up.
            assert_eq!(r.start, 0);
            assert_eq!(
                r.token_ids.len(),
                request.num_tokens() - 1 + usize::from(!r.produces_token)
            );
            readmissions.push(r.id);
        }
    }
    assert!(
        !preemptions.contains(&RequestId(1)),
        "the oldest request is never preempted"
    );
    assert_eq!(preemptions[..2], [RequestId(3), RequestId(2)]);
    assert!(!readmissions.is_empty());
    assert_eq!(s.kv().num_free_blocks(), 6);
}

#[test]
fn a_readmitted_request_emits_nothing_until_it_has_caught_up() {
    let mut s = scheduler(config(12, 8, 64), 6, 2);
    for id in 1..=3 {
        add(&mut s, id, 2, 10);
    }
    for _ in 0..4 {
        step(&mut s);
    }
    assert_eq!(
        s.request(RequestId(3)).unwrap().state(),
        RequestState::Preempted
    );
    let kept = s.request(RequestId(3)).unwrap().tokens().to_vec();
    // Run until request 3 is readmitted; its first step recomputes every token it had.
    let readmitted = loop {
        let (out, _) = step(&mut s);
        if let Some(r) = out.scheduled.iter().find(|r| r.id == RequestId(3)) {
            break r.clone();
        }
    };
    assert!(readmitted.newly_admitted);
    assert_eq!(readmitted.token_ids, kept);
    assert!(readmitted.produces_token);
    let output = s.request(RequestId(3)).unwrap().output().to_vec();
    let expected: Vec<u32> = (2..2 + output.len())
        .map(|p| token(RequestId(3), p))
        .collect();
    assert_eq!(output, expected);
}

#[test]
fn a_chunked_readmission_samples_only_at_its_last_chunk() {
    let mut s = scheduler(config(12, 8, 3), 6, 2);
    for id in 1..=3 {
        add(&mut s, id, 2, 10);
    }
    let mut preempted = false;
    while s.has_unfinished() {
        let (out, _) = step(&mut s);
        preempted |= !out.preempted.is_empty();
        for r in &out.scheduled {
            let request = s.request(r.id).unwrap();
            // After update the request's tokens end at the sampled token.
            if r.produces_token {
                assert_eq!(r.end() + 1, request.num_tokens());
            } else {
                assert!(r.end() < request.num_tokens());
            }
        }
    }
    assert!(preempted);
}

#[test]
fn a_request_that_cannot_grow_and_is_the_newest_preempts_itself() {
    let mut s = scheduler(config(5, 8, 64), 3, 2);
    add(&mut s, 1, 2, 3);
    add(&mut s, 2, 2, 3);
    assert_eq!(ids(&step(&mut s).0), [1, 2]);
    let (out, _) = step(&mut s);
    assert_eq!(ids(&out), [1]);
    assert_eq!(out.preempted, [RequestId(2)]);
    // Request 1 finishes; request 2 comes back with prompt and its one output token.
    let (_, finished) = step(&mut s);
    assert_eq!(finished, [(RequestId(1), FinishReason::Length)]);
    let (out, _) = step(&mut s);
    assert_eq!(plan(&out), [(2, 0, 3, true)]);
    assert!(out.scheduled[0].newly_admitted);
}

#[test]
fn admission_keeps_the_watermark_free() {
    let mut config = config(64, 8, 64);
    config.watermark_blocks = 3;
    let mut s = scheduler(config, 10, 4);
    add(&mut s, 1, 16, 1); // 4 blocks
    add(&mut s, 2, 12, 1); // 3 blocks: leaves exactly 3
    add(&mut s, 3, 4, 1); // 1 block: would leave 2
    add(&mut s, 4, 1, 1); // fits, but may not overtake request 3
    let (out, _) = step(&mut s);
    assert_eq!(ids(&out), [1, 2]);
    assert_eq!(s.num_waiting(), 2);
    assert_eq!(ids(&step(&mut s).0), [3, 4]);
}

#[test]
fn the_watermark_is_waived_while_nothing_runs() {
    let mut config = config(64, 8, 64);
    config.watermark_blocks = 3;
    let mut s = scheduler(config, 10, 4);
    add(&mut s, 1, 36, 1); // 9 blocks: leaves 1 < 3
    add(&mut s, 2, 1, 1);
    assert_eq!(ids(&step(&mut s).0), [1]);
    assert_eq!(ids(&step(&mut s).0), [2]);
}

#[test]
fn lower_priority_values_go_first_and_ties_go_by_arrival() {
    let mut s = scheduler(config(8, 1, 64), 10, 4);
    add_with_priority(&mut s, 1, 2, 1, 0);
    add_with_priority(&mut s, 2, 2, 1, 0);
    add_with_priority(&mut s, 3, 2, 1, -1);
    add_with_priority(&mut s, 4, 2, 1, 5);
    add_with_priority(&mut s, 5, 2, 1, -1);
    let mut order = Vec::new();
    while s.has_unfinished() {
        order.extend(ids(&step(&mut s).0));
    }
    assert_eq!(order, [3, 5, 1, 2, 4]);
}

#[test]
fn max_num_seqs_caps_the_running_set() {
    let mut s = scheduler(config(8, 2, 64), 10, 4);
    for id in 1..=3 {
        add(&mut s, id, 2, 2);
    }
    assert_eq!(ids(&step(&mut s).0), [1, 2]);
    assert_eq!(s.num_running(), 2);
    let (out, finished) = step(&mut s);
    assert_eq!(ids(&out), [1, 2]);
    assert_eq!(finished.len(), 2);
    assert_eq!(ids(&step(&mut s).0), [3]);
}

#[test]
fn preempted_requests_are_readmitted_before_waiting_ones() {
    let mut s = scheduler(config(12, 8, 64), 6, 2);
    for id in 1..=3 {
        add(&mut s, id, 2, 10);
    }
    for _ in 0..4 {
        step(&mut s);
    }
    assert_eq!(s.num_preempted(), 1);
    // A newcomer with a better priority still waits behind every preempted request.
    add_with_priority(&mut s, 9, 1, 1, -5);
    let mut admissions = Vec::new();
    while s.has_unfinished() {
        let (out, _) = step(&mut s);
        for r in out.scheduled.iter().filter(|r| r.newly_admitted) {
            admissions.push(r.id.0);
            if r.id == RequestId(9) {
                assert_eq!(s.num_preempted(), 0);
            }
        }
    }
    let first = |id| admissions.iter().position(|&a| a == id).unwrap();
    assert!(first(3) < first(9));
    assert!(
        first(2) < first(9),
        "request 2 was preempted after 3 and readmitted first"
    );
}

#[test]
fn abort_of_a_waiting_request_is_reported_next_step() {
    let mut s = scheduler(config(8, 1, 64), 10, 4);
    add(&mut s, 1, 2, 2);
    add(&mut s, 2, 2, 2);
    assert!(s.abort(RequestId(2)));
    assert!(!s.abort(RequestId(2)));
    assert!(!s.abort(RequestId(7)));
    assert_eq!(
        s.request(RequestId(2)).unwrap().state(),
        RequestState::Finished(FinishReason::Aborted)
    );
    let (out, _) = step(&mut s);
    assert_eq!(ids(&out), [1]);
    assert_eq!(out.finished, [(RequestId(2), FinishReason::Aborted)]);
    assert!(s.request(RequestId(2)).is_none());
    // The id is free again once reported.
    add(&mut s, 2, 1, 1);
}

#[test]
fn abort_of_a_running_request_frees_its_blocks_at_once() {
    let mut s = scheduler(config(64, 8, 64), 10, 4);
    add(&mut s, 1, 10, 5);
    step(&mut s);
    assert_eq!(s.kv().num_held_blocks(RequestId(1)), 3);
    assert!(s.abort(RequestId(1)));
    assert_eq!(s.kv().num_free_blocks(), 10);
    assert_eq!(s.num_running(), 0);
    assert!(!s.has_unfinished());
    let out = s.schedule().unwrap();
    assert!(out.is_empty());
    assert_eq!(out.finished, [(RequestId(1), FinishReason::Aborted)]);
}

#[test]
fn abort_during_a_step_ignores_the_late_sample() {
    for send_sample in [true, false] {
        let mut s = scheduler(config(64, 8, 64), 10, 4);
        add(&mut s, 1, 4, 5);
        add(&mut s, 2, 4, 5);
        let out = s.schedule().unwrap();
        assert!(s.abort(RequestId(2)));
        let samples: Vec<SampledToken> = out
            .scheduled
            .iter()
            .filter(|r| send_sample || r.id != RequestId(2))
            .map(|r| SampledToken {
                id: r.id,
                token: 1,
                stopped: false,
            })
            .collect();
        assert_eq!(s.update(&samples), Ok(vec![]));
        let aborted = s.request(RequestId(2)).unwrap();
        assert!(aborted.output().is_empty());
        assert_eq!(s.kv().num_held_blocks(RequestId(2)), 0);
        assert_eq!(s.request(RequestId(1)).unwrap().output(), [1]);
    }
}

#[test]
fn abort_of_a_preempted_request_leaves_its_queue() {
    let mut s = scheduler(config(5, 8, 64), 3, 2);
    add(&mut s, 1, 2, 3);
    add(&mut s, 2, 2, 3);
    step(&mut s);
    let (out, _) = step(&mut s);
    assert_eq!(out.preempted, [RequestId(2)]);
    assert!(s.abort(RequestId(2)));
    assert_eq!(s.num_preempted(), 0);
    let (out, _) = step(&mut s);
    assert_eq!(out.finished, [(RequestId(2), FinishReason::Aborted)]);
    assert!(!s.has_unfinished());
}

#[test]
fn a_stop_finishes_the_request_with_its_last_token() {
    let mut s = scheduler(config(64, 8, 64), 10, 4);
    add(&mut s, 1, 3, 5);
    add(&mut s, 2, 3, 2);
    step(&mut s);
    // Request 2 reaches max_tokens with a stop: the stop is the reason.
    let (_, finished) = step_with_stops(&mut s, &[1, 2]);
    assert_eq!(
        finished,
        [
            (RequestId(1), FinishReason::Stopped),
            (RequestId(2), FinishReason::Stopped)
        ]
    );
    assert_eq!(s.request(RequestId(1)).unwrap().output().len(), 2);
    assert_eq!(s.kv().num_free_blocks(), 10);
}

#[test]
fn bad_requests_are_refused() {
    let mut s = scheduler(config(16, 8, 64), 3, 4);
    add(&mut s, 1, 2, 2);
    let new = |id, len: usize, max_tokens| NewRequest::new(RequestId(id), vec![0; len], max_tokens);
    assert_eq!(
        s.add_request(new(1, 2, 2)),
        Err(Error::DuplicateRequest(RequestId(1)))
    );
    assert_eq!(
        s.add_request(new(2, 0, 2)),
        Err(Error::EmptyPrompt(RequestId(2)))
    );
    assert_eq!(
        s.add_request(new(2, 2, 0)),
        Err(Error::ZeroMaxTokens(RequestId(2)))
    );
    assert_eq!(
        s.add_request(new(2, 10, 7)),
        Err(Error::TooLong {
            id: RequestId(2),
            prompt_len: 10,
            max_tokens: 7,
            max_model_len: 16
        })
    );
    assert!(matches!(
        s.add_request(new(2, 1, usize::MAX)),
        Err(Error::TooLong { .. })
    ));
    // 10 + 4 - 1 = 13 tokens take 4 blocks of 4; the space has 3.
    assert_eq!(
        s.add_request(new(2, 10, 4)),
        Err(Error::ExceedsKvSpace {
            id: RequestId(2),
            tokens: 13,
            blocks_needed: 4,
            total_blocks: 3
        })
    );
    // 12 slots fit exactly: the last sampled token takes none.
    assert_eq!(s.add_request(new(2, 10, 3)), Ok(()));
}

struct NoBlocks;

impl KvSpace for NoBlocks {
    fn block_size(&self) -> usize {
        16
    }
    fn num_free_blocks(&self) -> usize {
        0
    }
    fn num_total_blocks(&self) -> usize {
        0
    }
    fn reserve_prefix(&mut self, _: RequestId, _: &[u32]) -> usize {
        0
    }
    fn grow(&mut self, _: RequestId, _: usize) -> bool {
        false
    }
    fn release(&mut self, _: RequestId) {}
}

#[test]
fn bad_configurations_are_refused() {
    assert_eq!(
        Scheduler::new(config(16, 8, 64), NoBlocks).err(),
        Some(Error::UnusableKvSpace {
            block_size: 16,
            total_blocks: 0
        })
    );
    let mut watermark = config(16, 8, 64);
    watermark.watermark_blocks = 4;
    assert_eq!(
        Scheduler::new(watermark, CountingKvSpace::new(4, 4).unwrap()).err(),
        Some(Error::WatermarkTooLarge {
            watermark_blocks: 4,
            total_blocks: 4
        })
    );
    assert_eq!(
        Scheduler::new(config(16, 0, 64), CountingKvSpace::new(4, 4).unwrap()).err(),
        Some(Error::ZeroLimit {
            name: "max_num_seqs"
        })
    );
}

#[test]
fn steps_must_alternate_with_updates() {
    let mut s = scheduler(config(64, 8, 4), 10, 4);
    assert_eq!(s.update(&[]), Ok(vec![]));
    let stray = SampledToken {
        id: RequestId(1),
        token: 0,
        stopped: false,
    };
    assert_eq!(s.update(&[stray]), Err(Error::NoStepInFlight));
    add(&mut s, 1, 6, 3);
    add(&mut s, 2, 1, 3);

    // Request 1's first chunk (4 of 6 tokens) produces nothing.
    let out = s.schedule().unwrap();
    assert_eq!(plan(&out), [(1, 0, 4, false)]);
    assert_eq!(s.schedule().err(), Some(Error::StepInFlight));
    assert_eq!(
        s.update(&[stray]),
        Err(Error::UnexpectedSample(RequestId(1)))
    );
    assert!(s.is_step_in_flight());
    assert_eq!(s.request(RequestId(1)).unwrap().num_computed_tokens(), 0);
    s.update(&[]).unwrap();
    assert_eq!(s.request(RequestId(1)).unwrap().num_computed_tokens(), 4);

    let out = s.schedule().unwrap();
    assert_eq!(plan(&out), [(1, 4, 2, true), (2, 0, 1, true)]);
    let one = SampledToken {
        id: RequestId(1),
        token: 5,
        stopped: false,
    };
    assert_eq!(s.update(&[one]), Err(Error::MissingSample(RequestId(2))));
    assert_eq!(
        s.update(&[one, one]),
        Err(Error::DuplicateSample(RequestId(1)))
    );
    assert!(s.request(RequestId(1)).unwrap().output().is_empty());
    let two = SampledToken {
        id: RequestId(2),
        token: 6,
        stopped: false,
    };
    assert_eq!(s.update(&[two, one]), Ok(vec![]));
    assert_eq!(s.request(RequestId(1)).unwrap().output(), [5]);
    assert_eq!(s.request(RequestId(2)).unwrap().output(), [6]);
    assert!(!s.is_step_in_flight());
}

#[test]
fn an_empty_step_needs_no_update() {
    let mut s = scheduler(config(64, 8, 4), 10, 4);
    assert!(s.schedule().unwrap().is_empty());
    assert!(s.schedule().unwrap().is_empty());
}

#[test]
fn a_cached_prefix_is_not_recomputed() {
    let kv = CountingKvSpace::with_prefix_caching(10, 4).unwrap();
    let mut s = Scheduler::new(config(64, 8, 64), kv).unwrap();
    let prompt: Vec<u32> = (0..10).collect();
    s.add_request(NewRequest::new(RequestId(1), prompt.clone(), 1))
        .unwrap();
    assert_eq!(plan(&step(&mut s).0), [(1, 0, 10, true)]);
    s.add_request(NewRequest::new(RequestId(2), prompt.clone(), 2))
        .unwrap();
    let (out, _) = step(&mut s);
    assert_eq!(plan(&out), [(2, 8, 2, true)]);
    assert_eq!(out.scheduled[0].token_ids, [8, 9]);
    assert_eq!(s.request(RequestId(2)).unwrap().num_computed_tokens(), 10);
    // A prompt that is entirely cached still computes its last block's final token.
    s.add_request(NewRequest::new(RequestId(3), prompt[..8].to_vec(), 1))
        .unwrap();
    assert_eq!(plan(&step(&mut s).0), [(2, 10, 1, true), (3, 4, 4, true)]);
}
