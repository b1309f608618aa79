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
            Weights::F32(w) => f32::widen(&w[range], out),
            Weights::F16(w) => f16::widen(&w[range], out),
            Weights::BF16(w) => bf16::widen(&w[range], out),
        }
    }
}

/// A weight storage type, widened to f32 where it is used.
trait Element: Copy + Send + Sync {
    /// The value as f32, by branch-free bit manipulation, so that loops over it vectorize with
    /// the baseline instruction set (`half`'s own conversions test for F16C at every call).
    fn to_f32(self) -> f32;

    /// `x · w` with the fastest kernel this CPU runs.
    fn dot(x: &[f32], w: &[Self]) -> f32;

    /// `dst = src` widened to f32, with the fastest kernel this CPU runs.
    fn widen(src: &[Self], dst: &mut [f32]);
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    fn dot(x: &[f32], w: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU has the features the kernel is compiled for, as just checked.
            return unsafe { avx2::dot_f32(x, w) };
        }
        dot_portable(x, w)
    }

    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl Element for bf16 {
    /// A bf16 is the upper half of the f32 with the same value.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }

    fn dot(x: &[f32], w: &[bf16]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU has the features the kernel is compiled for, as just checked.
            return unsafe { avx2::dot_bf16(x, w) };
        }
        dot_portable(x, w)
    }

    fn widen(src: &[bf16], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU has the features the kernel is compiled for, as just checked.
            return unsafe { avx2::widen_bf16(src, dst) };
        }
        widen_portable(src, dst);
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

    fn dot(x: &[f32], w: &[f16]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU has the features the kernel is compiled for, as just checked.
            return unsafe { avx2::dot_f16(x, w) };
        }
        dot_portable(x, w)
    }

    fn widen(src: &[f16], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU has the features the kernel is compiled for, as just checked.
            return unsafe { avx2::widen_f16(src, dst) };
        }
        widen_portable(src, dst);
    }
}

fn widen_portable<T: Element>(src: &[T], dst: &mut [f32]) {
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
    f32::dot(a, b)
}

/// `x · w` in portable Rust, for CPUs without the kernels of [`avx2`].
///
/// Independent partial sums let the compiler keep them in SIMD registers: a single running sum is
/// a serial chain of additions that it may not reorder.
fn dot_portable<T: Element>(x: &[f32], w: &[T]) -> f32 {
    const LANES: usize = 16;
    debug_assert_eq!(x.len(), w.len());
    let (x_blocks, x_tail) = x.as_chunks::<LANES>();
    let (w_blocks, w_tail) = w.as_chunks::<LANES>();
    let mut partial = [0.0f32; LANES];
    for (x, w) in x_blocks.iter().zip(w_blocks) {
        for lane in 0..LANES {
            partial[lane] += x[lane] * w[lane].to_f32();
        }
    }
    let tail: f32 = x_tail
        .iter()
        .zip(w_tail)
        .map(|(&x, &w)| x * w.to_f32())
        .sum();
    partial.iter().sum::<f32>() + tail
}

/// Dot-product kernels for x86-64 CPUs with AVX2, FMA and F16C (Intel Haswell, AMD Zen and
/// later): weights widened to f32 in registers, eight lanes at a time.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use super::Element;

    /// Whether this CPU runs the kernels below; the detection is cached by the standard library.
    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// Eight f32 weights.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load_f32(w: &[f32; 8]) -> __m256 {
        // SAFETY: `w` is 8 readable f32; the load has no alignment requirement.
        unsafe { _mm256_loadu_ps(w.as_ptr()) }
    }

    /// Eight f16 weights, converted by the F16C instruction.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn load_f16(w: &[f16; 8]) -> __m256 {
        // SAFETY: `w` is 16 readable bytes; the load has no alignment requirement.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(w.as_ptr().cast()) })
    }

    /// Eight bf16 weights: each is the upper half of an f32, so widen to 32 bits and shift.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load_bf16(w: &[bf16; 8]) -> __m256 {
        // SAFETY: `w` is 16 readable bytes; the load has no alignment requirement.
        let bits = unsafe { _mm_loadu_si128(w.as_ptr().cast()) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn horizontal_sum(acc: [__m256; 4]) -> f32 {
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` has room for 8 f32; the store has no alignment requirement.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        lanes.iter().sum()
    }

    /// Defines `$name(x, w) = x · w` for weights of type `$weight`, loaded by `$load`. Four
    /// accumulators keep enough independent multiply-adds in flight to hide their latency.
    macro_rules! dot_kernel {
        ($name:ident, $weight:ty, $load:ident) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) fn $name(x: &[f32], w: &[$weight]) -> f32 {
                debug_assert_eq!(x.len(), w.len());
                let (x_steps, x_tail) = x.as_chunks::<32>();
                let (w_steps, w_tail) = w.as_chunks::<32>();
                let mut acc = [_mm256_setzero_ps(); 4];
                for (x, w) in x_steps.iter().zip(w_steps) {
                    let (x, _) = x.as_chunks::<8>();
                    let (w, _) = w.as_chunks::<8>();
                    for ((acc, x), w) in acc.iter_mut().zip(x).zip(w) {
                        *acc = _mm256_fmadd_ps(load_f32(x), $load(w), *acc);
                    }
                }
                let tail: f32 = x_tail
                    .iter()
                    .zip(w_tail)
                    .map(|(&x, &w)| x * w.to_f32())
                    .sum();
                horizontal_sum(acc) + tail
            }
        };
    }

    dot_kernel!(dot_f32, f32, load_f32);
    dot_kernel!(dot_f16, f16, load_f16);
    dot_kernel!(dot_bf16, bf16, load_bf16);

    /// Defines `$name(src, dst)`, `dst = src` widened to f32, for `$weight` loaded by `$load`.
    macro_rules! widen_kernel {
        ($name:ident, $weight:ty, $load:ident) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) fn $name(src: &[$weight], dst: &mut [f32]) {
                debug_assert_eq!(src.len(), dst.len());
                let (src_steps, src_tail) = src.as_chunks::<8>();
                let (dst_steps, dst_tail) = dst.as_chunks_mut::<8>();
                for (src, dst) in src_steps.iter().zip(dst_steps) {
                    // SAFETY: `dst` has room for 8 f32; the store has no alignment requirement.
                    unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), $load(src)) };
                }
                for (src, dst) in src_tail.iter().zip(dst_tail) {
                    *dst = src.to_f32();
                }
            }
        };
    }

    widen_kernel!(widen_f16, f16, load_f16);
    widen_kernel!(widen_bf16, bf16, load_bf16);
}

/// Up to this many rows of `x`, [`linear`] takes dot products with each row of `w` rather than
/// calling `gemm`: measured as fast or faster at SmolLM2 shapes (`benches/cpu_ops.rs`), and
/// faster by far for f16/bf16 weights, which it reads without converting them to memory first.
/// Each output of such a product is one dot product of an input row and a weight row, so its bits
/// do not depend on the other rows (callers that need batch-invariant results stay within it).
pub const ROW_DOTS_MAX_M: usize = 16;

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
            for (products, w) in out_t.chunks_exact_mut(m).zip(w.chunks_exact(k)) {
                for (product, x) in products.iter_mut().zip(x.chunks_exact(k)) {
                    *product = T::dot(x, w);
                }
            }
            if let Some(bias) = bias {
                let bias = &bias[task * rows_per_task..];
                for (products, b) in out_t.chunks_exact_mut(m).zip(bias) {
                    products.iter_mut().for_each(|product| *product += b);
                }
            }
        });
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
    /// Both sides of `ROW_DOTS_MAX_M`, where `linear` switches from row dots to `gemm`.
    const SIZES_M: [usize; 5] = [1, 2, 16, 17, 33];
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
        for len in 0..80 {
            let a = random_vec(&mut rng, len);
            let b = random_vec(&mut rng, len);
            let expected: f64 = a
                .iter()
                .zip(&b)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            for value in [dot(&a, &b), dot_portable(&a, &b)] {
                assert!((f64::from(value) - expected).abs() < 1e-5, "len {len}");
            }
        }
    }

    #[test]
    fn dot_kernels_match_the_portable_dot_product() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for len in (0..70).chain([576, 1000]) {
            let x = random_vec(&mut rng, len);
            let w = random_vec(&mut rng, len);
            let w_f16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let w_bf16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let magnitude: f32 = x.iter().zip(&w).map(|(x, w)| (x * w).abs()).sum::<f32>() + 1e-6;
            let pairs = [
                (f32::dot(&x, &w), dot_portable(&x, &w)),
                (f16::dot(&x, &w_f16), dot_portable(&x, &w_f16)),
                (bf16::dot(&x, &w_bf16), dot_portable(&x, &w_bf16)),
            ];
            for (fast, portable) in pairs {
                assert!(
                    (fast - portable).abs() <= 1e-6 * magnitude,
                    "len {len}: {fast} vs {portable}"
                );
            }
        }
    }

    #[test]
    fn widening_kernels_match_the_portable_conversion() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        for len in [0, 1, 7, 8, 9, 100] {
            let w = random_vec(&mut rng, len);
            let w_f16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let w_bf16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let (mut fast, mut portable) = (vec![f32::NAN; len], vec![f32::NAN; len]);
            f16::widen(&w_f16, &mut fast);
            widen_portable(&w_f16, &mut portable);
            assert_eq!(fast, portable);
            bf16::widen(&w_bf16, &mut fast);
            widen_portable(&w_bf16, &mut portable);
            assert_eq!(fast, portable);
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
