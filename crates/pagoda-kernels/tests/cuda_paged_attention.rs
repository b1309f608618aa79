//! CUDA paged attention against the CPU oracle: ragged batches mixing decode, prefill and chunked
//! prefill rows, every group width the kernels have (1, 2, 3, 4 and 8 query heads per KV head,
//! multi-query with one KV head, groups wider than a block), scattered non-monotonic block ids,
//! contexts that are not a multiple of the block size, a single token, decode batches of a real
//! model's shape, split counts from 1 to the most, 32k-token contexts, both split kernels (tensor
//! cores for 16-bit heads of 64, 96 and 128 dimensions, CUDA cores otherwise, and for pages that
//! are not 16-byte aligned), each compiled form of the tensor-core kernel at every L2 prefetch
//! depth (the pipelined forms that split launches take among them). Outputs come from memory
//! poisoned with NaN first.
#![cfg(feature = "cuda")]

mod common;

use common::attention::{Batch, Case};
use common::{
    FLOAT_DTYPES, TestRng, assert_close, download, gpu_or_skip, poison_pool, random_tensor,
};
use pagoda_kernels::Error;
use pagoda_kernels::cpu::attention::AttentionParams;
use pagoda_kernels::cuda::paged_attention::{
    DecodeVariant, DeviceBatchLayout, MAX_PREFETCH_TILES, MAX_SPLITS, default_num_splits,
    paged_attention, paged_attention_variant, paged_attention_with_splits,
};
use pagoda_tensor::{CudaDevice, DType};

fn run(device: &CudaDevice, rng: &mut TestRng, case: &Case<'_>, dtype: DType) {
    run_with_splits(device, rng, case, dtype, None);
}

/// [`run`] with each context cut into `splits` splits, or the default number.
fn run_with_splits(
    device: &CudaDevice,
    rng: &mut TestRng,
    case: &Case<'_>,
    dtype: DType,
    splits: Option<usize>,
) {
    let variant = DecodeVariant {
        num_splits: splits,
        ..DecodeVariant::default()
    };
    run_variant(device, rng, case, dtype, &variant, false);
}

/// [`run`] as `variant` says, with the pages at an odd element offset in their storage (so not
/// 16-byte aligned) when `misaligned`.
fn run_variant(
    device: &CudaDevice,
    rng: &mut TestRng,
    case: &Case<'_>,
    dtype: DType,
    variant: &DecodeVariant,
    misaligned: bool,
) {
    let mut batch = Batch::new(device, rng, case, dtype);
    if misaligned {
        batch.misalign_pages(device);
    }
    let Case {
        seqs,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
    } = *case;
    let num_tokens = batch.num_tokens();
    let layout = &batch.layout;
    assert_eq!(
        (
            layout.num_seqs(),
            layout.num_tokens(),
            layout.max_blocks_per_seq()
        ),
        (seqs.len(), num_tokens, batch.max_blocks)
    );
    let (q, k_pages, v_pages, params) = (&batch.q, &batch.k_pages, &batch.v_pages, &batch.params);
    let splits = match variant.num_splits {
        Some(splits) => splits,
        None => default_num_splits(q, layout, params, k_pages, v_pages).unwrap(),
    };
    // The output and the splits' scratch come from the pool: poison both.
    poison_pool(
        device,
        num_tokens * num_heads * (splits * (head_dim + 2) + head_dim) * 4,
    );
    let variant = DecodeVariant {
        num_splits: Some(splits),
        ..variant.clone()
    };
    let out = paged_attention_variant(q, layout, params, k_pages, v_pages, &variant).unwrap();
    assert_eq!(
        (out.dims(), out.dtype()),
        (&[num_tokens, num_heads, head_dim][..], dtype)
    );
    let what = format!(
        "{dtype} heads {num_heads}/{num_kv_heads} dim {head_dim} block {block_size} {variant:?} \
         misaligned {misaligned} seqs {seqs:?}"
    );
    assert_close(&what, &download(&out), &batch.causal_reference(seqs), dtype);
}

#[test]
fn ragged_batches_match_the_cpu() {
    let Some(device) = gpu_or_skip("ragged_batches_match_the_cpu") else {
        return;
    };
    let mut rng = TestRng::new("ragged_batches_match_the_cpu");
    // Decode rows (1 of 1, 1 of 37), a whole prefill, chunked prefills after cached context, a
    // context of exactly one block, and one of a block and one token.
    let seqs = [(1, 1), (1, 37), (5, 5), (3, 50), (16, 16), (2, 17)];
    for dtype in FLOAT_DTYPES {
        for head_dim in [3, 64, 80, 96, 128, 256] {
            run(
                &device,
                &mut rng,
                &Case {
                    seqs: &seqs,
                    num_heads: 6,
                    num_kv_heads: 2,
                    head_dim,
                    block_size: 16,
                },
                dtype,
            );
        }
        // Multi-head (no grouping) and multi-query (one KV head), blocks of an odd size.
        run(
            &device,
            &mut rng,
            &Case {
                seqs: &seqs,
                num_heads: 3,
                num_kv_heads: 3,
                head_dim: 40,
                block_size: 5,
            },
            dtype,
        );
        run(
            &device,
            &mut rng,
            &Case {
                seqs: &seqs,
                num_heads: 4,
                num_kv_heads: 1,
                head_dim: 40,
                block_size: 1,
            },
            dtype,
        );
    }
}

#[test]
fn a_single_token() {
    let Some(device) = gpu_or_skip("paged_attention_a_single_token") else {
        return;
    };
    let mut rng = TestRng::new("paged_attention_a_single_token");
    for dtype in FLOAT_DTYPES {
        run(
            &device,
            &mut rng,
            &Case {
                seqs: &[(1, 1)],
                num_heads: 2,
                num_kv_heads: 1,
                head_dim: 64,
                block_size: 16,
            },
            dtype,
        );
    }
}

#[test]
fn decode_batches_shaped_like_llama_3_2_3b() {
    let Some(device) = gpu_or_skip("paged_attention_decode_batches") else {
        return;
    };
    let mut rng = TestRng::new("paged_attention_decode_batches");
    // 24 query heads over 8 KV heads of 128 dimensions: one sequence (its context cut into several
    // splits), then four of ragged lengths, one of them shorter than a split.
    let batches: [&[(usize, usize)]; 2] = [&[(1, 190)], &[(1, 130), (1, 190), (1, 17), (1, 161)]];
    for dtype in FLOAT_DTYPES {
        for seqs in batches {
            run(
                &device,
                &mut rng,
                &Case {
                    seqs,
                    num_heads: 24,
                    num_kv_heads: 8,
                    head_dim: 128,
                    block_size: 16,
                },
                dtype,
            );
        }
    }
}

#[test]
fn a_32k_token_context() {
    let Some(device) = gpu_or_skip("paged_attention_a_32k_token_context") else {
        return;
    };
    let mut rng = TestRng::new("paged_attention_a_32k_token_context");
    let seqs = [(2, 32768 + 5), (1, 3)];
    for dtype in [DType::F32, DType::BF16] {
        run(
            &device,
            &mut rng,
            &Case {
                seqs: &seqs,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 128,
                block_size: 16,
            },
            dtype,
        );
    }
}

#[test]
fn every_group_width_matches_the_cpu() {
    let Some(device) = gpu_or_skip("paged_attention_every_group_width") else {
        return;
    };
    let mut rng = TestRng::new("paged_attention_every_group_width");
    // A decode batch of ragged contexts, one of them a single token, plus a prompt chunk.
    let seqs = [(1, 1), (1, 100), (1, 333), (1, 17), (3, 40)];
    // (query heads, KV heads): groups of 1, 2, 3, 4 and 8; multi-query (one KV head) with a
    // group of 6 in a block of 8, and with 12 and 32 heads, which take several blocks per KV head.
    let heads = [
        (8, 8),
        (4, 2),
        (24, 8),
        (32, 8),
        (16, 2),
        (6, 1),
        (12, 1),
        (32, 1),
    ];
    for dtype in FLOAT_DTYPES {
        for (num_heads, num_kv_heads) in heads {
            run(
                &device,
                &mut rng,
                &Case {
                    seqs: &seqs,
                    num_heads,
                    num_kv_heads,
                    head_dim: 128,
                    block_size: 16,
                },
                dtype,
            );
        }
    }
}

#[test]
fn every_split_count_matches_the_cpu() {
    let Some(device) = gpu_or_skip("paged_attention_every_split_count") else {
        return;
    };
    let mut rng = TestRng::new("paged_attention_every_split_count");
    // Contexts longer and shorter than a split, so some splits of some rows are empty.
    let seqs = [(1, 1000), (1, 37), (1, 513), (2, 64)];
    for dtype in [DType::F32, DType::F16] {
        for splits in [1, 2, 7, 16, 33, 64, 66, MAX_SPLITS] {
            run_with_splits(
                &device,
                &mut rng,
                &Case {
                    seqs: &seqs,
                    num_heads: 24,
                    num_kv_heads: 8,
                    head_dim: 128,
                    block_size: 16,
                },
                dtype,
                Some(splits),
            );
        }
    }
    let layout = DeviceBatchLayout::new(&[0, 1], &[5], &[0], 1, 16, 1, &device).unwrap();
    let params = AttentionParams {
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 8,
        scale: 0.3,
    };
    let (q, _) = random_tensor(&mut rng, &[1, 2, 8], DType::F16, 1.0, &device);
    let (pages, _) = random_tensor(&mut rng, &[1, 16, 1, 8], DType::F16, 1.0, &device);
    for splits in [0, MAX_SPLITS + 1] {
        assert!(matches!(
            paged_attention_with_splits(&q, &layout, &params, &pages, &pages, splits),
            Err(Error::Shape { .. })
        ));
    }
}

#[test]
fn a_32k_token_decode_shaped_like_the_benchmark() {
    let Some(device) = gpu_or_skip("paged_attention_a_32k_token_decode") else {
        return;
    };
    let mut rng = TestRng::new("paged_attention_a_32k_token_decode");
    // B1 L32768 H32 KVH8 D128 of the decode benchmark, and one token past it.
    for (context, dtype) in [(32768, DType::F16), (32769, DType::BF16)] {
        run(
            &device,
            &mut rng,
            &Case {
                seqs: &[(1, context)],
                num_heads: 32,
                num_kv_heads: 8,
                head_dim: 128,
                block_size: 16,
            },
            dtype,
        );
    }
}

#[test]
fn every_tensor_core_form_and_prefetch_depth_matches_the_cpu() {
    let Some(device) = gpu_or_skip("paged_attention_every_form") else {
        return;
    };
    let mut rng = TestRng::new("paged_attention_every_form");
    // Decode rows of ragged lengths (one shorter than a tile, one not a multiple of a block's
    // step) and a prompt chunk, cut into splits some of which hold nothing.
    let seqs = [(1, 1), (1, 700), (1, 2049), (1, 17), (3, 300)];
    let kernels = [
        "mma_w4_b4",
        "mma_w4_b3",
        "mma_w4_b2_pl",
        "mma_w8_b1_pl",
        "fma",
    ];
    for kernel in kernels {
        for prefetch in 0..=MAX_PREFETCH_TILES {
            for (dtype, splits) in [(DType::F16, 1), (DType::BF16, 9), (DType::F16, 17)] {
                let variant = DecodeVariant {
                    num_splits: Some(splits),
                    prefetch_tiles: Some(prefetch),
                    kernel: Some(kernel.to_owned()),
                    // Both ways of launching the merge after the splits.
                    overlap_merge: Some(prefetch % 2 == 0),
                };
                run_variant(
                    &device,
                    &mut rng,
                    &Case {
                        seqs: &seqs,
                        num_heads: 32,
                        num_kv_heads: 8,
                        head_dim: 128,
                        block_size: 16,
                    },
                    dtype,
                    &variant,
                    false,
                );
            }
        }
    }
    // Heads of 64 and 96 dimensions have one form each, here with blocks of an odd size and
    // groups of 3; other forms are refused.
    for head_dim in [64, 96] {
        for prefetch in [0, MAX_PREFETCH_TILES] {
            let variant = DecodeVariant {
                num_splits: Some(4),
                prefetch_tiles: Some(prefetch),
                kernel: Some("mma_w4_b3".to_owned()),
                overlap_merge: None,
            };
            run_variant(
                &device,
                &mut rng,
                &Case {
                    seqs: &seqs,
                    num_heads: 6,
                    num_kv_heads: 2,
                    head_dim,
                    block_size: 7,
                },
                DType::BF16,
                &variant,
                false,
            );
        }
        let layout = DeviceBatchLayout::new(&[0, 1], &[5], &[0], 1, 16, 1, &device).unwrap();
        let params = AttentionParams {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim,
            scale: 0.3,
        };
        let (q, _) = random_tensor(&mut rng, &[1, 2, head_dim], DType::F16, 1.0, &device);
        let (pages, _) = random_tensor(&mut rng, &[1, 16, 1, head_dim], DType::F16, 1.0, &device);
        for kernel in ["mma_w4_b2_pl", "mma_w8_b1_pl", "mma_w4_b3_xx", "mma_w4"] {
            let variant = DecodeVariant {
                kernel: Some(kernel.to_owned()),
                ..DecodeVariant::default()
            };
            assert!(
                paged_attention_variant(&q, &layout, &params, &pages, &pages, &variant).is_err(),
                "head_dim {head_dim} {kernel}"
            );
        }
    }
}

#[test]
fn misaligned_pages_take_the_cuda_cores() {
    let Some(device) = gpu_or_skip("paged_attention_misaligned_pages") else {
        return;
    };
    let mut rng = TestRng::new("paged_attention_misaligned_pages");
    let seqs = [(1, 300), (1, 33), (2, 90)];
    for dtype in [DType::F16, DType::BF16] {
        for splits in [1, 5] {
            let variant = DecodeVariant {
                num_splits: Some(splits),
                ..DecodeVariant::default()
            };
            run_variant(
                &device,
                &mut rng,
                &Case {
                    seqs: &seqs,
                    num_heads: 8,
                    num_kv_heads: 2,
                    head_dim: 128,
                    block_size: 16,
                },
                dtype,
                &variant,
                true,
            );
        }
    }
}

#[test]
fn invalid_layouts_and_inputs_are_errors() {
    let Some(device) = gpu_or_skip("paged_attention_invalid_layouts") else {
        return;
    };
    let mut rng = TestRng::new("paged_attention_invalid_layouts");
    let layout = |query_start: &[u32], context: &[u32], tables: &[u32]| {
        DeviceBatchLayout::new(query_start, context, tables, 2, 4, 3, &device).err()
    };
    assert!(layout(&[0, 2], &[5], &[0, 1]).is_none(), "valid");
    assert!(
        matches!(layout(&[1, 2], &[5], &[0, 1]), Some(Error::Shape { .. })),
        "query_start must start at 0"
    );
    assert!(
        matches!(
            layout(&[0, 2, 1], &[5, 5], &[0, 1, 2, 0]),
            Some(Error::Shape { .. })
        ),
        "decreasing"
    );
    assert!(
        matches!(layout(&[0, 6], &[5], &[0, 1]), Some(Error::Shape { .. })),
        "query rows past the context"
    );
    assert!(
        matches!(layout(&[0, 1], &[9], &[0, 1]), Some(Error::Shape { .. })),
        "table too short"
    );
    assert!(
        matches!(layout(&[0, 1], &[5], &[0, 3]), Some(Error::Shape { .. })),
        "block outside the pages"
    );
    assert!(
        layout(&[0, 1], &[4], &[0, 3]).is_none(),
        "an unused padding id is never read"
    );
    assert!(
        matches!(layout(&[0, 1], &[4], &[0]), Some(Error::Shape { .. })),
        "table length"
    );

    let good = DeviceBatchLayout::new(&[0, 2], &[5], &[2, 0], 2, 4, 3, &device).unwrap();
    let params = AttentionParams {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        scale: 0.3,
    };
    let (q, _) = random_tensor(&mut rng, &[2, 4, 8], DType::F16, 1.0, &device);
    let (pages, _) = random_tensor(&mut rng, &[3, 4, 2, 8], DType::F16, 1.0, &device);
    paged_attention(&q, &good, &params, &pages, &pages).unwrap();
    let (three_rows, _) = random_tensor(&mut rng, &[3, 4, 8], DType::F16, 1.0, &device);
    assert!(matches!(
        paged_attention(&three_rows, &good, &params, &pages, &pages),
        Err(Error::Shape { .. })
    ));
    let (other_pages, _) = random_tensor(&mut rng, &[4, 4, 2, 8], DType::F16, 1.0, &device);
    assert!(matches!(
        paged_attention(&q, &good, &params, &other_pages, &pages),
        Err(Error::Shape { .. })
    ));
    let (f32_pages, _) = random_tensor(&mut rng, &[3, 4, 2, 8], DType::F32, 1.0, &device);
    assert!(matches!(
        paged_attention(&q, &good, &params, &f32_pages, &pages),
        Err(Error::DType { .. })
    ));
    let grouped_badly = AttentionParams {
        num_kv_heads: 3,
        ..params
    };
    assert!(matches!(
        paged_attention(&q, &good, &grouped_badly, &pages, &pages),
        Err(Error::Shape { .. })
    ));
    let huge_heads = AttentionParams {
        num_heads: 1,
        num_kv_heads: 1,
        head_dim: 512,
        scale: 1.0,
    };
    let (wide_q, _) = random_tensor(&mut rng, &[2, 1, 512], DType::F16, 1.0, &device);
    let (wide_pages, _) = random_tensor(&mut rng, &[3, 4, 1, 512], DType::F16, 1.0, &device);
    assert!(matches!(
        paged_attention(&wide_q, &good, &huge_heads, &wide_pages, &wide_pages),
        Err(Error::Shape { .. })
    ));
}
