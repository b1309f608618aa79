//! What the engine has done: counters since start, gauges of now, and latency histograms.

/// Latency buckets for the time to the first token and the queue time, in seconds: from a
/// millisecond (a prefix-cache hit on a GPU) to minutes (a deep queue).
const FIRST_TOKEN_BUCKETS: [f64; 19] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];

/// Buckets for the time between two output tokens, in seconds: a few milliseconds for a
/// small model on a GPU up to seconds on a loaded CPU.
const PER_TOKEN_BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    5.0,
];

/// Buckets for a whole request, in seconds.
const REQUEST_BUCKETS: [f64; 19] = [
    0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0,
];

/// A Prometheus-style histogram: cumulative counts of observations at or below each upper
/// bound, the last bound being `+inf` (so its count is `count`), and the sum of all
/// observations.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    /// `(upper bound in seconds, observations <= bound)`, bounds ascending, ending at `+inf`.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// An empty histogram with these finite upper bounds (ascending) and `+inf`.
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            buckets: bounds
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .map(|bound| (bound, 0))
                .collect(),
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, value: f64) {
        for (bound, count) in &mut self.buckets {
            if value <= *bound {
                *count += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    /// The mean observation, 0 before the first.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

/// A snapshot of the engine: counters are totals since it started, gauges are values at the
/// snapshot, and latencies are histograms in seconds measured from a request's arrival at
/// `add_request`.
#[derive(Clone, Debug, PartialEq)]
pub struct Metrics {
    /// Requests computing now.
    pub num_running: usize,
    /// Requests waiting for their first admission.
    pub num_waiting: usize,
    /// Requests preempted (their KV blocks taken back) and waiting to be recomputed.
    pub num_preempted: usize,
    /// Fraction of the KV blocks held by requests, in `[0, 1]` (cached blocks no request holds
    /// count as free).
    pub kv_usage: f32,
    /// Fraction of prompt tokens looked up in the prefix cache that were found there.
    pub prefix_cache_hit_rate: f32,
    pub preemptions_total: u64,
    /// Requests that finished with `Stop` or `Length`.
    pub requests_finished_total: u64,
    /// Requests that finished with `Abort`: aborted by the caller, or failed in the engine.
    pub requests_aborted_total: u64,
    /// Prompt tokens of accepted requests.
    pub prompt_tokens_total: u64,
    /// Tokens sampled.
    pub generation_tokens_total: u64,
    /// Steps that failed; the requests they held were aborted.
    pub step_errors_total: u64,
    /// The message of the most recent failure, if any.
    pub last_error: Option<String>,
    /// Arrival to first output token.
    pub time_to_first_token: Histogram,
    /// Each interval between two output tokens of a request.
    pub time_per_output_token: Histogram,
    /// Arrival to the last output of a request that finished with `Stop` or `Length`.
    pub e2e_latency: Histogram,
    /// Arrival to first admission.
    pub queue_time: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            num_running: 0,
            num_waiting: 0,
            num_preempted: 0,
            kv_usage: 0.0,
            prefix_cache_hit_rate: 0.0,
            preemptions_total: 0,
            requests_finished_total: 0,
            requests_aborted_total: 0,
            prompt_tokens_total: 0,
            generation_tokens_total: 0,
            step_errors_total: 0,
            last_error: None,
            time_to_first_token: Histogram::new(&FIRST_TOKEN_BUCKETS),
            time_per_output_token: Histogram::new(&PER_TOKEN_BUCKETS),
            e2e_latency: Histogram::new(&REQUEST_BUCKETS),
            queue_time: Histogram::new(&FIRST_TOKEN_BUCKETS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_end_at_infinity() {
        let mut histogram = Histogram::new(&[0.1, 1.0]);
        for value in [0.05, 0.1, 0.5, 3.0] {
            histogram.observe(value);
        }
        assert_eq!(histogram.buckets, [(0.1, 2), (1.0, 3), (f64::INFINITY, 4)]);
        assert_eq!(histogram.count, 4);
        assert!((histogram.sum - 3.65).abs() < 1e-12);
        assert!((histogram.mean() - 0.9125).abs() < 1e-12);
        assert_eq!(Histogram::new(&[1.0]).mean(), 0.0);
    }

    #[test]
    fn default_bounds_ascend() {
        for bounds in [
            &FIRST_TOKEN_BUCKETS[..],
            &PER_TOKEN_BUCKETS[..],
            &REQUEST_BUCKETS[..],
        ] {
            assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
