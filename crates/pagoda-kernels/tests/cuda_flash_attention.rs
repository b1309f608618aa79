//! CUDA flash attention against the CPU oracle: ragged batches of whole prompts (1 to 300 rows)
//! and of chunks after cached context, every head dimension and tile shape, both 16-bit dtypes,
//! grouped-query ratios 1, 4 and 8 and multi-query, block sizes that do not divide the contexts,
//! shuffled non-monotonic block ids, the non-causal mode against a direct computation, a chunk
//! after a 32k-token context and a whole 4k-token prompt.
#![cfg(feature = "cuda")]

mod common;

use common::attention::{Batch, Case};
use common::{TestRng, assert_close, download, gpu_or_skip, poison_pool, random_tensor};
use pagoda_kernels::Error;
use pagoda_kernels::cpu::attention::AttentionParams;
use pagoda_kernels::cuda::flash_attention::{
    TILE_SHAPES, TileShape, flash_attention_prefill, flash_attention_prefill_with, sm90a_available,
    supports,
};
use pagoda_tensor::{CudaDevice, DType, Tensor};

const DTYPES: [DType; 2] = [DType::F16, DType::BF16];

/// Whole prompts of ragged lengths, and chunks after cached context (`query_len < context_len`),
/// one of them a single token.
const RAGGED: [(usize, usize); 10] = [
    (1, 1),
    (3, 3),
    (17, 17),
    (64, 64),
    (129, 129),
    (300, 300),
    (17, 100),
    (64, 203),
    (1, 50),
    (129, 700),
];

impl Batch {
    /// Non-causal attention computed directly (every row sees its sequence's whole context),
    /// in f64.
    fn full_reference(&self, seqs: &[(usize, usize)]) -> Vec<f32> {
        let AttentionParams {
            num_heads,
            num_kv_heads,
            head_dim,
            scale,
        } = self.params;
        let block_size = self.geometry.block_size;
        let group = num_heads / num_kv_heads;
        let mut expected = vec![0.0; self.out_len()];
        for (s, &(query_len, context)) in seqs.iter().enumerate() {
            let table = &self.tables[s * self.max_blocks..];
            let key_offset = |token: usize, kv_head: usize| {
                let block = table[token / block_size] as usize;
                ((block * block_size + token % block_size) * num_kv_heads + kv_head) * head_dim
            };
            for row in self.query_start[s] as usize..self.query_start[s] as usize + query_len {
                for head in 0..num_heads {
                    let q = &self.q_values[(row * num_heads + head) * head_dim..][..head_dim];
                    let scores: Vec<f64> = (0..context)
                        .map(|token| {
                            let k = &self.k_values[key_offset(token, head / group)..][..head_dim];
                            let dot: f64 = q.iter().zip(k).map(|(&a, &b)| f64::from(a * b)).sum();
                            dot * f64::from(scale)
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = weights.iter().sum();
                    let out = &mut expected[(row * num_heads + head) * head_dim..][..head_dim];
                    for (token, weight) in weights.iter().enumerate() {
                        let v = &self.v_values[key_offset(token, head / group)..][..head_dim];
                        for (o, &x) in out.iter_mut().zip(v) {
                            *o += (weight / sum * f64::from(x)) as f32;
                        }
                    }
                }
            }
        }
        expected
    }

    /// Runs the kernel (with `shape`, or the default) into poisoned memory and checks its shape.
    fn run(&self, device: &CudaDevice, causal: bool, shape: Option<TileShape>) -> Vec<f32> {
        poison_pool(device, self.out_len() * 4);
        let out = match shape {
            Some(shape) => flash_attention_prefill_with(
                &self.q,
                &self.layout,
                &self.params,
                &self.k_pages,
                &self.v_pages,
                causal,
                shape,
            ),
            None => flash_attention_prefill(
                &self.q,
                &self.layout,
                &self.params,
                &self.k_pages,
                &self.v_pages,
                causal,
            ),
        }
        .unwrap();
        let p = &self.params;
        assert_eq!(
            (out.dims(), out.dtype()),
            (
                &[self.num_tokens(), p.num_heads, p.head_dim][..],
                self.q.dtype()
            )
        );
        download(&out)
    }
}

fn describe(case: &Case<'_>, dtype: DType, causal: bool) -> String {
    format!(
        "{dtype} heads {}/{} dim {} block {} causal {causal} seqs {:?}",
        case.num_heads, case.num_kv_heads, case.head_dim, case.block_size, case.seqs
    )
}

fn check_causal(device: &CudaDevice, rng: &mut TestRng, case: &Case<'_>, dtype: DType) {
    let batch = Batch::new(device, rng, case, dtype);
    let actual = batch.run(device, true, None);
    let expected = batch.causal_reference(case.seqs);
    assert_close(&describe(case, dtype, true), &actual, &expected, dtype);
}

#[test]
fn ragged_batches_match_the_cpu_at_every_head_dim() {
    let Some(device) = gpu_or_skip("flash_ragged_batches") else {
        return;
    };
    let mut rng = TestRng::new("flash_ragged_batches");
    for dtype in DTYPES {
        for head_dim in [64, 80, 96, 128, 256] {
            let case = Case {
                seqs: &RAGGED,
                num_heads: 8,
                num_kv_heads: 2,
                head_dim,
                block_size: 16,
            };
            check_causal(&device, &mut rng, &case, dtype);
        }
    }
}

#[test]
fn every_tile_shape_matches_the_cpu() {
    let Some(device) = gpu_or_skip("flash_every_tile_shape") else {
        return;
    };
    let mut rng = TestRng::new("flash_every_tile_shape");
    let sm90a = sm90a_available(&device).unwrap();
    for dtype in DTYPES {
        for &shape in TILE_SHAPES {
            if shape.schedule.needs_sm90a() && !sm90a {
                eprintln!("{shape:?}: skipped, no sm_90a on this device");
                continue;
            }
            let case = Case {
                seqs: &RAGGED,
                num_heads: 4,
                num_kv_heads: 4,
                head_dim: shape.head_dim,
                block_size: 16,
            };
            let batch = Batch::new(&device, &mut rng, &case, dtype);
            let expected = batch.causal_reference(case.seqs);
            let actual = batch.run(&device, true, Some(shape));
            let what = format!("{shape:?} {}", describe(&case, dtype, true));
            assert_close(&what, &actual, &expected, dtype);
            if shape.schedule.needs_sm90a() {
                // The wgmma kernels' own copy of the row packing and masking: grouped heads
                // (rows of a tile straddle tokens) and the non-causal mode.
                let case = Case {
                    seqs: &[(1, 1), (70, 70), (17, 100), (129, 129), (5, 64)],
                    num_heads: 6,
                    num_kv_heads: 2,
                    head_dim: shape.head_dim,
                    block_size: 16,
                };
                let batch = Batch::new(&device, &mut rng, &case, dtype);
                for causal in [true, false] {
                    let expected = if causal {
                        batch.causal_reference(case.seqs)
                    } else {
                        batch.full_reference(case.seqs)
                    };
                    let actual = batch.run(&device, causal, Some(shape));
                    let what = format!("{shape:?} {}", describe(&case, dtype, causal));
                    assert_close(&what, &actual, &expected, dtype);
                }
            }
        }
    }
}

#[test]
fn grouped_and_multi_query_heads() {
    let Some(device) = gpu_or_skip("flash_grouped_heads") else {
        return;
    };
    let mut rng = TestRng::new("flash_grouped_heads");
    let seqs = [(40, 40), (7, 90), (130, 130), (1, 33)];
    // Group sizes 1, 4 and 8, multi-query (one KV head), and a group of 3 (rows of a query tile
    // then straddle tokens unevenly).
    for (num_heads, num_kv_heads) in [(4, 4), (8, 2), (16, 2), (8, 1), (6, 2)] {
        for head_dim in [64, 128] {
            for dtype in DTYPES {
                let case = Case {
                    seqs: &seqs,
                    num_heads,
                    num_kv_heads,
                    head_dim,
                    block_size: 16,
                };
                check_causal(&device, &mut rng, &case, dtype);
            }
        }
    }
}

#[test]
fn block_sizes_that_do_not_divide_the_context() {
    let Some(device) = gpu_or_skip("flash_block_sizes") else {
        return;
    };
    let mut rng = TestRng::new("flash_block_sizes");
    let seqs = [(33, 33), (20, 77), (1, 5), (65, 130)];
    for block_size in [1, 5, 16, 32, 33] {
        let case = Case {
            seqs: &seqs,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 80,
            block_size,
        };
        check_causal(&device, &mut rng, &case, DType::BF16);
    }
}

#[test]
fn non_causal_rows_see_the_whole_context() {
    let Some(device) = gpu_or_skip("flash_non_causal") else {
        return;
    };
    let mut rng = TestRng::new("flash_non_causal");
    let seqs = [(1, 1), (70, 70), (17, 100), (129, 129), (5, 64)];
    for dtype in DTYPES {
        for (head_dim, num_heads, num_kv_heads) in [(128, 8, 2), (80, 4, 4), (256, 2, 1)] {
            let case = Case {
                seqs: &seqs,
                num_heads,
                num_kv_heads,
                head_dim,
                block_size: 16,
            };
            let batch = Batch::new(&device, &mut rng, &case, dtype);
            let actual = batch.run(&device, false, None);
            let expected = batch.full_reference(case.seqs);
            assert_close(&describe(&case, dtype, false), &actual, &expected, dtype);
        }
    }
}

#[test]
fn long_contexts() {
    let Some(device) = gpu_or_skip("flash_long_contexts") else {
        return;
    };
    let mut rng = TestRng::new("flash_long_contexts");
    // A 64-token chunk after a cached context of 32k tokens (not a multiple of the block size),
    // beside a short prompt; then a whole 4k-token prompt.
    let chunk = Case {
        seqs: &[(64, 32768 + 37), (9, 9)],
        num_heads: 8,
        num_kv_heads: 2,
        head_dim: 128,
        block_size: 16,
    };
    check_causal(&device, &mut rng, &chunk, DType::BF16);
    let prompt = Case {
        seqs: &[(4096, 4096)],
        num_heads: 4,
        num_kv_heads: 1,
        head_dim: 128,
        block_size: 16,
    };
    check_causal(&device, &mut rng, &prompt, DType::F16);
}

#[test]
fn unsupported_inputs_are_errors() {
    let Some(device) = gpu_or_skip("flash_unsupported_inputs") else {
        return;
    };
    let mut rng = TestRng::new("flash_unsupported_inputs");
    let case = Case {
        seqs: &[(3, 5)],
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        block_size: 4,
    };
    let batch = Batch::new(&device, &mut rng, &case, DType::F16);
    let call = |q: &Tensor, params: &AttentionParams, k: &Tensor, v: &Tensor| {
        flash_attention_prefill(q, &batch.layout, params, k, v, true)
    };
    let params = batch.params;
    call(&batch.q, &params, &batch.k_pages, &batch.v_pages).unwrap();

    // f32 has no tensor-core kernel here.
    let f32_tensor = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    assert!(matches!(
        call(
            &f32_tensor(&batch.q),
            &params,
            &f32_tensor(&batch.k_pages),
            &f32_tensor(&batch.v_pages)
        ),
        Err(Error::DType { .. })
    ));
    assert!(!supports(DType::F32, 64) && supports(DType::BF16, 64));
    // K in another dtype than Q.
    assert!(matches!(
        call(
            &batch.q,
            &params,
            &batch.k_pages.to_dtype(DType::BF16).unwrap(),
            &batch.v_pages
        ),
        Err(Error::DType { .. })
    ));
    // A head dimension without a kernel.
    let (q72, _) = random_tensor(&mut rng, &[3, 4, 72], DType::F16, 1.0, &device);
    let (pages72, _) = random_tensor(&mut rng, &[5, 4, 2, 72], DType::F16, 1.0, &device);
    let params72 = AttentionParams {
        head_dim: 72,
        ..params
    };
    assert!(!supports(DType::F16, 72));
    assert!(matches!(
        call(&q72, &params72, &pages72, &pages72),
        Err(Error::Shape { .. })
    ));
    // Heads that do not group evenly, a non-positive scale, rows the layout does not have.
    let badly_grouped = AttentionParams {
        num_kv_heads: 3,
        ..params
    };
    assert!(matches!(
        call(&batch.q, &badly_grouped, &batch.k_pages, &batch.v_pages),
        Err(Error::Shape { .. })
    ));
    let negative = AttentionParams {
        scale: -0.1,
        ..params
    };
    assert!(matches!(
        call(&batch.q, &negative, &batch.k_pages, &batch.v_pages),
        Err(Error::InvalidParameter { .. })
    ));
    let (four_rows, _) = random_tensor(&mut rng, &[4, 4, 64], DType::F16, 1.0, &device);
    assert!(matches!(
        call(&four_rows, &params, &batch.k_pages, &batch.v_pages),
        Err(Error::Shape { .. })
    ));
    // A tile shape compiled for another head dimension.
    let wrong_shape = TILE_SHAPES
        .iter()
        .copied()
        .find(|s| s.head_dim != 64)
        .unwrap();
    assert!(matches!(
        flash_attention_prefill_with(
            &batch.q,
            &batch.layout,
            &params,
            &batch.k_pages,
            &batch.v_pages,
            true,
            wrong_shape
        ),
        Err(Error::InvalidParameter { .. })
    ));
    // A query tensor that starts mid-way through a 16-byte word of its storage.
    let (wide, _) = random_tensor(&mut rng, &[3 * 4 * 64 + 1], DType::F16, 1.0, &device);
    let misaligned = wide
        .narrow(0, 1, 3 * 4 * 64)
        .and_then(|t| t.reshape(vec![3, 4, 64]))
        .unwrap();
    assert!(misaligned.is_contiguous());
    assert!(matches!(
        call(&misaligned, &params, &batch.k_pages, &batch.v_pages),
        Err(Error::Shape { .. })
    ));
}
