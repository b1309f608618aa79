//! The engine on a thread of its own, for many callers at once: an [`EngineHandle`] submits
//! requests from any thread, and a [`RequestStream`] receives one request's outputs, blocking
//! or from async code (through its waker), without tying the engine to an async runtime.
//!
//! The step loop blocks on its command channel while it has nothing to do, and otherwise takes
//! every queued command between two steps. A request stream is closed by whoever holds its
//! sending side when that goes away: after the last output, on abort, when a command is never
//! taken, and when the loop ends or its thread panics; so a receiver never waits forever.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use pagoda_sched::RequestId;

use crate::chat_template::ChatMessage;
use crate::engine::Engine;
use crate::intake::{Intake, Prompt};
use crate::metrics::Metrics;
use crate::output::RequestOutput;
use crate::params::{FinishReason, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// What a handle or stream asks of the step loop.
enum Command {
    /// A request already checked by [`Intake`].
    Add {
        id: RequestId,
        tokens: Vec<u32>,
        params: SamplingParams,
        arrival: Instant,
        stream: StreamSender,
    },
    Abort(RequestId),
    Shutdown,
}

/// What the handles share with the loop.
struct Shared {
    intake: Arc<Intake>,
    /// The latest snapshot, published by the loop after every step.
    metrics: Mutex<Metrics>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stopped: AtomicBool,
}

/// A lock that a panic elsewhere does not make unusable: every value guarded here stays
/// consistent between statements.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Engine {
    /// Moves the engine onto a thread of its own that steps while any request is unfinished and
    /// sleeps otherwise, and returns the handle to submit requests to it.
    pub fn spawn(self) -> EngineHandle {
        let (commands, receiver) = mpsc::channel();
        let shared = Arc::new(Shared {
            intake: Arc::clone(self.intake()),
            metrics: Mutex::new(self.metrics()),
            thread: Mutex::new(None),
            stopped: AtomicBool::new(false),
        });
        let for_loop = Arc::clone(&shared);
        let started = thread::Builder::new()
            .name("pagoda-engine".into())
            .spawn(move || serve(self, receiver, for_loop));
        match started {
            Ok(thread) => *lock(&shared.thread) = Some(thread),
            // The engine and the receiver went down with the closure: every submit fails.
            Err(e) => {
                shared.stopped.store(true, Ordering::SeqCst);
                lock(&shared.metrics).last_error = Some(format!("starting the engine thread: {e}"));
            }
        }
        EngineHandle { commands, shared }
    }
}

/// The step loop.
fn serve(mut engine: Engine, commands: Receiver<Command>, shared: Arc<Shared>) {
    let mut served = Served {
        streams: HashMap::new(),
        shared,
    };
    'serve: loop {
        if !engine.has_unfinished() {
            served.publish(&engine);
            // Nothing to step: sleep until a command comes, or every sender is gone.
            let Ok(command) = commands.recv() else { break };
            if !served.apply(&mut engine, command) {
                break;
            }
        }
        loop {
            match commands.try_recv() {
                Ok(command) => {
                    if !served.apply(&mut engine, command) {
                        break 'serve;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => break 'serve,
            }
        }
        // A failed step has aborted its requests and counted the error in the metrics; their
        // last outputs come from the next step.
        if let Ok(outputs) = engine.step() {
            for output in outputs {
                served.deliver(output);
            }
        }
        served.publish(&engine);
    }
    served.publish(&engine);
}

/// The loop's side of the open streams. Dropping it (the loop ended, or its thread panicked)
/// closes them all and marks the engine stopped.
struct Served {
    streams: HashMap<RequestId, StreamSender>,
    shared: Arc<Shared>,
}

impl Served {
    /// Applies a command; false for a shutdown.
    fn apply(&mut self, engine: &mut Engine, command: Command) -> bool {
        match command {
            Command::Add {
                id,
                tokens,
                params,
                arrival,
                stream,
            } => {
                let prompt_tokens = tokens.len();
                match engine.add_checked(id, tokens, params, arrival) {
                    Ok(()) => {
                        self.streams.insert(id, stream);
                    }
                    Err(e) => {
                        engine.record_error(&e);
                        let mut output = RequestOutput::empty(id, prompt_tokens, 0);
                        output.finish_reason = Some(FinishReason::Abort);
                        stream.push(output);
                    }
                }
                true
            }
            Command::Abort(id) => {
                // Its stream is gone; its last output goes nowhere.
                self.streams.remove(&id);
                engine.abort(id);
                true
            }
            Command::Shutdown => false,
        }
    }

    fn deliver(&mut self, output: RequestOutput) {
        let id = output.id;
        let finished = output.is_finished();
        if let Some(stream) = self.streams.get(&id) {
            stream.push(output);
        }
        if finished {
            self.streams.remove(&id);
        }
    }

    fn publish(&self, engine: &Engine) {
        *lock(&self.shared.metrics) = engine.metrics();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        // Dropping the senders closes the streams.
        self.streams.clear();
    }
}

/// Submits requests to an engine running on its own thread. Cloneable, `Send` and `Sync`.
///
/// The loop runs while a handle or a stream exists; [`shutdown`](Self::shutdown) ends it at
/// once.
#[derive(Clone)]
pub struct EngineHandle {
    commands: Sender<Command>,
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Queues a request and returns the stream of its outputs.
    ///
    /// # Errors
    /// The checks of [`Engine::add_request`], made here on the caller's thread;
    /// [`Error::Stopped`] when the engine has stopped.
    pub fn submit(&self, prompt: Prompt, params: SamplingParams) -> Result<RequestStream> {
        let arrival = Instant::now();
        if self.shared.stopped.load(Ordering::SeqCst) {
            return Err(Error::Stopped);
        }
        let intake = &self.shared.intake;
        let tokens = intake.prompt_tokens(&prompt)?;
        intake.check(tokens.len(), &params)?;
        let id = intake.next_id();
        let queue = Arc::new(StreamQueue::default());
        self.commands
            .send(Command::Add {
                id,
                tokens,
                params,
                arrival,
                stream: StreamSender(Arc::clone(&queue)),
            })
            .map_err(|_| Error::Stopped)?;
        Ok(RequestStream {
            id,
            queue,
            commands: self.commands.clone(),
        })
    }

    /// The latest metrics snapshot (taken after the last step).
    pub fn metrics(&self) -> Metrics {
        lock(&self.shared.metrics).clone()
    }

    /// The name the model is served under.
    pub fn model_name(&self) -> &str {
        &self.shared.intake.model_name
    }

    /// The longest sequence, prompt plus output, a request may have.
    pub fn max_context_tokens(&self) -> usize {
        self.shared.intake.max_context
    }

    /// The model's tokenizer, to name tokens by their text.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.shared.intake.tokenizer
    }

    /// Renders chat messages with the model's template, or ChatML when it has none.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        self.shared.intake.render_chat(messages)
    }

    /// The number of tokens of a prompt as generation would see it.
    pub fn count_tokens(&self, prompt: &Prompt) -> Result<usize> {
        Ok(self.shared.intake.encode(prompt)?.len())
    }

    /// Whether the step loop has ended.
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::SeqCst)
    }

    /// Stops the step loop and waits for it to end. Unfinished requests end too: their
    /// streams return `None`.
    pub fn shutdown(self) {
        // Fails only if the loop has ended already.
        let _ = self.commands.send(Command::Shutdown);
        let thread = lock(&self.shared.thread).take();
        if let Some(thread) = thread {
            // A panic of the loop has closed every stream already; there is nothing to add.
            let _ = thread.join();
        }
    }
}

/// One request's outputs, in order; `None` once the last one (with its finish reason) has been
/// received, or when the engine stopped. Dropping the stream aborts the request, which frees
/// its KV blocks at once.
pub struct RequestStream {
    id: RequestId,
    queue: Arc<StreamQueue>,
    commands: Sender<Command>,
}

impl RequestStream {
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The next output, waiting for it if need be.
    pub fn recv(&mut self) -> Option<RequestOutput> {
        let mut state = lock(&self.queue.state);
        loop {
            if let Some(output) = state.outputs.pop_front() {
                return Some(output);
            }
            if state.closed {
                return None;
            }
            state = self
                .queue
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The next output if one is there, without waiting.
    pub fn try_recv(&mut self) -> Option<RequestOutput> {
        lock(&self.queue.state).outputs.pop_front()
    }

    /// The next output, or [`Poll::Pending`] with `cx`'s waker registered to be woken when one
    /// arrives.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<RequestOutput>> {
        let mut state = lock(&self.queue.state);
        if let Some(output) = state.outputs.pop_front() {
            return Poll::Ready(Some(output));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        match &mut state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            waker => *waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The next output, for async code.
    // Named like `StreamExt::next` of the futures crate, whose role it plays; a stream of
    // outputs is not an `Iterator`.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> impl Future<Output = Option<RequestOutput>> + '_ {
        std::future::poll_fn(move |cx| self.poll_next(cx))
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !lock(&self.queue.state).closed {
            // Fails only if the loop has ended, which ended the request too.
            let _ = self.commands.send(Command::Abort(self.id));
        }
    }
}

/// Outputs on their way from the loop to one stream.
#[derive(Default)]
struct StreamQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    outputs: VecDeque<RequestOutput>,
    /// No more outputs will come.
    closed: bool,
    waker: Option<Waker>,
}

/// The loop's end of a stream; dropping it closes the stream.
struct StreamSender(Arc<StreamQueue>);

impl StreamSender {
    fn push(&self, output: RequestOutput) {
        self.update(|state| {
            state.closed |= output.is_finished();
            state.outputs.push_back(output);
        });
    }

    /// Changes the state and wakes whoever waits on it.
    fn update(&self, change: impl FnOnce(&mut QueueState)) {
        let waker = {
            let mut state = lock(&self.0.state);
            change(&mut state);
            state.waker.take()
        };
        self.0.ready.notify_all();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        self.update(|state| state.closed = true);
    }
}
