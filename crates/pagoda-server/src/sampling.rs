//! From the OpenAI sampling fields to the engine's [`SamplingParams`].
//!
//! Values are checked here only where the check can name the field (`param` in the error
//! body); the engine's own validation, which `submit` runs, remains the authority on ranges.

use pagoda_engine::SamplingParams;

use crate::error::ApiError;
use crate::request::SamplingFields;

/// OpenAI's default temperature: a request that names none samples.
const DEFAULT_TEMPERATURE: f32 = 1.0;

/// The most alternatives per token the OpenAI API lets a client ask for.
const MAX_TOP_LOGPROBS: u32 = 20;

/// The sampling parameters of a request. `max_tokens` is left at the engine's default: each
/// endpoint has its own default, set by the caller through [`max_tokens`]. `logprobs` is the
/// number of alternatives asked for per token, if any.
pub fn sampling_params(
    fields: &SamplingFields,
    logprobs: Option<(u32, &str)>,
) -> Result<SamplingParams, ApiError> {
    if let Some(n) = fields.n.filter(|&n| n != 1) {
        return Err(ApiError::invalid_param(
            "n",
            format!("This server returns one choice per request; n must be 1, not {n}."),
        ));
    }
    if fields
        .logit_bias
        .as_ref()
        .is_some_and(|bias| bias.as_object().is_none_or(|map| !map.is_empty()))
    {
        return Err(ApiError::invalid_param(
            "logit_bias",
            "logit_bias is not supported by this server.",
        ));
    }
    let top_k = match fields.top_k {
        None | Some(-1 | 0) => 0,
        Some(k) => usize::try_from(k).map_err(|_| {
            ApiError::invalid_param(
                "top_k",
                format!("top_k must be -1 (off) or positive, not {k}."),
            )
        })?,
    };
    if let Some((n, param)) = logprobs.filter(|&(n, _)| n > MAX_TOP_LOGPROBS) {
        return Err(ApiError::invalid_param(
            param,
            format!("{param} must be at most {MAX_TOP_LOGPROBS}, not {n}."),
        ));
    }
    let stop = fields.stop_strings()?;
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            "A stop string must not be empty.",
        ));
    }
    let defaults = SamplingParams::default();
    Ok(SamplingParams {
        temperature: fields.temperature.unwrap_or(DEFAULT_TEMPERATURE),
        top_k,
        top_p: fields.top_p.unwrap_or(defaults.top_p),
        min_p: fields.min_p.unwrap_or(defaults.min_p),
        repetition_penalty: fields
            .repetition_penalty
            .unwrap_or(defaults.repetition_penalty),
        presence_penalty: fields.presence_penalty.unwrap_or(defaults.presence_penalty),
        frequency_penalty: fields
            .frequency_penalty
            .unwrap_or(defaults.frequency_penalty),
        seed: fields.seed,
        stop_token_ids: fields.stop_token_ids.clone().unwrap_or_default(),
        stop,
        ignore_eos: fields.ignore_eos.unwrap_or(false),
        logprobs: logprobs.map(|(n, _)| n as usize),
        ..defaults
    })
}

/// A request's token limit, if it sets one: at least 1.
pub fn max_tokens(value: Option<u64>, param: &str) -> Result<Option<usize>, ApiError> {
    match value {
        None => Ok(None),
        Some(0) => Err(ApiError::invalid_param(
            param,
            format!("{param} must be at least 1."),
        )),
        Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{CompletionRequest, parse};

    fn fields(json: &str) -> SamplingFields {
        parse::<CompletionRequest>(json.as_bytes())
            .unwrap()
            .sampling
    }

    #[test]
    fn every_field_lands_on_its_parameter() {
        let params = sampling_params(
            &fields(
                r#"{"temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
                    "presence_penalty": 0.1, "frequency_penalty": -0.2, "repetition_penalty": 1.1,
                    "seed": 7, "stop": ["\n\n", "END"], "stop_token_ids": [2], "ignore_eos": true,
                    "n": 1, "logit_bias": {}}"#,
            ),
            Some((3, "logprobs")),
        )
        .unwrap();
        assert_eq!(
            params,
            SamplingParams {
                temperature: 0.5,
                top_k: 40,
                top_p: 0.9,
                min_p: 0.05,
                repetition_penalty: 1.1,
                presence_penalty: 0.1,
                frequency_penalty: -0.2,
                seed: Some(7),
                stop_token_ids: vec![2],
                stop: vec!["\n\n".into(), "END".into()],
                ignore_eos: true,
                logprobs: Some(3),
                ..SamplingParams::default()
            }
        );
        params.validate().unwrap();
    }

    #[test]
    fn absent_fields_take_the_openai_defaults() {
        let params = sampling_params(&fields("{}"), None).unwrap();
        assert_eq!(params.temperature, 1.0);
        assert_eq!((params.top_k, params.top_p, params.min_p), (0, 1.0, 0.0));
        assert_eq!(params.logprobs, None);
        assert!(params.stop.is_empty() && !params.ignore_eos);
        let vllm_off = sampling_params(&fields(r#"{"top_k": -1}"#), None).unwrap();
        assert_eq!(vllm_off.top_k, 0);
    }

    #[test]
    fn what_cannot_be_honoured_names_its_field() {
        let param = |json: &str, logprobs| {
            sampling_params(&fields(json), logprobs)
                .unwrap_err()
                .body
                .param
                .unwrap()
        };
        assert_eq!(param(r#"{"n": 2}"#, None), "n");
        assert_eq!(param(r#"{"top_k": -2}"#, None), "top_k");
        assert_eq!(param(r#"{"logit_bias": {"5": 10}}"#, None), "logit_bias");
        assert_eq!(param(r#"{"stop": ""}"#, None), "stop");
        assert_eq!(param("{}", Some((21, "top_logprobs"))), "top_logprobs");
        assert_eq!(
            max_tokens(Some(0), "max_tokens")
                .unwrap_err()
                .body
                .param
                .unwrap(),
            "max_tokens"
        );
        assert_eq!(max_tokens(Some(9), "max_tokens").unwrap(), Some(9));
        assert_eq!(max_tokens(None, "max_tokens").unwrap(), None);
    }
}
