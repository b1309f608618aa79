//! Dequantization of ggml tensor encodings to float elements.
//!
//! Block layouts follow ggml's reference `dequantize_row_*` functions
//! (ggml/src/ggml-quants.c): every block starts with its f16 scale (and, for
//! Q4_1, its f16 minimum), and the 4-bit formats store element `j` of a block
//! in the low nibble of byte `j` and element `j + 16` in its high nibble.

use half::{bf16, f16};
use rayon::prelude::*;

use super::GgmlType;
use crate::Element;

/// Elements per block of Q8_0, Q4_0 and Q4_1 (ggml's `QK8_0`, `QK4_0`, `QK4_1`).
const BLOCK: usize = 32;

/// Blocks handed to one rayon task: large enough to amortise scheduling,
/// small enough to balance a few-megabyte tensor over the cores.
const BLOCKS_PER_TASK: usize = 256;

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Q8_0: `d: f16, qs: [i8; 32]`.
fn q8_0<T: Element>(block: &[u8], out: &mut [T]) {
    let d = f16_at(block, 0);
    for (o, &q) in out.iter_mut().zip(&block[2..2 + BLOCK]) {
        *o = T::from_f32(f32::from(q as i8) * d);
    }
}

/// Q4_0: `d: f16, qs: [u8; 16]`, value `(q - 8) * d`.
fn q4_0<T: Element>(block: &[u8], out: &mut [T]) {
    let d = f16_at(block, 0);
    let (low, high) = out.split_at_mut(BLOCK / 2);
    for ((lo, hi), &q) in low.iter_mut().zip(high).zip(&block[2..2 + BLOCK / 2]) {
        *lo = T::from_f32(f32::from(i16::from(q & 0x0F) - 8) * d);
        *hi = T::from_f32(f32::from(i16::from(q >> 4) - 8) * d);
    }
}

/// Q4_1: `d: f16, m: f16, qs: [u8; 16]`, value `q * d + m`.
fn q4_1<T: Element>(block: &[u8], out: &mut [T]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let (low, high) = out.split_at_mut(BLOCK / 2);
    for ((lo, hi), &q) in low.iter_mut().zip(high).zip(&block[4..4 + BLOCK / 2]) {
        *lo = T::from_f32(f32::from(q & 0x0F) * d + m);
        *hi = T::from_f32(f32::from(q >> 4) * d + m);
    }
}

fn plain<S: Element, T: Element>(bytes: &[u8], out: &mut [T]) {
    for (o, chunk) in out.iter_mut().zip(bytes.chunks_exact(size_of::<S>())) {
        *o = T::from_f32(bytemuck::pod_read_unaligned::<S>(chunk).to_f32());
    }
}

/// Decodes `data`, the encoding of `out.len()` elements of `ggml_type`, into `out`.
///
/// Returns a message if the type is not supported or the lengths disagree;
/// the reader has already checked both, so this is a second line of defence.
pub(crate) fn dequantize<T: Element>(
    ggml_type: GgmlType,
    data: &[u8],
    out: &mut [T],
) -> Result<(), String> {
    let (block_elems, block_bytes) = ggml_type
        .block_layout()
        .filter(|_| ggml_type.is_supported())
        .ok_or_else(|| format!("cannot dequantize {ggml_type}"))?;
    if !out.len().is_multiple_of(block_elems) || data.len() != out.len() / block_elems * block_bytes
    {
        return Err(format!(
            "{} bytes of {ggml_type} do not encode {} elements",
            data.len(),
            out.len()
        ));
    }
    let decode_block: fn(&[u8], &mut [T]) = match ggml_type {
        GgmlType::Q8_0 => q8_0::<T>,
        GgmlType::Q4_0 => q4_0::<T>,
        GgmlType::Q4_1 => q4_1::<T>,
        GgmlType::F32 => plain::<f32, T>,
        GgmlType::F16 => plain::<f16, T>,
        GgmlType::BF16 => plain::<bf16, T>,
        GgmlType::Other(_) => return Err(format!("cannot dequantize {ggml_type}")),
    };
    // Plain types have one-element "blocks"; give them task-sized chunks instead.
    let (chunk_elems, chunk_bytes) = if block_elems == 1 {
        (
            BLOCK * BLOCKS_PER_TASK,
            block_bytes * BLOCK * BLOCKS_PER_TASK,
        )
    } else {
        (block_elems * BLOCKS_PER_TASK, block_bytes * BLOCKS_PER_TASK)
    };
    out.par_chunks_mut(chunk_elems)
        .zip(data.par_chunks(chunk_bytes))
        .for_each(|(out, data)| {
            if block_elems == 1 {
                decode_block(data, out);
            } else {
                for (out, block) in out
                    .chunks_exact_mut(block_elems)
                    .zip(data.chunks_exact(block_bytes))
                {
                    decode_block(block, out);
                }
            }
        });
    Ok(())
}
