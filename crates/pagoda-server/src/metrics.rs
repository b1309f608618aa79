//! `/metrics`: the engine's [`Metrics`] snapshot and the server's own counters in the
//! Prometheus text format. Names follow Prometheus conventions (base units, `_total` on
//! counters) under the `pagoda_` prefix; every sample carries the `model_name` label.

use pagoda_engine::{Histogram, Metrics};

use crate::prometheus::Exposition;

/// What the HTTP layer counts itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerCounters {
    /// Generation requests holding an admission slot now.
    pub pending_requests: usize,
    /// Requests answered 429 since start.
    pub rejected_requests_total: u64,
}

/// The exposition of one scrape.
pub fn render(model_name: &str, engine: &Metrics, server: ServerCounters) -> String {
    let labels: &[(&str, &str)] = &[("model_name", model_name)];
    let mut out = Exposition::new();
    out.gauge(
        "pagoda_num_requests_running",
        "Requests computing in the engine now.",
        labels,
        engine.num_running as f64,
    );
    out.gauge(
        "pagoda_num_requests_waiting",
        "Requests waiting for their first admission.",
        labels,
        engine.num_waiting as f64,
    );
    out.gauge(
        "pagoda_num_requests_preempted",
        "Requests preempted and waiting to be recomputed.",
        labels,
        engine.num_preempted as f64,
    );
    out.gauge(
        "pagoda_kv_cache_usage_ratio",
        "Fraction of KV-cache blocks held by requests (0 to 1).",
        labels,
        f64::from(engine.kv_usage),
    );
    out.gauge(
        "pagoda_prefix_cache_hit_ratio",
        "Fraction of prompt tokens looked up in the prefix cache that were found.",
        labels,
        f64::from(engine.prefix_cache_hit_rate),
    );
    out.gauge(
        "pagoda_server_pending_requests",
        "Generation requests admitted by the server and not yet finished.",
        labels,
        server.pending_requests as f64,
    );
    let counters = [
        (
            "pagoda_preemptions_total",
            "Preemptions since start.",
            engine.preemptions_total,
        ),
        (
            "pagoda_requests_finished_total",
            "Requests that finished by a stop condition or their length limit.",
            engine.requests_finished_total,
        ),
        (
            "pagoda_requests_aborted_total",
            "Requests aborted by their client or by an engine failure.",
            engine.requests_aborted_total,
        ),
        (
            "pagoda_prompt_tokens_total",
            "Prompt tokens of accepted requests.",
            engine.prompt_tokens_total,
        ),
        (
            "pagoda_generation_tokens_total",
            "Tokens generated.",
            engine.generation_tokens_total,
        ),
        (
            "pagoda_step_errors_total",
            "Engine steps that failed (their requests were aborted).",
            engine.step_errors_total,
        ),
        (
            "pagoda_server_rejected_requests_total",
            "Requests answered 429 because the pending-request limit was reached.",
            server.rejected_requests_total,
        ),
    ];
    for (name, help, value) in counters {
        out.counter(name, help, labels, value as f64);
    }
    let histograms: [(&str, &str, &Histogram); 4] = [
        (
            "pagoda_time_to_first_token_seconds",
            "From a request's arrival to its first output token.",
            &engine.time_to_first_token,
        ),
        (
            "pagoda_time_per_output_token_seconds",
            "Between two consecutive output tokens of a request.",
            &engine.time_per_output_token,
        ),
        (
            "pagoda_e2e_request_latency_seconds",
            "From a request's arrival to its last output.",
            &engine.e2e_latency,
        ),
        (
            "pagoda_request_queue_time_seconds",
            "From a request's arrival to its first admission.",
            &engine.queue_time,
        ),
    ];
    for (name, help, histogram) in histograms {
        out.histogram(
            name,
            help,
            labels,
            &histogram.buckets,
            histogram.sum,
            histogram.count,
        );
    }
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line that starts with `series`.
    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn a_snapshot_renders_every_family() {
        let mut metrics = Metrics {
            num_running: 3,
            num_waiting: 2,
            kv_usage: 0.5,
            preemptions_total: 4,
            generation_tokens_total: 99,
            ..Metrics::default()
        };
        metrics.time_to_first_token.observe(0.003);
        metrics.time_to_first_token.observe(30.0);
        let text = render(
            "m",
            &metrics,
            ServerCounters {
                pending_requests: 5,
                rejected_requests_total: 6,
            },
        );
        let label = "{model_name=\"m\"}";
        assert_eq!(
            sample(&text, &format!("pagoda_num_requests_running{label}")),
            3.0
        );
        assert_eq!(
            sample(&text, &format!("pagoda_num_requests_waiting{label}")),
            2.0
        );
        assert_eq!(
            sample(&text, &format!("pagoda_kv_cache_usage_ratio{label}")),
            0.5
        );
        assert_eq!(
            sample(&text, &format!("pagoda_preemptions_total{label}")),
            4.0
        );
        assert_eq!(
            sample(&text, &format!("pagoda_generation_tokens_total{label}")),
            99.0
        );
        assert_eq!(
            sample(&text, &format!("pagoda_server_pending_requests{label}")),
            5.0
        );
        assert_eq!(
            sample(
                &text,
                &format!("pagoda_server_rejected_requests_total{label}")
            ),
            6.0
        );
        let ttft = "pagoda_time_to_first_token_seconds";
        assert_eq!(
            sample(
                &text,
                &format!("{ttft}_bucket{{model_name=\"m\",le=\"0.001\"}}")
            ),
            0.0
        );
        assert_eq!(
            sample(
                &text,
                &format!("{ttft}_bucket{{model_name=\"m\",le=\"0.005\"}}")
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                &format!("{ttft}_bucket{{model_name=\"m\",le=\"+Inf\"}}")
            ),
            2.0
        );
        assert_eq!(sample(&text, &format!("{ttft}_count{label}")), 2.0);
        assert_eq!(
            text.matches("le=\"+Inf\"").count(),
            4,
            "one +Inf bucket per histogram"
        );
        // Every family is declared once, before its samples.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
                })
                .unwrap_or(name);
            assert_eq!(
                text.matches(&format!("# TYPE {family} ")).count(),
                1,
                "{family}"
            );
        }
    }
}
