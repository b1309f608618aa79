//! The scheduling policy: which requests run in each step, and how far.

use std::collections::{HashMap, HashSet};

use crate::config::SchedulerConfig;
use crate::error::{Error, Result};
use crate::kv_space::KvSpace;
use crate::output::{SampledToken, ScheduledRequest, SchedulerOutput};
use crate::queue::RequestQueue;
use crate::request::{FinishReason, NewRequest, Request, RequestId, RequestState};

/// A continuous-batching scheduler over a [`KvSpace`].
///
/// Each [`schedule`](Self::schedule) call plans one engine step within `max_num_seqs` requests
/// and `max_batch_tokens` tokens:
///
/// 1. Running requests, in admission order, each get what they have left to compute (one token
///    for a decode, the rest of the prompt for one mid-prefill), cut to the remaining token
///    budget. When the KV space cannot grow a request, the most recently admitted running
///    request is preempted (its blocks released, its output kept) until the request fits; if
///    the request is itself the most recently admitted one, it is the one preempted.
/// 2. If nothing was preempted, queued requests are admitted: preempted ones first, then
///    waiting ones, each queue by priority and then arrival. Admission stops at the first
///    request that does not fit (token budget, free blocks above the watermark, sequence limit),
///    so a large request is not overtaken by smaller ones behind it. With chunked prefill
///    an admitted prompt takes whatever budget is left and continues in later steps.
///
/// After the engine has run the step, [`update`](Self::update) takes the sampled tokens and
/// advances the requests. A preempted request recomputes its prompt and output so far on
/// readmission and produces its next token only once it has caught up.
///
/// The oldest running request makes progress in every step: it is first in line for the token
/// budget, and preemption takes newer requests before it until it fits, which it does once it
/// runs alone because [`add_request`](Self::add_request) refuses requests larger than the whole
/// KV space. So every request finishes within a bounded number of steps.
#[derive(Debug)]
pub struct Scheduler<K> {
    config: SchedulerConfig,
    kv: K,
    block_size: usize,
    requests: HashMap<RequestId, Request>,
    waiting: RequestQueue,
    preempted: RequestQueue,
    /// Running requests in admission order: the last is the next to preempt.
    running: Vec<RequestId>,
    /// Finished since the last `schedule`, to report there.
    finished: Vec<(RequestId, FinishReason)>,
    /// The step scheduled and not yet updated.
    in_flight: Option<Vec<StepEntry>>,
    next_arrival: u64,
}

/// What `update` needs to remember of a scheduled request.
#[derive(Debug, Clone, Copy)]
struct StepEntry {
    id: RequestId,
    num_tokens: usize,
    produces_token: bool,
}

impl<K: KvSpace> Scheduler<K> {
    /// A scheduler planning with `kv`, which it owns from now on.
    ///
    /// # Errors
    /// Those of [`SchedulerConfig::validate`]; [`Error::UnusableKvSpace`] when `kv` reports no
    /// blocks or a zero block size; [`Error::WatermarkTooLarge`] when the watermark is not below
    /// the number of blocks.
    pub fn new(config: SchedulerConfig, kv: K) -> Result<Self> {
        config.validate()?;
        let block_size = kv.block_size();
        let total_blocks = kv.num_total_blocks();
        if block_size == 0 || total_blocks == 0 {
            return Err(Error::UnusableKvSpace {
                block_size,
                total_blocks,
            });
        }
        if config.watermark_blocks >= total_blocks {
            return Err(Error::WatermarkTooLarge {
                watermark_blocks: config.watermark_blocks,
                total_blocks,
            });
        }
        Ok(Self {
            config,
            kv,
            block_size,
            requests: HashMap::new(),
            waiting: RequestQueue::default(),
            preempted: RequestQueue::default(),
            running: Vec::new(),
            finished: Vec::new(),
            in_flight: None,
            next_arrival: 0,
        })
    }

    /// Queues a request.
    ///
    /// # Errors
    /// [`Error::DuplicateRequest`] when the id is in use (a finished request keeps its id until
    /// the next [`schedule`](Self::schedule) reports it); [`Error::EmptyPrompt`];
    /// [`Error::ZeroMaxTokens`]; [`Error::TooLong`] when prompt plus `max_tokens` exceeds
    /// `max_model_len`; [`Error::ExceedsKvSpace`] when the request at its longest would not fit
    /// in the whole KV space.
    pub fn add_request(&mut self, request: NewRequest) -> Result<()> {
        let id = request.id;
        if self.requests.contains_key(&id) {
            return Err(Error::DuplicateRequest(id));
        }
        if request.prompt.is_empty() {
            return Err(Error::EmptyPrompt(id));
        }
        if request.max_tokens == 0 {
            return Err(Error::ZeroMaxTokens(id));
        }
        let prompt_len = request.prompt.len();
        if prompt_len.saturating_add(request.max_tokens) > self.config.max_model_len {
            return Err(Error::TooLong {
                id,
                prompt_len,
                max_tokens: request.max_tokens,
                max_model_len: self.config.max_model_len,
            });
        }
        // The last sampled token is never fed back, so its K/V never take a slot.
        let tokens = prompt_len + request.max_tokens - 1;
        let blocks_needed = tokens.div_ceil(self.block_size);
        let total_blocks = self.kv.num_total_blocks();
        if blocks_needed > total_blocks {
            return Err(Error::ExceedsKvSpace {
                id,
                tokens,
                blocks_needed,
                total_blocks,
            });
        }
        let request = Request::new(request, self.next_arrival);
        self.next_arrival += 1;
        self.waiting.push(request.queue_key(), id);
        self.requests.insert(id, request);
        Ok(())
    }

    /// Aborts a request: it leaves its queue, its blocks are released at once, and it is reported
    /// as [`FinishReason::Aborted`] by the next [`schedule`](Self::schedule). A sample that comes
    /// back for it from a step already scheduled is ignored.
    ///
    /// Returns false, changing nothing, when `id` is unknown or already finished.
    pub fn abort(&mut self, id: RequestId) -> bool {
        let Some(request) = self.requests.get_mut(&id) else {
            return false;
        };
        match request.state {
            RequestState::Waiting => self.waiting.remove(request.queue_key()),
            RequestState::Preempted => self.preempted.remove(request.queue_key()),
            RequestState::Running => {
                self.running.retain(|&running| running != id);
                self.kv.release(id);
            }
            RequestState::Finished(_) => return false,
        }
        request.state = RequestState::Finished(FinishReason::Aborted);
        self.finished.push((id, FinishReason::Aborted));
        true
    }

    /// Plans the next step. The engine runs it and reports back with [`update`](Self::update)
    /// before the next call (a step with nothing scheduled needs no update).
    ///
    /// # Errors
    /// [`Error::StepInFlight`] when the previous step has not been updated yet.
    pub fn schedule(&mut self) -> Result<SchedulerOutput> {
        if self.in_flight.is_some() {
            return Err(Error::StepInFlight);
        }
        let mut out = SchedulerOutput {
            finished: std::mem::take(&mut self.finished),
            ..Default::default()
        };
        for (id, _) in &out.finished {
            self.requests.remove(id);
        }
        let mut budget = self.config.max_batch_tokens;
        self.schedule_running(&mut budget, &mut out);
        // Blocks ran short for the running requests: admitting more would only preempt again.
        if out.preempted.is_empty() {
            self.admit_queued(&mut budget, &mut out);
        }
        out.num_batched_tokens = self.config.max_batch_tokens - budget;
        if !out.scheduled.is_empty() {
            self.in_flight = Some(
                out.scheduled
                    .iter()
                    .map(|s| StepEntry {
                        id: s.id,
                        num_tokens: s.num_tokens(),
                        produces_token: s.produces_token,
                    })
                    .collect(),
            );
        }
        Ok(out)
    }

    /// Takes the engine's results for the step last scheduled: one sample per request scheduled
    /// with `produces_token` (requests aborted since may be left out). Advances every scheduled
    /// request, appends the sampled tokens, and finishes (releasing the blocks of) each request
    /// that reported a stop or reached `max_tokens`. Returns those, in step order; the next
    /// [`schedule`](Self::schedule) reports them again in [`SchedulerOutput::finished`].
    ///
    /// Called with no samples while no step is in flight, it does nothing.
    ///
    /// # Errors
    /// Nothing changes on error, and the step stays in flight for a corrected call:
    /// [`Error::NoStepInFlight`], [`Error::MissingSample`], [`Error::UnexpectedSample`],
    /// [`Error::DuplicateSample`].
    pub fn update(&mut self, samples: &[SampledToken]) -> Result<Vec<(RequestId, FinishReason)>> {
        let Some(step) = self.in_flight.take() else {
            return if samples.is_empty() {
                Ok(Vec::new())
            } else {
                Err(Error::NoStepInFlight)
            };
        };
        let by_id = match self.match_samples(&step, samples) {
            Ok(by_id) => by_id,
            Err(err) => {
                self.in_flight = Some(step);
                return Err(err);
            }
        };
        let mut finished = Vec::new();
        for entry in &step {
            let Some(request) = self.requests.get_mut(&entry.id) else {
                continue;
            };
            if request.state != RequestState::Running {
                continue;
            }
            request.num_computed_tokens += entry.num_tokens;
            let Some(sample) = by_id.get(&entry.id) else {
                continue;
            };
            request.push_output(sample.token);
            let reason = if sample.stopped {
                FinishReason::Stopped
            } else if request.num_output_tokens() >= request.max_tokens() {
                FinishReason::Length
            } else {
                continue;
            };
            request.state = RequestState::Finished(reason);
            self.kv.release(entry.id);
            finished.push((entry.id, reason));
        }
        if !finished.is_empty() {
            let requests = &self.requests;
            self.running.retain(|id| {
                requests
                    .get(id)
                    .is_some_and(|r| r.state == RequestState::Running)
            });
            self.finished.extend_from_slice(&finished);
        }
        Ok(finished)
    }

    /// A request that is queued, running, or finished but not yet reported by
    /// [`schedule`](Self::schedule).
    pub fn request(&self, id: RequestId) -> Option<&Request> {
        self.requests.get(&id)
    }

    /// Every request [`request`](Self::request) would return, in no particular order.
    pub fn requests(&self) -> impl Iterator<Item = &Request> + '_ {
        self.requests.values()
    }

    /// Requests waiting for their first admission.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Preempted requests waiting for readmission.
    pub fn num_preempted(&self) -> usize {
        self.preempted.len()
    }

    /// Running requests.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Whether any request is queued or running.
    pub fn has_unfinished(&self) -> bool {
        !(self.running.is_empty() && self.waiting.is_empty() && self.preempted.is_empty())
    }

    /// Whether a scheduled step awaits its [`update`](Self::update).
    pub fn is_step_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The KV space, e.g. for the block tables of the scheduled requests.
    pub fn kv(&self) -> &K {
        &self.kv
    }

    /// The KV space, mutably: for state the [`KvSpace`] trait does not cover (statistics, block
    /// contents). Changing which blocks a request holds behind the scheduler's back breaks its
    /// accounting.
    pub fn kv_mut(&mut self) -> &mut K {
        &mut self.kv
    }

    fn entry(&self, id: RequestId) -> &Request {
        self.requests
            .get(&id)
            .expect("queued and running ids always have a request entry")
    }

    fn entry_mut(&mut self, id: RequestId) -> &mut Request {
        self.requests
            .get_mut(&id)
            .expect("queued and running ids always have a request entry")
    }

    fn schedule_running(&mut self, budget: &mut usize, out: &mut SchedulerOutput) {
        let mut index = 0;
        while index < self.running.len() && *budget > 0 {
            let id = self.running[index];
            let request = self.entry(id);
            let start = request.num_computed_tokens;
            let num_tokens = request.num_tokens();
            let count = (num_tokens - start).min(*budget);
            // Every running request has at least its last sampled token to compute; one without
            // would have nothing to sample from.
            if count == 0 {
                index += 1;
                continue;
            }
            if !self.grow_or_preempt(id, start + count, out) {
                break;
            }
            let token_ids = self.entry(id).tokens()[start..start + count].to_vec();
            out.scheduled.push(ScheduledRequest {
                id,
                start,
                token_ids,
                produces_token: start + count == num_tokens,
                newly_admitted: false,
            });
            *budget -= count;
            index += 1;
        }
    }

    /// Grows `id` to `num_tokens` slots, preempting running requests from the most recently
    /// admitted on until it fits. Returns false when `id` itself was preempted.
    fn grow_or_preempt(
        &mut self,
        id: RequestId,
        num_tokens: usize,
        out: &mut SchedulerOutput,
    ) -> bool {
        loop {
            if self.kv.grow(id, num_tokens) {
                return true;
            }
            let Some(victim) = self.running.pop() else {
                return false;
            };
            self.preempt(victim, out);
            if victim == id {
                return false;
            }
        }
    }

    /// Releases the blocks of `id`, already taken out of `running`, and queues it for
    /// recomputation.
    fn preempt(&mut self, id: RequestId, out: &mut SchedulerOutput) {
        self.kv.release(id);
        let request = self.entry_mut(id);
        request.num_computed_tokens = 0;
        request.state = RequestState::Preempted;
        request.num_preemptions += 1;
        let key = request.queue_key();
        self.preempted.push(key, id);
        out.preempted.push(id);
    }

    fn admit_queued(&mut self, budget: &mut usize, out: &mut SchedulerOutput) {
        while *budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(id) = self.preempted.first().or_else(|| self.waiting.first()) else {
                return;
            };
            let Some(scheduled) = self.try_admit(id, *budget) else {
                return;
            };
            *budget -= scheduled.num_tokens();
            out.scheduled.push(scheduled);
        }
    }

    /// Admits the queued request `id` with its first step within `budget` tokens, or leaves it
    /// queued, holding no blocks, when it does not fit now.
    fn try_admit(&mut self, id: RequestId, budget: usize) -> Option<ScheduledRequest> {
        let request = self
            .requests
            .get(&id)
            .expect("queued and running ids always have a request entry");
        let num_tokens = request.num_tokens();
        let cached = self.kv.reserve_prefix(id, request.tokens());
        // The last token is always computed: its logits give the next token.
        let start = cached.min(num_tokens - 1);
        let left = num_tokens - start;
        let count = if self.config.chunked_prefill {
            left.min(budget)
        } else {
            left
        };
        // The watermark keeps room for the running requests to grow into; with none running it
        // protects nothing, and waiving it lets any request that fits the space run alone.
        let blocks_needed = num_tokens
            .div_ceil(self.block_size)
            .saturating_sub(start.div_ceil(self.block_size));
        let keeps_watermark = self.running.is_empty()
            || self.kv.num_free_blocks() >= blocks_needed + self.config.watermark_blocks;
        if count > budget || !keeps_watermark || !self.kv.grow(id, start + count) {
            self.kv.release(id);
            return None;
        }

        let request = self.entry_mut(id);
        let key = request.queue_key();
        let was_preempted = request.state == RequestState::Preempted;
        request.state = RequestState::Running;
        request.num_computed_tokens = start;
        let token_ids = request.tokens()[start..start + count].to_vec();
        if was_preempted {
            self.preempted.remove(key);
        } else {
            self.waiting.remove(key);
        }
        self.running.push(id);
        Some(ScheduledRequest {
            id,
            start,
            token_ids,
            produces_token: start + count == num_tokens,
            newly_admitted: true,
        })
    }

    fn match_samples<'s>(
        &self,
        step: &[StepEntry],
        samples: &'s [SampledToken],
    ) -> Result<HashMap<RequestId, &'s SampledToken>> {
        let producing: HashSet<RequestId> = step
            .iter()
            .filter(|e| e.produces_token)
            .map(|e| e.id)
            .collect();
        let mut by_id = HashMap::with_capacity(samples.len());
        for sample in samples {
            if !producing.contains(&sample.id) {
                return Err(Error::UnexpectedSample(sample.id));
            }
            if by_id.insert(sample.id, sample).is_some() {
                return Err(Error::DuplicateSample(sample.id));
            }
        }
        for entry in step.iter().filter(|e| e.produces_token) {
            let running = self
                .requests
                .get(&entry.id)
                .is_some_and(|r| r.state == RequestState::Running);
            if running && !by_id.contains_key(&entry.id) {
                return Err(Error::MissingSample(entry.id));
            }
        }
        Ok(by_id)
    }
}
