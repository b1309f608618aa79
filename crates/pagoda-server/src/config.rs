//! What an embedder can tune about the server.

/// Settings of the HTTP layer; the engine's own (batch size, KV memory) are set on its builder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Generation requests admitted and not yet finished (running, or waiting in the engine's
    /// queue). The one past this limit is answered `429 Too Many Requests` at once.
    pub max_pending_requests: usize,
    /// The model id of `/v1/models`, and the only `model` a request may name (a request may
    /// also leave `model` out). By default the engine's model name.
    pub model_name: Option<String>,
    /// The largest request body accepted, in bytes; a larger one is answered 413.
    pub max_body_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_pending_requests: 1024,
            model_name: None,
            // A 128k-token prompt sent as token ids is under 1 MiB of JSON.
            max_body_bytes: 4 << 20,
        }
    }
}
