//! Row-wise softmax.

use rayon::prelude::*;

use crate::{Error, Result};

/// Softmax over each row of `cols` elements, in place.
///
/// The row maximum is subtracted before exponentiating, so large logits do not overflow; `-inf`
/// entries become exactly 0. A row whose entries are all `-inf` has no defined softmax and comes
/// out as NaN, as in PyTorch.
pub fn softmax_rows(x: &mut [f32], cols: usize) -> Result<()> {
    const OP: &str = "softmax_rows";
    if cols == 0 {
        return Err(Error::shape(OP, "row length must be positive"));
    }
    if !x.len().is_multiple_of(cols) {
        return Err(Error::shape(
            OP,
            format!(
                "x has {} elements, not a multiple of {cols} columns",
                x.len()
            ),
        ));
    }
    let rows_per_task = ((1 << 14) / cols).max(1);
    x.par_chunks_exact_mut(cols)
        .with_min_len(rows_per_task)
        .for_each(softmax_in_place);
    Ok(())
}

/// Softmax of one row, in place.
pub(crate) fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
    }
    let inv_sum = (1.0 / sum) as f32;
    for v in row.iter_mut() {
        *v *= inv_sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn matches_the_definition() {
        let mut rng = ChaCha8Rng::seed_from_u64(30);
        for cols in [1, 3, 67, 129, 1000] {
            for rows in [1, 5] {
                let input: Vec<f32> = (0..rows * cols)
                    .map(|_| rng.random_range(-30.0f32..30.0))
                    .collect();
                let mut x = input.clone();
                softmax_rows(&mut x, cols).unwrap();
                for (row, input) in x.chunks(cols).zip(input.chunks(cols)) {
                    let denominator: f64 = input.iter().map(|&v| f64::from(v).exp()).sum();
                    for (&p, &v) in row.iter().zip(input) {
                        let expected = f64::from(v).exp() / denominator;
                        let error = (f64::from(p) - expected).abs() / expected.max(1e-30);
                        assert!(error <= 1e-5, "{p} vs {expected}");
                    }
                }
            }
        }
    }

    #[test]
    fn large_and_masked_logits() {
        let mut x = [1000.0, 1000.0, f32::NEG_INFINITY, 999.0];
        softmax_rows(&mut x, 4).unwrap();
        let e = (-1.0f64).exp();
        let expected = [1.0 / (2.0 + e), 1.0 / (2.0 + e), 0.0, e / (2.0 + e)];
        for (p, e) in x.iter().zip(expected) {
            assert!((f64::from(*p) - e).abs() < 1e-6, "{p} vs {e}");
        }
        let mut masked = [f32::NEG_INFINITY; 2];
        softmax_rows(&mut masked, 2).unwrap();
        assert!(masked.iter().all(|p| p.is_nan()));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Every row is a probability distribution ordered like its logits.
        #[test]
        fn rows_are_distributions_in_logit_order(
            row in proptest::collection::vec(-100.0f32..100.0, 1..40),
        ) {
            let mut p = row.clone();
            softmax_rows(&mut p, row.len()).unwrap();
            let total: f32 = p.iter().sum();
            proptest::prop_assert!((total - 1.0).abs() < 1e-5, "sum {total}");
            for (i, (&pi, &xi)) in p.iter().zip(&row).enumerate() {
                proptest::prop_assert!((0.0..=1.0).contains(&pi), "p[{i}] = {pi}");
                for (&pj, &xj) in p.iter().zip(&row) {
                    if xi > xj {
                        proptest::prop_assert!(pi >= pj);
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(softmax_rows(&mut [0.0; 5], 2).is_err());
        assert!(softmax_rows(&mut [0.0; 4], 0).is_err());
        assert!(softmax_rows(&mut [], 3).is_ok());
    }
}
