//! A writer of the Prometheus text exposition format, version 0.0.4
//! (prometheus.io/docs/instrumenting/exposition_formats): `# HELP` and `# TYPE` lines, then
//! one sample per line.

use std::fmt::Write;

/// The content type of the text format, for the `/metrics` response.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Labels put on every sample, e.g. `[("model_name", "smollm2")]`.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// Builds one exposition. Each family is written whole (its HELP, TYPE and samples) by one
/// call, so families never interleave.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn gauge(&mut self, name: &str, help: &str, labels: Labels, value: f64) {
        self.header(name, help, "gauge");
        self.sample(name, labels, None, value);
    }

    /// A monotonically increasing total; `name` should end in `_total`.
    pub fn counter(&mut self, name: &str, help: &str, labels: Labels, value: f64) {
        self.header(name, help, "counter");
        self.sample(name, labels, None, value);
    }

    /// A histogram from cumulative bucket counts: `buckets` holds (upper bound, observations
    /// at most that bound), bounds increasing. The `+Inf` bucket is `count`; a bucket of
    /// infinite bound in `buckets` is left out in its favour.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: Labels,
        buckets: &[(f64, u64)],
        sum: f64,
        count: u64,
    ) {
        self.header(name, help, "histogram");
        let bucket = format!("{name}_bucket");
        for &(bound, cumulative) in buckets.iter().filter(|(bound, _)| bound.is_finite()) {
            self.sample(
                &bucket,
                labels,
                Some(&format_value(bound)),
                cumulative as f64,
            );
        }
        self.sample(&bucket, labels, Some("+Inf"), count as f64);
        self.sample(&format!("{name}_sum"), labels, None, sum);
        self.sample(&format!("{name}_count"), labels, None, count as f64);
    }

    pub fn finish(self) -> String {
        self.text
    }

    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        // Writing to a String cannot fail.
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: Labels, le: Option<&str>, value: f64) {
        self.text.push_str(name);
        let le = le.map(|le| ("le", le));
        let mut all = labels.iter().copied().chain(le).peekable();
        if all.peek().is_some() {
            self.text.push('{');
            for (i, (key, value)) in all.enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{key}=\"{}\"", escape_label(value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_value(value));
    }
}

/// Label values escape backslash, double quote and line feed.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// Go's float syntax, which Prometheus parses: `+Inf`, `-Inf`, `NaN`, else a decimal number.
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_in_the_text_format() {
        let mut out = Exposition::new();
        let labels: Labels = &[("model_name", "a\"b")];
        out.gauge(
            "pagoda_kv_cache_usage_ratio",
            "KV blocks in use.",
            labels,
            0.25,
        );
        out.counter(
            "pagoda_preemptions_total",
            "Preemptions.\nSince start.",
            &[],
            3.0,
        );
        out.histogram(
            "pagoda_e2e_request_latency_seconds",
            "Latency.",
            labels,
            &[(0.5, 1), (1.0, 3), (f64::INFINITY, 4)],
            4.5,
            4,
        );
        assert_eq!(
            out.finish(),
            "# HELP pagoda_kv_cache_usage_ratio KV blocks in use.\n\
             # TYPE pagoda_kv_cache_usage_ratio gauge\n\
             pagoda_kv_cache_usage_ratio{model_name=\"a\\\"b\"} 0.25\n\
             # HELP pagoda_preemptions_total Preemptions.\\nSince start.\n\
             # TYPE pagoda_preemptions_total counter\n\
             pagoda_preemptions_total 3\n\
             # HELP pagoda_e2e_request_latency_seconds Latency.\n\
             # TYPE pagoda_e2e_request_latency_seconds histogram\n\
             pagoda_e2e_request_latency_seconds_bucket{model_name=\"a\\\"b\",le=\"0.5\"} 1\n\
             pagoda_e2e_request_latency_seconds_bucket{model_name=\"a\\\"b\",le=\"1\"} 3\n\
             pagoda_e2e_request_latency_seconds_bucket{model_name=\"a\\\"b\",le=\"+Inf\"} 4\n\
             pagoda_e2e_request_latency_seconds_sum{model_name=\"a\\\"b\"} 4.5\n\
             pagoda_e2e_request_latency_seconds_count{model_name=\"a\\\"b\"} 4\n"
        );
    }

    #[test]
    fn special_values_use_go_spelling() {
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(1e-6), "0.000001");
        assert_eq!(escape_label("a\\b\nc"), "a\\\\b\\nc");
    }
}
