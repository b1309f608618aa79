//! The HTTP routes and their handlers.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use pagoda_engine::{EngineHandle, Prompt, RequestStream, SamplingParams};

use crate::admission::Admission;
use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::generation::{Api, Job};
use crate::metrics::{self, ServerCounters};
use crate::prometheus;
use crate::request::{self, ChatCompletionRequest, CompletionRequest, StreamOptions};
use crate::response::{ModelCard, ModelList};
use crate::sampling::{max_tokens, sampling_params};

/// A completion that names no `max_tokens` gets 16, the OpenAI API's default.
const DEFAULT_COMPLETION_TOKENS: usize = 16;

/// What every handler shares.
struct AppState {
    handle: EngineHandle,
    model_name: Arc<str>,
    context: usize,
    admission: Admission,
    max_body_bytes: usize,
    /// Unix seconds when the router was built, the `created` of the model card.
    started: u64,
}

/// The server's routes over an engine: `POST /v1/completions`, `POST /v1/chat/completions`,
/// `GET /v1/models`, `GET /health` and `GET /metrics`. Mount it as it is, or nest or merge it
/// into a larger [`Router`].
pub fn router(handle: EngineHandle, config: ServerConfig) -> Router {
    let model_name: Arc<str> = config
        .model_name
        .unwrap_or_else(|| handle.model_name().to_owned())
        .into();
    let state = Arc::new(AppState {
        context: handle.max_context_tokens(),
        handle,
        model_name,
        admission: Admission::new(config.max_pending_requests),
        max_body_bytes: config.max_body_bytes,
        started: unix_seconds(),
    });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(state)
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request = match body
        .map_err(|e| state.body_error(e))
        .and_then(|body| request::parse::<CompletionRequest>(&body))
    {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    state
        .complete(request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request = match body
        .map_err(|e| state.body_error(e))
        .and_then(|body| request::parse::<ChatCompletionRequest>(&body))
    {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    state
        .chat(request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

impl AppState {
    async fn complete(&self, request: CompletionRequest) -> Result<Response, ApiError> {
        self.check_model(request.model.as_deref())?;
        if request.echo == Some(true) {
            return Err(ApiError::invalid_param(
                "echo",
                "echo is not supported by this server.",
            ));
        }
        if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid_param(
                "suffix",
                "suffix is not supported by this server.",
            ));
        }
        if let Some(n) = request.best_of.filter(|&n| n != 1) {
            return Err(ApiError::invalid_param(
                "best_of",
                format!("This server returns one choice per request; best_of must be 1, not {n}."),
            ));
        }
        let prompt = request.prompt()?;
        let mut params =
            sampling_params(&request.sampling, request.logprobs.map(|n| (n, "logprobs")))?;
        params.max_tokens =
            max_tokens(request.max_tokens, "max_tokens")?.unwrap_or(DEFAULT_COMPLETION_TOKENS);
        let slot = self.admission.admit()?;
        let stream = self.submit(prompt, params, false).await?;
        let job = Job {
            id: format!("cmpl-{}", stream.id().0),
            slot: Some(slot),
            stream,
            api: Api::Completions,
            created: unix_seconds(),
            model: Arc::clone(&self.model_name),
            logprobs: request.logprobs.is_some(),
            engine: self.handle.clone(),
            include_usage: StreamOptions::wants_usage(request.stream_options.as_ref()),
        };
        respond(job, request.stream == Some(true)).await
    }

    async fn chat(&self, request: ChatCompletionRequest) -> Result<Response, ApiError> {
        self.check_model(request.model.as_deref())?;
        request.check_supported()?;
        let messages = request.messages()?;
        let logprobs = match (request.logprobs, request.top_logprobs) {
            (Some(true), top) => Some((top.unwrap_or(0), "top_logprobs")),
            (_, Some(top)) if top > 0 => {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    "top_logprobs needs logprobs set to true.",
                ));
            }
            _ => None,
        };
        let mut params = sampling_params(&request.sampling, logprobs)?;
        let limit = match request.max_completion_tokens {
            Some(n) => max_tokens(Some(n), "max_completion_tokens")?,
            None => max_tokens(request.max_tokens, "max_tokens")?,
        };
        let fill_context = limit.is_none();
        if let Some(limit) = limit {
            params.max_tokens = limit;
        }
        let slot = self.admission.admit()?;
        let stream = self
            .submit(Prompt::Chat(messages), params, fill_context)
            .await?;
        let job = Job {
            id: format!("chatcmpl-{}", stream.id().0),
            slot: Some(slot),
            stream,
            api: Api::Chat,
            created: unix_seconds(),
            model: Arc::clone(&self.model_name),
            logprobs: logprobs.is_some(),
            engine: self.handle.clone(),
            include_usage: StreamOptions::wants_usage(request.stream_options.as_ref()),
        };
        respond(job, request.stream == Some(true)).await
    }

    /// Hands the request to the engine. Tokenizing a long prompt takes milliseconds, so it
    /// runs off the async workers. With `fill_context`, the request may generate up to the
    /// end of the context.
    async fn submit(
        &self,
        prompt: Prompt,
        mut params: SamplingParams,
        fill_context: bool,
    ) -> Result<RequestStream, ApiError> {
        let handle = self.handle.clone();
        let context = self.context;
        tokio::task::spawn_blocking(move || {
            if fill_context {
                params.max_tokens = room_for_reply(&handle, &prompt, context)?;
            }
            Ok(handle.submit(prompt, params)?)
        })
        .await
        .map_err(|e| ApiError::internal(format!("submitting the request failed: {e}")))?
    }

    /// A request may name the served model or none.
    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(model) if model != &*self.model_name => Err(ApiError::model_not_found(model)),
            _ => Ok(()),
        }
    }

    fn body_error(&self, rejection: BytesRejection) -> ApiError {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(self.max_body_bytes)
        } else {
            ApiError::invalid_request(format!(
                "The request body could not be read: {}",
                rejection.body_text()
            ))
        }
    }
}

/// The tokens left in the context after `prompt`.
fn room_for_reply(
    handle: &EngineHandle,
    prompt: &Prompt,
    context: usize,
) -> Result<usize, ApiError> {
    let used = handle.count_tokens(prompt)?;
    match context.checked_sub(used) {
        Some(room) if room > 0 => Ok(room),
        _ => Err(ApiError::invalid_param(
            "messages",
            format!(
                "The conversation takes {used} tokens, which leaves nothing of the context of \
                 {context} tokens for a reply."
            ),
        )),
    }
}

async fn respond(job: Job, stream: bool) -> Result<Response, ApiError> {
    if stream {
        Ok(job.into_event_stream())
    } else {
        job.collect().await
    }
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: &state.model_name,
            object: "model",
            created: state.started,
            owned_by: "pagoda",
            max_model_len: state.context,
        }],
    })
    .into_response()
}

/// 200 while the engine's step loop runs, 503 once it has stopped.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.handle.is_stopped() {
        ApiError::unavailable("The engine has stopped.").into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let counters = ServerCounters {
        pending_requests: state.admission.pending(),
        rejected_requests_total: state.admission.rejected(),
    };
    let text = metrics::render(&state.model_name, &state.handle.metrics(), counters);
    ([(header::CONTENT_TYPE, prometheus::CONTENT_TYPE)], text).into_response()
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError::method_not_allowed(uri.path())
}
