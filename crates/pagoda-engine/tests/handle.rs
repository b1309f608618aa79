//! The engine on its own thread: concurrent submitters, blocking and async streams, aborts by
//! dropping a stream, refusals, and shutdown.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use pagoda_engine::{
    ChatMessage, Completion, EngineHandle, Error, FinishReason, Prompt, RequestStream,
    SamplingParams,
};
use support::{prompt, tiny_llama};

/// Wakes a parked thread.
struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to completion on this thread, parking while it is pending: the smallest
/// executor there is, enough to show that a stream needs no async runtime of its own.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(output) => return output,
            Poll::Pending => thread::park(),
        }
    }
}

fn drain(mut stream: RequestStream) -> Completion {
    let mut completion = Completion::new(stream.id());
    let mut finished = 0;
    while let Some(output) = stream.recv() {
        finished += usize::from(output.is_finished());
        completion.push(output);
    }
    assert_eq!(finished, 1, "exactly one last output");
    completion
}

async fn drain_async(mut stream: RequestStream) -> Completion {
    let mut completion = Completion::new(stream.id());
    while let Some(output) = stream.next().await {
        completion.push(output);
    }
    completion
}

fn params(i: u64) -> SamplingParams {
    SamplingParams {
        max_tokens: 4 + (i as usize % 9),
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

fn request(i: u64) -> Prompt {
    Prompt::Tokens(prompt(i, 3 + (i as usize * 5) % 40, 320))
}

/// Waits until `done` holds for the handle's metrics, for at most 10 s.
fn wait_for(handle: &EngineHandle, done: impl Fn(&pagoda_engine::Metrics) -> bool) {
    let start = Instant::now();
    while !done(&handle.metrics()) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            handle.metrics()
        );
        thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn thirty_two_streams_from_four_threads() {
    let mut reference = tiny_llama().build().expect("engine");
    let expected: Vec<Completion> = (0..32)
        .map(|i| {
            reference
                .generate(vec![request(i)], &params(i))
                .expect("generation")
                .remove(0)
        })
        .collect();

    let handle = tiny_llama()
        .max_num_seqs(16)
        .build()
        .expect("engine")
        .spawn();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let handle = handle.clone();
            thread::spawn(move || {
                // Submit all eight first, so that they run together, then read them.
                let streams: Vec<(u64, RequestStream)> = (0..8)
                    .map(|k| {
                        let i = t * 8 + k;
                        (i, handle.submit(request(i), params(i)).expect("accepted"))
                    })
                    .collect();
                streams
                    .into_iter()
                    .map(|(i, stream)| {
                        // Half of the streams are read as futures.
                        let completion = if i % 2 == 0 {
                            drain(stream)
                        } else {
                            block_on(drain_async(stream))
                        };
                        (i, completion)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for thread in threads {
        for (i, completion) in thread.join().expect("no panic") {
            let want = &expected[i as usize];
            assert_eq!(completion.token_ids, want.token_ids, "request {i}");
            assert_eq!(completion.text, want.text, "request {i}");
            assert_eq!(completion.finish_reason, FinishReason::Length);
        }
    }
    wait_for(&handle, |m| m.requests_finished_total == 32);
    let metrics = handle.metrics();
    assert_eq!(metrics.kv_usage, 0.0);
    assert_eq!(metrics.num_running + metrics.num_waiting, 0);
    handle.shutdown();
}

#[test]
fn dropping_a_stream_aborts_its_request() {
    let handle = tiny_llama().build().expect("engine").spawn();
    let long = SamplingParams {
        max_tokens: 100,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let mut stream = handle
        .submit(Prompt::Tokens(prompt(1, 20, 320)), long)
        .expect("accepted");
    let first = stream.recv().expect("a first token");
    assert_eq!(first.token_ids_delta.len(), 1);
    drop(stream);
    wait_for(&handle, |m| m.requests_aborted_total == 1);
    let metrics = handle.metrics();
    assert_eq!(
        metrics.kv_usage, 0.0,
        "the aborted request's blocks are free"
    );
    assert_eq!(metrics.requests_finished_total, 0);
    assert!(metrics.generation_tokens_total < 100);
    // The engine keeps serving.
    let out = drain(
        handle
            .submit(Prompt::Text("abc".into()), SamplingParams::greedy(3))
            .expect("accepted"),
    );
    assert!(out.finish_reason != FinishReason::Abort);
    handle.shutdown();
}

#[test]
fn submit_refuses_bad_requests_on_the_callers_thread() {
    let handle = tiny_llama().build().expect("engine").spawn();
    let refused = |prompt: Prompt, params: SamplingParams| {
        matches!(handle.submit(prompt, params), Err(Error::InvalidRequest(_)))
    };
    assert!(refused(Prompt::Tokens(vec![]), SamplingParams::greedy(1)));
    assert!(refused(
        Prompt::Tokens(vec![1; 100]),
        SamplingParams::greedy(29)
    ));
    assert!(refused(
        Prompt::Tokens(vec![320]),
        SamplingParams::greedy(1)
    ));
    let negative = SamplingParams {
        temperature: -0.5,
        ..SamplingParams::default()
    };
    assert!(refused(Prompt::Tokens(vec![1]), negative));
    assert_eq!(handle.max_context_tokens(), 128);
    assert_eq!(handle.model_name(), "tiny-llama");
    assert_eq!(
        handle.count_tokens(&Prompt::Text("ab c".into())).unwrap(),
        3
    );
    let chat = handle
        .render_chat(&[ChatMessage::new("user", "hi")])
        .expect("ChatML");
    assert!(chat.contains("<|im_start|>user\nhi<|im_end|>"), "{chat}");
    assert_eq!(handle.metrics().prompt_tokens_total, 0);
    handle.shutdown();
}

#[test]
fn shutdown_ends_every_stream() {
    let handle = tiny_llama().build().expect("engine").spawn();
    let long = SamplingParams {
        max_tokens: 120,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let mut streams: Vec<RequestStream> = (0..4)
        .map(|i| {
            handle
                .submit(Prompt::Tokens(prompt(i, 5, 320)), long.clone())
                .expect("accepted")
        })
        .collect();
    let other = handle.clone();
    other.shutdown();
    for stream in &mut streams {
        let mut last = None;
        while let Some(output) = stream.recv() {
            last = Some(output);
        }
        // Either it finished before the shutdown or its stream just ended.
        assert!(last.is_none_or(|o| o.completion_tokens <= 120));
    }
    assert!(handle.is_stopped());
    assert!(matches!(
        handle.submit(Prompt::Tokens(vec![1]), SamplingParams::greedy(1)),
        Err(Error::Stopped)
    ));
}

#[test]
fn a_handle_is_send_sync_and_clone() {
    fn shareable<T: Send + Sync + Clone>() {}
    fn sendable<T: Send>() {}
    shareable::<EngineHandle>();
    sendable::<RequestStream>();
    sendable::<pagoda_engine::Engine>();
}
