//! An OpenAI-compatible HTTP server over a pagoda engine, as a library that other programs
//! mount and the CLI serves.
//!
//! - `POST /v1/completions` and `POST /v1/chat/completions`: the OpenAI request and response
//!   schemas, `stream: true` as Server-Sent Events ending in `data: [DONE]`, and the sampling
//!   extensions vLLM made common (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
//!   `stop_token_ids`).
//! - `GET /v1/models`, `GET /health`, and `GET /metrics` in the Prometheus text format.
//!
//! Bad requests are answered 400 with an OpenAI error body; past
//! [`ServerConfig::max_pending_requests`] requests in flight, 429. A client that disconnects
//! mid-stream aborts its request, and the engine frees its KV blocks.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let handle = pagoda_engine::Engine::builder().model("model.gguf").build()?.spawn();
//! let app = pagoda_server::router(handle, pagoda_server::ServerConfig::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! pagoda_server::serve(listener, app, std::future::pending()).await?;
//! # Ok(())
//! # }
//! ```

mod admission;
mod config;
mod error;
mod generation;
mod logprobs;
mod metrics;
mod prometheus;
mod request;
mod response;
mod routes;
mod sampling;
mod sse;

use std::future::Future;

use axum::serve::ListenerExt;

pub use config::ServerConfig;
pub use error::{ApiError, ErrorDetail};
pub use routes::router;

/// Serves `app` (usually [`router`]'s) on `listener` until `shutdown` resolves, then lets the
/// requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Streamed tokens are small writes: without TCP_NODELAY, Nagle's algorithm holds each one
    // back until the previous is acknowledged.
    let listener = listener.tap_io(|stream| {
        // A connection without the option still works, only with more latency.
        let _ = stream.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
