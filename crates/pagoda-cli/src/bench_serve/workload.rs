//! W3 of the benchmark suite as a list of requests: Poisson arrivals at a given rate, prompt
//! and output lengths drawn uniformly from fixed ranges, all from one seed, so two runs with
//! the same arguments send the same requests at the same offsets.

use std::ops::RangeInclusive;
use std::time::Duration;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The shape of a workload.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    /// Mean arrivals per second.
    pub rate: f64,
    /// Requests sent: the rate times the duration, rounded.
    pub num_requests: usize,
    /// Prompt lengths in tokens (W3: 64..=1024).
    pub prompt_len: RangeInclusive<usize>,
    /// Output lengths in tokens (W3: 32..=512).
    pub output_len: RangeInclusive<usize>,
    /// Prompt token ids are drawn from `0..vocab_size`.
    pub vocab_size: u32,
    pub seed: u64,
}

/// One request of the workload.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedRequest {
    /// When to send it, from the start of the run.
    pub at: Duration,
    /// Random token ids: the prompt's length is exact whatever the model's tokenizer.
    pub prompt: Vec<u32>,
    /// Tokens to generate; sent with `ignore_eos`, so every request generates exactly these.
    pub max_tokens: usize,
}

impl WorkloadSpec {
    /// The requests, in order of arrival. Inter-arrival gaps are exponential with mean
    /// `1 / rate`, which makes the arrivals a Poisson process.
    pub fn requests(&self) -> Vec<PlannedRequest> {
        // One stream for arrival times and one for contents, so changing the rate keeps the
        // same prompts and lengths.
        let mut arrivals = ChaCha8Rng::seed_from_u64(self.seed);
        let mut contents = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed_c0de);
        let mut at = 0.0f64;
        (0..self.num_requests)
            .map(|_| {
                // Inverse transform sampling; 1 - u lies in (0, 1], so the log is finite.
                let u: f64 = arrivals.random();
                at += -(1.0 - u).ln() / self.rate;
                let prompt_len = contents.random_range(self.prompt_len.clone());
                let max_tokens = contents.random_range(self.output_len.clone());
                let prompt = (0..prompt_len)
                    .map(|_| contents.random_range(0..self.vocab_size))
                    .collect();
                PlannedRequest {
                    at: Duration::from_secs_f64(at),
                    prompt,
                    max_tokens,
                }
            })
            .collect()
    }

    /// The longest prompt plus output the workload can ask for.
    pub fn longest_request(&self) -> usize {
        self.prompt_len.end() + self.output_len.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rate: f64, seed: u64) -> WorkloadSpec {
        WorkloadSpec {
            rate,
            num_requests: 2000,
            prompt_len: 64..=1024,
            output_len: 32..=512,
            vocab_size: 1000,
            seed,
        }
    }

    #[test]
    fn the_seed_fixes_the_workload() {
        assert_eq!(spec(5.0, 1).requests(), spec(5.0, 1).requests());
        assert_ne!(spec(5.0, 1).requests(), spec(5.0, 2).requests());
        // Another rate moves the arrivals, not the requests.
        let slow = spec(5.0, 1).requests();
        let fast = spec(50.0, 1).requests();
        assert!(
            slow.iter()
                .zip(&fast)
                .all(|(s, f)| s.prompt == f.prompt && s.max_tokens == f.max_tokens && s.at > f.at)
        );
    }

    #[test]
    fn arrivals_have_poisson_statistics() {
        let requests = spec(20.0, 3).requests();
        assert!(requests.windows(2).all(|w| w[0].at <= w[1].at));
        let gaps: Vec<f64> = std::iter::once(requests[0].at.as_secs_f64())
            .chain(
                requests
                    .windows(2)
                    .map(|w| (w[1].at - w[0].at).as_secs_f64()),
            )
            .collect();
        let n = gaps.len() as f64;
        let mean = gaps.iter().sum::<f64>() / n;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n;
        // Exponential gaps: mean 1/rate = 0.05 s and standard deviation equal to the mean.
        // With 2000 gaps both estimates are within a few percent.
        assert!((mean - 0.05).abs() < 0.005, "mean gap {mean}");
        assert!(
            (var.sqrt() / mean - 1.0).abs() < 0.1,
            "sd/mean {}",
            var.sqrt() / mean
        );
    }

    #[test]
    fn lengths_and_ids_stay_in_range_and_cover_it() {
        let requests = spec(5.0, 4).requests();
        let prompts: Vec<usize> = requests.iter().map(|r| r.prompt.len()).collect();
        let outputs: Vec<usize> = requests.iter().map(|r| r.max_tokens).collect();
        assert!(prompts.iter().all(|l| (64..=1024).contains(l)));
        assert!(outputs.iter().all(|l| (32..=512).contains(l)));
        assert!(*prompts.iter().min().unwrap() < 100 && *prompts.iter().max().unwrap() > 990);
        assert!(*outputs.iter().min().unwrap() < 50 && *outputs.iter().max().unwrap() > 490);
        assert!(requests.iter().flat_map(|r| &r.prompt).all(|&id| id < 1000));
        assert_eq!(spec(5.0, 4).longest_request(), 1536);
    }
}
