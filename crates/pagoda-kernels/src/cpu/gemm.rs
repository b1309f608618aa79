//! Dense matrix products: [`linear`] (activations times a weight matrix stored `[out, in]`, the
//! `nn.Linear` convention, in f32, f16 or bf16) and [`matmul`] (two f32 matrices). Products always
//! accumulate in f32.

use gemm::Parallelism;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::Result;
use crate::error::expect_len;

/// A row-major weight matrix in one of the storage types checkpoints ship.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl Weights<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::F16(w) => w.len(),
            Weights::BF16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per element as stored.
    pub fn element_size(&self) -> usize {
        match self {
            Weights::F32(_) => size_of::<f32>(),
            Weights::F16(_) => size_of::<f16>(),
            Weights::BF16(_) => size_of::<bf16>(),
        }
    }

    /// Converts row `row` of the matrix viewed as `[len / width, width]` into `out`.
    ///
    /// # Panics
    ///
    /// Panics if `out.len() != width` or the row lies past the end of the matrix.
    pub fn row_to_f32(&self, row: usize, width: usize, out: &mut [f32]) {
        assert_eq!(
            out.len(),
            width,
            "row_to_f32: output length must equal the row width"
        );
        self.range_to_f32(row * width, out);
    }

    /// Converts the `out.len()` elements starting at `start` into `out`.
    fn range_to_f32(&self, start: usize, out: &mut [f32]) {
        let range = start..start + out.len();
        match self {
            Weights::F32(w) => out.copy_from_slice(&w[range]),
            Weights::F16(w) => convert(&w[range], out),
            Weights::BF16(w) => convert(&w[range], out),
        }
    }
}

/// A weight storage type, widened to f32 where it is used.
///
/// The conversions are branch-free bit manipulation, so that loops over them vectorize with the
/// baseline instruction set; `half`'s own conversions test for F16C at run time on each call.
trait Element: Copy + Send + Sync {
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for bf16 {
    /// A bf16 is the upper half of the f32 with the same value.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

impl Element for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // IEEE 754 binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
        let bits = u32::from(self.to_bits());
        let sign = (bits & 0x8000) << 16;
        let magnitude = bits & 0x7fff;
        // Exponent and mantissa moved into f32 position read as a number 2^(127 - 15) times too
        // small: one multiplication rebiases normal numbers and turns subnormal ones (an f32
        // subnormal after the shift) into the right normal f32.
        let finite = f32::from_bits(magnitude << 13) * f32::from_bits((127 + 112) << 23);
        // An all-ones exponent (infinity, NaN) must stay all ones, mantissa (NaN payload) kept.
        let value = if magnitude >= 0x7c00 {
            (magnitude << 13) | 0x7f80_0000
        } else {
            finite.to_bits()
        };
        f32::from_bits(value | sign)
    }
}

fn convert<T: Element>(src: &[T], dst: &mut [f32]) {
    for (dst, &src) in dst.iter_mut().zip(src) {
        *dst = src.to_f32();
    }
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ (+ bias[n])`: the `nn.Linear` convention, `w` row-major
/// `[n, k]`.
///
/// A few rows (decode) take dot products against each row of `w`, split across threads; more
/// rows go through the `gemm` crate in panels of `w` rows converted to f32.
pub fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "linear";
    expect_len(OP, "x", x.len(), &[m, k])?;
    expect_len(OP, "w", w.len(), &[n, k])?;
    if let Some(bias) = bias {
        expect_len(OP, "bias", bias.len(), &[n])?;
    }
    expect_len(OP, "out", out.len(), &[m, n])?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        for row in out.chunks_exact_mut(n) {
            match bias {
                Some(bias) => row.copy_from_slice(bias),
                None => row.fill(0.0),
            }
        }
        return Ok(());
    }
    if m <= ROW_DOTS_MAX_M {
        row_dots(x, m, k, w, bias, out);
    } else {
        panel_gemm(x, m, k, w, n, bias, out);
    }
    Ok(())
}

/// `out[m, n] = a[m, k] · b[k, n]`, all f32 row-major.
pub fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) -> Result<()> {
    const OP: &str = "matmul";
    expect_len(OP, "a", a.len(), &[m, k])?;
    expect_len(OP, "b", b.len(), &[k, n])?;
    expect_len(OP, "out", out.len(), &[m, n])?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    // SAFETY: the lengths were checked above: `a` holds m x k elements with strides (k, 1), `b`
    // k x n with strides (n, 1), `out` m x n with strides (n, 1); `out` is exclusively borrowed
    // and, with `read_dst` false, only written.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        );
    }
    Ok(())
}

/// Dot product of two equally long f32 slices.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_widened(a, b)
}

/// Dot product of `x` with `w` widened to f32.
///
/// Independent partial sums let the compiler keep them in SIMD registers (a single running sum is
/// a serial chain of additions that it may not reorder), enough of them to hide the latency of
/// the additions; they are then added pairwise.
#[inline(always)]
fn dot_widened<T: Element>(x: &[f32], w: &[T]) -> f32 {
    const LANES: usize = 32;
    debug_assert_eq!(x.len(), w.len());
    let (x_blocks, x_tail) = x.as_chunks::<LANES>();
    let (w_blocks, w_tail) = w.as_chunks::<LANES>();
    let mut partial = [0.0f32; LANES];
    for (x, w) in x_blocks.iter().zip(w_blocks) {
        for lane in 0..LANES {
            partial[lane] += x[lane] * w[lane].to_f32();
        }
    }
    for (lane, (&x, &w)) in x_tail.iter().zip(w_tail).enumerate() {
        partial[lane] += x * w.to_f32();
    }
    let mut width = LANES / 2;
    while width > 0 {
        for lane in 0..width {
            partial[lane] += partial[lane + width];
        }
        width /= 2;
    }
    partial[0]
}

/// Up to this many rows of `x`, [`linear`] takes dot products with each row of `w` rather than
/// calling `gemm`, whose packing does not pay off for so few rows.
const ROW_DOTS_MAX_M: usize = 1;

/// Weight elements one task of [`row_dots`] covers: enough that scheduling is noise, few enough
/// that the rows of a decode-sized matrix spread over every thread.
const ROW_DOTS_ELEMENTS_PER_TASK: usize = 1 << 15;

/// `out[i, j] = x[i] · w[j] (+ bias[j])` for `k > 0`, parallel over chunks of rows of `w`.
fn row_dots(x: &[f32], m: usize, k: usize, w: Weights<'_>, bias: Option<&[f32]>, out: &mut [f32]) {
    if m == 1 {
        row_dots_transposed(x, k, w, bias, out);
        return;
    }
    // Each task fills whole rows of the transposed product; one pass puts them in place.
    let n = out.len() / m;
    let mut out_t = vec![0.0; out.len()];
    row_dots_transposed(x, k, w, bias, &mut out_t);
    for (j, products) in out_t.chunks_exact(m).enumerate() {
        for (i, &product) in products.iter().enumerate() {
            out[i * n + j] = product;
        }
    }
}

/// `out_t[j, i] = x[i] · w[j] (+ bias[j])`.
fn row_dots_transposed(
    x: &[f32],
    k: usize,
    w: Weights<'_>,
    bias: Option<&[f32]>,
    out_t: &mut [f32],
) {
    match w {
        Weights::F32(w) => row_dots_typed(x, k, w, bias, out_t),
        Weights::F16(w) => row_dots_typed(x, k, w, bias, out_t),
        Weights::BF16(w) => row_dots_typed(x, k, w, bias, out_t),
    }
}

fn row_dots_typed<T: Element>(
    x: &[f32],
    k: usize,
    w: &[T],
    bias: Option<&[f32]>,
    out_t: &mut [f32],
) {
    let m = x.len() / k;
    let rows_per_task = (ROW_DOTS_ELEMENTS_PER_TASK / k).max(1);
    out_t
        .par_chunks_mut(rows_per_task * m)
        .zip(w.par_chunks(rows_per_task * k))
        .enumerate()
        .for_each(|(task, (out_t, w))| {
            dot_each_row_dispatch(x, k, w, out_t);
            if let Some(bias) = bias {
                let bias = &bias[task * rows_per_task..];
                for (products, b) in out_t.chunks_exact_mut(m).zip(bias) {
                    products.iter_mut().for_each(|product| *product += b);
                }
            }
        });
}

/// `out_t[j, i] = x[i] · w[j]` for the rows `x[i]` and `w[j]` of `k` elements.
#[inline(always)]
fn dot_each_row<T: Element>(x: &[f32], k: usize, w: &[T], out_t: &mut [f32]) {
    let m = x.len() / k;
    for (products, w) in out_t.chunks_exact_mut(m).zip(w.chunks_exact(k)) {
        for (product, x) in products.iter_mut().zip(x.chunks_exact(k)) {
            *product = dot_widened(x, w);
        }
    }
}

/// [`dot_each_row`] compiled for AVX2: twice the SIMD width of the x86-64 baseline, which the
/// f16 conversion needs to keep up with memory.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_each_row_avx2<T: Element>(x: &[f32], k: usize, w: &[T], out_t: &mut [f32]) {
    dot_each_row(x, k, w, out_t);
}

/// [`dot_each_row`] with the widest instruction set the CPU offers.
fn dot_each_row_dispatch<T: Element>(x: &[f32], k: usize, w: &[T], out_t: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, as just checked.
        return unsafe { dot_each_row_avx2(x, k, w, out_t) };
    }
    dot_each_row(x, k, w, out_t);
}

/// Weight elements in one panel of `w` rows: its f32 copy (256 KiB) stays in a core's L2 cache
/// while `gemm` multiplies all of `x` by it.
const PANEL_ELEMENTS: usize = 1 << 16;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ (+ bias)` for `k > 0`, parallel over panels of rows of `w`
/// (columns of `out`); each panel is converted to f32 (unless it is f32 already) and handed to
/// `gemm`.
fn panel_gemm(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    if let Some(bias) = bias {
        for row in out.chunks_exact_mut(n) {
            row.copy_from_slice(bias);
        }
    }
    let panel_rows = (PANEL_ELEMENTS / k).clamp(1, n);
    let panels = n.div_ceil(panel_rows);
    // Each task takes a run of consecutive panels and converts them into one buffer of its own;
    // a few tasks per thread even out threads that fall behind.
    let panels_per_task = panels.div_ceil(4 * rayon::current_num_threads()).max(1);
    let out = SharedOutput(out.as_mut_ptr());
    (0..panels.div_ceil(panels_per_task))
        .into_par_iter()
        .for_each(|task| {
            let mut scratch = Vec::new();
            for panel in task * panels_per_task..((task + 1) * panels_per_task).min(panels) {
                let first_row = panel * panel_rows;
                let rows = panel_rows.min(n - first_row);
                let elements = first_row * k..(first_row + rows) * k;
                let panel_f32: &[f32] = match w {
                    Weights::F32(w) => &w[elements],
                    Weights::F16(_) | Weights::BF16(_) => {
                        scratch.resize(elements.len(), 0.0);
                        w.range_to_f32(elements.start, &mut scratch);
                        &scratch
                    }
                };
                // SAFETY: `x` holds m x k elements with strides (k, 1); `panel_f32` holds
                // `rows` rows of `w`, read as the k x rows right-hand side with strides (1, k).
                // The destination is the m x rows block of `out` (m x n, strides (n, 1), length
                // checked by `linear`) starting at column `first_row`: inside `out`, and disjoint
                // from every other panel's block, so the concurrent writes through the shared
                // pointer never touch the same element. With a bias the block was filled with it
                // above and is read back (`read_dst`), otherwise only written.
                unsafe {
                    gemm::gemm(
                        m,
                        rows,
                        k,
                        out.get().add(first_row),
                        1,
                        n as isize,
                        bias.is_some(),
                        x.as_ptr(),
                        1,
                        k as isize,
                        panel_f32.as_ptr(),
                        k as isize,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
        });
}

/// The output matrix, shared by the panel tasks of [`panel_gemm`], each of which writes only its
/// own columns.
#[derive(Clone, Copy)]
struct SharedOutput(*mut f32);

// SAFETY: the pointer is only dereferenced by `gemm` inside `panel_gemm`, where every task writes a
// disjoint block of the exclusively borrowed output, which outlives the parallel loop.
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    /// Taking `self` whole makes closures capture the `Send` wrapper, not the bare pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_vec(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Naive triple loop in f64, the reference for every product below.
    fn naive_linear(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        n: usize,
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut sum = bias.map_or(0.0, |b| f64::from(b[j]));
                for p in 0..k {
                    sum += f64::from(x[i * k + p]) * f64::from(w[j * k + p]);
                }
                out[i * n + j] = sum as f32;
            }
        }
        out
    }

    /// Relative error against the reference, normalised by the reference's largest magnitude so
    /// that entries which cancel to near zero do not dominate.
    fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32) {
        assert_eq!(actual.len(), expected.len());
        let scale = expected.iter().fold(1e-6f32, |acc, v| acc.max(v.abs()));
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            let error = (a - e).abs() / scale;
            assert!(
                error <= tolerance,
                "element {i}: {a} vs {e} (relative error {error:e})"
            );
        }
    }

    const SIZES_K: [usize; 6] = [1, 3, 16, 67, 129, 600];
    const SIZES_M: [usize; 4] = [1, 2, 5, 33];
    const SIZES_N: [usize; 4] = [1, 7, 64, 300];

    #[test]
    fn linear_f32_matches_naive() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for k in SIZES_K {
            for m in SIZES_M {
                for n in SIZES_N {
                    let x = random_vec(&mut rng, m * k);
                    let w = random_vec(&mut rng, n * k);
                    let bias = random_vec(&mut rng, n);
                    for bias in [None, Some(bias.as_slice())] {
                        let mut out = vec![f32::NAN; m * n];
                        linear(&x, m, k, Weights::F32(&w), n, bias, &mut out).unwrap();
                        assert_close(&out, &naive_linear(&x, m, k, &w, n, bias), 1e-5);
                    }
                }
            }
        }
    }

    #[test]
    fn linear_half_weights_match_naive_on_converted_weights() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for k in SIZES_K {
            for m in SIZES_M {
                for n in SIZES_N {
                    let x = random_vec(&mut rng, m * k);
                    let w = random_vec(&mut rng, n * k);
                    let bias = random_vec(&mut rng, n);
                    let w_f16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                    let w_bf16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                    let w_f16_as_f32: Vec<f32> = w_f16.iter().map(|v| v.to_f32()).collect();
                    let w_bf16_as_f32: Vec<f32> = w_bf16.iter().map(|v| v.to_f32()).collect();
                    for (weights, reference) in [
                        (Weights::F16(&w_f16), &w_f16_as_f32),
                        (Weights::BF16(&w_bf16), &w_bf16_as_f32),
                    ] {
                        let mut out = vec![f32::NAN; m * n];
                        linear(&x, m, k, weights, n, Some(&bias), &mut out).unwrap();
                        let expected = naive_linear(&x, m, k, reference, n, Some(&bias));
                        assert_close(&out, &expected, 1e-5);
                    }
                }
            }
        }
    }

    #[test]
    fn linear_with_empty_inner_dimension_is_the_bias() {
        let bias = [1.0, -2.0, 3.0];
        let mut out = [f32::NAN; 6];
        linear(&[], 2, 0, Weights::F32(&[]), 3, Some(&bias), &mut out).unwrap();
        assert_eq!(out, [1.0, -2.0, 3.0, 1.0, -2.0, 3.0]);
        let mut out = [f32::NAN; 3];
        linear(&[], 1, 0, Weights::BF16(&[]), 3, None, &mut out).unwrap();
        assert_eq!(out, [0.0; 3]);
    }

    #[test]
    fn linear_rejects_mismatched_lengths() {
        let x = [0.0; 6];
        let w = [0.0; 12];
        let mut out = [0.0; 8];
        let results = [
            linear(&x[..5], 2, 3, Weights::F32(&w), 4, None, &mut out),
            linear(&x, 2, 3, Weights::F32(&w[..11]), 4, None, &mut out),
            linear(&x, 2, 3, Weights::F32(&w), 4, Some(&[0.0; 3]), &mut out),
            linear(&x, 2, 3, Weights::F32(&w), 4, None, &mut out[..7]),
        ];
        for result in results {
            assert!(
                matches!(result, Err(Error::Shape { op: "linear", .. })),
                "{result:?}"
            );
        }
        let overflow = linear(&x, usize::MAX, 3, Weights::F32(&w), 4, None, &mut out);
        assert!(matches!(overflow, Err(Error::Shape { .. })));
    }

    #[test]
    fn matmul_matches_naive() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for k in SIZES_K {
            for m in SIZES_M {
                for n in SIZES_N {
                    let a = random_vec(&mut rng, m * k);
                    let b = random_vec(&mut rng, k * n);
                    let mut b_transposed = vec![0.0; n * k];
                    for p in 0..k {
                        for j in 0..n {
                            b_transposed[j * k + p] = b[p * n + j];
                        }
                    }
                    let mut out = vec![f32::NAN; m * n];
                    matmul(&a, &b, m, k, n, &mut out).unwrap();
                    assert_close(&out, &naive_linear(&a, m, k, &b_transposed, n, None), 1e-5);
                }
            }
        }
    }

    #[test]
    fn matmul_rejects_mismatched_lengths() {
        let mut out = [0.0; 4];
        let result = matmul(&[0.0; 6], &[0.0; 5], 2, 3, 2, &mut out);
        assert!(
            matches!(result, Err(Error::Shape { op: "matmul", .. })),
            "{result:?}"
        );
        let mut out = [f32::NAN; 4];
        matmul(&[], &[], 2, 0, 2, &mut out).unwrap();
        assert_eq!(out, [0.0; 4]);
    }

    #[test]
    fn dot_matches_sequential_sum_for_every_tail_length() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for len in 0..40 {
            let a = random_vec(&mut rng, len);
            let b = random_vec(&mut rng, len);
            let expected: f64 = a
                .iter()
                .zip(&b)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            assert!(
                (f64::from(dot(&a, &b)) - expected).abs() < 1e-5,
                "len {len}"
            );
        }
    }

    #[test]
    fn half_conversions_match_the_half_crate_for_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            for (ours, reference) in [
                (
                    Element::to_f32(f16::from_bits(bits)),
                    f16::from_bits(bits).to_f32(),
                ),
                (
                    Element::to_f32(bf16::from_bits(bits)),
                    bf16::from_bits(bits).to_f32(),
                ),
            ] {
                if reference.is_nan() {
                    assert!(ours.is_nan(), "{bits:#06x}: {ours} is not NaN");
                } else {
                    assert_eq!(
                        ours.to_bits(),
                        reference.to_bits(),
                        "{bits:#06x}: {ours} vs {reference}"
                    );
                }
            }
        }
    }

    #[test]
    fn row_to_f32_converts_one_row() {
        let w: Vec<bf16> = (0..6).map(|v| bf16::from_f32(v as f32)).collect();
        let mut row = [0.0; 3];
        Weights::BF16(&w).row_to_f32(1, 3, &mut row);
        assert_eq!(row, [3.0, 4.0, 5.0]);
    }
}
