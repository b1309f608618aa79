//! Rotary position embeddings (Su et al., "RoFormer", 2021) in the GPT-NeoX "rotate half" layout
//! used by both Pythia and Hugging Face Llama: dimension `i` of a head's rotary part is paired with
//! dimension `i + rotary_dim / 2`, not with its neighbour.

use std::f32::consts::PI;

use rayon::prelude::*;

use crate::error::{checked_product, expect_len};
use crate::{Error, Result};

/// The frequency rescaling of Llama 3.1 (`rope_type: "llama3"` in `config.json`): long wavelengths
/// are stretched by `factor`, short ones kept, and those in between interpolated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

impl Llama3RopeScaling {
    fn validate(&self) -> Result<()> {
        let invalid = |message: String| {
            Err(Error::InvalidParameter {
                op: "rope_table",
                message,
            })
        };
        if !(self.factor.is_finite() && self.factor > 0.0) {
            return invalid(format!(
                "llama3 scaling factor must be positive and finite, got {}",
                self.factor
            ));
        }
        if !(self.low_freq_factor > 0.0
            && self.low_freq_factor < self.high_freq_factor
            && self.high_freq_factor.is_finite())
        {
            return invalid(format!(
                "llama3 scaling needs 0 < low_freq_factor < high_freq_factor, got {} and {}",
                self.low_freq_factor, self.high_freq_factor
            ));
        }
        if self.original_max_position_embeddings == 0 {
            return invalid("llama3 scaling needs original_max_position_embeddings > 0".to_owned());
        }
        Ok(())
    }

    /// Rescales one inverse frequency, following `_compute_llama3_parameters` in Hugging Face
    /// transformers (`modeling_rope_utils.py`), in f32 as it computes.
    fn rescale(&self, inv_freq: f32) -> f32 {
        let original_context = self.original_max_position_embeddings as f32;
        let low_freq_wavelen = original_context / self.low_freq_factor;
        let high_freq_wavelen = original_context / self.high_freq_factor;
        let wavelen = 2.0 * PI / inv_freq;
        if wavelen < high_freq_wavelen {
            inv_freq
        } else if wavelen > low_freq_wavelen {
            inv_freq / self.factor
        } else {
            let smooth = (original_context / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * inv_freq / self.factor + smooth * inv_freq
        }
    }
}

/// Precomputed `cos` and `sin` of every (position, frequency) pair, each
/// `[max_positions, rotary_dim / 2]`.
#[derive(Clone, Debug)]
pub struct RopeTable {
    rotary_dim: usize,
    max_positions: usize,
    inv_freq: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Builds the table for `rotary_dim` (even, positive) rotated dimensions per head, frequency
    /// base `base` (`rope_theta`), positions `0..max_positions`.
    ///
    /// The inverse frequencies `1 / base^(2i / rotary_dim)` and the angles `position * inv_freq`
    /// are computed in f32, as Hugging Face transformers does, so the rotations match it.
    pub fn new(
        rotary_dim: usize,
        base: f32,
        max_positions: usize,
        scaling: Option<Llama3RopeScaling>,
    ) -> Result<Self> {
        const OP: &str = "rope_table";
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(Error::shape(
                OP,
                format!("rotary_dim must be even and positive, got {rotary_dim}"),
            ));
        }
        if !(base.is_finite() && base > 0.0) {
            return Err(Error::InvalidParameter {
                op: OP,
                message: format!("base must be positive and finite, got {base}"),
            });
        }
        if let Some(scaling) = &scaling {
            scaling.validate()?;
        }
        let half = rotary_dim / 2;
        let table_len = checked_product(OP, &[max_positions, half])?;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let inv_freq = 1.0 / base.powf((2 * i) as f32 / rotary_dim as f32);
                scaling.map_or(inv_freq, |scaling| scaling.rescale(inv_freq))
            })
            .collect();
        let mut cos = vec![0.0; table_len];
        let mut sin = vec![0.0; table_len];
        cos.par_chunks_exact_mut(half)
            .zip(sin.par_chunks_exact_mut(half))
            .enumerate()
            .for_each(|(position, (cos, sin))| {
                for ((cos, sin), &inv_freq) in cos.iter_mut().zip(sin.iter_mut()).zip(&inv_freq) {
                    let angle = position as f32 * inv_freq;
                    *cos = angle.cos();
                    *sin = angle.sin();
                }
            });
        Ok(RopeTable {
            rotary_dim,
            max_positions,
            inv_freq,
            cos,
            sin,
        })
    }

    /// Leading dimensions of each head that are rotated.
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    /// Positions the table covers: `0..max_positions`.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The `rotary_dim / 2` inverse frequencies, scaling applied.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `cos(position * inv_freq[i])`, row-major `[max_positions, rotary_dim / 2]`.
    pub fn cos(&self) -> &[f32] {
        &self.cos
    }

    /// `sin(position * inv_freq[i])`, row-major `[max_positions, rotary_dim / 2]`.
    pub fn sin(&self) -> &[f32] {
        &self.sin
    }
}

/// Rotates dimensions `[0, rotary_dim)` of every head of token `t` in `x` (`[num_tokens,
/// num_heads, head_dim]`) by the angles of position `positions[t]`; the remaining dimensions of
/// each head are left as they are.
///
/// With `h = rotary_dim / 2`, each pair `(x[i], x[i + h])` becomes
/// `(x[i] cos - x[i + h] sin, x[i + h] cos + x[i] sin)`.
pub fn apply_rope(
    x: &mut [f32],
    num_heads: usize,
    head_dim: usize,
    positions: &[u32],
    table: &RopeTable,
) -> Result<()> {
    const OP: &str = "apply_rope";
    let rotary_dim = table.rotary_dim;
    if rotary_dim > head_dim {
        return Err(Error::shape(
            OP,
            format!("rotary_dim {rotary_dim} exceeds head_dim {head_dim}"),
        ));
    }
    expect_len(OP, "x", x.len(), &[positions.len(), num_heads, head_dim])?;
    if let Some((token, position)) = positions
        .iter()
        .enumerate()
        .find(|(_, position)| **position as usize >= table.max_positions)
    {
        return Err(Error::shape(
            OP,
            format!(
                "token {token} has position {position}, but the table covers {}",
                table.max_positions
            ),
        ));
    }
    if x.is_empty() {
        return Ok(());
    }
    let half = rotary_dim / 2;
    x.par_chunks_exact_mut(num_heads * head_dim)
        .zip(positions)
        .for_each(|(token, &position)| {
            let row = position as usize * half..(position as usize + 1) * half;
            let (cos, sin) = (&table.cos[row.clone()], &table.sin[row]);
            for head in token.chunks_exact_mut(head_dim) {
                let (first, second) = head[..rotary_dim].split_at_mut(half);
                for (((a, b), &cos), &sin) in
                    first.iter_mut().zip(second.iter_mut()).zip(cos).zip(sin)
                {
                    (*a, *b) = (*a * cos - *b * sin, *b * cos + *a * sin);
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The straightforward formula, angles in f64 from f32 inverse frequencies.
    fn naive_rope(
        x: &[f32],
        num_heads: usize,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &[f32],
    ) -> Vec<f32> {
        let half = inv_freq.len();
        let mut out = x.to_vec();
        for (t, &position) in positions.iter().enumerate() {
            for h in 0..num_heads {
                let head = (t * num_heads + h) * head_dim;
                for i in 0..half {
                    let angle = f64::from(position) * f64::from(inv_freq[i]);
                    let (a, b) = (f64::from(x[head + i]), f64::from(x[head + i + half]));
                    out[head + i] = (a * angle.cos() - b * angle.sin()) as f32;
                    out[head + i + half] = (b * angle.cos() + a * angle.sin()) as f32;
                }
            }
        }
        out
    }

    fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32) {
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            let error = (a - e).abs() / e.abs().max(1.0);
            assert!(error <= tolerance, "element {i}: {a} vs {e}");
        }
    }

    #[test]
    fn matches_the_formula_including_partial_rotation() {
        let mut rng = ChaCha8Rng::seed_from_u64(40);
        // (head_dim, rotary_dim): full rotation, and partial as in Pythia (rotary_pct 0.25).
        for (head_dim, rotary_dim) in [(64, 64), (64, 16), (6, 2), (10, 6)] {
            let base = 10000.0f32;
            let table = RopeTable::new(rotary_dim, base, 300, None).unwrap();
            let inv_freq: Vec<f32> = (0..rotary_dim / 2)
                .map(|i| 1.0 / base.powf((2 * i) as f32 / rotary_dim as f32))
                .collect();
            assert_eq!(table.inv_freq(), inv_freq);
            let num_heads = 3;
            let positions = [0, 7, 299, 1, 150];
            let x: Vec<f32> = (0..positions.len() * num_heads * head_dim)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            let mut rotated = x.clone();
            apply_rope(&mut rotated, num_heads, head_dim, &positions, &table).unwrap();
            let expected = naive_rope(&x, num_heads, head_dim, &positions, &inv_freq);
            // Angles up to 299 rad rounded to f32 differ from f64 by up to ~1.5e-5 rad.
            assert_close(&rotated, &expected, 1e-4);
            for (t, token) in rotated.chunks(num_heads * head_dim).enumerate() {
                for (h, head) in token.chunks(head_dim).enumerate() {
                    let start = (t * num_heads + h) * head_dim;
                    assert_eq!(
                        head[rotary_dim..],
                        x[start + rotary_dim..start + head_dim],
                        "tail untouched"
                    );
                }
            }
        }
    }

    #[test]
    fn small_positions_match_tightly_and_position_zero_is_identity() {
        let mut rng = ChaCha8Rng::seed_from_u64(41);
        let table = RopeTable::new(64, 100000.0, 8, None).unwrap();
        let x: Vec<f32> = (0..8 * 2 * 64)
            .map(|_| rng.random_range(-2.0f32..2.0))
            .collect();
        let positions: Vec<u32> = (0..8).collect();
        let mut rotated = x.clone();
        apply_rope(&mut rotated, 2, 64, &positions, &table).unwrap();
        assert_close(
            &rotated,
            &naive_rope(&x, 2, 64, &positions, table.inv_freq()),
            1e-5,
        );
        assert_eq!(rotated[..128], x[..128]);
    }

    #[test]
    fn rotation_preserves_pair_norms() {
        let table = RopeTable::new(4, 10000.0, 100, None).unwrap();
        let mut x = [3.0, 1.0, 4.0, -2.0];
        apply_rope(&mut x, 1, 4, &[97], &table).unwrap();
        assert!((x[0].hypot(x[2]) - 5.0).abs() < 1e-5);
        assert!((x[1].hypot(x[3]) - 5.0f32.sqrt()).abs() < 1e-5);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// The point of RoPE: the dot product of a rotated query and key depends only on how far
        /// apart their positions are.
        #[test]
        fn dot_products_depend_only_on_relative_position(
            seed in 0u64..1000,
            query_position in 0u32..100,
            key_position in 0u32..100,
            shift in 0u32..100,
        ) {
            let table = RopeTable::new(16, 10000.0, 200, None).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let q: Vec<f32> = (0..16).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let k: Vec<f32> = (0..16).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let rotated_dot = |q_position: u32, k_position: u32| {
                let (mut q, mut k) = (q.clone(), k.clone());
                apply_rope(&mut q, 1, 16, &[q_position], &table).unwrap();
                apply_rope(&mut k, 1, 16, &[k_position], &table).unwrap();
                q.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>()
            };
            let near = rotated_dot(query_position, key_position);
            let shifted = rotated_dot(query_position + shift, key_position + shift);
            proptest::prop_assert!((near - shifted).abs() < 1e-4, "{near} vs {shifted}");
        }
    }

    #[test]
    fn llama3_scaling_matches_hugging_face() {
        // Llama 3.1 8B: head_dim 128, rope_theta 500000, factor 8, low 1, high 4, original 8192.
        // (index, inv_freq) from transformers' `_compute_llama3_parameters`: indices below 29 are
        // unchanged, 29..=34 interpolated, 35 and above divided by the factor.
        let expected: [(usize, f64); 10] = [
            (0, 1.0),
            (10, 0.12868738174438477),
            (28, 0.0032114461064338684),
            (29, 0.0021665706299245358),
            (30, 0.0013718936825171113),
            (32, 0.0005248460220173001),
            (34, 0.0001785077911335975),
            (35, 9.556212171446532e-05),
            (50, 4.411534519022098e-06),
            (63, 3.068925877869333e-07),
        ];
        let scaling = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let table = RopeTable::new(128, 500000.0, 4, Some(scaling)).unwrap();
        for (i, value) in expected {
            let error = (f64::from(table.inv_freq()[i]) - value).abs() / value;
            assert!(
                error < 1e-6,
                "inv_freq[{i}] = {} vs {value}",
                table.inv_freq()[i]
            );
        }
        let angle = 3.0 * table.inv_freq()[30];
        assert_eq!(table.cos()[3 * 64 + 30], angle.cos());
        assert_eq!(table.sin()[3 * 64 + 30], angle.sin());
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(matches!(
            RopeTable::new(0, 10000.0, 8, None),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            RopeTable::new(7, 10000.0, 8, None),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            RopeTable::new(8, -1.0, 8, None),
            Err(Error::InvalidParameter { .. })
        ));
        let scaling = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 4.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        assert!(matches!(
            RopeTable::new(8, 10000.0, 8, Some(scaling)),
            Err(Error::InvalidParameter { .. })
        ));

        let table = RopeTable::new(8, 10000.0, 16, None).unwrap();
        let mut x = [0.0; 16];
        let error = apply_rope(&mut x, 1, 8, &[3, 16], &table).unwrap_err();
        assert!(error.to_string().contains("position 16"), "{error}");
        assert!(
            apply_rope(&mut x, 1, 8, &[3], &table).is_err(),
            "x too long"
        );
        assert!(
            apply_rope(&mut x, 2, 4, &[3, 4], &table).is_err(),
            "rotary_dim > head_dim"
        );
        assert!(apply_rope(&mut [], 0, 8, &[3], &table).is_ok());
    }
}
