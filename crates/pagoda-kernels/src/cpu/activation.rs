//! Elementwise activations: exact and tanh-approximated GELU (GPT-NeoX), and the SwiGLU gate
//! `silu(gate) * up` (Llama). Each element is evaluated in f64 and rounded once to f32.

use std::f64::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};

use rayon::prelude::*;

use crate::Result;
use crate::error::expect_len;

/// Elements one task covers at least: the functions are cheap, so small inputs stay on one thread.
const ELEMENTS_PER_TASK: usize = 1 << 12;

/// `x = 0.5 x (1 + erf(x / √2))` in place: GELU as `torch.nn.functional.gelu` computes it by
/// default.
pub fn gelu_exact(x: &mut [f32]) {
    // 1 + erf(x/√2) written as erfc(-x/√2), which keeps its relative accuracy for very negative x.
    map_in_place(x, |v| 0.5 * v * erfc(-v * FRAC_1_SQRT_2));
}

/// `x = 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` in place: GELU with `approximate="tanh"`
/// (Hendrycks & Gimpel, "Gaussian Error Linear Units", 2016, section 2).
pub fn gelu_tanh(x: &mut [f32]) {
    const SQRT_2_OVER_PI: f64 = FRAC_2_SQRT_PI * FRAC_1_SQRT_2;
    map_in_place(x, |v| {
        0.5 * v * (1.0 + (SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)).tanh())
    });
}

/// `out = silu(gate) * up` with `silu(g) = g / (1 + e^-g)`: the gated MLP of Llama.
pub fn silu_and_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    const OP: &str = "silu_and_mul";
    expect_len(OP, "up", up.len(), &[gate.len()])?;
    expect_len(OP, "out", out.len(), &[gate.len()])?;
    out.par_iter_mut()
        .zip(gate)
        .zip(up)
        .with_min_len(ELEMENTS_PER_TASK)
        .for_each(|((out, &g), &u)| {
            let g = f64::from(g);
            *out = (g / (1.0 + (-g).exp()) * f64::from(u)) as f32;
        });
    Ok(())
}

fn map_in_place(x: &mut [f32], f: impl Fn(f64) -> f64 + Sync) {
    x.par_iter_mut()
        .with_min_len(ELEMENTS_PER_TASK)
        .for_each(|v| *v = f(f64::from(*v)) as f32);
}

/// Where [`erf`] switches from its power series to the continued fraction of `erfc`: both are
/// accurate to about 1e-15 around here, the series needs fewer terms below and the fraction above.
const ERF_SERIES_LIMIT: f64 = 2.5;

/// Terms of the `erfc` continued fraction; at x ≥ 2.5 forty bring it to f64 round-off.
const ERFC_FRACTION_TERMS: u32 = 40;

/// The complementary error function `1 - erf(x)`, with relative error below 1e-11 everywhere.
fn erfc(x: f64) -> f64 {
    if x < ERF_SERIES_LIMIT {
        // erfc(x) > erfc(2.5) ≈ 4e-4 here, so the subtraction keeps eleven significant digits.
        1.0 - erf(x)
    } else {
        erfc_continued_fraction(x)
    }
}

/// The error function, with absolute error below 1e-14 everywhere.
fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let magnitude = x.abs();
    let value = if magnitude < ERF_SERIES_LIMIT {
        erf_series(magnitude)
    } else {
        1.0 - erfc_continued_fraction(magnitude)
    };
    value.copysign(x)
}

/// `erf(x) = 2/√π e^(-x²) Σₙ 2ⁿ x^(2n+1) / (1·3·5···(2n+1))` (Abramowitz & Stegun 7.1.6): every
/// term is positive, so nothing cancels, unlike the alternating Maclaurin series.
fn erf_series(x: f64) -> f64 {
    let two_x_squared = 2.0 * x * x;
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0;
    while term > sum * f64::EPSILON * 0.25 {
        n += 1.0;
        term *= two_x_squared / (2.0 * n + 1.0);
        sum += term;
    }
    FRAC_2_SQRT_PI * (-x * x).exp() * sum
}

/// `erfc(x) = e^(-x²)/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))` for x > 0 (Abramowitz &
/// Stegun 7.1.14), evaluated from the innermost term outwards.
fn erfc_continued_fraction(x: f64) -> f64 {
    let mut denominator = x;
    for n in (1..=ERFC_FRACTION_TERMS).rev() {
        denominator = x + f64::from(n) * 0.5 / denominator;
    }
    0.5 * FRAC_2_SQRT_PI * (-x * x).exp() / denominator
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// (x, erf x) from Python's `math.erf`.
    const ERF_VALUES: [(f64, f64); 15] = [
        (0.0, 0.0),
        (0.001, 0.0011283787909692365),
        (0.1, 0.1124629160182849),
        (0.5, 0.5204998778130465),
        (1.0, 0.8427007929497149),
        (1.5, 0.9661051464753108),
        (2.0, 0.9953222650189527),
        (2.5, 0.999593047982555),
        (3.0, 0.9999779095030014),
        (3.9, 0.9999999652077514),
        (4.5, 0.9999999998033839),
        (5.0, 0.9999999999984626),
        (6.0, 1.0),
        (-0.3, -0.3286267594591274),
        (-2.2, -0.9981371537020182),
    ];

    #[test]
    fn erf_matches_known_values() {
        for (x, expected) in ERF_VALUES {
            assert!(
                (erf(x) - expected).abs() < 1e-14,
                "erf({x}) = {} vs {expected}",
                erf(x)
            );
        }
        assert!(erf(f64::NAN).is_nan());
        assert_eq!(erf(f64::INFINITY), 1.0);
        assert_eq!(erf(f64::NEG_INFINITY), -1.0);
    }

    #[test]
    fn erf_series_and_continued_fraction_agree_where_they_meet() {
        for i in 0..=100 {
            let x = 2.0 + f64::from(i) * 0.015;
            let series = erf_series(x);
            let fraction = 1.0 - erfc_continued_fraction(x);
            assert!(
                (series - fraction).abs() < 1e-14,
                "x = {x}: {series} vs {fraction}"
            );
        }
    }

    #[test]
    fn erfc_keeps_relative_accuracy_in_the_tail() {
        // (x, erfc x) from Python's `math.erfc`.
        let cases = [
            (-1.0, 1.842700792949715),
            (1.0, 0.15729920705028513),
            (2.4, 0.0006885138966450789),
            (2.9, 4.109787809945886e-05),
            (4.0, 1.541725790028002e-08),
            (6.0, 2.1519736712498916e-17),
        ];
        for (x, expected) in cases {
            let value = erfc(x);
            assert!(
                ((value - expected) / expected).abs() < 1e-11,
                "erfc({x}) = {value} vs {expected}"
            );
        }
    }

    #[test]
    fn gelu_exact_known_values() {
        // (x, gelu x) with gelu x = x/2 erfc(-x/√2) from Python's `math.erfc`.
        let cases: [(f32, f64); 6] = [
            (0.0, 0.0),
            (1.0, 0.8413447460685429),
            (-1.0, -0.15865525393145707),
            (2.5, 2.4844758366855597),
            (-3.0, -0.004049694094890287),
            (-8.0, -4.9767684594174555e-15),
        ];
        let mut x = cases.map(|(x, _)| x);
        gelu_exact(&mut x);
        for (value, (input, expected)) in x.iter().zip(cases) {
            let error = (f64::from(*value) - expected).abs();
            assert!(
                error <= 1e-7 * expected.abs(),
                "gelu({input}) = {value} vs {expected}"
            );
        }
    }

    #[test]
    fn gelu_tanh_matches_the_formula_and_approximates_gelu() {
        let mut rng = ChaCha8Rng::seed_from_u64(20);
        let input: Vec<f32> = (0..1000).map(|_| rng.random_range(-6.0f32..6.0)).collect();
        let mut approx = input.clone();
        gelu_tanh(&mut approx);
        let mut exact = input.clone();
        gelu_exact(&mut exact);
        for ((&x, &a), &e) in input.iter().zip(&approx).zip(&exact) {
            let x = f64::from(x);
            let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3));
            let expected = 0.5 * x * (1.0 + inner.tanh());
            assert!(
                (f64::from(a) - expected).abs() <= 1e-6 * expected.abs().max(1e-3),
                "x = {x}"
            );
            // The approximation's own error is below 1e-3 (the paper's figure).
            assert!((a - e).abs() < 1e-3, "x = {x}: tanh form {a} vs exact {e}");
        }
    }

    #[test]
    fn silu_and_mul_matches_the_formula() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        for len in [0, 1, 3, 67, 5000] {
            let gate: Vec<f32> = (0..len).map(|_| rng.random_range(-20.0f32..20.0)).collect();
            let up: Vec<f32> = (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let mut out = vec![f32::NAN; len];
            silu_and_mul(&gate, &up, &mut out).unwrap();
            for i in 0..len {
                let g = f64::from(gate[i]);
                let expected = g * f64::from(up[i]) / (1.0 + (-g).exp());
                let error = (f64::from(out[i]) - expected).abs() / expected.abs().max(1e-6);
                assert!(error <= 1e-6, "gate {g}: {} vs {expected}", out[i]);
            }
        }
    }

    #[test]
    fn silu_and_mul_rejects_mismatched_lengths() {
        let mut out = [0.0; 3];
        assert!(silu_and_mul(&[0.0; 3], &[0.0; 2], &mut out).is_err());
        assert!(silu_and_mul(&[0.0; 3], &[0.0; 3], &mut out[..2]).is_err());
    }
}
