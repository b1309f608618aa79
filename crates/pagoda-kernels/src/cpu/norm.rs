//! Per-row normalisation: LayerNorm (GPT-NeoX) and RMSNorm (Llama).
//!
//! Row statistics accumulate in f64: these functions are the reference the GPU kernels are
//! checked against, and the cost is small next to the matrix products around them.

use rayon::prelude::*;

use crate::error::expect_len;
use crate::{Error, Result};

/// Rows handed to one task at least, so that many short rows do not drown in scheduling.
fn rows_per_task(hidden: usize) -> usize {
    const ELEMENTS_PER_TASK: usize = 1 << 14;
    (ELEMENTS_PER_TASK / hidden).max(1)
}

/// The shape checks both norms share.
fn check_shapes(
    op: &'static str,
    x: &[f32],
    hidden: usize,
    weight: &[f32],
    out: &[f32],
) -> Result<()> {
    if hidden == 0 {
        return Err(Error::shape(op, "hidden size must be positive"));
    }
    if !x.len().is_multiple_of(hidden) {
        return Err(Error::shape(
            op,
            format!(
                "x has {} elements, not a multiple of hidden size {hidden}",
                x.len()
            ),
        ));
    }
    expect_len(op, "weight", weight.len(), &[hidden])?;
    expect_len(op, "out", out.len(), &[x.len()])
}

/// `out = (x - mean) / sqrt(var + eps) * weight + bias` over each row of `hidden` elements, with
/// the biased variance (as `torch.nn.LayerNorm`).
pub fn layer_norm(
    x: &[f32],
    hidden: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "layer_norm";
    check_shapes(OP, x, hidden, weight, out)?;
    expect_len(OP, "bias", bias.len(), &[hidden])?;
    out.par_chunks_exact_mut(hidden)
        .zip(x.par_chunks_exact(hidden))
        .with_min_len(rows_per_task(hidden))
        .for_each(|(out, x)| {
            let count = hidden as f64;
            let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / count;
            let variance = x
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / count;
            let inv_std = (variance + f64::from(eps)).sqrt().recip();
            for (((out, &x), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
                *out = ((f64::from(x) - mean) * inv_std) as f32 * w + b;
            }
        });
    Ok(())
}

/// `out = x / sqrt(mean(x²) + eps) * weight` over each row of `hidden` elements.
pub fn rms_norm(x: &[f32], hidden: usize, weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    const OP: &str = "rms_norm";
    check_shapes(OP, x, hidden, weight, out)?;
    out.par_chunks_exact_mut(hidden)
        .zip(x.par_chunks_exact(hidden))
        .with_min_len(rows_per_task(hidden))
        .for_each(|(out, x)| {
            let mean_square = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / hidden as f64;
            let inv_rms = (mean_square + f64::from(eps)).sqrt().recip();
            for ((out, &x), &w) in out.iter_mut().zip(x).zip(weight) {
                *out = (f64::from(x) * inv_rms) as f32 * w;
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_vec(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-scale..scale)).collect()
    }

    fn assert_close(actual: &[f32], expected: &[f64], tolerance: f64) {
        assert_eq!(actual.len(), expected.len());
        for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            let error = (f64::from(a) - e).abs() / e.abs().max(1.0);
            assert!(
                error <= tolerance,
                "element {i}: {a} vs {e} (relative error {error:e})"
            );
        }
    }

    const HIDDEN_SIZES: [usize; 5] = [1, 3, 67, 129, 576];

    #[test]
    fn layer_norm_matches_the_definition() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        for hidden in HIDDEN_SIZES {
            for rows in [1, 5] {
                // An offset mean checks that the variance is taken around it.
                let x: Vec<f32> = random_vec(&mut rng, rows * hidden, 3.0)
                    .iter()
                    .map(|v| v + 10.0)
                    .collect();
                let weight = random_vec(&mut rng, hidden, 2.0);
                let bias = random_vec(&mut rng, hidden, 1.0);
                let eps = 1e-5;
                let mut out = vec![f32::NAN; x.len()];
                layer_norm(&x, hidden, &weight, &bias, eps, &mut out).unwrap();

                let mut expected = Vec::new();
                for row in x.chunks(hidden) {
                    let n = hidden as f64;
                    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
                    let var = row
                        .iter()
                        .map(|&v| (v as f64 - mean) * (v as f64 - mean))
                        .sum::<f64>()
                        / n;
                    for (j, &v) in row.iter().enumerate() {
                        let normalised = (v as f64 - mean) / (var + eps as f64).sqrt();
                        expected.push(normalised * weight[j] as f64 + bias[j] as f64);
                    }
                }
                assert_close(&out, &expected, 1e-5);
            }
        }
    }

    #[test]
    fn rms_norm_matches_the_definition() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for hidden in HIDDEN_SIZES {
            for rows in [1, 5] {
                let x = random_vec(&mut rng, rows * hidden, 4.0);
                let weight = random_vec(&mut rng, hidden, 2.0);
                let eps = 1e-6;
                let mut out = vec![f32::NAN; x.len()];
                rms_norm(&x, hidden, &weight, eps, &mut out).unwrap();

                let mut expected = Vec::new();
                for row in x.chunks(hidden) {
                    let mean_square =
                        row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / hidden as f64;
                    let rms = (mean_square + eps as f64).sqrt();
                    expected.extend(
                        row.iter()
                            .zip(&weight)
                            .map(|(&v, &w)| v as f64 / rms * w as f64),
                    );
                }
                assert_close(&out, &expected, 1e-5);
            }
        }
    }

    #[test]
    fn known_values() {
        // x = [1, 2, 3, 4]: mean 2.5, variance 1.25, mean square 7.5.
        let x = [1.0, 2.0, 3.0, 4.0];
        let mut out = [0.0; 4];
        layer_norm(&x, 4, &[1.0; 4], &[0.5; 4], 0.0, &mut out).unwrap();
        let inv_std = 1.25f32.sqrt().recip();
        let expected = [
            -1.5 * inv_std + 0.5,
            -0.5 * inv_std + 0.5,
            0.5 * inv_std + 0.5,
            1.5 * inv_std + 0.5,
        ];
        assert_close(&out, &expected.map(f64::from), 1e-6);
        rms_norm(&x, 4, &[2.0; 4], 0.0, &mut out).unwrap();
        let inv_rms = 7.5f64.sqrt().recip();
        assert_close(
            &out,
            &[2.0 * inv_rms, 4.0 * inv_rms, 6.0 * inv_rms, 8.0 * inv_rms],
            1e-6,
        );
    }

    #[test]
    fn rejects_mismatched_lengths() {
        let x = [0.0; 6];
        let mut out = [0.0; 6];
        assert!(rms_norm(&x, 4, &[1.0; 4], 1e-6, &mut out).is_err());
        assert!(rms_norm(&x, 3, &[1.0; 2], 1e-6, &mut out).is_err());
        assert!(rms_norm(&x, 3, &[1.0; 3], 1e-6, &mut out[..3]).is_err());
        assert!(rms_norm(&x, 0, &[], 1e-6, &mut out).is_err());
        assert!(layer_norm(&x, 3, &[1.0; 3], &[0.0; 2], 1e-5, &mut out).is_err());
        let result = layer_norm(&x, 3, &[1.0; 3], &[0.0; 3], 1e-5, &mut out);
        assert!(result.is_ok(), "{result:?}");
    }
}
