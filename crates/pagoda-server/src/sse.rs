//! Server-Sent Events framing for streamed completions: each event is one `data:` line and a
//! blank line (WHATWG HTML, "Server-sent events", 9.2.5); the stream ends with `data: [DONE]`,
//! as OpenAI's does.

use serde::Serialize;

use crate::error::ApiError;

/// The last event of every stream.
pub const DONE: &str = "data: [DONE]\n\n";

/// The response headers of an event stream.
pub const HEADERS: [(&str, &str); 3] = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    // Proxies such as nginx otherwise buffer the stream and hold back every token.
    ("x-accel-buffering", "no"),
];

/// One event carrying `value` as JSON. Compact JSON has no raw newlines (they are escaped
/// inside strings), so the event is a single `data:` line.
pub fn event(value: &impl Serialize) -> String {
    match serde_json::to_string(value) {
        Ok(json) => format!("data: {json}\n\n"),
        Err(e) => error_event(&ApiError::internal(format!("serializing a chunk: {e}"))),
    }
}

/// An error reported inside a stream whose `200 OK` has already been sent.
pub fn error_event(error: &ApiError) -> String {
    format!("data: {}\n\n", error.to_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_data_line() {
        let frame = event(&serde_json::json!({"text": "two\nlines"}));
        assert_eq!(frame, "data: {\"text\":\"two\\nlines\"}\n\n");
        assert_eq!(frame.matches('\n').count(), 2);
    }

    #[test]
    fn errors_travel_as_events() {
        let frame = error_event(&ApiError::internal("engine stopped"));
        let json: serde_json::Value =
            serde_json::from_str(frame.strip_prefix("data: ").unwrap().trim_end()).unwrap();
        assert_eq!(json["error"]["message"], "engine stopped");
    }
}
