//! The skinny-product kernel behind `cuda::gemm::linear` for at most eight rows, against
//! `cpu::gemm::linear`: every row count it takes (and the first one it does not), odd and
//! vector-width k and n, biases of both dtypes, unaligned views, and Llama-sized layers.
#![cfg(feature = "cuda")]

mod common;

use common::{FLOAT_DTYPES, TestRng};
use pagoda_kernels::cpu::gemm::Weights;
use pagoda_kernels::ops::{self, Epilogue, OutputActivation};
use pagoda_kernels::{Error, cpu, cuda};
use pagoda_tensor::{CudaDevice, DType, Tensor};

fn cpu_linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * n];
    cpu::gemm::linear(x, m, k, Weights::F32(w), n, bias, &mut out).unwrap();
    out
}

/// Runs `linear` on poisoned memory and compares it with the oracle.
fn check(
    device: &CudaDevice,
    what: &str,
    (x, x_host): (&Tensor, &[f32]),
    (w, w_host): (&Tensor, &[f32]),
    bias: Option<(&Tensor, &[f32])>,
    (m, k, n): (usize, usize, usize),
) {
    let dtype = x.dtype();
    common::poison_pool(device, m * n * dtype.size_in_bytes());
    let out =
        cuda::gemm::linear(x, w, bias.map(|(b, _)| b)).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!((out.dims(), out.dtype()), (&[m, n][..], dtype), "{what}");
    let expected = cpu_linear(x_host, m, k, w_host, n, bias.map(|(_, h)| h));
    common::assert_close(what, &common::download(&out), &expected, dtype);
}

/// m = 9 is the first row count left to cuBLAS: the boundary on both sides.
const ROWS: [usize; 6] = [1, 2, 3, 5, 8, 9];

/// (k, n): k of 1, odd, past 4096 (scalar loop), multiples of 8 (16-byte loop, with and without
/// a partly filled last warp), and k = 0 (the result is the bias).
const SHAPES: [(usize, usize); 9] = [
    (1, 1),
    (7, 67),
    (67, 7),
    (4097, 67),
    (8, 1),
    (256, 67),
    (3072, 130),
    (1000, 4097),
    (0, 5),
];

#[test]
fn few_row_products_match_the_cpu_oracle() {
    let Some(device) = common::gpu_or_skip("few_row_products_match_the_cpu_oracle") else {
        return;
    };
    let mut rng = TestRng::new("few_row_products_match_the_cpu_oracle");
    for dtype in FLOAT_DTYPES {
        for m in ROWS {
            for (k, n) in SHAPES {
                let (x, x_host) = common::random_tensor(&mut rng, &[m, k], dtype, 1.0, &device);
                let (w, w_host) = common::random_tensor(&mut rng, &[n, k], dtype, 1.0, &device);
                let shape = (m, k, n);
                let what = format!("linear {dtype} {shape:?}");
                check(&device, &what, (&x, &x_host), (&w, &w_host), None, shape);
                let mut bias_dtypes = vec![DType::F32];
                if dtype != DType::F32 {
                    bias_dtypes.push(dtype);
                }
                for bias_dtype in bias_dtypes {
                    let (b, b_host) =
                        common::random_tensor(&mut rng, &[n], bias_dtype, 1.0, &device);
                    let what = format!("linear {dtype} + {bias_dtype} bias {shape:?}");
                    let bias = Some((&b, &b_host[..]));
                    check(&device, &what, (&x, &x_host), (&w, &w_host), bias, shape);
                }
            }
        }
    }
}

/// `len` elements viewed one element into a larger buffer: contiguous, but not 16-byte aligned.
fn offset_by_one(
    rng: &mut TestRng,
    dims: &[usize],
    dtype: DType,
    device: &CudaDevice,
) -> (Tensor, Vec<f32>) {
    let len: usize = dims.iter().product();
    let (buffer, host) = common::random_tensor(rng, &[len + 1], dtype, 1.0, device);
    let view = buffer
        .narrow(0, 1, len)
        .and_then(|t| t.reshape(dims.to_vec()))
        .unwrap_or_else(|e| panic!("viewing {dims:?} at offset 1: {e}"));
    assert!(view.is_contiguous());
    (view, host[1..].to_vec())
}

#[test]
fn unaligned_views_take_the_scalar_path() {
    let Some(device) = common::gpu_or_skip("unaligned_views_take_the_scalar_path") else {
        return;
    };
    let mut rng = TestRng::new("unaligned_views_take_the_scalar_path");
    let (m, k, n) = (3, 256, 33);
    for dtype in FLOAT_DTYPES {
        let (x, x_host) = offset_by_one(&mut rng, &[m, k], dtype, &device);
        let (w, w_host) = common::random_tensor(&mut rng, &[n, k], dtype, 1.0, &device);
        let what = format!("linear {dtype} with x at offset 1");
        check(
            &device,
            &what,
            (&x, &x_host),
            (&w, &w_host),
            None,
            (m, k, n),
        );
        let (x, x_host) = common::random_tensor(&mut rng, &[m, k], dtype, 1.0, &device);
        let (w, w_host) = offset_by_one(&mut rng, &[n, k], dtype, &device);
        let what = format!("linear {dtype} with w at offset 1");
        check(
            &device,
            &what,
            (&x, &x_host),
            (&w, &w_host),
            None,
            (m, k, n),
        );
    }
}

#[test]
fn decode_sized_llama_layers_match_the_cpu_oracle() {
    let Some(device) = common::gpu_or_skip("decode_sized_llama_layers_match_the_cpu_oracle") else {
        return;
    };
    let mut rng = TestRng::new("decode_sized_llama_layers_match_the_cpu_oracle");
    // Llama-3.2-3B: the MLP up projection (3072 -> 8192) and the down projection (8192 -> 3072).
    for (k, n) in [(3072, 8192), (8192, 3072)] {
        for dtype in FLOAT_DTYPES {
            let (w, w_host) = common::random_tensor(&mut rng, &[n, k], dtype, 1.0, &device);
            for m in [1, 8] {
                let (x, x_host) = common::random_tensor(&mut rng, &[m, k], dtype, 1.0, &device);
                let (b, b_host) = common::random_tensor(&mut rng, &[n], DType::F32, 1.0, &device);
                let shape = (m, k, n);
                let what = format!("linear {dtype} {shape:?}");
                check(&device, &what, (&x, &x_host), (&w, &w_host), None, shape);
                let what = format!("linear {dtype} + f32 bias {shape:?}");
                let bias = Some((&b, &b_host[..]));
                check(&device, &what, (&x, &x_host), (&w, &w_host), bias, shape);
            }
        }
    }
}

/// Rows enough that the launcher picks the warp-per-row form (a full wave of warps at two rows
/// per warp on any GPU of up to 312 SMs), odd so that the last warp has a row past n.
const LM_HEAD_ROWS: usize = 40_003;

#[test]
fn lm_head_sized_outputs_match_the_cpu_oracle() {
    let Some(device) = common::gpu_or_skip("lm_head_sized_outputs_match_the_cpu_oracle") else {
        return;
    };
    let mut rng = TestRng::new("lm_head_sized_outputs_match_the_cpu_oracle");
    let n = LM_HEAD_ROWS;
    // k = 64 takes the vectorized loop, k = 67 the scalar one.
    for k in [64, 67] {
        for dtype in FLOAT_DTYPES {
            let (w, w_host) = common::random_tensor(&mut rng, &[n, k], dtype, 1.0, &device);
            for m in [1, 5] {
                let (x, x_host) = common::random_tensor(&mut rng, &[m, k], dtype, 1.0, &device);
                let (b, b_host) = common::random_tensor(&mut rng, &[n], dtype, 1.0, &device);
                let shape = (m, k, n);
                let what = format!("linear {dtype} {shape:?}");
                check(&device, &what, (&x, &x_host), (&w, &w_host), None, shape);
                let what = format!("linear {dtype} + {dtype} bias {shape:?}");
                let bias = Some((&b, &b_host[..]));
                check(&device, &what, (&x, &x_host), (&w, &w_host), bias, shape);
            }
        }
    }
}

#[test]
fn a_bias_of_the_wrong_length_or_dtype_is_an_error() {
    let Some(device) = common::gpu_or_skip("a_bias_of_the_wrong_length_or_dtype_is_an_error")
    else {
        return;
    };
    let mut rng = TestRng::new("a_bias_of_the_wrong_length_or_dtype_is_an_error");
    let (x, _) = common::random_tensor(&mut rng, &[2, 16], DType::F16, 1.0, &device);
    let (w, _) = common::random_tensor(&mut rng, &[5, 16], DType::F16, 1.0, &device);
    let (short, _) = common::random_tensor(&mut rng, &[4], DType::F16, 1.0, &device);
    let err = cuda::gemm::linear(&x, &w, Some(&short)).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err:?}");
    let (bf16_bias, _) = common::random_tensor(&mut rng, &[5], DType::BF16, 1.0, &device);
    let err = cuda::gemm::linear(&x, &w, Some(&bf16_bias)).unwrap_err();
    assert!(matches!(err, Error::DType { .. }), "{err:?}");
}

/// `ops::linear_with_epilogue` on the CPU over the same values: the product, then the
/// elementwise step, each by its oracle.
fn cpu_epilogue(
    (x, m, k): (&[f32], usize, usize),
    (w, rows): (&[f32], usize),
    bias: Option<&[f32]>,
    activation: OutputActivation,
    addend: Option<&[f32]>,
) -> Vec<f32> {
    let x = Tensor::from_slice(x, [m, k]).unwrap();
    let w = Tensor::from_slice(w, [rows, k]).unwrap();
    let bias = bias.map(|b| Tensor::from_slice(b, [rows]).unwrap());
    let n = if activation == OutputActivation::SiluGate {
        rows / 2
    } else {
        rows
    };
    let addend = addend.map(|a| Tensor::from_slice(a, [m, n]).unwrap());
    let epilogue = Epilogue {
        activation,
        addend: addend.as_ref(),
    };
    ops::linear_with_epilogue(&x, &w, bias.as_ref(), epilogue)
        .and_then(|t| Ok(t.to_vec::<f32>()?))
        .unwrap()
}

#[test]
fn epilogues_match_the_product_then_the_elementwise_oracles() {
    let Some(device) =
        common::gpu_or_skip("epilogues_match_the_product_then_the_elementwise_oracles")
    else {
        return;
    };
    let mut rng = TestRng::new("epilogues_match_the_product_then_the_elementwise_oracles");
    let activations = [
        OutputActivation::Identity,
        OutputActivation::Gelu,
        OutputActivation::GeluTanh,
        OutputActivation::SiluGate,
    ];
    for dtype in FLOAT_DTYPES {
        for m in [1, 3, 8] {
            for (k, n) in [(67, 7), (256, 67), (3072, 130), (1000, 515)] {
                for activation in activations {
                    let rows = if activation == OutputActivation::SiluGate {
                        2 * n
                    } else {
                        n
                    };
                    let (x, x_host) = common::random_tensor(&mut rng, &[m, k], dtype, 1.0, &device);
                    let (w, w_host) =
                        common::random_tensor(&mut rng, &[rows, k], dtype, 0.1, &device);
                    let (b, b_host) =
                        common::random_tensor(&mut rng, &[rows], DType::F32, 1.0, &device);
                    let (a, a_host) = common::random_tensor(&mut rng, &[m, n], dtype, 1.0, &device);
                    for (with_bias, with_addend) in [(false, false), (true, false), (true, true)] {
                        let what = format!(
                            "{dtype} m {m} k {k} n {n} {activation:?} bias {with_bias} addend {with_addend}"
                        );
                        common::poison_pool(&device, m * n * dtype.size_in_bytes());
                        let epilogue = Epilogue {
                            activation,
                            addend: with_addend.then_some(&a),
                        };
                        let out = cuda::gemm::linear_with_epilogue(
                            &x,
                            &w,
                            with_bias.then_some(&b),
                            epilogue,
                        )
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                        assert_eq!(out.dims(), &[m, n][..], "{what}");
                        let expected = cpu_epilogue(
                            (&x_host, m, k),
                            (&w_host, rows),
                            with_bias.then_some(&b_host[..]),
                            activation,
                            with_addend.then_some(&a_host[..]),
                        );
                        common::assert_close(&what, &common::download(&out), &expected, dtype);
                    }
                }
            }
        }
    }
}

#[test]
fn epilogue_misuse_is_an_error() {
    let Some(device) = common::gpu_or_skip("epilogue_misuse_is_an_error") else {
        return;
    };
    let mut rng = TestRng::new("epilogue_misuse_is_an_error");
    let (x, _) = common::random_tensor(&mut rng, &[2, 16], DType::F16, 1.0, &device);
    let (odd, _) = common::random_tensor(&mut rng, &[7, 16], DType::F16, 1.0, &device);
    let gated = Epilogue {
        activation: OutputActivation::SiluGate,
        addend: None,
    };
    assert!(cuda::gemm::linear_with_epilogue(&x, &odd, None, gated).is_err());
    let (wide, _) = common::random_tensor(&mut rng, &[9, 16], DType::F16, 1.0, &device);
    assert!(cuda::gemm::linear_with_epilogue(&wide, &odd, None, Epilogue::default()).is_err());
    let (addend, _) = common::random_tensor(&mut rng, &[2, 6], DType::F16, 1.0, &device);
    let with_addend = Epilogue {
        activation: OutputActivation::Identity,
        addend: Some(&addend),
    };
    assert!(cuda::gemm::linear_with_epilogue(&x, &odd, None, with_addend).is_err());
}

#[test]
fn paired_products_match_two_products_and_a_sum() {
    let Some(device) = common::gpu_or_skip("paired_products_match_two_products_and_a_sum") else {
        return;
    };
    let mut rng = TestRng::new("paired_products_match_two_products_and_a_sum");
    for dtype in FLOAT_DTYPES {
        for m in [1, 3, 8] {
            // (k, k2, n): unequal widths, odd ones (the scalar loop on one side only), and the
            // GPT-NeoX shape (k2 = 4k) at small width.
            for (k, k2, n) in [
                (64, 256, 67),
                (67, 256, 7),
                (256, 67, 130),
                (1000, 4000, 515),
            ] {
                let (x, x_host) = common::random_tensor(&mut rng, &[m, k], dtype, 1.0, &device);
                let (w, w_host) = common::random_tensor(&mut rng, &[n, k], dtype, 0.1, &device);
                let (b, b_host) = common::random_tensor(&mut rng, &[n], DType::F32, 1.0, &device);
                let (x2, x2_host) = common::random_tensor(&mut rng, &[m, k2], dtype, 1.0, &device);
                let (w2, w2_host) = common::random_tensor(&mut rng, &[n, k2], dtype, 0.1, &device);
                let (b2, b2_host) = common::random_tensor(&mut rng, &[n], dtype, 1.0, &device);
                let (a, a_host) = common::random_tensor(&mut rng, &[m, n], dtype, 1.0, &device);
                for (with_biases, with_addend) in [(false, false), (true, false), (true, true)] {
                    let what = format!(
                        "{dtype} m {m} k {k} k2 {k2} n {n} biases {with_biases} addend {with_addend}"
                    );
                    common::poison_pool(&device, m * n * dtype.size_in_bytes());
                    let out = cuda::gemm::linear_pair(
                        (&x, &w, with_biases.then_some(&b)),
                        (&x2, &w2, with_biases.then_some(&b2)),
                        with_addend.then_some(&a),
                    )
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(out.dims(), &[m, n][..], "{what}");
                    let first = cpu_linear(
                        &x_host,
                        m,
                        k,
                        &w_host,
                        n,
                        with_biases.then_some(&b_host[..]),
                    );
                    let second = cpu_linear(
                        &x2_host,
                        m,
                        k2,
                        &w2_host,
                        n,
                        with_biases.then_some(&b2_host[..]),
                    );
                    let expected: Vec<f32> = (0..m * n)
                        .map(|i| first[i] + second[i] + if with_addend { a_host[i] } else { 0.0 })
                        .collect();
                    common::assert_close(&what, &common::download(&out), &expected, dtype);
                }
            }
        }
    }
    // Products whose outputs or rows differ are refused.
    let (x, _) = common::random_tensor(&mut rng, &[2, 16], DType::F16, 1.0, &device);
    let (w, _) = common::random_tensor(&mut rng, &[6, 16], DType::F16, 1.0, &device);
    let (w7, _) = common::random_tensor(&mut rng, &[7, 16], DType::F16, 1.0, &device);
    let (x3, _) = common::random_tensor(&mut rng, &[3, 16], DType::F16, 1.0, &device);
    assert!(cuda::gemm::linear_pair((&x, &w, None), (&x, &w7, None), None).is_err());
    assert!(cuda::gemm::linear_pair((&x, &w, None), (&x3, &w, None), None).is_err());
}

#[test]
fn side_by_side_products_match_each_alone() {
    let Some(device) = common::gpu_or_skip("side_by_side_products_match_each_alone") else {
        return;
    };
    let mut rng = TestRng::new("side_by_side_products_match_each_alone");
    for dtype in FLOAT_DTYPES {
        for m in [1, 5] {
            // (k, n) of each product: one gated, one with GELU, odd sizes on either side.
            for ((ka, na), (kb, nb)) in [((64, 67), (64, 130)), ((67, 7), (256, 515))] {
                let (xa, xa_host) = common::random_tensor(&mut rng, &[m, ka], dtype, 1.0, &device);
                let (wa, wa_host) =
                    common::random_tensor(&mut rng, &[2 * na, ka], dtype, 0.1, &device);
                let (ba, ba_host) =
                    common::random_tensor(&mut rng, &[2 * na], DType::F32, 1.0, &device);
                let (xb, xb_host) = common::random_tensor(&mut rng, &[m, kb], dtype, 1.0, &device);
                let (wb, wb_host) = common::random_tensor(&mut rng, &[nb, kb], dtype, 0.1, &device);
                let (ab, ab_host) = common::random_tensor(&mut rng, &[m, nb], dtype, 1.0, &device);
                let what = format!("{dtype} m {m} a ({ka}, {na}) b ({kb}, {nb})");
                common::poison_pool(&device, m * (na + nb) * 4);
                let a = cuda::gemm::LinearJob {
                    x: &xa,
                    w: &wa,
                    bias: Some(&ba),
                    epilogue: Epilogue {
                        activation: OutputActivation::SiluGate,
                        addend: None,
                    },
                };
                let b = cuda::gemm::LinearJob {
                    x: &xb,
                    w: &wb,
                    bias: None,
                    epilogue: Epilogue {
                        activation: OutputActivation::Gelu,
                        addend: Some(&ab),
                    },
                };
                let (out_a, out_b) =
                    cuda::gemm::linear_side_by_side(a, b).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!((out_a.dims(), out_b.dims()), (&[m, na][..], &[m, nb][..]));
                let expected_a = cpu_epilogue(
                    (&xa_host, m, ka),
                    (&wa_host, 2 * na),
                    Some(&ba_host),
                    OutputActivation::SiluGate,
                    None,
                );
                let expected_b = cpu_epilogue(
                    (&xb_host, m, kb),
                    (&wb_host, nb),
                    None,
                    OutputActivation::Gelu,
                    Some(&ab_host),
                );
                common::assert_close(&what, &common::download(&out_a), &expected_a, dtype);
                common::assert_close(&what, &common::download(&out_b), &expected_b, dtype);
            }
        }
    }
    // Products in two dtypes cannot share a launch.
    let (x16, _) = common::random_tensor(&mut rng, &[1, 16], DType::F16, 1.0, &device);
    let (w16, _) = common::random_tensor(&mut rng, &[4, 16], DType::F16, 1.0, &device);
    let (x32, _) = common::random_tensor(&mut rng, &[1, 16], DType::F32, 1.0, &device);
    let (w32, _) = common::random_tensor(&mut rng, &[4, 16], DType::F32, 1.0, &device);
    let job = |x, w| cuda::gemm::LinearJob {
        x,
        w,
        bias: None,
        epilogue: Epilogue::default(),
    };
    assert!(cuda::gemm::linear_side_by_side(job(&x16, &w16), job(&x32, &w32)).is_err());
}
