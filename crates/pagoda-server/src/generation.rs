//! One admitted request from the engine's outputs to the client: collected into a single
//! response, or sent as Server-Sent Events chunk by chunk.
//!
//! The request's [`RequestStream`] and its admission [`Slot`] live inside the response: when
//! the client goes away mid-stream, the server drops the body, which drops the stream (the
//! engine aborts the request and frees its blocks) and the slot (the next request may enter).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::{IntoResponse, Json, Response};
use futures_core::Stream;
use pagoda_engine::{EngineHandle, FinishReason, RequestOutput, RequestStream};

use crate::admission::Slot;
use crate::error::ApiError;
use crate::logprobs::{self, TextOffset};
use crate::response::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatLogprobs, Completion, CompletionChoice, CompletionLogprobs, Delta, Usage,
};
use crate::sse;

/// Which API shapes the response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Completions,
    Chat,
}

/// A request the engine has accepted, and how to answer it.
pub struct Job {
    pub stream: RequestStream,
    /// Released as soon as the engine is done with the request.
    pub slot: Option<Slot>,
    pub api: Api,
    /// The response id (`cmpl-…`, `chatcmpl-…`).
    pub id: String,
    /// Unix seconds at arrival.
    pub created: u64,
    pub model: Arc<str>,
    /// Whether the client asked for logprobs.
    pub logprobs: bool,
    /// The engine, whose tokenizer names the tokens of logprobs.
    pub engine: EngineHandle,
    /// Streaming only: send a last chunk with the token usage.
    pub include_usage: bool,
}

/// Why a request ended without a proper finish.
fn unfinished(reason: Option<FinishReason>) -> ApiError {
    match reason {
        Some(FinishReason::Abort) => {
            ApiError::internal("The engine failed while generating this request; its log says why.")
        }
        _ => ApiError::unavailable("The engine stopped before the request finished."),
    }
}

fn finish_name(reason: Option<FinishReason>) -> Option<&'static str> {
    reason.map(FinishReason::as_str)
}

impl Job {
    /// Waits for the whole completion and answers it as one JSON body.
    pub async fn collect(mut self) -> Result<Response, ApiError> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut usage = Usage::default();
        let mut finish = None;
        while let Some(output) = self.stream.next().await {
            text.push_str(&output.text_delta);
            tokens.extend(output.logprobs_delta);
            usage = Usage::new(output.prompt_tokens, output.completion_tokens);
            if output.finish_reason.is_some() {
                finish = output.finish_reason;
                break;
            }
        }
        self.slot.take();
        if !matches!(finish, Some(FinishReason::Stop | FinishReason::Length)) {
            return Err(unfinished(finish));
        }
        let response = match self.api {
            Api::Completions => {
                let logprobs = self.logprobs.then(|| {
                    let mut logprobs = CompletionLogprobs::default();
                    logprobs::extend_completion(
                        &mut logprobs,
                        &tokens,
                        self.engine.tokenizer(),
                        &mut TextOffset::default(),
                    );
                    logprobs
                });
                Json(Completion {
                    id: &self.id,
                    object: "text_completion",
                    created: self.created,
                    model: &self.model,
                    choices: vec![CompletionChoice {
                        index: 0,
                        text,
                        logprobs,
                        finish_reason: finish_name(finish),
                    }],
                    usage: Some(usage),
                })
                .into_response()
            }
            Api::Chat => {
                let logprobs = self.logprobs.then(|| {
                    let mut logprobs = ChatLogprobs::default();
                    logprobs::extend_chat(&mut logprobs, &tokens, self.engine.tokenizer());
                    logprobs
                });
                Json(ChatCompletion {
                    id: &self.id,
                    object: "chat.completion",
                    created: self.created,
                    model: &self.model,
                    choices: vec![ChatChoice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content: text,
                        },
                        logprobs,
                        finish_reason: finish_name(finish),
                    }],
                    usage,
                })
                .into_response()
            }
        };
        Ok(response)
    }

    /// Answers `200 OK` at once and streams the outputs as events.
    pub fn into_event_stream(self) -> Response {
        let state = match self.api {
            Api::Chat => State::Role,
            Api::Completions => State::Outputs,
        };
        let events = Events {
            job: self,
            state,
            text_offset: TextOffset::default(),
        };
        let mut response = Body::from_stream(events).into_response();
        for (name, value) in sse::HEADERS {
            response
                .headers_mut()
                .insert(name, axum::http::HeaderValue::from_static(value));
        }
        response
    }
}

/// Where a stream of events stands.
#[derive(Clone, Copy, Debug)]
enum State {
    /// A chat stream first announces the assistant role.
    Role,
    /// Forwarding the engine's outputs.
    Outputs,
    /// The request finished; the usage chunk is next.
    Usage(Usage),
    /// `[DONE]` is next.
    Done,
    Ended,
}

/// The events of one streamed request; implements [`Stream`] for the response body.
struct Events {
    job: Job,
    state: State,
    /// Completions logprobs: where the next token's text starts.
    text_offset: TextOffset,
}

impl Events {
    /// The chunk of one output, or None for an output with nothing to tell (a token whose
    /// text is held back until a character or a possible stop string completes).
    fn chunk(&mut self, output: RequestOutput) -> Option<String> {
        let finish = output.finish_reason;
        if output.text_delta.is_empty() && output.logprobs_delta.is_empty() && finish.is_none() {
            return None;
        }
        let job = &self.job;
        Some(match job.api {
            Api::Completions => {
                let logprobs = job.logprobs.then(|| {
                    let mut logprobs = CompletionLogprobs::default();
                    logprobs::extend_completion(
                        &mut logprobs,
                        &output.logprobs_delta,
                        job.engine.tokenizer(),
                        &mut self.text_offset,
                    );
                    logprobs
                });
                sse::event(&Completion {
                    id: &job.id,
                    object: "text_completion",
                    created: job.created,
                    model: &job.model,
                    choices: vec![CompletionChoice {
                        index: 0,
                        text: output.text_delta,
                        logprobs,
                        finish_reason: finish_name(finish),
                    }],
                    usage: None,
                })
            }
            Api::Chat => {
                let logprobs = job.logprobs.then(|| {
                    let mut logprobs = ChatLogprobs::default();
                    logprobs::extend_chat(
                        &mut logprobs,
                        &output.logprobs_delta,
                        job.engine.tokenizer(),
                    );
                    logprobs
                });
                let content = (!output.text_delta.is_empty()).then_some(output.text_delta);
                self.chat_chunk(
                    Delta {
                        role: None,
                        content,
                    },
                    logprobs,
                    finish_name(finish),
                )
            }
        })
    }

    fn chat_chunk(
        &self,
        delta: Delta,
        logprobs: Option<ChatLogprobs>,
        finish_reason: Option<&'static str>,
    ) -> String {
        sse::event(&ChatCompletionChunk {
            id: &self.job.id,
            object: "chat.completion.chunk",
            created: self.job.created,
            model: &self.job.model,
            choices: vec![ChatChunkChoice {
                index: 0,
                delta,
                logprobs,
                finish_reason,
            }],
            usage: None,
        })
    }

    /// The last chunk of a stream that asked for usage: no choices, the request's counts.
    fn usage_chunk(&self, usage: Usage) -> String {
        let job = &self.job;
        match job.api {
            Api::Completions => sse::event(&Completion {
                id: &job.id,
                object: "text_completion",
                created: job.created,
                model: &job.model,
                choices: Vec::new(),
                usage: Some(usage),
            }),
            Api::Chat => sse::event(&ChatCompletionChunk {
                id: &job.id,
                object: "chat.completion.chunk",
                created: job.created,
                model: &job.model,
                choices: Vec::new(),
                usage: Some(usage),
            }),
        }
    }
}

impl Stream for Events {
    type Item = Result<String, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let event = match this.state {
                State::Role => {
                    this.state = State::Outputs;
                    let delta = Delta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                    };
                    this.chat_chunk(delta, None, None)
                }
                State::Outputs => match this.job.stream.poll_next(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => {
                        this.job.slot.take();
                        this.state = State::Done;
                        sse::error_event(&unfinished(None))
                    }
                    Poll::Ready(Some(output)) => {
                        let finish = output.finish_reason;
                        let usage = Usage::new(output.prompt_tokens, output.completion_tokens);
                        if finish.is_some() {
                            this.job.slot.take();
                            this.state = if this.job.include_usage {
                                State::Usage(usage)
                            } else {
                                State::Done
                            };
                        }
                        if finish == Some(FinishReason::Abort) {
                            this.state = State::Done;
                            sse::error_event(&unfinished(finish))
                        } else {
                            match this.chunk(output) {
                                Some(event) => event,
                                None => continue,
                            }
                        }
                    }
                },
                State::Usage(usage) => {
                    this.state = State::Done;
                    this.usage_chunk(usage)
                }
                State::Done => {
                    this.state = State::Ended;
                    sse::DONE.to_owned()
                }
                State::Ended => return Poll::Ready(None),
            };
            return Poll::Ready(Some(Ok(event)));
        }
    }
}
