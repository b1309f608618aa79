//! CUDA argmax and sampling against the CPU sampler: given the same uniform number per row, the
//! GPU must pick the token the CPU's filtered distribution puts that number on.
#![cfg(feature = "cuda")]

mod common;

use common::{FLOAT_DTYPES, TestRng, gpu_or_skip, rounded, upload};
use pagoda_kernels::cpu::sampling::{Penalties, SamplingConfig, TokenProb, distribution};
use pagoda_kernels::cuda::sampling::{
    DevicePenalties, DeviceSamplingParams, NO_TOKEN, apply_penalties, argmax, logprobs, sample,
};
use pagoda_kernels::{Error, cpu};
use pagoda_tensor::{CudaDevice, DType, Tensor};
use rand::RngExt;

fn tokens(tensor: &Tensor) -> Vec<u32> {
    assert_eq!(tensor.dtype(), DType::U32);
    tensor
        .to_vec::<u32>()
        .unwrap_or_else(|e| panic!("downloading tokens: {e}"))
}

/// Random logits for `rows x vocab`, rounded to `dtype`; with `ties`, small integers, so that many
/// tokens share a logit and the tie-breaking by id decides.
fn logits(rng: &mut TestRng, rows: usize, vocab: usize, dtype: DType, ties: bool) -> Vec<f32> {
    let values = if ties {
        rng.below(rows * vocab, 6)
            .into_iter()
            .map(|v| v as f32)
            .collect()
    } else {
        rng.uniform(rows * vocab, 6.0)
    };
    rounded(&values, dtype)
}

/// The CPU's choice for the draw `uniform`: the first token whose cumulative probability passes it,
/// as `Sampler::sample` walks the distribution.
fn cpu_choice(probs: &[TokenProb], uniform: f64) -> u32 {
    let mut cumulative = 0.0;
    for token in probs {
        cumulative += token.prob;
        if uniform < cumulative {
            return token.id;
        }
    }
    probs.last().map_or(NO_TOKEN, |token| token.id)
}

/// Whether `gpu` is the CPU's choice for the draw `uniform`, or the draw lies within rounding of
/// the boundary of `gpu`'s cumulative interval (sums in another order may land on either side).
fn explains(probs: &[TokenProb], uniform: f64, gpu: u32) -> bool {
    if gpu == cpu_choice(probs, uniform) {
        return true;
    }
    let mut cumulative = 0.0;
    for token in probs {
        let (low, high) = (cumulative, cumulative + token.prob);
        if token.id == gpu && uniform >= low - 1e-12 && uniform < high + 1e-12 {
            return true;
        }
        cumulative = high;
    }
    false
}

fn assert_same_draw(what: &str, probs: &[TokenProb], uniform: f64, gpu: u32) {
    assert!(
        explains(probs, uniform, gpu),
        "{what}: the GPU drew {gpu}, the CPU {} for uniform {uniform} in {:?}",
        cpu_choice(probs, uniform),
        &probs[..probs.len().min(8)]
    );
}

/// The next f32 above and below `value`.
fn neighbours(value: f32) -> [f32; 2] {
    [
        f32::from_bits(value.to_bits() + 1),
        f32::from_bits(value.to_bits() - 1),
    ]
}

/// [`assert_same_draw`] for the distribution of `row` under `config`, also accepting the draw of
/// a top-p or min-p one f32 step away: with tied logits the probability mass can reach top_p
/// exactly at a token (e.g. 85 of 170 equal tokens for 0.5), and then the order in which the sums
/// were taken decides whether that token is kept.
fn assert_same_sample(what: &str, row: &[f32], config: &SamplingConfig, uniform: f64, gpu: u32) {
    let probs = distribution(row, config).unwrap();
    if explains(&probs, uniform, gpu) {
        return;
    }
    let mut nudged = Vec::new();
    if config.top_p < 1.0 {
        nudged.extend(neighbours(config.top_p).map(|top_p| SamplingConfig {
            top_p: top_p.min(1.0),
            ..config.clone()
        }));
    }
    if config.min_p > 0.0 {
        nudged.extend(neighbours(config.min_p).map(|min_p| SamplingConfig {
            min_p: min_p.min(1.0),
            ..config.clone()
        }));
    }
    if nudged
        .iter()
        .any(|c| distribution(row, c).is_ok_and(|probs| explains(&probs, uniform, gpu)))
    {
        return;
    }
    assert_same_draw(what, &probs, uniform, gpu);
}

fn random_config(rng: &mut TestRng) -> SamplingConfig {
    let rng = rng.rng();
    SamplingConfig {
        temperature: [0.0, 0.3, 0.7, 1.0, 1.8][rng.random_range(0..5)],
        top_k: [0, 0, 1, 2, 5, 50, 1000][rng.random_range(0..7)],
        top_p: [1.0, 1.0, 0.95, 0.8, 0.5, 0.1][rng.random_range(0..6)],
        min_p: [0.0, 0.0, 0.02, 0.1, 0.5][rng.random_range(0..5)],
    }
}

fn check_sampling(
    device: &CudaDevice,
    rng: &mut TestRng,
    rows: usize,
    vocab: usize,
    dtype: DType,
    ties: bool,
) {
    let values = logits(rng, rows, vocab, dtype, ties);
    let configs: Vec<SamplingConfig> = (0..rows).map(|_| random_config(rng)).collect();
    let uniforms: Vec<f32> = (0..rows)
        .map(|_| rng.rng().random_range(0.0f32..1.0))
        .collect();
    let params = DeviceSamplingParams::new(&configs, device).unwrap();
    assert_eq!(params.rows(), rows);
    let drawn = tokens(
        &sample(
            &upload(&values, &[rows, vocab], dtype, device),
            &params,
            &upload(&uniforms, &[rows], DType::F32, device),
        )
        .unwrap(),
    );
    for (r, ((row, config), &uniform)) in values
        .chunks(vocab)
        .zip(&configs)
        .zip(&uniforms)
        .enumerate()
    {
        let what = format!("row {r} of {rows} x {vocab} {dtype} ties {ties} {config:?}");
        assert_same_sample(&what, row, config, f64::from(uniform), drawn[r]);
    }
}

#[test]
fn argmax_matches_the_cpu() {
    let Some(device) = gpu_or_skip("argmax_matches_the_cpu") else {
        return;
    };
    let mut rng = TestRng::new("argmax_matches_the_cpu");
    for dtype in FLOAT_DTYPES {
        for (rows, vocab) in [(1, 1), (5, 3), (7, 67), (3, 4097), (2, 32000), (2, 128_256)] {
            for ties in [false, true] {
                let mut values = logits(&mut rng, rows, vocab, dtype, ties);
                // NaN is ignored, -inf is a number like any other.
                values[0] = f32::NAN;
                if let Some(v) = values.get_mut(vocab / 2) {
                    *v = f32::NEG_INFINITY;
                }
                let gpu =
                    tokens(&argmax(&upload(&values, &[rows, vocab], dtype, &device)).unwrap());
                let cpu: Vec<u32> = values
                    .chunks(vocab)
                    .map(|row| cpu::sampling::argmax(row).unwrap_or(NO_TOKEN))
                    .collect();
                assert_eq!(gpu, cpu, "{rows} x {vocab} {dtype} ties {ties}");
            }
        }
    }
}

#[test]
fn argmax_of_rows_without_a_number() {
    let Some(device) = gpu_or_skip("argmax_of_rows_without_a_number") else {
        return;
    };
    let values = [
        f32::NAN,
        f32::NAN,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        1.0,
        f32::INFINITY,
    ];
    let gpu = tokens(&argmax(&upload(&values, &[3, 2], DType::F32, &device)).unwrap());
    assert_eq!(gpu, [NO_TOKEN, 0, 1]);
}

#[test]
fn sampling_matches_the_cpu_distribution() {
    let Some(device) = gpu_or_skip("sampling_matches_the_cpu_distribution") else {
        return;
    };
    let mut rng = TestRng::new("sampling_matches_the_cpu_distribution");
    for dtype in FLOAT_DTYPES {
        for (rows, vocab) in [
            (64, 1),
            (64, 3),
            (64, 67),
            (32, 1000),
            (16, 4097),
            (4, 32000),
            (2, 128_256),
        ] {
            for ties in [false, true] {
                check_sampling(&device, &mut rng, rows, vocab, dtype, ties);
            }
        }
    }
}

#[test]
fn every_filter_alone_matches_the_cpu() {
    let Some(device) = gpu_or_skip("every_filter_alone") else {
        return;
    };
    let mut rng = TestRng::new("every_filter_alone");
    let vocab = 5000;
    let configs = [
        SamplingConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
        },
        SamplingConfig {
            temperature: 0.05,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
        },
        SamplingConfig {
            temperature: 1.0,
            top_k: 7,
            top_p: 1.0,
            min_p: 0.0,
        },
        SamplingConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.3,
            min_p: 0.0,
        },
        SamplingConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.2,
        },
        SamplingConfig {
            temperature: 0.0,
            top_k: 3,
            top_p: 0.5,
            min_p: 0.5,
        },
    ];
    for config in &configs {
        let rows = 48;
        let values = logits(&mut rng, rows, vocab, DType::F32, false);
        let uniforms: Vec<f32> = (0..rows).map(|i| (i as f32 + 0.5) / rows as f32).collect();
        let params = DeviceSamplingParams::shared(config, rows, &device).unwrap();
        let logits_gpu = upload(&values, &[rows, vocab], DType::F32, &device);
        let drawn = tokens(
            &sample(
                &logits_gpu,
                &params,
                &upload(&uniforms, &[rows], DType::F32, &device),
            )
            .unwrap(),
        );
        for (r, row) in values.chunks(vocab).enumerate() {
            let what = format!("row {r} {config:?}");
            assert_same_sample(&what, row, config, f64::from(uniforms[r]), drawn[r]);
        }
    }
}

#[test]
fn special_values_and_rows_without_mass() {
    let Some(device) = gpu_or_skip("special_values_and_rows_without_mass") else {
        return;
    };
    let nan = f32::NAN;
    let (inf, neg_inf) = (f32::INFINITY, f32::NEG_INFINITY);
    let rows: [[f32; 4]; 5] = [
        [nan, 0.0, neg_inf, 0.0],     // NaN never drawn, -inf has no mass
        [inf, 0.0, inf, 1.0],         // the +inf logits share all the mass
        [neg_inf, nan, neg_inf, nan], // nothing to draw from
        [nan, nan, nan, nan],
        [-0.0, 0.0, -1.0, -0.0], // -0 and +0 tie, broken by id
    ];
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let logits_gpu = upload(&flat, &[5, 4], DType::F32, &device);
    let config = SamplingConfig {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
    };
    for uniform in [0.0f32, 0.3, 0.6, 0.999] {
        let params = DeviceSamplingParams::shared(&config, 5, &device).unwrap();
        let drawn = tokens(
            &sample(
                &logits_gpu,
                &params,
                &upload(&[uniform; 5], &[5], DType::F32, &device),
            )
            .unwrap(),
        );
        for (r, row) in rows.iter().enumerate() {
            match distribution(row, &config) {
                Ok(probs) => {
                    assert_same_draw(&format!("row {r}"), &probs, f64::from(uniform), drawn[r])
                }
                Err(_) => assert_eq!(drawn[r], NO_TOKEN, "row {r} has nothing to draw"),
            }
        }
    }
    // Greedy rows take the argmax even when every logit is -inf.
    let greedy = DeviceSamplingParams::shared(&SamplingConfig::greedy(), 5, &device).unwrap();
    let drawn = tokens(
        &sample(
            &logits_gpu,
            &greedy,
            &upload(&[0.5; 5], &[5], DType::F32, &device),
        )
        .unwrap(),
    );
    assert_eq!(drawn, [1, 0, 0, NO_TOKEN, 0]);
}

#[test]
fn bad_inputs_are_errors() {
    let Some(device) = gpu_or_skip("sampling_bad_inputs") else {
        return;
    };
    let logits_gpu = upload(&[0.0; 12], &[3, 4], DType::F16, &device);
    let params = DeviceSamplingParams::shared(&SamplingConfig::greedy(), 3, &device).unwrap();
    let uniforms = upload(&[0.5; 3], &[3], DType::F32, &device);
    sample(&logits_gpu, &params, &uniforms).unwrap();
    let two_rows = DeviceSamplingParams::shared(&SamplingConfig::greedy(), 2, &device).unwrap();
    assert!(matches!(
        sample(&logits_gpu, &two_rows, &uniforms),
        Err(Error::Shape { .. })
    ));
    let half_uniforms = upload(&[0.5; 3], &[3], DType::F16, &device);
    assert!(matches!(
        sample(&logits_gpu, &params, &half_uniforms),
        Err(Error::DType { .. })
    ));
    let invalid = SamplingConfig {
        temperature: 1.0,
        top_k: 0,
        top_p: 0.0,
        min_p: 0.0,
    };
    assert!(matches!(
        DeviceSamplingParams::new(&[invalid], &device),
        Err(Error::InvalidSampling(_))
    ));
    let flat = upload(&[0.0; 4], &[4], DType::F32, &device);
    assert!(matches!(argmax(&flat), Err(Error::Shape { .. })));
    let no_vocab = upload(&[], &[2, 0], DType::F32, &device);
    assert!(matches!(argmax(&no_vocab), Err(Error::Shape { .. })));
    assert_eq!(
        tokens(&argmax(&upload(&[], &[0, 5], DType::F32, &device)).unwrap()),
        Vec::<u32>::new()
    );
}

/// Random (prompt, output) token lists over `vocab`. The prompt repeats a token and the output
/// repeats tokens of its own and of the prompt, so that every kind of entry (prompt only, output
/// only, both, several occurrences) turns up even in a large vocabulary; the output may be empty.
fn sequence(rng: &mut TestRng, vocab: usize) -> (Vec<u32>, Vec<u32>) {
    let prompt_len = rng.below(1, 30)[0] as usize + 1;
    let mut prompt = rng.below(prompt_len, vocab as u32);
    prompt.push(prompt[0]);
    let output_len = rng.below(1, 30)[0] as usize;
    let mut output = Vec::new();
    for (i, token) in rng.below(output_len, vocab as u32).into_iter().enumerate() {
        output.push(token);
        match i % 3 {
            0 => output.push(prompt[i % prompt.len()]),
            1 => output.push(token),
            _ => {}
        }
    }
    (prompt, output)
}

#[test]
fn penalties_match_the_cpu_bit_for_bit() {
    let Some(device) = gpu_or_skip("penalties_match_the_cpu_bit_for_bit") else {
        return;
    };
    let mut rng = TestRng::new("penalties_match_the_cpu_bit_for_bit");
    let settings = [
        Penalties::none(),
        Penalties {
            repetition: 1.3,
            ..Penalties::none()
        },
        Penalties {
            presence: 0.7,
            ..Penalties::none()
        },
        Penalties {
            frequency: -0.4,
            ..Penalties::none()
        },
        Penalties {
            repetition: 0.8,
            presence: -1.5,
            frequency: 1.9,
        },
    ];
    for dtype in FLOAT_DTYPES {
        for vocab in [1, 3, 1001, 128256] {
            let rows = 7;
            let values = logits(&mut rng, rows, vocab, dtype, false);
            let tensor = upload(&values, &[rows, vocab], dtype, &device);
            let sequences: Vec<_> = (0..rows).map(|_| sequence(&mut rng, vocab)).collect();
            let entries: Vec<(Penalties, &[u32], &[u32])> = sequences
                .iter()
                .enumerate()
                .map(|(r, (p, o))| (settings[r % settings.len()], p.as_slice(), o.as_slice()))
                .collect();
            let penalties = DevicePenalties::new(&entries, vocab, &device).unwrap();
            assert_eq!(penalties.rows(), rows);
            common::poison_pool(&device, rows * vocab * 4);
            let out = apply_penalties(&tensor, &penalties).unwrap();
            assert_eq!(out.dtype(), DType::F32);
            let got = out.to_vec::<f32>().unwrap();
            for (r, (settings, prompt, output)) in entries.iter().enumerate() {
                let mut expected = values[r * vocab..(r + 1) * vocab].to_vec();
                settings.apply(&mut expected, prompt, output).unwrap();
                let row = &got[r * vocab..(r + 1) * vocab];
                for (i, (g, e)) in row.iter().zip(&expected).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        e.to_bits(),
                        "{dtype} vocab {vocab} row {r} token {i}: {g} vs {e} ({settings:?})"
                    );
                }
            }
            // The input is left as it was.
            assert_eq!(common::download(&tensor), values);
        }
    }
    // Tokens outside the vocabulary are refused on the host.
    let bad: [(Penalties, &[u32], &[u32]); 1] = [(settings[1], &[5], &[])];
    assert!(matches!(
        DevicePenalties::new(&bad, 5, &device),
        Err(Error::InvalidSampling(_))
    ));
}

/// `logprobs` of (row, token) queries over `logits`, downloaded: (the chosen tokens' logprobs,
/// the top ids, the top logprobs), the tops `top_n` per query.
fn logprobs_on_host(
    device: &CudaDevice,
    logits: &Tensor,
    rows: &[u32],
    tokens: &[u32],
    top_n: usize,
) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
    let found = logprobs(
        logits,
        &common::upload_u32(rows, device),
        &common::upload_u32(tokens, device),
        top_n,
    )
    .unwrap();
    (
        found.chosen.to_vec::<f32>().unwrap(),
        found.top_ids.to_vec::<u32>().unwrap(),
        found.top_logprobs.to_vec::<f32>().unwrap(),
    )
}

#[test]
fn logprobs_match_the_cpu() {
    let Some(device) = gpu_or_skip("logprobs_match_the_cpu") else {
        return;
    };
    let mut rng = TestRng::new("logprobs_match_the_cpu");
    for dtype in FLOAT_DTYPES {
        for (vocab, ties) in [
            (1, false),
            (3, true),
            (1001, false),
            (1001, true),
            (128256, false),
        ] {
            let rows = 9;
            let mut values = logits(&mut rng, rows, vocab, dtype, ties);
            if vocab > 3 {
                // Row 1 holds NaN and -inf, row 2 two +inf.
                values[vocab] = f32::NAN;
                values[vocab + 2] = f32::NEG_INFINITY;
                values[2 * vocab + 1] = f32::INFINITY;
                values[2 * vocab + 3] = f32::INFINITY;
            }
            let tensor = upload(&values, &[rows, vocab], dtype, &device);
            // Every other row, in reverse order, each at a random token.
            let picked: Vec<u32> = (0..rows as u32).rev().step_by(2).collect();
            let asked = rng.below(picked.len(), vocab as u32);
            for top_n in [0, 1, 5, 20] {
                common::poison_pool(&device, 1 << 20);
                let (chosen, ids, top) = logprobs_on_host(&device, &tensor, &picked, &asked, top_n);
                for (q, (&row, &token)) in picked.iter().zip(&asked).enumerate() {
                    let row_values = &values[row as usize * vocab..(row as usize + 1) * vocab];
                    let expected = cpu::sampling::logprobs(row_values, token, top_n).unwrap();
                    let what = format!("{dtype} vocab {vocab} ties {ties} row {row} top {top_n}");
                    let close = |a: f32, b: f32| a == b || (a - b).abs() <= 1e-5 * b.abs().max(1.0);
                    assert!(
                        close(chosen[q], expected.logprob),
                        "{what}: {} vs {}",
                        chosen[q],
                        expected.logprob
                    );
                    let listed = top_n.min(vocab);
                    for n in 0..listed {
                        let (id, logprob) = expected.top[n];
                        assert_eq!(ids[q * top_n + n], id, "{what}: place {n}");
                        assert!(close(top[q * top_n + n], logprob), "{what}: place {n}");
                    }
                    for n in listed..top_n {
                        assert_eq!(
                            ids[q * top_n + n],
                            NO_TOKEN,
                            "{what}: place {n} past the vocabulary"
                        );
                    }
                }
            }
        }
    }
    let rows = common::upload_u32(&[0], &device);
    let tensor = upload(&[1.0, 2.0], &[1, 2], DType::F32, &device);
    assert!(matches!(
        logprobs(&tensor, &rows, &rows, 21),
        Err(Error::InvalidSampling(_))
    ));
}

#[test]
fn penalties_that_touch_nothing_and_mismatched_shapes() {
    let Some(device) = gpu_or_skip("penalties_that_touch_nothing") else {
        return;
    };
    let mut rng = TestRng::new("penalties_that_touch_nothing");
    let (rows, vocab) = (3, 67);
    let repetition = Penalties {
        repetition: 1.5,
        ..Penalties::none()
    };
    let prompt = [1u32, 5, 5];
    let output = [5u32, 66];
    // Off everywhere, or on with nothing to act on (presence needs an output): nothing to patch.
    let idle: [(Penalties, &[u32], &[u32]); 3] = [
        (Penalties::none(), &prompt, &output),
        (
            Penalties {
                presence: 1.0,
                ..Penalties::none()
            },
            &prompt,
            &[],
        ),
        (repetition, &[], &[]),
    ];
    let penalties = DevicePenalties::new(&idle, vocab, &device).unwrap();
    assert!(!penalties.any());
    for dtype in FLOAT_DTYPES {
        let values = logits(&mut rng, rows, vocab, dtype, false);
        common::poison_pool(&device, rows * vocab * 4);
        let out = apply_penalties(&upload(&values, &[rows, vocab], dtype, &device), &penalties)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&out),
            bits(&values),
            "{dtype}: a copy, converted to f32"
        );
    }

    let active: [(Penalties, &[u32], &[u32]); 3] =
        [idle[0], idle[1], (repetition, &prompt, &output)];
    let penalties = DevicePenalties::new(&active, vocab, &device).unwrap();
    assert!(penalties.any());
    assert_eq!(penalties.rows(), rows);
    // Logits of another vocabulary could be written outside their rows: refused.
    let narrower = upload(&vec![0.0; rows * 60], &[rows, 60], DType::F32, &device);
    assert!(matches!(
        apply_penalties(&narrower, &penalties),
        Err(Error::Shape { .. })
    ));
    let fewer_rows = upload(&vec![0.0; 2 * vocab], &[2, vocab], DType::F32, &device);
    assert!(matches!(
        apply_penalties(&fewer_rows, &penalties),
        Err(Error::Shape { .. })
    ));
    // Out-of-range tokens are refused in the prompt and in the output, even for rows whose
    // penalties are off; invalid penalties are refused too.
    for bad in [
        [(repetition, &[0u32, 67][..], &[][..])],
        [(Penalties::none(), &[0u32][..], &[3, 1000][..])],
        [(
            Penalties {
                frequency: 2.5,
                ..Penalties::none()
            },
            &[0u32][..],
            &[][..],
        )],
    ] {
        assert!(matches!(
            DevicePenalties::new(&bad, vocab, &device),
            Err(Error::InvalidSampling(_))
        ));
    }
}

#[test]
fn logprobs_of_rows_and_tokens_out_of_range() {
    let Some(device) = gpu_or_skip("logprobs_out_of_range") else {
        return;
    };
    let nan = f32::NAN;
    let values = [
        [1.0, 2.0, 3.0, 0.5, 2.0],
        [nan, f32::NEG_INFINITY, nan, f32::NEG_INFINITY, nan],
    ];
    let flat: Vec<f32> = values.iter().flatten().copied().collect();
    let tensor = upload(&flat, &[2, 5], DType::F32, &device);
    let top_n = 3;
    // Valid; a token past the vocabulary; a row past the logits; a row without a number.
    let rows = [0u32, 0, 2, 1];
    let asked = [3u32, 5, 0, 0];
    common::poison_pool(&device, 1 << 16);
    let (chosen, ids, top) = logprobs_on_host(&device, &tensor, &rows, &asked, top_n);
    let expected = cpu::sampling::logprobs(&values[0], 3, top_n).unwrap();
    assert!((chosen[0] - expected.logprob).abs() <= 1e-6);
    for q in [0, 1] {
        for (n, &(id, logprob)) in expected.top.iter().enumerate() {
            assert_eq!(ids[q * top_n + n], id, "query {q} place {n}");
            assert!((top[q * top_n + n] - logprob).abs() <= 1e-6);
        }
    }
    assert!(
        chosen[1].is_nan(),
        "token past the vocabulary: {}",
        chosen[1]
    );
    assert!(chosen[2].is_nan(), "row past the logits: {}", chosen[2]);
    assert_eq!(&ids[2 * top_n..3 * top_n], [NO_TOKEN; 3]);
    assert!(top[2 * top_n..3 * top_n].iter().all(|l| l.is_nan()));
    // Where the CPU fails (no logit above -inf), the GPU reports NaN.
    assert!(cpu::sampling::logprobs(&values[1], 0, top_n).is_err());
    assert!(chosen[3].is_nan());
    assert!(top[3 * top_n..].iter().all(|l| l.is_nan()));

    // No rows asked for, and ids of the wrong dtype.
    let none = logprobs(
        &tensor,
        &common::upload_u32(&[], &device),
        &common::upload_u32(&[], &device),
        top_n,
    )
    .unwrap();
    assert_eq!(none.chosen.dims(), [0]);
    assert_eq!(none.top_ids.dims(), [0, top_n]);
    let float_rows = upload(&[0.0], &[1], DType::F32, &device);
    let one = common::upload_u32(&[0], &device);
    assert!(matches!(
        logprobs(&tensor, &float_rows, &one, 1),
        Err(Error::DType { .. })
    ));
    let two = common::upload_u32(&[0, 1], &device);
    assert!(matches!(
        logprobs(&tensor, &one, &two, 1),
        Err(Error::Shape { .. })
    ));
}
