//! Choosing the next token from a row of logits: greedy argmax, and seeded random sampling with
//! temperature, top-k, top-p (nucleus) and min-p filtering.
//!
//! This is the reference the GPU sampler is checked against, so it favours exactness over speed:
//! probabilities are computed in `f64` and ties are broken by token id, so that a given
//! configuration, seed and row of logits always yield the same token.
//!
//! The filters run in the order of Hugging Face transformers' logits warpers (and vLLM's sampler):
//! temperature, then top-k, then top-p, then min-p, each on the distribution the previous one left.
//!
//! Before any of them, [`Penalties`] may lower the logits of tokens already seen (repetition,
//! presence and frequency penalties, as vLLM applies them); [`logprobs`] reports the log-softmax of
//! a row and its most likely tokens.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::{Error, Result};

/// How to pick a token from logits.
///
/// A filter set to its "off" value (`top_k = 0`, `top_p = 1`, `min_p = 0`) keeps every token.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Logits are divided by this before the softmax; 0 means greedy (always the most likely
    /// token), values below 1 sharpen the distribution and values above 1 flatten it.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (tokens tied with the k-th are kept too, as in
    /// transformers and vLLM); 0 turns the filter off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probabilities add up to at least `top_p`
    /// (always at least one token); 1 turns the filter off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the probability of the most likely
    /// token; 0 turns the filter off.
    pub min_p: f32,
}

impl Default for SamplingConfig {
    /// Greedy decoding.
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingConfig {
    /// Greedy decoding: temperature 0, every filter off.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
        }
    }

    /// Whether this configuration always picks the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field's range: `temperature` finite and `>= 0`, `top_p` in `(0, 1]`,
    /// `min_p` in `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::InvalidSampling(format!(
                "temperature must be finite and >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidSampling(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return Err(Error::InvalidSampling(format!(
                "min_p must be in [0, 1], got {}",
                self.min_p
            )));
        }
        Ok(())
    }
}

/// The index of the largest logit. Ties go to the lowest index (as `torch.argmax`); NaN logits are
/// ignored.
///
/// Fails if `logits` is empty or holds only NaN.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (index, &logit) in logits.iter().enumerate() {
        if logit.is_nan() {
            continue;
        }
        // Strictly greater: an equal logit later in the row does not replace the first one.
        if best.is_none_or(|(_, best_logit)| logit > best_logit) {
            best = Some((index, logit));
        }
    }
    let (index, _) = best.ok_or_else(|| {
        Error::InvalidSampling(format!(
            "argmax over {} logits, none of them a number",
            logits.len()
        ))
    })?;
    token_id(index)
}

/// A token that survived filtering, with its renormalised probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenProb {
    /// The token's id: its index in the row of logits.
    pub id: u32,
    /// Its probability after filtering; the probabilities of one distribution sum to 1.
    pub prob: f64,
}

/// The distribution that [`Sampler::sample`] draws from: the tokens that survive temperature,
/// top-k, top-p and min-p, with probabilities renormalised to sum to 1, most likely first (ties
/// by lowest id).
///
/// A greedy configuration gives the argmax with probability 1. NaN logits are never kept. Fails
/// if the configuration is invalid, or if no logit is a number or every one is `-inf`.
pub fn distribution(logits: &[f32], config: &SamplingConfig) -> Result<Vec<TokenProb>> {
    config.validate()?;
    if config.is_greedy() {
        return Ok(vec![TokenProb {
            id: argmax(logits)?,
            prob: 1.0,
        }]);
    }

    let mut candidates = Vec::with_capacity(logits.len());
    for (index, &logit) in logits.iter().enumerate() {
        if !logit.is_nan() {
            candidates.push(Candidate {
                id: token_id(index)?,
                logit,
            });
        }
    }
    top_k(&mut candidates, config.top_k);
    candidates.sort_by(Candidate::most_likely_first);

    let mut probs = softmax(&candidates, config.temperature, logits.len())?;
    top_p(&mut probs, config.top_p);
    min_p(&mut probs, config.min_p);

    let total: f64 = probs.iter().map(|token| token.prob).sum();
    for token in &mut probs {
        token.prob /= total;
    }
    Ok(probs)
}

/// Draws tokens from logits with a fixed configuration and a seeded random generator: the same
/// seed and the same logits give the same tokens.
#[derive(Clone, Debug)]
pub struct Sampler {
    config: SamplingConfig,
    rng: ChaCha20Rng,
}

impl Sampler {
    /// A sampler for `config` (validated here) whose random stream starts from `seed`.
    pub fn new(config: SamplingConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            rng: ChaCha20Rng::seed_from_u64(seed),
        })
    }

    /// The configuration this sampler was built with.
    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// The next number of this sampler's random stream, uniform in `[0, 1)`: the draw
    /// [`sample`](Self::sample) makes for a token when the configuration is not greedy. A
    /// sampler that runs elsewhere (on a GPU) takes its draws from here, so a seed gives the
    /// same stream of draws wherever the tokens are picked.
    pub fn draw(&mut self) -> f64 {
        self.rng.random()
    }

    /// Picks the next token: the argmax when the configuration is greedy (which draws no random
    /// number), otherwise a draw from [`distribution`].
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if self.config.is_greedy() {
            return argmax(logits);
        }
        let probs = distribution(logits, &self.config)?;
        let target = self.draw();
        let mut cumulative = 0.0;
        for token in &probs {
            cumulative += token.prob;
            if target < cumulative {
                return Ok(token.id);
            }
        }
        // The probabilities sum to 1 only up to rounding; a draw past the end belongs to the last
        // token.
        probs
            .last()
            .map(|token| token.id)
            .ok_or_else(|| Error::InvalidSampling("no token left to sample from".into()))
    }
}

/// Penalties on tokens that already occur in a sequence, with vLLM's definitions and order
/// (`apply_penalties` in vLLM's `model_executor/layers/utils.py`):
///
/// 1. `repetition` (Keskar et al., 2019, CTRL): every token of the prompt or the output so far has
///    a positive logit divided by it and a negative one multiplied by it; 1 is off.
/// 2. `frequency`: subtracted once per occurrence of the token in the output; 0 is off.
/// 3. `presence`: subtracted once from every token that occurs in the output; 0 is off.
///
/// Values above the "off" value discourage repetition, values below encourage it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Penalties {
    pub repetition: f32,
    pub presence: f32,
    pub frequency: f32,
}

impl Default for Penalties {
    /// No penalty.
    fn default() -> Self {
        Self::none()
    }
}

impl Penalties {
    /// Bound on `presence` and `frequency` (either sign), as in vLLM and the OpenAI API.
    pub const MAX_ADDITIVE: f32 = 2.0;

    /// Every penalty off.
    pub fn none() -> Self {
        Self {
            repetition: 1.0,
            presence: 0.0,
            frequency: 0.0,
        }
    }

    /// Whether applying these penalties leaves every logit as it is.
    pub fn is_off(&self) -> bool {
        self.repetition == 1.0 && self.presence == 0.0 && self.frequency == 0.0
    }

    /// Checks the ranges: `repetition` finite and `> 0`, `presence` and `frequency` in
    /// `[-2, 2]`.
    pub fn validate(&self) -> Result<()> {
        if !(self.repetition.is_finite() && self.repetition > 0.0) {
            return Err(Error::InvalidSampling(format!(
                "repetition_penalty must be finite and > 0, got {}",
                self.repetition
            )));
        }
        for (name, value) in [
            ("presence_penalty", self.presence),
            ("frequency_penalty", self.frequency),
        ] {
            if value.is_nan() || value.abs() > Self::MAX_ADDITIVE {
                return Err(Error::InvalidSampling(format!(
                    "{name} must be in [-{max}, {max}], got {value}",
                    max = Self::MAX_ADDITIVE
                )));
            }
        }
        Ok(())
    }

    /// Applies the penalties in place to one row of logits, for a sequence whose prompt is
    /// `prompt` and whose output so far is `output`.
    ///
    /// Fails if the penalties are invalid or a token id lies outside the row.
    pub fn apply(&self, logits: &mut [f32], prompt: &[u32], output: &[u32]) -> Result<()> {
        self.validate()?;
        if self.is_off() {
            return Ok(());
        }
        let vocab = logits.len();
        if let Some(&bad) = prompt.iter().chain(output).find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidSampling(format!(
                "token {bad} of the sequence is outside the {vocab} logits"
            )));
        }
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &token in output {
            *counts.entry(token).or_default() += 1;
        }
        if self.repetition != 1.0 {
            let seen: HashSet<u32> = prompt
                .iter()
                .copied()
                .chain(counts.keys().copied())
                .collect();
            for token in seen {
                let logit = &mut logits[token as usize];
                if *logit > 0.0 {
                    *logit /= self.repetition;
                } else {
                    *logit *= self.repetition;
                }
            }
        }
        for (&token, &count) in &counts {
            let logit = &mut logits[token as usize];
            *logit -= self.frequency * count as f32;
            *logit -= self.presence;
        }
        Ok(())
    }
}

/// The log-probability of one token under a row of logits and the row's most likely tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Logprobs {
    /// The token asked about.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The `n` most likely tokens with their log-probabilities, most likely first (ties by lowest
    /// id); may include `token`.
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax of `logits` at `token`, and its `top_n` most likely tokens.
///
/// Computed in `f64` from the logits as given: callers that want the model's own distribution
/// (vLLM's default, `raw_logprobs`) pass the logits before penalties and temperature. NaN
/// logits count as `-inf`. Fails if `token` lies outside the row or no logit is a number
/// above `-inf`.
pub fn logprobs(logits: &[f32], token: u32, top_n: usize) -> Result<Logprobs> {
    let vocab = logits.len();
    let chosen = *logits.get(token as usize).ok_or_else(|| {
        Error::InvalidSampling(format!("token {token} is outside the {vocab} logits"))
    })?;
    let value = |logit: f32| {
        if logit.is_nan() {
            f32::NEG_INFINITY
        } else {
            logit
        }
    };
    let max = logits
        .iter()
        .copied()
        .map(value)
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return Err(Error::InvalidSampling(format!(
            "all {vocab} logits are NaN or -inf"
        )));
    }
    // With +inf logits those share all the mass equally and every other token has none.
    let infinite = logits.iter().filter(|&&l| l == f32::INFINITY).count();
    let log_sum_exp = if infinite > 0 {
        0.0
    } else {
        let max = f64::from(max);
        let sum: f64 = logits
            .iter()
            .map(|&l| (f64::from(value(l)) - max).exp())
            .sum();
        max + sum.ln()
    };
    let logprob = |logit: f32| -> f32 {
        let logit = value(logit);
        match (infinite, logit == f32::INFINITY) {
            (0, _) => (f64::from(logit) - log_sum_exp) as f32,
            (_, true) => -(infinite as f64).ln() as f32,
            (_, false) => f32::NEG_INFINITY,
        }
    };
    let mut top = Vec::new();
    if top_n > 0 {
        let mut order: Vec<Candidate> = logits
            .iter()
            .enumerate()
            .map(|(index, &logit)| {
                Ok(Candidate {
                    id: token_id(index)?,
                    logit: value(logit),
                })
            })
            .collect::<Result<_>>()?;
        if top_n < order.len() {
            order.select_nth_unstable_by(top_n - 1, Candidate::most_likely_first);
            order.truncate(top_n);
        }
        order.sort_by(Candidate::most_likely_first);
        top = order.iter().map(|c| (c.id, logprob(c.logit))).collect();
    }
    Ok(Logprobs {
        token,
        logprob: logprob(chosen),
        top,
    })
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u32,
    logit: f32,
}

impl Candidate {
    /// Descending logit, then ascending id: the order in which top-p accumulates mass.
    fn most_likely_first(a: &Self, b: &Self) -> Ordering {
        b.logit
            .partial_cmp(&a.logit)
            .unwrap_or(Ordering::Equal)
            .then(a.id.cmp(&b.id))
    }
}

fn token_id(index: usize) -> Result<u32> {
    u32::try_from(index).map_err(|_| {
        Error::InvalidSampling(format!(
            "token index {index} does not fit in a u32 token id"
        ))
    })
}

/// Keeps the `k` largest logits and every logit tied with the k-th.
fn top_k(candidates: &mut Vec<Candidate>, k: usize) {
    if k == 0 || k >= candidates.len() {
        return;
    }
    let (_, kth, _) = candidates.select_nth_unstable_by(k - 1, Candidate::most_likely_first);
    let threshold = kth.logit;
    candidates.retain(|candidate| candidate.logit >= threshold);
}

/// `softmax(logit / temperature)` over the candidates (sorted most likely first), in `f64`.
///
/// The maximum is subtracted before dividing by the temperature, so that a tiny temperature sends
/// the others to zero instead of overflowing.
fn softmax(candidates: &[Candidate], temperature: f32, vocab: usize) -> Result<Vec<TokenProb>> {
    let no_mass = || Error::InvalidSampling(format!("all {vocab} logits are NaN or -inf"));
    let max = candidates.first().ok_or_else(no_mass)?.logit;
    if max == f32::NEG_INFINITY {
        return Err(no_mass());
    }
    let temperature = f64::from(temperature);
    let weight = |logit: f32| {
        if max == f32::INFINITY {
            // Every +inf logit is equally, infinitely more likely than any finite one.
            if logit == f32::INFINITY { 1.0 } else { 0.0 }
        } else {
            ((f64::from(logit) - f64::from(max)) / temperature).exp()
        }
    };
    let mut probs: Vec<TokenProb> = candidates
        .iter()
        .map(|c| TokenProb {
            id: c.id,
            prob: weight(c.logit),
        })
        .collect();
    let total: f64 = probs.iter().map(|token| token.prob).sum();
    for token in &mut probs {
        token.prob /= total;
    }
    probs.retain(|token| token.prob > 0.0);
    Ok(probs)
}

/// Keeps the shortest prefix (of tokens sorted most likely first) whose mass reaches `top_p`.
fn top_p(probs: &mut Vec<TokenProb>, top_p: f32) {
    // At 1 the filter is off; accumulating would drop the tail wherever rounding reaches 1 early.
    if top_p >= 1.0 {
        return;
    }
    let top_p = f64::from(top_p);
    let mut mass = 0.0;
    let mut keep = 0;
    for token in probs.iter() {
        keep += 1;
        mass += token.prob;
        if mass >= top_p {
            break;
        }
    }
    probs.truncate(keep);
}

/// Drops tokens less likely than `min_p` times the most likely one (the first).
fn min_p(probs: &mut Vec<TokenProb>, min_p: f32) {
    let Some(first) = probs.first() else { return };
    let threshold = f64::from(min_p) * first.prob;
    probs.retain(|token| token.prob >= threshold);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingConfig {
        SamplingConfig {
            temperature,
            top_k,
            top_p,
            min_p,
        }
    }

    fn ids(probs: &[TokenProb]) -> Vec<u32> {
        probs.iter().map(|token| token.id).collect()
    }

    /// Logits whose softmax at temperature 1 is exactly `probs`.
    fn logits_of(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    #[test]
    fn argmax_picks_the_largest_and_the_first_of_ties() {
        assert_eq!(argmax(&[0.5, 3.0, -1.0, 2.0]).unwrap(), 1);
        assert_eq!(argmax(&[1.0, 7.0, 7.0, 7.0]).unwrap(), 1);
        assert_eq!(argmax(&[f32::NAN, -2.0, f32::NAN, -1.0]).unwrap(), 3);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]).unwrap(), 0);
        assert_eq!(argmax(&[1.0, f32::INFINITY, 2.0]).unwrap(), 1);
    }

    #[test]
    fn argmax_rejects_rows_without_numbers() {
        assert!(matches!(argmax(&[]), Err(Error::InvalidSampling(_))));
        assert!(matches!(
            argmax(&[f32::NAN, f32::NAN]),
            Err(Error::InvalidSampling(_))
        ));
    }

    #[test]
    fn default_is_greedy() {
        assert_eq!(SamplingConfig::default(), SamplingConfig::greedy());
        assert!(SamplingConfig::default().is_greedy());
        SamplingConfig::default().validate().unwrap();
    }

    #[test]
    fn invalid_values_are_rejected_naming_the_field() {
        let cases = [
            (config(-0.5, 0, 1.0, 0.0), "temperature"),
            (config(f32::NAN, 0, 1.0, 0.0), "temperature"),
            (config(f32::INFINITY, 0, 1.0, 0.0), "temperature"),
            (config(1.0, 0, 0.0, 0.0), "top_p"),
            (config(1.0, 0, 1.5, 0.0), "top_p"),
            (config(1.0, 0, f32::NAN, 0.0), "top_p"),
            (config(1.0, 0, 1.0, -0.1), "min_p"),
            (config(1.0, 0, 1.0, 1.01), "min_p"),
            (config(1.0, 0, 1.0, f32::NAN), "min_p"),
        ];
        for (bad, field) in cases {
            match Sampler::new(bad.clone(), 0) {
                Err(Error::InvalidSampling(message)) => {
                    assert!(message.contains(field), "{message:?} does not name {field}")
                }
                other => panic!("{bad:?} was accepted: {other:?}"),
            }
            assert!(distribution(&[1.0, 2.0], &bad).is_err());
        }
        config(0.0, 5, 1.0, 1.0).validate().unwrap();
        config(2.0, 0, 0.01, 0.0).validate().unwrap();
    }

    #[test]
    fn top_k_one_is_argmax() {
        let logits = [0.1, 2.5, -3.0, 2.4, 1.0];
        let mut sampler = Sampler::new(config(1.5, 1, 1.0, 0.0), 7).unwrap();
        for _ in 0..50 {
            assert_eq!(sampler.sample(&logits).unwrap(), 1);
        }
    }

    #[test]
    fn top_k_keeps_the_k_largest_and_ties_with_the_kth() {
        let logits = [1.0, 5.0, 3.0, 4.0, 3.0, 0.0];
        let kept = distribution(&logits, &config(1.0, 2, 1.0, 0.0)).unwrap();
        assert_eq!(ids(&kept), [1, 3]);
        let kept = distribution(&logits, &config(1.0, 3, 1.0, 0.0)).unwrap();
        assert_eq!(ids(&kept), [1, 3, 2, 4]);
        let kept = distribution(&logits, &config(1.0, 100, 1.0, 0.0)).unwrap();
        assert_eq!(kept.len(), logits.len());
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_the_mass() {
        let logits = logits_of(&[0.1, 0.4, 0.05, 0.3, 0.15]);
        // Sorted: 1 (0.4), 3 (0.3), 4 (0.15), 0 (0.1), 2 (0.05).
        let kept = |top_p| ids(&distribution(&logits, &config(1.0, 0, top_p, 0.0)).unwrap());
        assert_eq!(kept(0.3), [1]);
        assert_eq!(kept(0.39), [1]);
        assert_eq!(kept(0.41), [1, 3]);
        assert_eq!(kept(0.69), [1, 3]);
        assert_eq!(kept(0.71), [1, 3, 4]);
        assert_eq!(kept(0.9), [1, 3, 4, 0]);
        assert_eq!(kept(0.96), [1, 3, 4, 0, 2]);
        assert_eq!(kept(1.0), [1, 3, 4, 0, 2]);
        // A single token above the mass on its own is still kept.
        assert_eq!(
            ids(&distribution(&logits_of(&[0.01, 0.99]), &config(1.0, 0, 0.001, 0.0)).unwrap()),
            [1]
        );
    }

    #[test]
    fn top_p_sees_the_mass_renormalised_after_top_k() {
        // After top-k = 2 the two survivors have 0.4 / 0.7 and 0.3 / 0.7 of the mass.
        let logits = logits_of(&[0.1, 0.4, 0.05, 0.3, 0.15]);
        let kept = distribution(&logits, &config(1.0, 2, 0.55, 0.0)).unwrap();
        assert_eq!(ids(&kept), [1]);
        let kept = distribution(&logits, &config(1.0, 2, 0.6, 0.0)).unwrap();
        assert_eq!(ids(&kept), [1, 3]);
    }

    #[test]
    fn min_p_drops_tokens_below_the_scaled_maximum() {
        let logits = logits_of(&[0.1, 0.4, 0.05, 0.3, 0.15]);
        let kept = |min_p| ids(&distribution(&logits, &config(1.0, 0, 1.0, min_p)).unwrap());
        // Thresholds relative to 0.4: 0.3 -> 0.75, 0.15 -> 0.375, 0.1 -> 0.25, 0.05 -> 0.125.
        assert_eq!(kept(0.8), [1]);
        assert_eq!(kept(0.7), [1, 3]);
        assert_eq!(kept(0.3), [1, 3, 4]);
        assert_eq!(kept(0.2), [1, 3, 4, 0]);
        assert_eq!(kept(0.1), [1, 3, 4, 0, 2]);
        assert_eq!(kept(1.0), [1]);
    }

    #[test]
    fn temperature_reshapes_the_distribution() {
        let logits = [0.0, 1.0, 2.0];
        for temperature in [0.25f32, 1.0, 3.0] {
            let probs = distribution(&logits, &config(temperature, 0, 1.0, 0.0)).unwrap();
            let weights: Vec<f64> = logits
                .iter()
                .map(|&l| (f64::from(l) / f64::from(temperature)).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            for token in &probs {
                let expected = weights[token.id as usize] / total;
                assert!(
                    (token.prob - expected).abs() < 1e-12,
                    "T={temperature}: {token:?} vs {expected}"
                );
            }
        }
        // A temperature tiny enough to overflow a naive division still leaves a distribution.
        let probs = distribution(&[1.0, 3.0, 2.0], &config(1e-30, 0, 1.0, 0.0)).unwrap();
        assert_eq!(probs, [TokenProb { id: 1, prob: 1.0 }]);
    }

    #[test]
    fn special_values_in_logits() {
        let probs = distribution(
            &[f32::NAN, 0.0, f32::NEG_INFINITY, 0.0],
            &config(1.0, 0, 1.0, 0.0),
        )
        .unwrap();
        assert_eq!(
            probs,
            [
                TokenProb { id: 1, prob: 0.5 },
                TokenProb { id: 3, prob: 0.5 }
            ]
        );
        let probs = distribution(
            &[f32::INFINITY, 0.0, f32::INFINITY],
            &config(1.0, 0, 1.0, 0.0),
        )
        .unwrap();
        assert_eq!(
            probs,
            [
                TokenProb { id: 0, prob: 0.5 },
                TokenProb { id: 2, prob: 0.5 }
            ]
        );
        assert!(distribution(&[f32::NEG_INFINITY, f32::NAN], &config(1.0, 0, 1.0, 0.0)).is_err());
        assert!(distribution(&[], &config(1.0, 0, 1.0, 0.0)).is_err());
        let mut sampler = Sampler::new(config(1.0, 0, 1.0, 0.0), 0).unwrap();
        assert!(sampler.sample(&[f32::NAN]).is_err());
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let cfg = config(0.9, 20, 0.95, 0.01);
        let draw = |seed| {
            let mut sampler = Sampler::new(cfg.clone(), seed).unwrap();
            (0..64)
                .map(|_| sampler.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    /// Pearson's chi-square statistic of `counts` against `probs`; a token with probability 0
    /// that was drawn makes it infinite.
    fn chi_square(counts: &[u32], probs: &[f64], draws: u32) -> f64 {
        counts
            .iter()
            .zip(probs)
            .map(|(&count, &p)| {
                let expected = p * f64::from(draws);
                let diff = f64::from(count) - expected;
                if expected == 0.0 {
                    if count == 0 { 0.0 } else { f64::INFINITY }
                } else {
                    diff * diff / expected
                }
            })
            .sum()
    }

    #[test]
    fn draws_follow_the_filtered_distribution() {
        let logits: Vec<f32> = [2.0, 0.5, 1.5, -1.0, 1.0, 0.0, 1.8, -0.5].to_vec();
        let cfg = config(0.8, 6, 0.9, 0.1);
        let probs = distribution(&logits, &cfg).unwrap();

        // The filtered distribution, recomputed naively from the definitions.
        let temperature = f64::from(cfg.temperature);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap());
        let top6 = &order[..6];
        let weights: Vec<f64> = top6
            .iter()
            .map(|&i| (f64::from(logits[i]) / temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut mass = 0.0;
        let mut nucleus = Vec::new();
        for (&i, w) in top6.iter().zip(&weights) {
            nucleus.push((i, w / total));
            mass += w / total;
            if mass >= 0.9 {
                break;
            }
        }
        let max = nucleus[0].1;
        nucleus.retain(|&(_, p)| p >= 0.1 * max);
        let kept_total: f64 = nucleus.iter().map(|&(_, p)| p).sum();
        let mut expected = vec![0.0; logits.len()];
        for &(i, p) in &nucleus {
            expected[i] = p / kept_total;
        }
        assert!(
            nucleus.len() >= 3 && nucleus.len() < 6,
            "the filters should bite: {nucleus:?}"
        );
        for token in &probs {
            assert!((token.prob - expected[token.id as usize]).abs() < 1e-12);
        }
        assert_eq!(probs.len(), nucleus.len());

        let draws = 20_000;
        let mut counts = vec![0u32; logits.len()];
        let mut sampler = Sampler::new(cfg, 1234).unwrap();
        for _ in 0..draws {
            counts[sampler.sample(&logits).unwrap() as usize] += 1;
        }
        // Degrees of freedom = kept tokens - 1 (at most 4); 25 is far beyond the 99.99th
        // percentile of chi-square with 4 degrees of freedom (~23.5).
        let fit = chi_square(&counts, &expected, draws);
        assert!(
            fit < 25.0,
            "chi-square {fit} for counts {counts:?} against {expected:?}"
        );

        // The same counts against the distribution without top-p/min-p must be rejected, or this
        // test could not catch a filter that keeps too much.
        let unfiltered = distribution(&logits, &config(0.8, 6, 1.0, 0.0)).unwrap();
        let mut loose = vec![0.0; logits.len()];
        for token in &unfiltered {
            loose[token.id as usize] = token.prob;
        }
        assert!(chi_square(&counts, &loose, draws) > 100.0);
    }

    /// The penalties written out token by token, straight from their definitions.
    fn naive_penalties(logits: &[f32], p: &Penalties, prompt: &[u32], output: &[u32]) -> Vec<f32> {
        (0..logits.len() as u32)
            .map(|token| {
                let mut logit = logits[token as usize];
                let count = output.iter().filter(|&&t| t == token).count();
                if count > 0 || prompt.contains(&token) {
                    logit = if logit > 0.0 {
                        logit / p.repetition
                    } else {
                        logit * p.repetition
                    };
                }
                logit -= p.frequency * count as f32;
                if count > 0 {
                    logit -= p.presence;
                }
                logit
            })
            .collect()
    }

    #[test]
    fn penalties_follow_their_definitions() {
        let logits = [1.5, -0.5, 2.0, 0.0, -3.0, 0.25, 4.0, -1.0];
        let prompt = [0, 1, 1, 7];
        let output = [1, 2, 2, 2, 4];
        let penalties = Penalties {
            repetition: 1.3,
            presence: 0.4,
            frequency: 0.7,
        };
        let mut penalised = logits;
        penalties.apply(&mut penalised, &prompt, &output).unwrap();
        assert_eq!(
            penalised.to_vec(),
            naive_penalties(&logits, &penalties, &prompt, &output)
        );
        // Worked by hand: token 2 (output x3): 2.0 / 1.3 - 3 * 0.7 - 0.4; token 7 (prompt only):
        // -1.0 * 1.3; token 6 (unseen) unchanged.
        assert!((penalised[2] - (2.0 / 1.3 - 2.1 - 0.4)).abs() < 1e-6);
        assert_eq!(penalised[7], -1.3);
        assert_eq!(penalised[6], 4.0);
        assert_eq!(penalised[3], 0.0);

        // Presence and frequency ignore the prompt; repetition alone touches prompt tokens.
        let mut additive_only = logits;
        Penalties {
            repetition: 1.0,
            presence: 1.0,
            frequency: 0.5,
        }
        .apply(&mut additive_only, &prompt, &[])
        .unwrap();
        assert_eq!(additive_only, logits);

        let mut off = logits;
        Penalties::none().apply(&mut off, &prompt, &output).unwrap();
        assert_eq!(off, logits);
        assert!(Penalties::default().is_off());
    }

    #[test]
    fn invalid_penalties_are_rejected_naming_the_field() {
        let cases = [
            (1.0, 0.0, 0.0, None),
            (0.0, 0.0, 0.0, Some("repetition_penalty")),
            (f32::NAN, 0.0, 0.0, Some("repetition_penalty")),
            (f32::INFINITY, 0.0, 0.0, Some("repetition_penalty")),
            (1.0, 2.5, 0.0, Some("presence_penalty")),
            (1.0, f32::NAN, 0.0, Some("presence_penalty")),
            (1.0, 0.0, -2.01, Some("frequency_penalty")),
            (0.5, -2.0, 2.0, None),
        ];
        for (repetition, presence, frequency, field) in cases {
            let penalties = Penalties {
                repetition,
                presence,
                frequency,
            };
            match (penalties.validate(), field) {
                (Ok(()), None) => {}
                (Err(Error::InvalidSampling(message)), Some(field)) => {
                    assert!(message.contains(field), "{message:?} does not name {field}")
                }
                (other, _) => panic!("{penalties:?}: {other:?}"),
            }
        }
        let mut logits = [0.0; 4];
        let penalties = Penalties {
            repetition: 1.2,
            ..Penalties::none()
        };
        assert!(penalties.apply(&mut logits, &[4], &[]).is_err());
    }

    /// `log(softmax(logits)[token])`, naively in f64.
    fn naive_logprob(logits: &[f32], token: usize) -> f64 {
        let total: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        (f64::from(logits[token]).exp() / total).ln()
    }

    #[test]
    fn logprobs_are_the_log_softmax_and_its_top_tokens() {
        let logits = [0.5, 3.0, -1.0, 3.0, 2.0, -7.5];
        let out = logprobs(&logits, 2, 3).unwrap();
        assert_eq!(out.token, 2);
        assert!((f64::from(out.logprob) - naive_logprob(&logits, 2)).abs() < 1e-6);
        // 1 and 3 tie: the lower id first.
        let ids: Vec<u32> = out.top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, [1, 3, 4]);
        for &(id, logprob) in &out.top {
            assert!((f64::from(logprob) - naive_logprob(&logits, id as usize)).abs() < 1e-6);
        }
        assert!(logprobs(&logits, 0, 0).unwrap().top.is_empty());
        let all = logprobs(&logits, 0, 100).unwrap();
        assert_eq!(all.top.len(), logits.len());
        let mass: f64 = all.top.iter().map(|&(_, l)| f64::from(l).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-6);
        // Large logits stay finite: the maximum is subtracted first.
        let big = logprobs(&[1000.0, 1000.0], 1, 1).unwrap();
        assert!((big.logprob - (-std::f32::consts::LN_2)).abs() < 1e-6);
        assert_eq!(big.top, [(0, big.logprob)]);
    }

    #[test]
    fn logprobs_of_special_values() {
        let out = logprobs(&[f32::NAN, 0.0, f32::NEG_INFINITY, 0.0], 1, 4).unwrap();
        assert!((out.logprob + std::f32::consts::LN_2).abs() < 1e-6);
        assert_eq!(out.top[2].1, f32::NEG_INFINITY);
        assert_eq!(out.top[3].1, f32::NEG_INFINITY);
        let inf = logprobs(&[f32::INFINITY, 1.0, f32::INFINITY], 0, 3).unwrap();
        assert!((inf.logprob + std::f32::consts::LN_2).abs() < 1e-6);
        assert_eq!(inf.top[2], (1, f32::NEG_INFINITY));
        assert!(logprobs(&[1.0, 2.0], 2, 1).is_err());
        assert!(logprobs(&[f32::NAN, f32::NEG_INFINITY], 0, 1).is_err());
    }

    proptest! {
        #[test]
        fn penalties_match_the_naive_definition(
            logits in proptest::collection::vec(-10.0f32..10.0, 1..40),
            prompt in proptest::collection::vec(0u32..40, 0..20),
            output in proptest::collection::vec(0u32..40, 0..20),
            repetition in 0.1f32..3.0,
            presence in -2.0f32..=2.0,
            frequency in -2.0f32..=2.0,
        ) {
            let vocab = logits.len() as u32;
            let prompt: Vec<u32> = prompt.into_iter().map(|t| t % vocab).collect();
            let output: Vec<u32> = output.into_iter().map(|t| t % vocab).collect();
            let penalties = Penalties { repetition, presence, frequency };
            let mut penalised = logits.clone();
            penalties.apply(&mut penalised, &prompt, &output).unwrap();
            prop_assert_eq!(penalised, naive_penalties(&logits, &penalties, &prompt, &output));
        }

        #[test]
        fn logprobs_match_the_naive_log_softmax(
            logits in proptest::collection::vec(-20.0f32..20.0, 1..64),
            token in 0usize..64,
            top_n in 0usize..70,
        ) {
            let token = token % logits.len();
            let out = logprobs(&logits, token as u32, top_n).unwrap();
            prop_assert!((f64::from(out.logprob) - naive_logprob(&logits, token)).abs() < 1e-5);
            prop_assert_eq!(out.top.len(), top_n.min(logits.len()));
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap().then(a.cmp(&b)));
            for (&(id, logprob), &expected) in out.top.iter().zip(&order) {
                prop_assert_eq!(id as usize, expected);
                prop_assert!((f64::from(logprob) - naive_logprob(&logits, expected)).abs() < 1e-5);
            }
        }

        #[test]
        fn distribution_is_normalised_and_ordered(
            logits in proptest::collection::vec(-20.0f32..20.0, 1..64),
            temperature in 0.05f32..4.0,
            top_k in 0usize..70,
            top_p in 0.01f32..=1.0,
            min_p in 0.0f32..=1.0,
        ) {
            let cfg = config(temperature, top_k, top_p, min_p);
            let probs = distribution(&logits, &cfg).unwrap();
            prop_assert!(!probs.is_empty());
            let total: f64 = probs.iter().map(|t| t.prob).sum();
            prop_assert!((total - 1.0).abs() < 1e-9);
            prop_assert!(probs.windows(2).all(|w| w[0].prob >= w[1].prob));
            // The most likely token always survives, and it is the argmax.
            prop_assert_eq!(probs[0].id, argmax(&logits).unwrap());
            if top_k > 0 {
                let kth = {
                    let mut sorted = logits.clone();
                    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
                    sorted[(top_k - 1).min(sorted.len() - 1)]
                };
                prop_assert!(probs.iter().all(|t| logits[t.id as usize] >= kth));
            }
            let mut sampler = Sampler::new(cfg, 3).unwrap();
            let token = sampler.sample(&logits).unwrap();
            prop_assert!(probs.iter().any(|t| t.id == token));
        }

        #[test]
        fn greedy_sampling_is_argmax(
            logits in proptest::collection::vec(-5.0f32..5.0, 1..100),
            seed: u64,
        ) {
            let mut sampler = Sampler::new(SamplingConfig::greedy(), seed).unwrap();
            prop_assert_eq!(sampler.sample(&logits).unwrap(), argmax(&logits).unwrap());
        }
    }
}
