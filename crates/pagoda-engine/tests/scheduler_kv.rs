//! The scheduler planning with the real block manager ([`ManagedKvSpace`]): random workloads with
//! shared prompt prefixes in a pool small enough to force preemption. A stand-in for the model
//! commits each step's computed tokens (which fills the prefix cache) and samples a token from
//! the request's position. Every request must finish with its full output, the cache must be
//! hit, and every block must come back.

use pagoda_engine::ManagedKvSpace;
use pagoda_kv::{KvBlockManager, SeqId};
use pagoda_sched::{FinishReason, NewRequest, RequestId, SampledToken, Scheduler, SchedulerConfig};
use proptest::prelude::*;

const BLOCK_SIZE: usize = 4;

/// The token the stand-in model samples after `tokens`: a function of the sequence alone, so a
/// preempted and recomputed request must produce the same output.
fn next_token(tokens: &[u32]) -> u32 {
    tokens
        .iter()
        .fold(17u32, |h, &t| h.wrapping_mul(31).wrapping_add(t))
        % 100
}

#[derive(Debug)]
struct Workload {
    /// (prompt, max_tokens) per request, in arrival order.
    requests: Vec<(Vec<u32>, usize)>,
    num_blocks: usize,
    max_batch_tokens: usize,
}

fn workloads() -> impl Strategy<Value = Workload> {
    // Prompts are a shared prefix of 0-3 blocks and a tail of their own.
    let request = (0usize..=3, 1usize..12, 1usize..10, any::<u8>());
    (prop::collection::vec(request, 1..12), 0usize..8, 8usize..40).prop_map(
        |(specs, spare_blocks, max_batch_tokens)| {
            let shared: Vec<u32> = (0..3 * BLOCK_SIZE as u32).collect();
            let mut longest = 0;
            let requests: Vec<(Vec<u32>, usize)> = specs
                .into_iter()
                .map(|(prefix_blocks, tail, max_tokens, salt)| {
                    let mut prompt = shared[..prefix_blocks * BLOCK_SIZE].to_vec();
                    prompt.extend((0..tail as u32).map(|i| 1000 + u32::from(salt) + i));
                    longest = longest.max(prompt.len() + max_tokens);
                    (prompt, max_tokens)
                })
                .collect();
            Workload {
                requests,
                // The largest request fits alone; the rest compete for `spare_blocks` more.
                num_blocks: longest.div_ceil(BLOCK_SIZE) + spare_blocks,
                max_batch_tokens,
            }
        },
    )
}

type Finished = Vec<(RequestId, FinishReason, Vec<u32>)>;

/// A scheduler over a fresh pool of `num_blocks` blocks holding `requests`.
fn scheduler(
    requests: &[(Vec<u32>, usize)],
    num_blocks: usize,
    config: SchedulerConfig,
) -> Scheduler<ManagedKvSpace> {
    let manager = KvBlockManager::new(num_blocks, BLOCK_SIZE).expect("a valid pool");
    let mut scheduler =
        Scheduler::new(config, ManagedKvSpace::new(manager)).expect("a valid config");
    for (i, (prompt, max_tokens)) in requests.iter().enumerate() {
        scheduler
            .add_request(NewRequest::new(
                RequestId(i as u64),
                prompt.clone(),
                *max_tokens,
            ))
            .expect("every request fits the pool alone");
    }
    scheduler
}

/// Steps `scheduler` until every request has finished, standing in for the model: each step's
/// computed tokens are committed to the block manager and producing requests sample
/// [`next_token`]. Returns the requests in the order they finished, with their outputs.
fn drive(scheduler: &mut Scheduler<ManagedKvSpace>) -> Result<Finished, TestCaseError> {
    let mut finished = Vec::new();
    let mut steps = 0;
    while scheduler.has_unfinished() {
        steps += 1;
        prop_assert!(steps < 10_000, "no progress");
        let step = scheduler.schedule().expect("a step");
        let mut samples = Vec::new();
        for scheduled in &step.scheduled {
            let request = scheduler
                .request(scheduled.id)
                .expect("scheduled requests exist");
            let computed = request.tokens()[..scheduled.end()].to_vec();
            if scheduled.produces_token {
                samples.push(SampledToken {
                    id: scheduled.id,
                    token: next_token(&computed),
                    stopped: false,
                });
            }
            scheduler
                .kv_mut()
                .manager_mut()
                .commit(SeqId(scheduled.id.0), &computed)
                .expect("the scheduled request holds slots for what it computed");
        }
        for (id, reason) in scheduler
            .update(&samples)
            .expect("one sample per producing request")
        {
            let request = scheduler
                .request(id)
                .expect("finished requests are kept a step");
            finished.push((id, reason, request.output().to_vec()));
        }
    }
    Ok(finished)
}

fn run(workload: &Workload) -> Result<(), TestCaseError> {
    let mut config = SchedulerConfig::new(256);
    config.max_batch_tokens = workload.max_batch_tokens;
    let mut scheduler = scheduler(&workload.requests, workload.num_blocks, config);
    let finished = drive(&mut scheduler)?;

    prop_assert_eq!(finished.len(), workload.requests.len());
    for (id, reason, output) in finished {
        let (prompt, max_tokens) = &workload.requests[id.0 as usize];
        prop_assert_eq!(reason, FinishReason::Length);
        let mut tokens = prompt.clone();
        for _ in 0..*max_tokens {
            tokens.push(next_token(&tokens));
        }
        prop_assert_eq!(&output[..], &tokens[prompt.len()..], "{}", id);
    }
    let manager = scheduler.kv().manager();
    prop_assert_eq!(manager.num_sequences(), 0);
    prop_assert_eq!(manager.num_free_blocks(), workload.num_blocks);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn requests_finish_with_their_output_and_every_block_comes_back(workload in workloads()) {
        run(&workload)?;
    }
}

#[test]
fn a_repeated_prompt_hits_the_prefix_cache() {
    let shared: Vec<u32> = (0..3 * BLOCK_SIZE as u32).collect();
    let workload = Workload {
        requests: vec![(shared.clone(), 2), (shared.clone(), 2), (shared, 2)],
        num_blocks: 16,
        max_batch_tokens: 64,
    };
    // Admitted one at a time, each later request finds the first one's blocks committed;
    // admitted together, in one step, none does.
    for admitted_together in [false, true] {
        let mut config = SchedulerConfig::new(256);
        config.max_batch_tokens = workload.max_batch_tokens;
        config.max_num_seqs = if admitted_together { 8 } else { 1 };
        let mut scheduler = scheduler(&workload.requests, workload.num_blocks, config);
        let finished = drive(&mut scheduler).expect("every request finishes");
        assert_eq!(finished.len(), 3);
        let stats = scheduler.kv().manager().stats();
        if admitted_together {
            assert_eq!(stats.prefix_hit_tokens, 0, "{stats:?}");
        } else {
            // The second and third requests reuse the first's two full blocks (the last token
            // of a prompt is always computed, so the third block is not reused).
            assert_eq!(stats.prefix_hit_tokens, 2 * 8, "{stats:?}");
        }
        assert_eq!(scheduler.kv().manager().num_free_blocks(), 16);
    }
}
