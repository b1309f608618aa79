//! cuBLAS products against `cpu::gemm`: `linear` with and without bias, and the batched matmul.
#![cfg(feature = "cuda")]

mod common;

use common::{FLOAT_DTYPES, TestRng};
use half::bf16;
use pagoda_kernels::cpu::gemm::Weights;
use pagoda_kernels::{Error, cpu, cuda};
use pagoda_tensor::{DType, Tensor};

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

/// (m, k, n): decode (m = 1), odd sizes, and a k past 4096.
const CASES: [(usize, usize, usize); 7] = [
    (1, 1, 1),
    (1, 576, 67),
    (3, 67, 129),
    (67, 128, 3),
    (17, 4097, 33),
    (128, 256, 512),
    (5, 0, 7),
];

#[test]
fn linear_matches_the_cpu_oracle() {
    let Some(device) = common::gpu_or_skip("linear_matches_the_cpu_oracle") else {
        return;
    };
    let mut rng = TestRng::new("linear_matches_the_cpu_oracle");
    for dtype in FLOAT_DTYPES {
        for (m, k, n) in CASES {
            let (x, x_host) = common::random_tensor(&mut rng, &[m, k], dtype, 1.0, &device);
            let (w, w_host) = common::random_tensor(&mut rng, &[n, k], dtype, 1.0, &device);
            let bias_dtypes = if dtype == DType::F32 {
                vec![DType::F32]
            } else {
                vec![dtype, DType::F32]
            };
            common::poison_pool(&device, m * n * dtype.size_in_bytes());
            let out = cuda::gemm::linear(&x, &w, None).unwrap();
            assert_eq!((out.dims(), out.dtype()), (&[m, n][..], dtype));
            let expected = cpu_linear(&x_host, m, k, &w_host, n, None);
            common::assert_close(
                &format!("linear {dtype} ({m},{k},{n})"),
                &common::download(&out),
                &expected,
                dtype,
            );
            for bias_dtype in bias_dtypes {
                let (bias, bias_host) =
                    common::random_tensor(&mut rng, &[n], bias_dtype, 1.0, &device);
                common::poison_pool(&device, m * n * dtype.size_in_bytes());
                let out = cuda::gemm::linear(&x, &w, Some(&bias)).unwrap();
                let expected = cpu_linear(&x_host, m, k, &w_host, n, Some(&bias_host));
                let what = format!("linear {dtype} + {bias_dtype} bias ({m},{k},{n})");
                common::assert_close(&what, &common::download(&out), &expected, dtype);
            }
        }
    }
}

#[test]
fn linear_takes_leading_dimensions_and_half_weights() {
    let Some(device) = common::gpu_or_skip("linear_takes_leading_dimensions") else {
        return;
    };
    let mut rng = TestRng::new("linear_takes_leading_dimensions");
    let (x, x_host) = common::random_tensor(&mut rng, &[2, 3, 64], DType::BF16, 1.0, &device);
    let (w, w_host) = common::random_tensor(&mut rng, &[10, 64], DType::BF16, 1.0, &device);
    let out = cuda::gemm::linear(&x, &w, None).unwrap();
    assert_eq!(out.dims(), &[2, 3, 10]);
    // The oracle again, this time reading the weight as bf16 storage.
    let w_bf16: Vec<bf16> = w_host.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut expected = vec![f32::NAN; 60];
    cpu::gemm::linear(
        &x_host,
        6,
        64,
        Weights::BF16(&w_bf16),
        10,
        None,
        &mut expected,
    )
    .unwrap();
    common::assert_close(
        "linear [2,3,64] bf16",
        &common::download(&out),
        &expected,
        DType::BF16,
    );
}

#[test]
fn batched_matmul_matches_the_cpu_oracle() {
    let Some(device) = common::gpu_or_skip("batched_matmul_matches_the_cpu_oracle") else {
        return;
    };
    let mut rng = TestRng::new("batched_matmul_matches_the_cpu_oracle");
    for dtype in FLOAT_DTYPES {
        for (batch, m, k, n) in [(1, 1, 1, 1), (3, 5, 67, 9), (4, 64, 128, 33), (2, 3, 0, 4)] {
            let (a, a_host) = common::random_tensor(&mut rng, &[batch, m, k], dtype, 1.0, &device);
            let (b, b_host) = common::random_tensor(&mut rng, &[batch, k, n], dtype, 1.0, &device);
            common::poison_pool(&device, batch * m * n * dtype.size_in_bytes());
            let out = cuda::gemm::matmul_strided_batched(&a, &b).unwrap();
            assert_eq!(out.dims(), &[batch, m, n]);
            let mut expected = vec![f32::NAN; batch * m * n];
            for i in 0..batch {
                cpu::gemm::matmul(
                    &a_host[i * m * k..(i + 1) * m * k],
                    &b_host[i * k * n..(i + 1) * k * n],
                    m,
                    k,
                    n,
                    &mut expected[i * m * n..(i + 1) * m * n],
                )
                .unwrap();
            }
            let what = format!("matmul_strided_batched {dtype} ({batch},{m},{k},{n})");
            common::assert_close(&what, &common::download(&out), &expected, dtype);
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let Some(device) = common::gpu_or_skip("bad_arguments_are_errors") else {
        return;
    };
    let mut rng = TestRng::new("bad_arguments_are_errors");
    let (x, _) = common::random_tensor(&mut rng, &[4, 8], DType::F16, 1.0, &device);
    let (w_bad_k, _) = common::random_tensor(&mut rng, &[3, 7], DType::F16, 1.0, &device);
    let (w_f32, _) = common::random_tensor(&mut rng, &[3, 8], DType::F32, 1.0, &device);
    let (w, _) = common::random_tensor(&mut rng, &[3, 8], DType::F16, 1.0, &device);
    let (bias_bad, _) = common::random_tensor(&mut rng, &[4], DType::F16, 1.0, &device);
    assert!(matches!(
        cuda::gemm::linear(&x, &w_bad_k, None).unwrap_err(),
        Error::Shape { .. }
    ));
    assert!(matches!(
        cuda::gemm::linear(&x, &w_f32, None).unwrap_err(),
        Error::DType { .. }
    ));
    assert!(matches!(
        cuda::gemm::linear(&x, &w, Some(&bias_bad)).unwrap_err(),
        Error::Shape { .. }
    ));
    let err = cuda::gemm::linear(&common::non_contiguous(&x), &w, None).unwrap_err();
    assert!(matches!(err, Error::NotContiguous { .. }), "{err:?}");
    let (a, _) = common::random_tensor(&mut rng, &[2, 3, 4], DType::F32, 1.0, &device);
    let (b, _) = common::random_tensor(&mut rng, &[3, 4, 5], DType::F32, 1.0, &device);
    assert!(matches!(
        cuda::gemm::matmul_strided_batched(&a, &b).unwrap_err(),
        Error::Shape { .. }
    ));
}

#[test]
fn host_tensors_are_refused_without_a_gpu() {
    let x = Tensor::from_slice(&[1.0f32, 2.0], vec![1, 2]).unwrap();
    assert!(matches!(
        cuda::gemm::linear(&x, &x, None).unwrap_err(),
        Error::Device { .. }
    ));
}
