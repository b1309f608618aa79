//! Continuous-batching scheduler for pagoda: decides which requests run in each engine step, and
//! how many of their tokens, under the `max_num_seqs`, `max_batch_tokens` and KV-block budgets.
//! Pure logic: no tensors, no model.
//!
//! The policy follows vLLM's (Kwon et al., 2023, and its v1 scheduler): every request is a list of
//! tokens (prompt, then output) of which a leading part has its K/V computed, and a step computes
//! some of the rest for each scheduled request. Prefill and decode are the same operation, so a
//! long prompt is split into chunks that fill what the decodes leave of the token budget
//! (*chunked prefill*); a request preempted for lack of KV blocks is later recomputed, output
//! included, from its tokens. See [`Scheduler`] for the rules.
//!
//! - [`Scheduler`] queues requests ([`NewRequest`]), plans steps ([`SchedulerOutput`] of
//!   [`ScheduledRequest`]s) and takes back the sampled tokens ([`SampledToken`]).
//! - [`KvSpace`] is the block accounting it plans with; the engine implements it over its paged
//!   KV cache, and [`CountingKvSpace`] implements it by counting (with an optional simulated
//!   prefix cache).
//! - [`SchedulerConfig`] holds the limits; [`Error`] names everything refused.
//!
//! A whole serving loop, with a stand-in for the model that always samples token 7:
//!
//! ```
//! use pagoda_sched::{
//!     CountingKvSpace, NewRequest, RequestId, SampledToken, Scheduler, SchedulerConfig,
//! };
//!
//! // 64 blocks of 16 tokens; at most 32 tokens computed per step.
//! let kv = CountingKvSpace::new(64, 16)?;
//! let mut config = SchedulerConfig::new(256);
//! config.max_batch_tokens = 32;
//! let mut scheduler = Scheduler::new(config, kv)?;
//!
//! scheduler.add_request(NewRequest::new(RequestId(1), vec![1; 40], 4))?;
//! scheduler.add_request(NewRequest::new(RequestId(2), vec![2; 10], 3).with_priority(-1))?;
//!
//! let mut outputs = Vec::new();
//! let mut steps = 0;
//! while scheduler.has_unfinished() {
//!     let step = scheduler.schedule()?;
//!     assert!(step.num_batched_tokens <= 32);
//!     // The model would compute K/V for `s.token_ids` at positions `s.start..s.end()` here and
//!     // return logits for the requests that produce a token.
//!     let samples: Vec<SampledToken> = step
//!         .scheduled
//!         .iter()
//!         .filter(|s| s.produces_token)
//!         .map(|s| SampledToken { id: s.id, token: 7, stopped: false })
//!         .collect();
//!     for (id, reason) in scheduler.update(&samples)? {
//!         let output = scheduler.request(id).map(|r| r.output().to_vec());
//!         outputs.push((id, reason, output));
//!     }
//!     steps += 1;
//! }
//!
//! use pagoda_sched::FinishReason::Length;
//! assert_eq!(outputs, [
//!     (RequestId(2), Length, Some(vec![7; 3])),
//!     (RequestId(1), Length, Some(vec![7; 4])),
//! ]);
//! // Step 1: request 2 (priority -1) prefills its 10 tokens and request 1 its first 22;
//! // step 2: a decode for request 2 and the last 18 prompt tokens of request 1; then decodes.
//! assert_eq!(steps, 5);
//! # Ok::<(), pagoda_sched::Error>(())
//! ```

mod config;
mod counting_kv_space;
mod error;
mod kv_space;
mod output;
mod queue;
mod request;
mod scheduler;

pub use config::SchedulerConfig;
pub use counting_kv_space::CountingKvSpace;
pub use error::{Error, Result};
pub use kv_space::KvSpace;
pub use output::{SampledToken, ScheduledRequest, SchedulerOutput};
pub use request::{FinishReason, NewRequest, Request, RequestId, RequestState};
pub use scheduler::Scheduler;
