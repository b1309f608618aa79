//! NF4 ("4-bit NormalFloat", Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs",
//! 2023, section 3) in the layout bitsandbytes stores, so that its checkpoints load unchanged and
//! ours dequantize identically:
//!
//! - the tensor is flattened (row-major) and cut into blocks of `block_size` values (64 unless
//!   stated, a power of two from 32 to 4096); each block keeps its largest magnitude, `absmax`,
//!   as its scale;
//! - each value becomes the index of the nearest entry of [`CODE`] to `value / absmax`, chosen by
//!   comparing against the midpoints between neighbouring entries ([`THRESHOLDS`]) exactly as
//!   bitsandbytes' quantizer does (`value * (1 / absmax)`, in f32, then `>` tests);
//! - two indices share a byte, the even element in the high nibble: byte `i` holds elements
//!   `2i` (bits 4..8) and `2i + 1` (bits 0..4); an odd tail leaves the last low nibble as the
//!   code of 0.0;
//! - decoding is `CODE[index] * absmax` in f32, rounded once to the output type;
//! - optionally the scales are quantized too ("double quantization", QLoRA section 3): their mean
//!   is subtracted (the `offset`), and what remains is stored as 8-bit indices into a 256-entry
//!   code (bitsandbytes' signed dynamic map, [`dynamic_code`]) in blocks of 256 scales, each with
//!   its own f32 `absmax`. A scale decodes as `code[q] * absmax2 + offset`, two f32 roundings.
//!
//! The CUDA kernels (`kernels/nf4.cu`) decode with the same f32 operations, so both produce the
//! very bits bitsandbytes' `dequantize_4bit` does for the same packed input.

use std::ops::Range;

use rayon::prelude::*;

use crate::cpu::gemm::{self, Weights};
use crate::error::expect_len;
use crate::{Error, Result};

/// The 16 values of NF4, indexed by the 4-bit code: quantiles of N(0, 1) scaled to [-1, 1], with
/// an exact zero and eight positive values (QLoRA, appendix E). These are the f32 values every
/// bitsandbytes release decodes with.
pub const CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The decision points of the quantizer: code `i` is chosen for the normalised values in
/// `(THRESHOLDS[i - 1], THRESHOLDS[i]]`. Each is the midpoint between neighbouring [`CODE`]
/// entries, as the f32 constants of bitsandbytes' quantizer (`dQuantizeNF4`) round it.
pub const THRESHOLDS: [f32; 15] = [
    -0.848_096_4,
    -0.610_632_9,
    -0.459_995_27,
    -0.339_679_43,
    -0.234_607_4,
    -0.137_911_73,
    -0.045_525_018,
    0.039_790_15,
    0.120_255_25,
    0.203_521_25,
    0.292_013_77,
    0.389_312_54,
    0.501_663_4,
    0.642_786_9,
    0.861_478_4,
];

/// Values per block, bitsandbytes' and transformers' default.
pub const DEFAULT_BLOCK_SIZE: usize = 64;
/// Scales per block of the second quantization level (bitsandbytes uses 256).
pub const NESTED_BLOCK_SIZE: usize = 256;
/// Entries of the 8-bit code of the second level.
pub const NESTED_CODE_LEN: usize = 256;

/// Whether `block_size` is one bitsandbytes' 4-bit format allows: a power of two in 32..=4096.
pub fn is_valid_block_size(block_size: usize) -> bool {
    block_size.is_power_of_two() && (32..=4096).contains(&block_size)
}

/// The 4-bit code of a value already divided by its block's absmax: the number of thresholds it
/// exceeds. NaN exceeds none and gets code 0, as in bitsandbytes.
pub fn code_of(normalised: f32) -> u8 {
    THRESHOLDS.iter().filter(|&&t| normalised > t).count() as u8
}

/// The scales of a tensor's NF4 blocks.
#[derive(Clone, Debug, PartialEq)]
pub enum Scales {
    /// One f32 absmax per block.
    Absmax(Vec<f32>),
    /// Double quantization: each absmax stored in 8 bits.
    Nested(NestedScales),
}

/// Block scales quantized to 8 bits (bitsandbytes' `compress_statistics`): block `b` decodes to
/// `code[quantized[b]] * absmax[b / block_size] + offsets[b / block_size]`.
///
/// bitsandbytes stores one offset for the whole tensor (`nested_offset`); here every group of
/// `block_size` scales carries its own, so that the scales of several tensors can be laid end
/// to end (a fused projection) without decoding them.
#[derive(Clone, Debug, PartialEq)]
pub struct NestedScales {
    /// One 8-bit index into `code` per NF4 block (bitsandbytes' `absmax`, as uint8).
    pub quantized: Vec<u8>,
    /// The 8-bit code, [`NESTED_CODE_LEN`] values (`nested_quant_map`).
    pub code: Vec<f32>,
    /// One scale per group of `block_size` NF4 blocks (`nested_absmax`).
    pub absmax: Vec<f32>,
    /// One offset per group, added after scaling.
    pub offsets: Vec<f32>,
    /// NF4 blocks per group (`nested_blocksize`).
    pub block_size: usize,
}

impl NestedScales {
    /// The decoded scale of NF4 block `block`: two f32 operations, rounded separately, as
    /// bitsandbytes' `dequantize_blockwise` then `absmax += offset` compute it.
    pub fn scale(&self, block: usize) -> f32 {
        let group = block / self.block_size;
        self.code[usize::from(self.quantized[block])] * self.absmax[group] + self.offsets[group]
    }
}

/// A tensor of `len` values in NF4: packed 4-bit codes and their blocks' scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Blocks {
    packed: Vec<u8>,
    len: usize,
    block_size: usize,
    scales: Scales,
}

impl Nf4Blocks {
    /// Checks that the parts describe `len` values in blocks of `block_size`: `len.div_ceil(2)`
    /// packed bytes, one scale per block, a nested code of 256 entries and one second-level scale
    /// and offset per group.
    pub fn new(packed: Vec<u8>, len: usize, block_size: usize, scales: Scales) -> Result<Self> {
        const OP: &str = "nf4";
        if !is_valid_block_size(block_size) {
            return Err(Error::InvalidParameter {
                op: OP,
                message: format!("block size {block_size} is not a power of two in 32..=4096"),
            });
        }
        if packed.len() != len.div_ceil(2) {
            return Err(Error::shape(
                OP,
                format!(
                    "{} packed bytes cannot hold {len} values (expected {})",
                    packed.len(),
                    len.div_ceil(2)
                ),
            ));
        }
        let blocks = len.div_ceil(block_size);
        match &scales {
            Scales::Absmax(absmax) => expect_len(OP, "absmax", absmax.len(), &[blocks])?,
            Scales::Nested(nested) => {
                expect_len(OP, "nested absmax codes", nested.quantized.len(), &[blocks])?;
                expect_len(OP, "nested code", nested.code.len(), &[NESTED_CODE_LEN])?;
                if nested.block_size == 0 {
                    return Err(Error::InvalidParameter {
                        op: OP,
                        message: "nested block size must be positive".into(),
                    });
                }
                let groups = blocks.div_ceil(nested.block_size);
                expect_len(OP, "nested absmax", nested.absmax.len(), &[groups])?;
                expect_len(OP, "nested offsets", nested.offsets.len(), &[groups])?;
            }
        }
        Ok(Self {
            packed,
            len,
            block_size,
            scales,
        })
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Values per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Number of blocks (the last may be partial).
    pub fn num_blocks(&self) -> usize {
        self.len.div_ceil(self.block_size)
    }

    /// The packed codes, two per byte, the even element in the high nibble.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    pub fn scales(&self) -> &Scales {
        &self.scales
    }

    /// The scale (absmax) of block `block`, as the decoder uses it.
    pub fn scale(&self, block: usize) -> f32 {
        match &self.scales {
            Scales::Absmax(absmax) => absmax[block],
            Scales::Nested(nested) => nested.scale(block),
        }
    }

    /// Every block's scale, decoded.
    pub fn absmax(&self) -> Vec<f32> {
        (0..self.num_blocks()).map(|b| self.scale(b)).collect()
    }

    /// The same values with every scale stored as its decoded f32: decodes to identical bits,
    /// and can be cut or reordered at any block.
    pub fn without_nesting(&self) -> Nf4Blocks {
        Nf4Blocks {
            packed: self.packed.clone(),
            len: self.len,
            block_size: self.block_size,
            scales: Scales::Absmax(self.absmax()),
        }
    }

    /// Bytes of storage: packed codes plus scales (and the second level's code and scales).
    pub fn storage_bytes(&self) -> usize {
        let scales = match &self.scales {
            Scales::Absmax(absmax) => absmax.len() * 4,
            Scales::Nested(n) => {
                n.quantized.len() + 4 * (n.code.len() + n.absmax.len() + n.offsets.len())
            }
        };
        self.packed.len() + scales
    }

    /// The 4-bit code of element `i`.
    pub fn code_at(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// Decodes the elements `start..start + out.len()` into `out`: `CODE[code] * absmax`, one
    /// f32 multiplication.
    ///
    /// # Panics
    ///
    /// Panics if the range runs past [`Self::len`].
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) {
        assert!(
            start + out.len() <= self.len,
            "dequantize_into: elements {start}..{} of {}",
            start + out.len(),
            self.len
        );
        let mut block = usize::MAX;
        let mut scale = 0.0;
        for (i, v) in (start..).zip(out.iter_mut()) {
            if i / self.block_size != block {
                block = i / self.block_size;
                scale = self.scale(block);
            }
            *v = CODE[usize::from(self.code_at(i))] * scale;
        }
    }

    /// All values, decoded to f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len];
        out.par_chunks_mut(1 << 14)
            .enumerate()
            .for_each(|(chunk, values)| self.dequantize_into(chunk << 14, values));
        out
    }

    /// Several tensors laid end to end, as if they had been quantized as one: each part but
    /// the last must fill whole blocks (and, for nested scales to stay nested, whole groups of
    /// the second level with the same code); otherwise their scales are decoded to f32, which
    /// changes no value.
    pub fn concat(parts: &[Nf4Blocks]) -> Result<Nf4Blocks> {
        const OP: &str = "nf4 concat";
        let Some(first) = parts.first() else {
            return Err(Error::shape(OP, "nothing to concatenate"));
        };
        let block_size = first.block_size;
        for (i, part) in parts.iter().enumerate() {
            if part.block_size != block_size {
                return Err(Error::shape(
                    OP,
                    format!(
                        "part {i} has blocks of {}, part 0 of {block_size}",
                        part.block_size
                    ),
                ));
            }
            if i + 1 < parts.len() && !part.len.is_multiple_of(block_size) {
                return Err(Error::shape(
                    OP,
                    format!(
                        "part {i} holds {} values, not whole blocks of {block_size}",
                        part.len
                    ),
                ));
            }
        }
        let len = parts.iter().map(|p| p.len).sum();
        let packed: Vec<u8> = parts
            .iter()
            .flat_map(|p| p.packed.iter().copied())
            .collect();
        let stays_nested = parts.iter().enumerate().all(|(i, p)| match &p.scales {
            Scales::Nested(n) => match &first.scales {
                Scales::Nested(f) => {
                    n.code == f.code
                        && n.block_size == f.block_size
                        && (i + 1 == parts.len() || p.num_blocks().is_multiple_of(n.block_size))
                }
                Scales::Absmax(_) => false,
            },
            Scales::Absmax(_) => false,
        });
        let scales = match &first.scales {
            Scales::Nested(f) if stays_nested => {
                let mut nested = NestedScales {
                    quantized: Vec::new(),
                    code: f.code.clone(),
                    absmax: Vec::new(),
                    offsets: Vec::new(),
                    block_size: f.block_size,
                };
                for part in parts {
                    if let Scales::Nested(n) = &part.scales {
                        nested.quantized.extend_from_slice(&n.quantized);
                        nested.absmax.extend_from_slice(&n.absmax);
                        nested.offsets.extend_from_slice(&n.offsets);
                    }
                }
                Scales::Nested(nested)
            }
            _ => Scales::Absmax(parts.iter().flat_map(Nf4Blocks::absmax).collect()),
        };
        Nf4Blocks::new(packed, len, block_size, scales)
    }

    /// The tensor viewed as `[len / cols, cols]` with its rows reordered: row `r` of the result
    /// is row `order[r]` of `self`. Rows must fill whole blocks; the scales come out decoded to
    /// f32 (a group of the second level would mix rows from different places).
    pub fn permute_rows(&self, cols: usize, order: &[usize]) -> Result<Nf4Blocks> {
        const OP: &str = "nf4 permute_rows";
        if cols == 0 || !cols.is_multiple_of(self.block_size) || self.len != order.len() * cols {
            return Err(Error::shape(
                OP,
                format!(
                    "{} values cannot be {} rows of {cols} whole blocks of {}",
                    self.len,
                    order.len(),
                    self.block_size
                ),
            ));
        }
        let rows = order.len();
        let mut seen = vec![false; rows];
        for &r in order {
            if r >= rows || std::mem::replace(&mut seen[r], true) {
                return Err(Error::shape(
                    OP,
                    format!("{order:?} is not a permutation of {rows} rows"),
                ));
            }
        }
        let (row_bytes, row_blocks) = (cols / 2, cols / self.block_size);
        let absmax = self.absmax();
        let mut packed = Vec::with_capacity(self.packed.len());
        let mut scales = Vec::with_capacity(absmax.len());
        for &r in order {
            packed.extend_from_slice(&self.packed[r * row_bytes..(r + 1) * row_bytes]);
            scales.extend_from_slice(&absmax[r * row_blocks..(r + 1) * row_blocks]);
        }
        Nf4Blocks::new(packed, self.len, self.block_size, Scales::Absmax(scales))
    }
}

/// Quantizes `values` to NF4 in blocks of `block_size`, with the scales quantized again
/// (blocks of [`NESTED_BLOCK_SIZE`], [`dynamic_code`]) when `nested`.
///
/// The codes and f32 scales are bit for bit those of bitsandbytes' `quantize_4bit` for the same
/// input. With `nested`, the offset is the mean of the scales computed in f64 and rounded once;
/// bitsandbytes' mean runs in f32 in an order of its GPU's choosing, so its offset and the 8-bit
/// scale codes may differ from these in the last bit. Either decodes correctly: the offset and
/// the code travel with the data.
pub fn quantize(values: &[f32], block_size: usize, nested: bool) -> Result<Nf4Blocks> {
    if !is_valid_block_size(block_size) {
        return Err(Error::InvalidParameter {
            op: "nf4 quantize",
            message: format!("block size {block_size} is not a power of two in 32..=4096"),
        });
    }
    // Whole blocks keep both nibbles of every byte inside one block.
    let (packed, absmax): (Vec<Vec<u8>>, Vec<f32>) = values
        .par_chunks(block_size)
        .map(|block| {
            let absmax = block.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v.abs()));
            // Multiplying by the reciprocal, not dividing, is what bitsandbytes does; it can
            // differ from division in the last bit, and so flip a value at a threshold.
            let inverse = 1.0 / absmax;
            let packed = block
                .chunks(2)
                .map(|pair| {
                    let high = code_of(pair[0] * inverse);
                    // The missing partner of an odd tail is a zero (bitsandbytes pads with 0).
                    let low = code_of(pair.get(1).copied().unwrap_or(0.0) * inverse);
                    (high << 4) | low
                })
                .collect();
            (packed, absmax)
        })
        .unzip();
    let packed = packed.concat();
    let scales = if nested {
        Scales::Nested(quantize_scales(&absmax))
    } else {
        Scales::Absmax(absmax)
    };
    Nf4Blocks::new(packed, values.len(), block_size, scales)
}

/// Double quantization of block scales: mean subtracted, then 8-bit blockwise quantization
/// with the dynamic code in groups of [`NESTED_BLOCK_SIZE`].
fn quantize_scales(absmax: &[f32]) -> NestedScales {
    let offset = if absmax.is_empty() {
        0.0
    } else {
        (absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / absmax.len() as f64) as f32
    };
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let code = dynamic_code();
    let (quantized, group_absmax) = quantize_8bit(&centred, &code, NESTED_BLOCK_SIZE);
    NestedScales {
        quantized,
        offsets: vec![offset; group_absmax.len()],
        absmax: group_absmax,
        code,
        block_size: NESTED_BLOCK_SIZE,
    }
}

/// Blockwise 8-bit quantization against a sorted 256-entry `code`: each value, divided by its
/// block's absmax (as `value * (1 / absmax)`), goes to the nearest code entry, found by the
/// binary search with midpoint tie-breaking of bitsandbytes' blockwise quantizer.
pub fn quantize_8bit(values: &[f32], code: &[f32], block_size: usize) -> (Vec<u8>, Vec<f32>) {
    let mut quantized = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(block_size));
    for block in values.chunks(block_size) {
        let max = block.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v.abs()));
        let inverse = 1.0 / max;
        quantized.extend(block.iter().map(|&v| nearest_code_8bit(code, v * inverse)));
        absmax.push(max);
    }
    (quantized, absmax)
}

/// The index of the entry of a sorted 256-entry `code` nearest to `x` (in [-1, 1]): seven
/// halving steps from the middle entry, then a comparison with the midpoint towards the
/// neighbour on `x`'s side. The search order and the midpoint rule decide ties and NaN the way
/// bitsandbytes' blockwise quantizer does.
pub fn nearest_code_8bit(code: &[f32], x: f32) -> u8 {
    let (mut pivot, mut upper_pivot, mut lower_pivot) = (127usize, 255usize, 0usize);
    let (mut lower, mut upper) = (-1.0f32, 1.0f32);
    let mut val = code[pivot];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[255];
    }
    if lower_pivot == 0 {
        lower = code[0];
    }
    let index = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    index as u8
}

/// bitsandbytes' signed "dynamic" 8-bit code (Dettmers, "8-Bit Approximations for Parallelism
/// in Deep Learning", 2016), with which it quantizes the scales: for each decimal exponent
/// `e = -6..=0`, the midpoints of `2^(e + 6) + 1` evenly spaced points in [0.1, 1], times `10^e`,
/// with both signs; then 0 and 1; sorted. 256 values in [-1, 1].
///
/// Computed in f32 as PyTorch's `linspace` evaluates it element by element; a vectorized
/// `linspace` may round a few entries differently in the last bit. The code a checkpoint was
/// quantized with is stored beside it and is what decoding uses.
pub fn dynamic_code() -> Vec<f32> {
    let mut data = Vec::with_capacity(NESTED_CODE_LEN);
    for i in 0..7i32 {
        let steps = (1usize << i) + 1;
        let points = linspace(0.1, 1.0, steps);
        let scale = 10f64.powi(i - 6) as f32;
        for pair in points.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            data.push(scale * mean);
            data.push(-(scale * mean));
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data
}

/// `steps` points from `start` to `end` in f32, the first half counted up from `start` and the
/// second down from `end` (PyTorch's formula, which makes both ends exact).
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// `out[m, n] = x[m, k] · w[rows]ᵀ (+ bias[n])` where `w` is viewed as `[len / k, k]` and
/// `rows` (n of them) picks consecutive weight rows: the reference NF4 product. The weight rows
/// are decoded to f32 and multiplied with f32 accumulation.
pub fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &Nf4Blocks,
    rows: Range<usize>,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "nf4 linear";
    let n = rows.len();
    if k == 0 || !w.len().is_multiple_of(k) || rows.end > w.len() / k {
        return Err(Error::shape(
            OP,
            format!(
                "weight rows {rows:?} of {k} values lie outside a tensor of {} values",
                w.len()
            ),
        ));
    }
    let mut dense = vec![0.0f32; n * k];
    dense
        .par_chunks_mut(k)
        .zip(rows.clone())
        .for_each(|(row, r)| w.dequantize_into(r * k, row));
    gemm::linear(x, m, k, Weights::F32(&dense), n, bias, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_vec(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-scale..scale)).collect()
    }

    /// The nearest code by brute force; ties go to the lower code (the quantizer's `>` test).
    fn nearest_code(normalised: f32) -> u8 {
        let mut best = 0;
        for (i, &c) in CODE.iter().enumerate() {
            if (normalised - c).abs() < (normalised - CODE[best]).abs() {
                best = i;
            }
        }
        best as u8
    }

    #[test]
    fn code_table_is_the_normal_float_table() {
        // QLoRA appendix E: 7 negative values, an exact zero, 8 positive, both ends at 1.
        assert_eq!(CODE[0], -1.0);
        assert_eq!(CODE[7], 0.0);
        assert_eq!(CODE[15], 1.0);
        assert!(CODE.windows(2).all(|w| w[0] < w[1]));
        // Known entries, to the last bit of their f32 values.
        assert_eq!(CODE[1].to_bits(), (-0.6961928009986877f64 as f32).to_bits());
        assert_eq!(CODE[8].to_bits(), (0.07958029955625534f64 as f32).to_bits());
        assert_eq!(CODE[14].to_bits(), (0.7229568362236023f64 as f32).to_bits());
        // The positive values are quantiles of N(0, 1): Phi^-1 at 8 evenly spaced levels from
        // 0.5 to 0.9677083 (offset from the paper), normalised by the largest.
        let top = inverse_normal_cdf(0.9677083);
        for (i, &c) in CODE[8..].iter().enumerate() {
            let p = 0.5 + (0.9677083 - 0.5) * (i + 1) as f64 / 8.0;
            let q = inverse_normal_cdf(p) / top;
            assert!(
                (f64::from(c) - q).abs() < 1e-3,
                "code {}: {c} vs {q}",
                i + 8
            );
        }
    }

    /// Phi^-1 by bisection of the error function's series: enough digits for the table check.
    fn inverse_normal_cdf(p: f64) -> f64 {
        let cdf = |x: f64| {
            // Phi(x) = 1/2 + phi(x) (x + x^3/3 + x^5/(3*5) + ...).
            let (mut term, mut sum, mut n) = (x, x, 1.0);
            while term.abs() > 1e-17 {
                n += 2.0;
                term *= x * x / n;
                sum += term;
            }
            0.5 + sum * (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt()
        };
        let (mut lo, mut hi) = (-8.0, 8.0);
        for _ in 0..100 {
            let mid = (lo + hi) / 2.0;
            if cdf(mid) < p { lo = mid } else { hi = mid }
        }
        (lo + hi) / 2.0
    }

    #[test]
    fn thresholds_are_the_midpoints() {
        for (i, &t) in THRESHOLDS.iter().enumerate() {
            let midpoint = (f64::from(CODE[i]) + f64::from(CODE[i + 1])) / 2.0;
            assert!(CODE[i] < t && t < CODE[i + 1]);
            assert!(
                (f64::from(t) - midpoint).abs() <= f64::from(f32::EPSILON) * midpoint.abs(),
                "threshold {i}: {t} vs midpoint {midpoint}"
            );
        }
    }

    #[test]
    fn code_of_picks_the_nearest_entry() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for x in random_vec(&mut rng, 10_000, 1.0) {
            assert_eq!(code_of(x), nearest_code(x), "{x}");
        }
        for (i, &c) in CODE.iter().enumerate() {
            assert_eq!(usize::from(code_of(c)), i);
        }
        // A value on a threshold is not above it; NaN is above nothing.
        assert_eq!(code_of(THRESHOLDS[7]), 7);
        assert_eq!(code_of(f32::NAN), 0);
    }

    #[test]
    fn packs_the_even_element_in_the_high_nibble() {
        // absmax 1: the values are their own codes.
        let values = [-1.0, 1.0, 0.0, CODE[3], CODE[12]];
        let q = quantize(&values, 64, false).unwrap();
        assert_eq!(q.packed(), &[0x0f, 0x73, 0xc7]);
        assert_eq!(q.absmax(), vec![1.0]);
        assert_eq!(q.dequantize(), values.to_vec());
    }

    #[test]
    fn quantize_matches_naive_math() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (len, block_size) in [
            (1, 64),
            (63, 64),
            (64, 64),
            (1000, 64),
            (4097, 128),
            (129, 32),
        ] {
            let values = random_vec(&mut rng, len, 3.0);
            let q = quantize(&values, block_size, false).unwrap();
            for (b, block) in values.chunks(block_size).enumerate() {
                let absmax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert_eq!(q.scale(b), absmax);
                for (j, &v) in block.iter().enumerate() {
                    let i = b * block_size + j;
                    assert_eq!(q.code_at(i), code_of(v * (1.0 / absmax)), "element {i}");
                    // Never farther from the value than half the widest gap of the table.
                    let decoded = CODE[usize::from(q.code_at(i))] * absmax;
                    assert!((decoded - v).abs() <= 0.16 * absmax, "{v} -> {decoded}");
                }
            }
            let dense = q.dequantize();
            for (i, &d) in dense.iter().enumerate() {
                let expected = CODE[usize::from(q.code_at(i))] * q.scale(i / block_size);
                assert_eq!(d.to_bits(), expected.to_bits());
            }
        }
    }

    #[test]
    fn zero_block_decodes_to_zero() {
        let q = quantize(&[0.0; 64], 64, false).unwrap();
        assert!(q.dequantize().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn dynamic_code_has_the_documented_shape() {
        let code = dynamic_code();
        assert_eq!(code.len(), 256);
        assert!(code.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(code[127], 0.0);
        assert_eq!(code[255], 1.0);
        // The smallest magnitude: 10^-6 times the midpoint of linspace(0.1, 1, 2).
        assert!((code[128] - 0.55e-6).abs() < 1e-12);
        assert_eq!(code[128], -code[126]);
        // The largest below 1: the last midpoint of linspace(0.1, 1, 65).
        assert!((code[254] - (1.0 - 0.9 / 128.0)).abs() < 1e-6);
        assert_eq!(code[0], -code[254]);
    }

    #[test]
    fn nearest_code_8bit_matches_brute_force() {
        let code = dynamic_code();
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let samples = random_vec(&mut rng, 5000, 1.0)
            .into_iter()
            .chain(code.iter().copied());
        for x in samples {
            let q = usize::from(nearest_code_8bit(&code, x));
            let best = code
                .iter()
                .map(|&c| (c - x).abs())
                .fold(f32::INFINITY, f32::min);
            assert!(
                (code[q] - x).abs() <= best * (1.0 + 1e-6),
                "{x}: chose {} ({q}), nearest is {best} away",
                code[q]
            );
        }
    }

    #[test]
    fn nested_scales_decode_close_to_the_absmax() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let values = random_vec(&mut rng, 64 * 700 + 5, 2.0);
        let plain = quantize(&values, 64, false).unwrap();
        let nested = quantize(&values, 64, true).unwrap();
        assert_eq!(plain.packed(), nested.packed());
        let Scales::Nested(n) = nested.scales() else {
            panic!("expected nested scales")
        };
        assert_eq!(n.absmax.len(), 701usize.div_ceil(256));
        for (b, &absmax) in plain.absmax().iter().enumerate() {
            let decoded = nested.scale(b);
            // 8-bit dynamic code on values within +-max|absmax - mean|.
            assert!(
                (decoded - absmax).abs() < 0.01 * absmax.max(0.1),
                "{absmax} vs {decoded}"
            );
            let naive = n.code[usize::from(n.quantized[b])] * n.absmax[b / 256] + n.offsets[0];
            assert_eq!(decoded.to_bits(), naive.to_bits());
        }
        assert!(nested.storage_bytes() < plain.storage_bytes());
        assert_eq!(
            nested.without_nesting().dequantize(),
            nested.dequantize(),
            "decoded scales change no value"
        );
    }

    #[test]
    fn concat_keeps_every_value() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let a = random_vec(&mut rng, 64 * 512, 1.0);
        let b = random_vec(&mut rng, 64 * 3 + 10, 1.0);
        for nested in [false, true] {
            let (qa, qb) = (
                quantize(&a, 64, nested).unwrap(),
                quantize(&b, 64, nested).unwrap(),
            );
            let joined = Nf4Blocks::concat(&[qa.clone(), qb.clone()]).unwrap();
            assert_eq!(
                matches!(joined.scales(), Scales::Nested(_)),
                nested,
                "512 blocks are two whole groups"
            );
            let mut expected = qa.dequantize();
            expected.extend(qb.dequantize());
            assert_eq!(joined.dequantize(), expected);
            // A part that ends mid-group forces decoded scales.
            let joined = Nf4Blocks::concat(&[qb.clone(), qb.clone()]);
            assert!(joined.is_err(), "part 0 ends mid-block");
        }
        let c = quantize(&b[..64 * 3], 64, true).unwrap();
        let joined = Nf4Blocks::concat(&[c.clone(), c.clone()]).unwrap();
        assert!(matches!(joined.scales(), Scales::Absmax(_)));
        assert_eq!(
            joined.dequantize(),
            [c.dequantize(), c.dequantize()].concat()
        );
    }

    #[test]
    fn permute_rows_moves_whole_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (rows, cols) = (6, 128);
        let values = random_vec(&mut rng, rows * cols, 1.0);
        let q = quantize(&values, 64, true).unwrap();
        let order = [3, 0, 5, 1, 4, 2];
        let permuted = q.permute_rows(cols, &order).unwrap();
        let dense = q.dequantize();
        let expected: Vec<f32> = order
            .iter()
            .flat_map(|&r| dense[r * cols..(r + 1) * cols].iter().copied())
            .collect();
        assert_eq!(permuted.dequantize(), expected);
        assert!(q.permute_rows(cols, &[0, 0, 1, 2, 3, 4]).is_err());
        assert!(q.permute_rows(96, &[0, 1, 2, 3, 4, 5, 6, 7]).is_err());
    }

    #[test]
    fn linear_matches_naive_math() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let (m, k, total_rows) = (3, 192, 7);
        let w = quantize(&random_vec(&mut rng, total_rows * k, 0.5), 64, true).unwrap();
        let dense = w.dequantize();
        let x = random_vec(&mut rng, m * k, 1.0);
        let rows = 2..6;
        let bias = random_vec(&mut rng, rows.len(), 1.0);
        let mut out = vec![f32::NAN; m * rows.len()];
        linear(&x, m, k, &w, rows.clone(), Some(&bias), &mut out).unwrap();
        for i in 0..m {
            for (j, r) in rows.clone().enumerate() {
                let expected: f64 = (0..k)
                    .map(|c| f64::from(x[i * k + c]) * f64::from(dense[r * k + c]))
                    .sum::<f64>()
                    + f64::from(bias[j]);
                let got = f64::from(out[i * rows.len() + j]);
                assert!((got - expected).abs() < 1e-4, "{got} vs {expected}");
            }
        }
        assert!(linear(&x, m, k, &w, 5..8, None, &mut out).is_err());
    }

    #[test]
    fn malformed_parts_are_refused() {
        assert!(quantize(&[1.0; 10], 48, false).is_err());
        assert!(Nf4Blocks::new(vec![0; 3], 7, 64, Scales::Absmax(vec![1.0])).is_err());
        assert!(Nf4Blocks::new(vec![0; 4], 7, 64, Scales::Absmax(vec![1.0, 2.0])).is_err());
        assert!(Nf4Blocks::new(vec![0; 4], 7, 64, Scales::Absmax(vec![1.0])).is_ok());
    }
}
