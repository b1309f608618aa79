//! One streamed completion request of the benchmark, timed from the client's side.

use std::time::{Duration, Instant};

use serde::Deserialize;

use super::stats::RequestRecord;
use super::workload::PlannedRequest;

/// Splits a byte stream of Server-Sent Events into the `data` of each event.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
}

impl SseParser {
    /// Adds received bytes; returns the data of every event they complete. Events end with a
    /// blank line; several `data:` lines of one event are joined by newlines; comments and
    /// other fields are skipped.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some((end, separator)) = find_event_end(&self.buffer) {
            let event = String::from_utf8_lossy(&self.buffer[..end]).into_owned();
            self.buffer.drain(..end + separator);
            let data: Vec<&str> = event
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|value| value.strip_prefix(' ').unwrap_or(value))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

/// The end of the first complete event in `buffer` and the length of the blank line after it.
fn find_event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<ChunkUsage>,
    error: Option<ChunkError>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
struct ChunkUsage {
    completion_tokens: usize,
}

#[derive(Deserialize)]
struct ChunkError {
    message: String,
}

/// Sends `request` to `url` (a completions endpoint) as a streamed completion and times it.
/// Never fails: what went wrong is in the record's `error`.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    request: &PlannedRequest,
    temperature: f32,
    run_start: Instant,
) -> RequestRecord {
    let sent = Instant::now();
    let mut record = RequestRecord {
        sent_at: sent.duration_since(run_start).as_secs_f64(),
        prompt_tokens: request.prompt.len(),
        max_tokens: request.max_tokens,
        output_tokens: 0,
        ttft: None,
        e2e: None,
        error: None,
    };
    let body = serde_json::json!({
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": temperature,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let outcome = stream(client, url, body.to_string(), sent, &mut record).await;
    record.e2e = Some(sent.elapsed().as_secs_f64());
    if let Err(error) = outcome {
        record.error = Some(error);
    }
    record
}

async fn stream(
    client: &reqwest::Client,
    url: &str,
    body: String,
    sent: Instant,
    record: &mut RequestRecord,
) -> Result<(), String> {
    let mut response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| describe(&e))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or(text);
        return Err(format!("HTTP {}: {message}", status.as_u16()));
    }
    let mut parser = SseParser::default();
    let mut text_chunks = 0;
    while let Some(bytes) = response.chunk().await.map_err(|e| describe(&e))? {
        for data in parser.push(&bytes) {
            if data == "[DONE]" {
                if record.output_tokens == 0 {
                    record.output_tokens = text_chunks;
                }
                return Ok(());
            }
            let chunk: Chunk = serde_json::from_str(&data)
                .map_err(|e| format!("a chunk that is not a completion ({e}): {data}"))?;
            if let Some(error) = chunk.error {
                return Err(format!("error in the stream: {}", error.message));
            }
            if chunk.choices.iter().any(|c| !c.text.is_empty()) {
                text_chunks += 1;
                record.ttft.get_or_insert(sent.elapsed().as_secs_f64());
            }
            if let Some(usage) = chunk.usage {
                record.output_tokens = usage.completion_tokens;
            }
        }
    }
    Err("the stream ended without [DONE]".into())
}

/// A transport error in a sentence, without the URL (the same for every request).
pub fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else if error.is_body() || error.is_decode() {
        "the response broke off"
    } else {
        "request failed"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        cause = inner.to_string();
        source = inner.source();
    }
    if cause.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {cause}")
    }
}

/// The HTTP client of a run; a request that takes longer than `timeout` in all fails.
pub fn client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads_are_joined() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"data: {\"a\"").is_empty());
        assert_eq!(parser.push(b": 1}\n\ndata: [DO"), vec!["{\"a\": 1}"]);
        assert_eq!(parser.push(b"NE]\n\n"), vec!["[DONE]"]);
        assert!(parser.push(b"").is_empty());
    }

    #[test]
    fn comments_fields_crlf_and_multiline_data() {
        let mut parser = SseParser::default();
        let events =
            parser.push(b": keep-alive\n\nevent: x\r\ndata:a\r\ndata: b\r\n\r\ndata: c\n\n");
        assert_eq!(events, vec!["a\nb", "c"]);
    }
}
