//! Causal attention over a flat batch of sequences whose keys and values live in the paged KV
//! cache: prefill, chunked prefill after cached context, and single-token decode alike.

use rayon::prelude::*;

use crate::error::{checked_product, expect_len};
use crate::{Error, Result};

use super::gemm::dot;
use super::kv_write::PageGeometry;
use super::softmax::softmax_in_place;

/// Head counts and the score scale (usually `1 / sqrt(head_dim)`).
///
/// With grouped-query attention `num_kv_heads` divides `num_heads`, and query head `h` reads
/// key/value head `h / (num_heads / num_kv_heads)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// One sequence of a flat batch.
///
/// Its query rows are `q[query_start .. query_start + query_len]`; its keys and values
/// (`context_len` tokens, the query tokens included, already written into the pages) live in the
/// blocks of `block_table`, token `j` in block `block_table[j / block_size]` at offset
/// `j % block_size`. Query row `i` sits at position `context_len - query_len + i` and attends
/// causally to positions `0..=` that.
#[derive(Clone, Copy, Debug)]
pub struct SequenceSpan<'a> {
    pub query_start: usize,
    pub query_len: usize,
    pub context_len: usize,
    pub block_table: &'a [u32],
}

/// Attention for every query row of `seqs`: `q` and `out` are `[num_tokens, num_heads, head_dim]`,
/// `k_pages` and `v_pages` are laid out as `geometry` says.
///
/// Rows of `out` that belong to no sequence are left as they are. Spans that overlap or reach
/// past `num_tokens`, a block table too short for its context, a block id outside the pages, and
/// `query_len > context_len` are errors, reported before anything is written.
pub fn paged_attention(
    q: &[f32],
    seqs: &[SequenceSpan<'_>],
    params: &AttentionParams,
    geometry: &PageGeometry,
    k_pages: &[f32],
    v_pages: &[f32],
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "paged_attention";
    check_heads(OP, params, geometry)?;
    geometry.validate(OP)?;
    geometry.expect_pages(OP, "k_pages", k_pages.len())?;
    geometry.expect_pages(OP, "v_pages", v_pages.len())?;
    let AttentionParams {
        num_heads,
        num_kv_heads,
        head_dim,
        scale,
    } = *params;
    let row_len = checked_product(OP, &[num_heads, head_dim])?;
    if !q.len().is_multiple_of(row_len) {
        return Err(Error::shape(
            OP,
            format!(
                "q has {} elements, not a multiple of {num_heads} heads x {head_dim}",
                q.len()
            ),
        ));
    }
    let num_tokens = q.len() / row_len;
    expect_len(OP, "out", out.len(), &[num_tokens, num_heads, head_dim])?;
    let row_owners = assign_query_rows(OP, seqs, geometry, num_tokens)?;
    if q.is_empty() {
        return Ok(());
    }
    let group_size = num_heads / num_kv_heads;
    let block_size = geometry.block_size;
    let token_len = geometry.token_len();

    // One task per (query row, head), so a single decoding sequence still spreads over threads.
    out.par_chunks_exact_mut(head_dim)
        .enumerate()
        .for_each_init(Vec::new, |scores, (index, out)| {
            let (row, head) = (index / num_heads, index % num_heads);
            let Some(RowOwner { seq, query_index }) = row_owners[row] else {
                return;
            };
            let seq = &seqs[seq];
            let position = seq.context_len - seq.query_len + query_index;
            let query = &q[index * head_dim..(index + 1) * head_dim];
            let kv_offset = (head / group_size) * head_dim;
            let page_offset = |token: usize| {
                let block = seq.block_table[token / block_size] as usize;
                (block * block_size + token % block_size) * token_len + kv_offset
            };

            scores.clear();
            scores.extend((0..=position).map(|token| {
                let start = page_offset(token);
                scale * dot(query, &k_pages[start..start + head_dim])
            }));
            softmax_in_place(scores);

            out.fill(0.0);
            for (token, &weight) in scores.iter().enumerate() {
                let start = page_offset(token);
                for (out, &value) in out.iter_mut().zip(&v_pages[start..start + head_dim]) {
                    *out += weight * value;
                }
            }
        });
    Ok(())
}

/// The sequence a query row belongs to, and its index among that sequence's query rows.
#[derive(Clone, Copy, Debug)]
struct RowOwner {
    seq: usize,
    query_index: usize,
}

/// Checks that the head counts are positive, grouped evenly, and match the pages'.
fn check_heads(op: &'static str, params: &AttentionParams, geometry: &PageGeometry) -> Result<()> {
    let AttentionParams {
        num_heads,
        num_kv_heads,
        head_dim,
        ..
    } = *params;
    if num_heads == 0 || num_kv_heads == 0 || head_dim == 0 {
        return Err(Error::shape(op, format!("{params:?} has a zero dimension")));
    }
    if !num_heads.is_multiple_of(num_kv_heads) {
        return Err(Error::shape(
            op,
            format!("num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"),
        ));
    }
    if (num_kv_heads, head_dim) != (geometry.num_kv_heads, geometry.head_dim) {
        return Err(Error::shape(
            op,
            format!(
                "{num_kv_heads} kv heads of size {head_dim} do not match the pages' {} of size {}",
                geometry.num_kv_heads, geometry.head_dim
            ),
        ));
    }
    Ok(())
}

/// Checks every sequence's span and block table, and returns the owner of each of the
/// `num_tokens` query rows.
fn assign_query_rows(
    op: &'static str,
    seqs: &[SequenceSpan<'_>],
    geometry: &PageGeometry,
    num_tokens: usize,
) -> Result<Vec<Option<RowOwner>>> {
    let mut owners: Vec<Option<RowOwner>> = vec![None; num_tokens];
    for (index, seq) in seqs.iter().enumerate() {
        let SequenceSpan {
            query_start,
            query_len,
            context_len,
            block_table,
        } = *seq;
        let fail = |message: String| Err(Error::shape(op, format!("sequence {index}: {message}")));
        if query_len > context_len {
            return fail(format!(
                "query_len {query_len} exceeds context_len {context_len}"
            ));
        }
        let query_end = query_start
            .checked_add(query_len)
            .filter(|&end| end <= num_tokens);
        let Some(query_end) = query_end else {
            return fail(format!(
                "query rows {query_start}..{query_start}+{query_len} exceed the batch's \
                 {num_tokens} tokens"
            ));
        };
        let blocks_needed = context_len.div_ceil(geometry.block_size);
        if block_table.len() < blocks_needed {
            return fail(format!(
                "context of {context_len} tokens needs {blocks_needed} blocks, block table has {}",
                block_table.len()
            ));
        }
        if let Some(block) = block_table[..blocks_needed]
            .iter()
            .find(|&&b| b as usize >= geometry.num_blocks)
        {
            return fail(format!(
                "block {block} is outside the {} pages",
                geometry.num_blocks
            ));
        }
        for (query_index, owner) in owners[query_start..query_end].iter_mut().enumerate() {
            if let Some(other) = owner {
                return fail(format!(
                    "query row {} also belongs to sequence {}",
                    query_start + query_index,
                    other.seq
                ));
            }
            *owner = Some(RowOwner {
                seq: index,
                query_index,
            });
        }
    }
    Ok(owners)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kv_write::write_kv;
    use rand::seq::SliceRandom;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A sequence's keys and values as contiguous `[context_len, num_kv_heads, head_dim]` arrays.
    struct Context {
        keys: Vec<f32>,
        values: Vec<f32>,
        block_table: Vec<u32>,
    }

    /// Plain causal attention over contiguous K/V in f64: row `i` of `q` (`[query_len, num_heads,
    /// head_dim]`) sits at position `context_len - query_len + i`.
    fn naive_attention(q: &[f32], context: &Context, params: &AttentionParams) -> Vec<f32> {
        let AttentionParams {
            num_heads,
            num_kv_heads,
            head_dim,
            scale,
        } = *params;
        let row_len = num_heads * head_dim;
        let kv_len = num_kv_heads * head_dim;
        let query_len = q.len() / row_len;
        let context_len = context.keys.len() / kv_len;
        let mut out = vec![0.0; q.len()];
        for i in 0..query_len {
            let position = context_len - query_len + i;
            for h in 0..num_heads {
                let kv_head = h / (num_heads / num_kv_heads);
                let query = &q[i * row_len + h * head_dim..][..head_dim];
                let scores: Vec<f64> = (0..=position)
                    .map(|j| {
                        let key = &context.keys[j * kv_len + kv_head * head_dim..][..head_dim];
                        let dot: f64 = query
                            .iter()
                            .zip(key)
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum();
                        dot * f64::from(scale)
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..head_dim {
                    let value: f64 = (0..=position)
                        .map(|j| {
                            weights[j]
                                * f64::from(context.values[j * kv_len + kv_head * head_dim + d])
                        })
                        .sum();
                    out[i * row_len + h * head_dim + d] = (value / total) as f32;
                }
            }
        }
        out
    }

    fn random_vec(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Builds random contexts, scatters them into shuffled blocks of fresh pages with `write_kv`,
    /// and returns the contexts and the pages.
    fn build_contexts(
        rng: &mut ChaCha8Rng,
        geometry: &PageGeometry,
        context_lens: &[usize],
    ) -> (Vec<Context>, Vec<f32>, Vec<f32>) {
        let page_len = geometry.num_blocks * geometry.block_size * geometry.token_len();
        let mut k_pages = vec![f32::NAN; page_len];
        let mut v_pages = vec![f32::NAN; page_len];
        let mut free_blocks: Vec<u32> = (0..geometry.num_blocks as u32).collect();
        free_blocks.shuffle(rng);
        let contexts = context_lens
            .iter()
            .map(|&context_len| {
                let blocks = context_len.div_ceil(geometry.block_size);
                let block_table = free_blocks.split_off(free_blocks.len() - blocks);
                let keys = random_vec(rng, context_len * geometry.token_len());
                let values = random_vec(rng, context_len * geometry.token_len());
                let slots: Vec<u32> = (0..context_len)
                    .map(|j| {
                        block_table[j / geometry.block_size] * geometry.block_size as u32
                            + (j % geometry.block_size) as u32
                    })
                    .collect();
                write_kv(&keys, &values, &slots, geometry, &mut k_pages, &mut v_pages).unwrap();
                Context {
                    keys,
                    values,
                    block_table,
                }
            })
            .collect();
        (contexts, k_pages, v_pages)
    }

    fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32) {
        assert_eq!(actual.len(), expected.len());
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            let error = (a - e).abs() / e.abs().max(1.0);
            assert!(error <= tolerance, "element {i}: {a} vs {e}");
        }
    }

    #[test]
    fn matches_contiguous_causal_attention_over_shuffled_pages() {
        let mut rng = ChaCha8Rng::seed_from_u64(50);
        // (num_heads, num_kv_heads, head_dim): grouped-query, multi-query, multi-head.
        for (num_heads, num_kv_heads, head_dim) in [(6, 2, 8), (4, 1, 5), (3, 3, 64)] {
            let geometry = PageGeometry {
                num_blocks: 40,
                block_size: 4,
                num_kv_heads,
                head_dim,
            };
            let params = AttentionParams {
                num_heads,
                num_kv_heads,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
            };
            // (query_len, context_len): a whole prompt, a single decoding token, a prefill chunk
            // after cached context, a one-token prompt; no context is a multiple of block_size
            // except the last, which fills its blocks exactly.
            let shapes = [(13, 13), (1, 9), (5, 22), (1, 1), (3, 16)];
            let context_lens: Vec<usize> = shapes.iter().map(|&(_, c)| c).collect();
            let (contexts, k_pages, v_pages) = build_contexts(&mut rng, &geometry, &context_lens);

            // Place the sequences' query rows in a different order than the sequences, with one
            // row in the middle that belongs to none.
            let row_len = num_heads * head_dim;
            let order = [3, 1, 4, 0, 2];
            let mut query_starts = [0; 5];
            let mut next_row = 0;
            for (n, &s) in order.iter().enumerate() {
                if n == 2 {
                    next_row += 1;
                }
                query_starts[s] = next_row;
                next_row += shapes[s].0;
            }
            let num_tokens = next_row;
            let q = random_vec(&mut rng, num_tokens * row_len);
            let seqs: Vec<SequenceSpan<'_>> = shapes
                .iter()
                .zip(&contexts)
                .zip(query_starts)
                .map(
                    |((&(query_len, context_len), context), query_start)| SequenceSpan {
                        query_start,
                        query_len,
                        context_len,
                        block_table: &context.block_table,
                    },
                )
                .collect();
            let mut out = vec![f32::NAN; q.len()];
            paged_attention(&q, &seqs, &params, &geometry, &k_pages, &v_pages, &mut out).unwrap();

            for (seq, context) in seqs.iter().zip(&contexts) {
                let rows = seq.query_start * row_len..(seq.query_start + seq.query_len) * row_len;
                let expected = naive_attention(&q[rows.clone()], context, &params);
                assert_close(&out[rows], &expected, 1e-5);
            }
            let gap = query_starts[order[2]] - 1;
            assert!(
                out[gap * row_len..(gap + 1) * row_len]
                    .iter()
                    .all(|v| v.is_nan()),
                "gap row untouched"
            );
        }
    }

    #[test]
    fn single_position_returns_its_value() {
        let geometry = PageGeometry {
            num_blocks: 2,
            block_size: 2,
            num_kv_heads: 1,
            head_dim: 2,
        };
        let mut k_pages = vec![0.0; 8];
        let mut v_pages = vec![0.0; 8];
        // Token 0 of a sequence whose first block is block 1: slot 1 * block_size + 0.
        write_kv(
            &[1.0, 2.0],
            &[3.0, -4.0],
            &[2],
            &geometry,
            &mut k_pages,
            &mut v_pages,
        )
        .unwrap();
        let params = AttentionParams {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 2,
            scale: 0.5,
        };
        let seqs = [SequenceSpan {
            query_start: 0,
            query_len: 1,
            context_len: 1,
            block_table: &[1, 7],
        }];
        let mut out = [0.0; 4];
        // The block table's unused tail (block 7 does not exist) is not looked at.
        paged_attention(
            &[9.0, 9.0, -1.0, 5.0],
            &seqs,
            &params,
            &geometry,
            &k_pages,
            &v_pages,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, [3.0, -4.0, 3.0, -4.0]);
    }

    #[test]
    fn rejects_invalid_batches() {
        let geometry = PageGeometry {
            num_blocks: 4,
            block_size: 2,
            num_kv_heads: 2,
            head_dim: 2,
        };
        let pages = vec![0.0; 32];
        let params = AttentionParams {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 2,
            scale: 1.0,
        };
        let q = vec![0.0; 3 * 8];
        let mut out = vec![0.0; 3 * 8];
        let run = |seqs: &[SequenceSpan<'_>], params: &AttentionParams, out: &mut [f32]| {
            paged_attention(&q, seqs, params, &geometry, &pages, &pages, out)
        };
        let span = |query_start, query_len, context_len, block_table| SequenceSpan {
            query_start,
            query_len,
            context_len,
            block_table,
        };
        assert!(
            run(
                &[span(0, 2, 3, &[0, 1]), span(2, 1, 4, &[2, 3])],
                &params,
                &mut out
            )
            .is_ok()
        );

        let cases: [(&[SequenceSpan<'_>], &str); 6] = [
            (&[span(0, 3, 2, &[0])], "exceeds context_len"),
            (&[span(2, 2, 3, &[0, 1])], "exceed the batch"),
            (&[span(0, 1, 5, &[0, 1])], "needs 3 blocks"),
            (&[span(0, 1, 3, &[0, 4])], "block 4"),
            (
                &[span(0, 2, 2, &[0]), span(1, 1, 1, &[1])],
                "also belongs to sequence 0",
            ),
            (&[span(usize::MAX, 2, 2, &[0])], "exceed the batch"),
        ];
        for (seqs, expected) in cases {
            let error = run(seqs, &params, &mut out).unwrap_err();
            assert!(
                error.to_string().contains(expected),
                "{error} lacks {expected:?}"
            );
        }

        let uneven = AttentionParams {
            num_heads: 3,
            ..params
        };
        assert!(run(&[], &uneven, &mut out).is_err());
        let mismatched = AttentionParams {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            scale: 1.0,
        };
        assert!(run(&[], &mismatched, &mut out).is_err());
        assert!(run(&[], &params, &mut out[..8]).is_err());
        let short_pages =
            paged_attention(&q, &[], &params, &geometry, &pages[..31], &pages, &mut out);
        assert!(short_pages.is_err());
    }
}
