//! `kernels/nf4.cu` against `cpu::nf4`: decoding bit for bit (every dtype, block size, nested
//! or not, ranges starting mid-byte), the packed-weight product and its epilogues - the decode
//! GEMV at one row, the tensor-core kernel on every tile width - and past it (where the weights
//! are decoded first), and - when
//! `PAGODA_NF4_BNB_DIR` names the output of `benches/peers/nf4_matmul.py --dump` - bit for bit
//! against bitsandbytes' own `quantize_4bit` / `dequantize_4bit`.
#![cfg(feature = "cuda")]

mod common;

use std::path::PathBuf;

use common::TestRng;
use pagoda_kernels::cpu::nf4::{self, NestedScales, Nf4Blocks, Scales};
use pagoda_kernels::cuda::nf4::{CudaNf4, FUSED_MAX_ROWS};
use pagoda_kernels::ops::{self, Epilogue, Nf4Weight, OutputActivation};
use pagoda_kernels::{Error, cuda};
use pagoda_tensor::safetensors::SafeTensors;
use pagoda_tensor::{DType, Tensor};

const HALF_DTYPES: [DType; 2] = [DType::F16, DType::BF16];

/// Weights with the spread of a trained layer: mostly small, a few outliers per block, and one
/// block of zeros.
fn weights(rng: &mut TestRng, len: usize) -> Vec<f32> {
    let mut values = rng.uniform(len, 0.05);
    for v in values.iter_mut().step_by(37) {
        *v *= 20.0;
    }
    let zeros = len.min(64);
    values[len - zeros..].fill(0.0);
    values
}

/// The bits a tensor of `dtype` holds for each value, widened to f32 bits (exact for f16/bf16).
fn stored_bits(values: &[f32], dtype: DType) -> Vec<u32> {
    common::rounded(values, dtype)
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn download_bits(tensor: &Tensor) -> Vec<u32> {
    common::download(tensor)
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn first_mismatch(actual: &[u32], expected: &[u32]) -> Option<String> {
    if actual.len() != expected.len() {
        return Some(format!("lengths {} vs {}", actual.len(), expected.len()));
    }
    actual
        .iter()
        .zip(expected)
        .position(|(a, e)| a != e)
        .map(|i| {
            format!(
                "element {i}: {} vs {}",
                f32::from_bits(actual[i]),
                f32::from_bits(expected[i])
            )
        })
}

#[test]
fn dequantize_is_bit_exact_with_the_cpu_decoder() {
    let Some(device) = common::gpu_or_skip("dequantize_is_bit_exact_with_the_cpu_decoder") else {
        return;
    };
    let mut rng = TestRng::new("dequantize_is_bit_exact_with_the_cpu_decoder");
    for block_size in [32, 64, 128, 4096] {
        for len in [1, 3, 67, 4097, 64 * 257 + 5] {
            for nested in [false, true] {
                let blocks = nf4::quantize(&weights(&mut rng, len), block_size, nested).unwrap();
                let on_gpu = CudaNf4::new(&blocks, &device).unwrap();
                let decoded = blocks.dequantize();
                // The whole tensor, and a range starting on a low nibble and ending early.
                let ranges = [(0, len), if len >= 8 { (3, len - 5) } else { (0, len) }];
                for (start, count) in ranges {
                    for dtype in common::FLOAT_DTYPES {
                        common::poison_pool(&device, 4 * len + 64);
                        let what = format!(
                            "{dtype} blocks of {block_size} nested {nested} {start}+{count} of {len}"
                        );
                        let out = cuda::nf4::dequantize(&on_gpu, start, &[count], dtype)
                            .unwrap_or_else(|e| panic!("{what}: {e}"));
                        let expected = stored_bits(&decoded[start..start + count], dtype);
                        if let Some(m) = first_mismatch(&download_bits(&out), &expected) {
                            panic!("{what}: {m}");
                        }
                    }
                }
            }
        }
    }
    let blocks = nf4::quantize(&[1.0; 10], 64, false).unwrap();
    let on_gpu = CudaNf4::new(&blocks, &device).unwrap();
    assert!(cuda::nf4::dequantize(&on_gpu, 4, &[7], DType::F16).is_err());
    assert!(cuda::nf4::dequantize(&on_gpu, 0, &[2, 5], DType::U32).is_err());
}

/// The CPU oracle: `x` (as stored in `dtype`) times rows `rows` of `w`, plus the bias.
fn oracle(
    x: &[f32],
    m: usize,
    k: usize,
    w: &Nf4Blocks,
    rows: std::ops::Range<usize>,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * rows.len()];
    nf4::linear(x, m, k, w, rows, bias, &mut out).unwrap();
    out
}

/// Per output, the sum of the magnitudes of its terms: sum over k of |x[i, k]| |w[j, k]|, with
/// `weights` the dequantized rows.
///
/// The error of a 16-bit product is a fraction of this, not of the output: the kernels round the
/// dequantized weights to the activation dtype for the tensor cores, so an output that its terms
/// nearly cancel (or a bias cancels) keeps the rounding of the terms.
fn term_magnitudes(
    x: &[f32],
    m: usize,
    k: usize,
    weights: &[f32],
    rows: std::ops::Range<usize>,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(m * rows.len());
    for x_row in x.chunks_exact(k).take(m) {
        for row in rows.clone() {
            let w_row = &weights[row * k..(row + 1) * k];
            out.push(x_row.iter().zip(w_row).map(|(a, b)| (a * b).abs()).sum());
        }
    }
    out
}

/// [`common::assert_close`] with the error measured against the larger of `expected`'s and
/// `scale`'s largest magnitude.
fn assert_close_at_scale(
    what: &str,
    actual: &[f32],
    expected: &[f32],
    scale: &[f32],
    dtype: DType,
) {
    let max = |v: &[f32]| v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let reference = max(expected).max(max(scale));
    let worst = actual
        .iter()
        .zip(expected)
        .map(|(a, e)| {
            if a.is_finite() {
                (a - e).abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0f32, f32::max);
    let error = f64::from(worst) / f64::from(reference.max(f32::MIN_POSITIVE));
    assert!(
        actual.len() == expected.len() && error < common::tolerance(dtype),
        "{what}: relative error {error:e} (largest difference {worst}, scale {reference})"
    );
}

/// Row counts for every tile width (1, 2, 4 and 8 tiles of 8 rows) and their edges.
const ROWS: [usize; 10] = [1, 2, 7, 8, 9, 16, 17, 33, 40, 64];

/// (k, n, block size): one chunk, odd n, a partly filled last block of rows, blocks larger than
/// a chunk, a Llama-width row, and more tiles of rows than the persistent grid has blocks (so
/// blocks loop over several, the next one's loads overlapping the current one's end).
const SHAPES: [(usize, usize, usize); 6] = [
    (64, 1, 64),
    (64, 3, 64),
    (192, 67, 128),
    (3072, 130, 64),
    (4096, 33, 4096),
    (128, 9000, 64),
];

#[test]
fn fused_product_matches_the_cpu_oracle() {
    let Some(device) = common::gpu_or_skip("fused_product_matches_the_cpu_oracle") else {
        return;
    };
    let mut rng = TestRng::new("fused_product_matches_the_cpu_oracle");
    for (k, n, block_size) in SHAPES {
        for nested in [false, true] {
            // Two spare rows on each side: the product reads rows 2 .. 2 + n.
            let total_rows = n + 4;
            let blocks =
                nf4::quantize(&weights(&mut rng, total_rows * k), block_size, nested).unwrap();
            let on_gpu = CudaNf4::new(&blocks, &device).unwrap();
            let dense = blocks.dequantize();
            let rows = 2..2 + n;
            for dtype in HALF_DTYPES {
                for m in ROWS {
                    assert!(m <= FUSED_MAX_ROWS);
                    let (x, x_host) = common::random_tensor(&mut rng, &[m, k], dtype, 1.0, &device);
                    let bias_host = rng.uniform(n, 1.0);
                    let biases = [
                        None,
                        Some(common::upload(&bias_host, &[n], DType::F32, &device)),
                        Some(common::upload(&bias_host, &[n], dtype, &device)),
                    ];
                    let magnitudes = term_magnitudes(&x_host, m, k, &dense, rows.clone());
                    for bias in &biases {
                        let what = format!(
                            "{dtype} m {m} k {k} n {n} blocks {block_size} nested {nested} bias {:?}",
                            bias.as_ref().map(Tensor::dtype)
                        );
                        common::poison_pool(&device, m * n * 2);
                        let out = cuda::nf4::linear(
                            &x,
                            &on_gpu,
                            k,
                            rows.clone(),
                            bias.as_ref(),
                            Epilogue::default(),
                        )
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                        assert_eq!((out.dims(), out.dtype()), (&[m, n][..], dtype), "{what}");
                        let bias_rounded = bias
                            .as_ref()
                            .map(|b| common::rounded(&bias_host, b.dtype()));
                        let expected = oracle(
                            &x_host,
                            m,
                            k,
                            &blocks,
                            rows.clone(),
                            bias_rounded.as_deref(),
                        );
                        assert_close_at_scale(
                            &what,
                            &common::download(&out),
                            &expected,
                            &magnitudes,
                            dtype,
                        );
                    }
                }
            }
        }
    }
}

/// (k, n, block size) for the decode GEMV, which gives each block a tile of 16 weight rows and
/// splits k among its warps in groups of 512 (4 spans of 128, a 16-byte load per lane and row):
/// one chunk (three lanes of four idle in the span), a tile of 5 of 16 rows, a span and a half,
/// two and a half spans, a Llama-width row (six warps of one group), two groups and one chunk,
/// blocks of 256 over eight groups and a chunk (warps of two groups), 16.5 groups of 4096-value
/// blocks (warps of three groups: a batch of two, then one), and many tiles of a short row.
const GEMV_SHAPES: [(usize, usize, usize); 9] = [
    (64, 1, 64),
    (64, 5, 64),
    (192, 67, 128),
    (320, 16, 64),
    (3072, 37, 64),
    (1088, 19, 64),
    (4160, 21, 256),
    (8448, 9, 4096),
    (128, 4501, 64),
];

/// Decode-sized products (1..=4 rows of x: the GEMV at one, the tensor-core kernel above) against
/// the CPU oracle: plain and nested scales, f16 and
/// bf16, no bias and both bias kinds, a row range inside a larger tensor, poisoned outputs.
#[test]
fn decode_gemv_matches_the_cpu_oracle() {
    let Some(device) = common::gpu_or_skip("decode_gemv_matches_the_cpu_oracle") else {
        return;
    };
    let mut rng = TestRng::new("decode_gemv_matches_the_cpu_oracle");
    for (k, n, block_size) in GEMV_SHAPES {
        for nested in [false, true] {
            let blocks =
                nf4::quantize(&weights(&mut rng, (n + 3) * k), block_size, nested).unwrap();
            let on_gpu = CudaNf4::new(&blocks, &device).unwrap();
            let dense = blocks.dequantize();
            let rows = 1..1 + n;
            for dtype in HALF_DTYPES {
                for m in 1..=4 {
                    let (x, x_host) = common::random_tensor(&mut rng, &[m, k], dtype, 1.0, &device);
                    let bias_host = rng.uniform(n, 1.0);
                    let magnitudes = term_magnitudes(&x_host, m, k, &dense, rows.clone());
                    for bias_dtype in [None, Some(DType::F32), Some(dtype)] {
                        let bias = bias_dtype.map(|d| common::upload(&bias_host, &[n], d, &device));
                        let what = format!(
                            "gemv {dtype} m {m} k {k} n {n} blocks {block_size} nested {nested} \
                             bias {bias_dtype:?}"
                        );
                        common::poison_pool(&device, m * n * 2);
                        let out = cuda::nf4::linear(
                            &x,
                            &on_gpu,
                            k,
                            rows.clone(),
                            bias.as_ref(),
                            Epilogue::default(),
                        )
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                        assert_eq!((out.dims(), out.dtype()), (&[m, n][..], dtype), "{what}");
                        let bias_rounded = bias_dtype.map(|d| common::rounded(&bias_host, d));
                        let expected = oracle(
                            &x_host,
                            m,
                            k,
                            &blocks,
                            rows.clone(),
                            bias_rounded.as_deref(),
                        );
                        assert_close_at_scale(
                            &what,
                            &common::download(&out),
                            &expected,
                            &magnitudes,
                            dtype,
                        );
                    }
                }
            }
        }
    }
}

/// Every epilogue of decode-sized products, with and without an addend, against the CPU composition:
/// odd n, gated and not, 1..=4 rows of x.
#[test]
fn decode_gemv_epilogues_match_the_cpu_composition() {
    let Some(device) = common::gpu_or_skip("decode_gemv_epilogues_match_the_cpu_composition")
    else {
        return;
    };
    let mut rng = TestRng::new("decode_gemv_epilogues_match_the_cpu_composition");
    for (k, n) in [(64, 3), (1088, 13), (3072, 67)] {
        for activation in [
            OutputActivation::Identity,
            OutputActivation::Gelu,
            OutputActivation::GeluTanh,
            OutputActivation::SiluGate,
        ] {
            check_epilogue(&device, &mut rng, (activation, k, n), &[1, 2, 3, 4]);
        }
    }
}

/// `linear_into` writes exactly what `linear` returns into a kept (poisoned) output, at one row
/// and on the tensor cores, and refuses outputs of the wrong shape or dtype.
#[test]
fn products_into_kept_outputs_match_fresh_ones() {
    let Some(device) = common::gpu_or_skip("products_into_kept_outputs_match_fresh_ones") else {
        return;
    };
    let mut rng = TestRng::new("products_into_kept_outputs_match_fresh_ones");
    let (k, n) = (1088, 37);
    let blocks = nf4::quantize(&weights(&mut rng, (n + 2) * k), 64, true).unwrap();
    let on_gpu = CudaNf4::new(&blocks, &device).unwrap();
    let rows = 2..2 + n;
    for dtype in HALF_DTYPES {
        for m in [1, 5] {
            let (x, _) = common::random_tensor(&mut rng, &[m, k], dtype, 1.0, &device);
            let bias = common::upload(&rng.uniform(n, 1.0), &[n], DType::F32, &device);
            let what = format!("{dtype} m {m}");
            let fresh = cuda::nf4::linear(
                &x,
                &on_gpu,
                k,
                rows.clone(),
                Some(&bias),
                Epilogue::default(),
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut kept = common::upload(&vec![f32::NAN; m * n], &[m, n], dtype, &device);
            cuda::nf4::linear_into(
                &x,
                &on_gpu,
                k,
                rows.clone(),
                Some(&bias),
                Epilogue::default(),
                &mut kept,
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(
                download_bits(&kept),
                download_bits(&fresh),
                "{what}: kept output differs"
            );
            let mut wrong_shape =
                common::upload(&vec![0.0; m * (n + 1)], &[m, n + 1], dtype, &device);
            assert!(matches!(
                cuda::nf4::linear_into(
                    &x,
                    &on_gpu,
                    k,
                    rows.clone(),
                    None,
                    Epilogue::default(),
                    &mut wrong_shape
                ),
                Err(Error::Shape { .. })
            ));
            let mut wrong_dtype = common::upload(&vec![0.0; m * n], &[m, n], DType::F32, &device);
            assert!(
                cuda::nf4::linear_into(
                    &x,
                    &on_gpu,
                    k,
                    rows.clone(),
                    None,
                    Epilogue::default(),
                    &mut wrong_dtype
                )
                .is_err()
            );
        }
    }
}

/// `ops::nf4_linear_with_epilogue` on the GPU and on the CPU (the product, then the elementwise
/// step) over the same NF4 weights `[n (2n when gated), k]`, an f32 bias and each row count in
/// `ms`, with and without an addend, in f16 and bf16.
fn check_epilogue(
    device: &pagoda_tensor::CudaDevice,
    rng: &mut TestRng,
    (activation, k, n): (OutputActivation, usize, usize),
    ms: &[usize],
) {
    let rows = if activation == OutputActivation::SiluGate {
        2 * n
    } else {
        n
    };
    let blocks = nf4::quantize(&weights(rng, rows * k), 64, true).unwrap();
    let on_cpu = Nf4Weight::new(blocks.clone(), rows, k, &pagoda_tensor::Device::Cpu).unwrap();
    let on_gpu = Nf4Weight::new(blocks, rows, k, &common::cuda(device)).unwrap();
    let bias_host = rng.uniform(rows, 1.0);
    let bias_cpu = Tensor::from_slice(&bias_host, [rows]).unwrap();
    let bias_gpu = common::upload(&bias_host, &[rows], DType::F32, device);
    for dtype in HALF_DTYPES {
        for &m in ms {
            let (x, x_host) = common::random_tensor(rng, &[m, k], dtype, 1.0, device);
            let x_cpu = Tensor::from_vec(x_host, [m, k]).unwrap();
            for with_addend in [false, true] {
                let (addend, addend_host) = common::random_tensor(rng, &[m, n], dtype, 1.0, device);
                let addend_cpu = Tensor::from_vec(addend_host, [m, n]).unwrap();
                let what = format!("{activation:?} k {k} n {n} {dtype} m {m} addend {with_addend}");
                let epilogue = |addend| Epilogue {
                    activation,
                    addend: with_addend.then_some(addend),
                };
                common::poison_pool(device, m * n * 2);
                let out =
                    ops::nf4_linear_with_epilogue(&x, &on_gpu, Some(&bias_gpu), epilogue(&addend))
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                let expected = ops::nf4_linear_with_epilogue(
                    &x_cpu,
                    &on_cpu,
                    Some(&bias_cpu),
                    epilogue(&addend_cpu),
                )
                .unwrap();
                assert_eq!(out.dims(), expected.dims(), "{what}");
                common::assert_close(
                    &what,
                    &common::download(&out),
                    &expected.to_vec_f32().unwrap(),
                    dtype,
                );
            }
        }
    }
}

#[test]
fn llama_sized_layer_matches_the_cpu_oracle() {
    let Some(device) = common::gpu_or_skip("llama_sized_layer_matches_the_cpu_oracle") else {
        return;
    };
    let mut rng = TestRng::new("llama_sized_layer_matches_the_cpu_oracle");
    // Llama-3.2-3B's fused q/k/v projection.
    let (k, n) = (3072, 5120);
    let blocks = nf4::quantize(&weights(&mut rng, n * k), 64, true).unwrap();
    let weight = Nf4Weight::new(blocks.clone(), n, k, &common::cuda(&device)).unwrap();
    for m in [1, 16] {
        let (x, x_host) = common::random_tensor(&mut rng, &[m, k], DType::F16, 1.0, &device);
        let out = ops::nf4_linear(&x, &weight, None).unwrap();
        let expected = oracle(&x_host, m, k, &blocks, 0..n, None);
        common::assert_close(
            &format!("llama qkv m {m}"),
            &common::download(&out),
            &expected,
            DType::F16,
        );
    }
}

/// Products the fused kernel does not take - more rows, f32, k not a multiple of 64, blocks of
/// 32 - decode the weights and multiply them densely; same answers.
#[test]
fn decoded_fallback_matches_the_cpu_oracle() {
    let Some(device) = common::gpu_or_skip("decoded_fallback_matches_the_cpu_oracle") else {
        return;
    };
    let mut rng = TestRng::new("decoded_fallback_matches_the_cpu_oracle");
    let cases: [(DType, usize, usize, usize, usize); 5] = [
        (DType::F16, 65, 128, 40, 64),
        (DType::BF16, 100, 192, 67, 64),
        (DType::F32, 3, 128, 9, 64),
        (DType::F16, 4, 96, 5, 32),
        (DType::BF16, 2, 128, 7, 32),
    ];
    for (dtype, m, k, n, block_size) in cases {
        let blocks = nf4::quantize(&weights(&mut rng, (n + 3) * k), block_size, true).unwrap();
        let weight = Nf4Weight::new(blocks.clone(), n + 3, k, &common::cuda(&device))
            .unwrap()
            .narrow_rows(3, n)
            .unwrap();
        let (x, x_host) = common::random_tensor(&mut rng, &[m, k], dtype, 1.0, &device);
        let bias_host = rng.uniform(n, 1.0);
        let bias = common::upload(&bias_host, &[n], DType::F32, &device);
        let what = format!("fallback {dtype} m {m} k {k} n {n} blocks {block_size}");
        common::poison_pool(&device, m * n * 4);
        let out =
            ops::nf4_linear(&x, &weight, Some(&bias)).unwrap_or_else(|e| panic!("{what}: {e}"));
        let expected = oracle(&x_host, m, k, &blocks, 3..3 + n, Some(&bias_host));
        common::assert_close(&what, &common::download(&out), &expected, dtype);
    }
}

#[test]
fn epilogues_match_the_cpu_composition() {
    let Some(device) = common::gpu_or_skip("epilogues_match_the_cpu_composition") else {
        return;
    };
    let mut rng = TestRng::new("epilogues_match_the_cpu_composition");
    // n = 4500: more tiles than the persistent grid has blocks.
    let cases = [
        (OutputActivation::Identity, 67),
        (OutputActivation::Gelu, 67),
        (OutputActivation::GeluTanh, 67),
        (OutputActivation::SiluGate, 67),
        (OutputActivation::SiluGate, 4500),
        (OutputActivation::Gelu, 4500),
    ];
    for (activation, n) in cases {
        // Fused tile widths, then a row count that decodes first.
        check_epilogue(&device, &mut rng, (activation, 256, n), &[1, 5, 16, 40, 70]);
    }
}

#[test]
fn bad_arguments_are_errors() {
    let Some(device) = common::gpu_or_skip("bad_arguments_are_errors") else {
        return;
    };
    let mut rng = TestRng::new("bad_arguments_are_errors");
    let blocks = nf4::quantize(&weights(&mut rng, 8 * 128), 64, false).unwrap();
    let on_gpu = CudaNf4::new(&blocks, &device).unwrap();
    let (x, _) = common::random_tensor(&mut rng, &[2, 128], DType::F16, 1.0, &device);
    let plain = Epilogue::default();
    let gated = Epilogue {
        activation: OutputActivation::SiluGate,
        addend: None,
    };
    let shape_error = |r: pagoda_kernels::Result<Tensor>| matches!(r, Err(Error::Shape { .. }));
    assert!(shape_error(cuda::nf4::linear(
        &x,
        &on_gpu,
        128,
        4..9,
        None,
        plain
    )));
    assert!(shape_error(cuda::nf4::linear(
        &x,
        &on_gpu,
        64,
        0..8,
        None,
        plain
    )));
    assert!(shape_error(cuda::nf4::linear(
        &x,
        &on_gpu,
        128,
        0..3,
        None,
        gated
    )));
    let wrong_bias = common::upload(&[0.0; 3], &[3], DType::F32, &device);
    assert!(cuda::nf4::linear(&x, &on_gpu, 128, 0..4, Some(&wrong_bias), plain).is_err());
    let too_many = common::upload(&vec![0.0; 65 * 128], &[65, 128], DType::F16, &device);
    assert!(shape_error(cuda::nf4::linear(
        &too_many,
        &on_gpu,
        128,
        0..4,
        None,
        plain
    )));

    // Through ops: a host x against a device weight, and a strided x (refused by the dense
    // product it falls back to).
    let weight = Nf4Weight::new(blocks, 8, 128, &common::cuda(&device)).unwrap();
    let host_x = Tensor::from_vec(vec![0.0f32; 128], [1, 128]).unwrap();
    assert!(matches!(
        ops::nf4_linear(&host_x, &weight, None),
        Err(Error::Device { .. })
    ));
    let (square, _) = common::random_tensor(&mut rng, &[128, 128], DType::F16, 1.0, &device);
    let strided = common::non_contiguous(&square);
    assert!(ops::nf4_linear(&strided, &weight, None).is_err());
    assert!(weight.narrow_rows(5, 4).is_err());
}

// ---------------------------------------------------------------------------------------------
// bitsandbytes
// ---------------------------------------------------------------------------------------------

/// One case of the dump: a weight bitsandbytes quantized, its state, and its decodings.
struct BnbCase {
    name: String,
    input: Vec<f32>,
    blocks: Nf4Blocks,
    nested: bool,
    block_size: usize,
}

fn read_case(file: &SafeTensors, name: &str) -> BnbCase {
    let get = |suffix: &str| {
        file.get(&format!("{name}.{suffix}"))
            .unwrap_or_else(|e| panic!("{name}.{suffix}: {e}"))
    };
    let input = get("input").to_vec_f32().unwrap();
    let block_size = get("blocksize").to_vec::<i32>().unwrap()[0] as usize;
    let packed = get("packed").to_vec::<u8>().unwrap();
    let absmax = get("absmax");
    let nested = absmax.dtype() == DType::U8;
    let scales = if nested {
        let absmax2 = get("nested_absmax").to_vec_f32().unwrap();
        let offset = get("offset").to_vec_f32().unwrap()[0];
        Scales::Nested(NestedScales {
            quantized: absmax.to_vec::<u8>().unwrap(),
            code: get("nested_code").to_vec_f32().unwrap(),
            offsets: vec![offset; absmax2.len()],
            absmax: absmax2,
            block_size: get("nested_blocksize").to_vec::<i32>().unwrap()[0] as usize,
        })
    } else {
        Scales::Absmax(absmax.to_vec_f32().unwrap())
    };
    let blocks = Nf4Blocks::new(packed, input.len(), block_size, scales)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    BnbCase {
        name: name.to_owned(),
        input,
        blocks,
        nested,
        block_size,
    }
}

/// bitsandbytes' `dequantize_4bit` of its own packed weights, against our GPU and CPU decoders
/// (bit for bit, every dtype), and our quantizer against its `quantize_4bit` (codes and f32
/// scales bit for bit; the double-quantized scales are counted, since its offset is a GPU mean).
#[test]
fn matches_bitsandbytes() {
    let Some(dir) = std::env::var_os("PAGODA_NF4_BNB_DIR").map(PathBuf::from) else {
        eprintln!("matches_bitsandbytes: skipped: PAGODA_NF4_BNB_DIR is not set");
        return;
    };
    let Some(device) = common::gpu_or_skip("matches_bitsandbytes") else {
        return;
    };
    let file = SafeTensors::open(&dir.join("nf4_dump.safetensors")).expect("the bitsandbytes dump");
    let mut names: Vec<String> = file
        .names()
        .iter()
        .filter_map(|n| n.strip_suffix(".packed").map(str::to_owned))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no cases in the dump");
    let (mut values, mut scale_codes, mut scale_code_mismatches) = (0usize, 0usize, 0usize);
    for name in &names {
        let case = read_case(&file, name);
        let on_gpu = CudaNf4::new(&case.blocks, &device).unwrap();
        let decoded = case.blocks.dequantize();
        for (dtype, suffix) in [
            (DType::F32, "f32"),
            (DType::F16, "f16"),
            (DType::BF16, "bf16"),
        ] {
            let theirs = download_bits(
                &file
                    .get(&format!("{name}.dequant_{suffix}"))
                    .unwrap_or_else(|e| panic!("{name}.dequant_{suffix}: {e}")),
            );
            let ours_cpu = stored_bits(&decoded, dtype);
            if let Some(m) = first_mismatch(&ours_cpu, &theirs) {
                panic!("{name} {dtype}: CPU decoder differs from bitsandbytes at {m}");
            }
            let ours_gpu = cuda::nf4::dequantize(&on_gpu, 0, &[decoded.len()], dtype).unwrap();
            if let Some(m) = first_mismatch(&download_bits(&ours_gpu), &theirs) {
                panic!("{name} {dtype}: GPU decoder differs from bitsandbytes at {m}");
            }
        }
        values += decoded.len();

        let ours = nf4::quantize(&case.input, case.block_size, case.nested).unwrap();
        assert_eq!(
            ours.packed(),
            case.blocks.packed(),
            "{}: packed codes differ from bitsandbytes'",
            case.name
        );
        match (ours.scales(), case.blocks.scales()) {
            (Scales::Absmax(a), Scales::Absmax(b)) => {
                let (a, b): (Vec<u32>, Vec<u32>) = (
                    a.iter().map(|v| v.to_bits()).collect(),
                    b.iter().map(|v| v.to_bits()).collect(),
                );
                assert_eq!(a, b, "{}: absmax differs from bitsandbytes'", case.name);
            }
            (Scales::Nested(a), Scales::Nested(b)) => {
                scale_codes += a.quantized.len();
                scale_code_mismatches += a
                    .quantized
                    .iter()
                    .zip(&b.quantized)
                    .filter(|(x, y)| x != y)
                    .count();
                let (ours, theirs) = (a.offsets[0], b.offsets[0]);
                eprintln!(
                    "{}: nested offset ours {ours:e}, bitsandbytes {theirs:e} ({} ulp)",
                    case.name,
                    (ours.to_bits() as i64 - theirs.to_bits() as i64).abs()
                );
            }
            _ => panic!("{}: scale kinds differ", case.name),
        }
    }
    if let Ok(code) = file.get("dynamic_code") {
        let theirs = code.to_vec_f32().unwrap();
        let ours = nf4::dynamic_code();
        let differing = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!(
            "dynamic code: {differing} of 256 entries differ from bitsandbytes' (at most {worst:e})"
        );
    }
    println!(
        "bitsandbytes: {} cases, {values} values: dequantize bit-exact (CPU and GPU, f32/f16/bf16), \
         packed codes identical; nested scale codes differing: {scale_code_mismatches} of {scale_codes}",
        names.len()
    );
}
