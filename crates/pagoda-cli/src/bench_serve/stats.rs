//! What one run of the serving benchmark measured, and its summary.

use serde::Serialize;

/// The outcome of one request, times in seconds from the start of the run.
#[derive(Clone, Debug, Serialize)]
pub struct RequestRecord {
    /// When the request was sent.
    pub sent_at: f64,
    pub prompt_tokens: usize,
    /// Tokens asked for.
    pub max_tokens: usize,
    /// Tokens received (the server's usage count).
    pub output_tokens: usize,
    /// Time to the first chunk with text, from sending.
    pub ttft: Option<f64>,
    /// Time to the end of the stream, from sending.
    pub e2e: Option<f64>,
    /// Why the request failed; None when it completed.
    pub error: Option<String>,
}

impl RequestRecord {
    /// Mean time per output token after the first.
    pub fn tpot(&self) -> Option<f64> {
        match (self.ttft, self.e2e) {
            (Some(ttft), Some(e2e)) if self.output_tokens > 1 => {
                Some((e2e - ttft) / (self.output_tokens - 1) as f64)
            }
            _ => None,
        }
    }
}

/// Mean and percentiles of one latency, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// Summarizes samples in seconds; None without samples.
    pub fn of_seconds(samples: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut ms: Vec<f64> = samples.into_iter().map(|s| s * 1e3).collect();
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        Some(Self {
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
            p50: percentile(&ms, 50.0),
            p90: percentile(&ms, 90.0),
            p99: percentile(&ms, 99.0),
            max: ms[ms.len() - 1],
        })
    }
}

/// The `p`-th percentile of sorted, non-empty `sorted`, interpolating linearly between the two
/// nearest ranks (numpy's default).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let below = rank.floor() as usize;
    let above = rank.ceil() as usize;
    sorted[below] + (sorted[above] - sorted[below]) * (rank - below as f64)
}

/// The summary of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    /// From the first request sent to the last response finished.
    pub wall_s: f64,
    /// Completed requests per second of wall time.
    pub request_throughput: f64,
    /// Output tokens per second of wall time.
    pub output_tok_s: f64,
    /// Prompt and output tokens per second of wall time.
    pub total_tok_s: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub ttft_ms: Option<Latency>,
    pub tpot_ms: Option<Latency>,
    pub e2e_ms: Option<Latency>,
    /// Each distinct failure and how often it happened, most frequent first.
    pub errors: Vec<ErrorCount>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ErrorCount {
    pub message: String,
    pub count: usize,
}

impl Summary {
    pub fn of(records: &[RequestRecord], wall_s: f64) -> Self {
        let done: Vec<&RequestRecord> = records.iter().filter(|r| r.error.is_none()).collect();
        let prompt_tokens: usize = done.iter().map(|r| r.prompt_tokens).sum();
        let output_tokens: usize = done.iter().map(|r| r.output_tokens).sum();
        let per_second = |n: usize| if wall_s > 0.0 { n as f64 / wall_s } else { 0.0 };
        let mut errors: Vec<ErrorCount> = Vec::new();
        for error in records.iter().filter_map(|r| r.error.as_ref()) {
            match errors.iter_mut().find(|e| e.message == *error) {
                Some(seen) => seen.count += 1,
                None => errors.push(ErrorCount {
                    message: error.clone(),
                    count: 1,
                }),
            }
        }
        errors.sort_by_key(|e| std::cmp::Reverse(e.count));
        Self {
            requests: records.len(),
            completed: done.len(),
            failed: records.len() - done.len(),
            wall_s,
            request_throughput: per_second(done.len()),
            output_tok_s: per_second(output_tokens),
            total_tok_s: per_second(prompt_tokens + output_tokens),
            prompt_tokens,
            output_tokens,
            ttft_ms: Latency::of_seconds(done.iter().filter_map(|r| r.ttft)),
            tpot_ms: Latency::of_seconds(done.iter().filter_map(|r| r.tpot())),
            e2e_ms: Latency::of_seconds(done.iter().filter_map(|r| r.e2e)),
            errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let sorted = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&sorted, 0.0), 1.0);
        assert_eq!(percentile(&sorted, 50.0), 3.0);
        assert_eq!(percentile(&sorted, 100.0), 5.0);
        assert_eq!(percentile(&sorted, 90.0), 4.6);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        let hundred: Vec<f64> = (1..=101).map(f64::from).collect();
        assert_eq!(percentile(&hundred, 99.0), 100.0);
    }

    fn record(ttft: f64, e2e: f64, output_tokens: usize, error: Option<&str>) -> RequestRecord {
        RequestRecord {
            sent_at: 0.0,
            prompt_tokens: 10,
            max_tokens: output_tokens,
            output_tokens,
            ttft: Some(ttft),
            e2e: Some(e2e),
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn a_summary_counts_only_completed_requests() {
        let records = [
            record(0.1, 1.1, 11, None),
            record(0.3, 2.3, 21, None),
            record(0.0, 0.0, 0, Some("HTTP 429")),
            record(0.0, 0.0, 0, Some("HTTP 429")),
            record(0.0, 0.0, 0, Some("connection refused")),
        ];
        let summary = Summary::of(&records, 4.0);
        assert_eq!(
            (summary.requests, summary.completed, summary.failed),
            (5, 2, 3)
        );
        assert_eq!(summary.output_tokens, 32);
        assert_eq!(summary.output_tok_s, 8.0);
        assert_eq!(summary.total_tok_s, 13.0);
        assert_eq!(summary.request_throughput, 0.5);
        let tpot = summary.tpot_ms.unwrap();
        assert!((tpot.mean - 100.0).abs() < 1e-9, "{tpot:?}");
        let ttft = summary.ttft_ms.unwrap();
        assert!((ttft.p50 - 200.0).abs() < 1e-9 && (ttft.max - 300.0).abs() < 1e-9);
        let errors: Vec<(&str, usize)> = summary
            .errors
            .iter()
            .map(|e| (e.message.as_str(), e.count))
            .collect();
        assert_eq!(errors, vec![("HTTP 429", 2), ("connection refused", 1)]);
        assert!(Summary::of(&[], 1.0).ttft_ms.is_none());
    }
}
