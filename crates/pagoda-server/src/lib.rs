//! OpenAI-compatible HTTP server (`/v1/completions`, `/v1/chat/completions`, `/v1/models`,
//! `/health`, `/metrics`) as a library that other programs mount and the CLI serves.
//!
//! Not implemented yet.
