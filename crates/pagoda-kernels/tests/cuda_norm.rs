//! RMSNorm / LayerNorm kernels, plain and fused with the residual add, against the CPU oracles
//! in `cpu::norm` (the fused forms against the CPU add followed by the CPU norm).
#![cfg(feature = "cuda")]

mod common;

use common::{FLOAT_DTYPES, TestRng};
use pagoda_kernels::{Error, cpu, cuda};
use pagoda_tensor::{CudaDevice, DType, Tensor};

/// (rows, hidden): odd widths take the scalar path, multiples of 8 the vector path; 4097 and
/// 8192 exceed one element per thread of a 1024-thread block, and 20000 exceeds what a block
/// keeps in registers (2 vectors of 8 per thread), so part of its row is re-read.
const CASES: [(usize, usize); 10] = [
    (1, 1),
    (3, 3),
    (5, 67),
    (2, 129),
    (67, 64),
    (3, 1000),
    (2, 4096),
    (1, 4097),
    (2, 8192),
    (2, 20000),
];

const EPS: f32 = 1e-5;

/// The weight dtypes the kernels take for activations of `dtype`.
fn weight_dtypes(dtype: DType) -> Vec<DType> {
    if dtype == DType::F32 {
        vec![DType::F32]
    } else {
        vec![dtype, DType::F32]
    }
}

struct Inputs {
    x: Tensor,
    x_host: Vec<f32>,
    residual_host: Vec<f32>,
    weight: Tensor,
    weight_host: Vec<f32>,
    bias: Tensor,
    bias_host: Vec<f32>,
}

fn inputs(
    rng: &mut TestRng,
    device: &CudaDevice,
    dtype: DType,
    w_dtype: DType,
    rows: usize,
    hidden: usize,
) -> Inputs {
    let (x, x_host) = common::random_tensor(rng, &[rows, hidden], dtype, 4.0, device);
    // An offset mean, so that LayerNorm's variance must be taken around it.
    let residual_host = common::rounded(
        &rng.uniform(rows * hidden, 3.0)
            .iter()
            .map(|v| v + 8.0)
            .collect::<Vec<_>>(),
        dtype,
    );
    let (weight, weight_host) = common::random_tensor(rng, &[hidden], w_dtype, 2.0, device);
    let (bias, bias_host) = common::random_tensor(rng, &[hidden], w_dtype, 1.0, device);
    Inputs {
        x,
        x_host,
        residual_host,
        weight,
        weight_host,
        bias,
        bias_host,
    }
}

fn cpu_rms(x: &[f32], hidden: usize, weight: &[f32]) -> Vec<f32> {
    let mut out = vec![f32::NAN; x.len()];
    cpu::norm::rms_norm(x, hidden, weight, EPS, &mut out).unwrap();
    out
}

fn cpu_layer(x: &[f32], hidden: usize, weight: &[f32], bias: &[f32]) -> Vec<f32> {
    let mut out = vec![f32::NAN; x.len()];
    cpu::norm::layer_norm(x, hidden, weight, bias, EPS, &mut out).unwrap();
    out
}

/// The CPU residual add: the sum in f32, rounded to the residual's dtype as stored.
fn cpu_add(x: &[f32], residual: &[f32], dtype: DType) -> Vec<f32> {
    common::rounded(
        &x.iter()
            .zip(residual)
            .map(|(a, b)| a + b)
            .collect::<Vec<_>>(),
        dtype,
    )
}

#[test]
fn norms_match_the_cpu_oracle() {
    let Some(device) = common::gpu_or_skip("norms_match_the_cpu_oracle") else {
        return;
    };
    let mut rng = TestRng::new("norms_match_the_cpu_oracle");
    for dtype in FLOAT_DTYPES {
        for w_dtype in weight_dtypes(dtype) {
            for (rows, hidden) in CASES {
                let what = |op: &str| format!("{op} {dtype} weight {w_dtype} [{rows}, {hidden}]");
                let inp = inputs(&mut rng, &device, dtype, w_dtype, rows, hidden);
                let out_bytes = rows * hidden * dtype.size_in_bytes();

                common::poison_pool(&device, out_bytes);
                let out = cuda::norm::rms_norm(&inp.x, &inp.weight, EPS).unwrap();
                assert_eq!(out.dims(), &[rows, hidden]);
                assert_eq!(out.dtype(), dtype);
                let expected = cpu_rms(&inp.x_host, hidden, &inp.weight_host);
                common::assert_close(&what("rms_norm"), &common::download(&out), &expected, dtype);

                common::poison_pool(&device, out_bytes);
                let out = cuda::norm::layer_norm(&inp.x, &inp.weight, &inp.bias, EPS).unwrap();
                let expected = cpu_layer(&inp.x_host, hidden, &inp.weight_host, &inp.bias_host);
                common::assert_close(
                    &what("layer_norm"),
                    &common::download(&out),
                    &expected,
                    dtype,
                );

                let new_residual = cpu_add(&inp.x_host, &inp.residual_host, dtype);

                let mut residual =
                    common::upload(&inp.residual_host, &[rows, hidden], dtype, &device);
                common::poison_pool(&device, out_bytes);
                let out =
                    cuda::norm::add_rms_norm(&inp.x, &mut residual, &inp.weight, EPS).unwrap();
                common::assert_close(
                    &what("add_rms_norm residual"),
                    &common::download(&residual),
                    &new_residual,
                    dtype,
                );
                let expected = cpu_rms(&new_residual, hidden, &inp.weight_host);
                common::assert_close(
                    &what("add_rms_norm"),
                    &common::download(&out),
                    &expected,
                    dtype,
                );

                let mut residual =
                    common::upload(&inp.residual_host, &[rows, hidden], dtype, &device);
                common::poison_pool(&device, out_bytes);
                let out =
                    cuda::norm::add_layer_norm(&inp.x, &mut residual, &inp.weight, &inp.bias, EPS)
                        .unwrap();
                common::assert_close(
                    &what("add_layer_norm residual"),
                    &common::download(&residual),
                    &new_residual,
                    dtype,
                );
                let expected = cpu_layer(&new_residual, hidden, &inp.weight_host, &inp.bias_host);
                common::assert_close(
                    &what("add_layer_norm"),
                    &common::download(&out),
                    &expected,
                    dtype,
                );
            }
        }
    }
}

#[test]
fn views_at_unaligned_offsets_and_leading_dimensions_work() {
    let Some(device) = common::gpu_or_skip("views_at_unaligned_offsets") else {
        return;
    };
    let mut rng = TestRng::new("views_at_unaligned_offsets");
    let (rows, hidden) = (3, 256);
    for dtype in FLOAT_DTYPES {
        // One element of padding in front: contiguous, but not 16-byte aligned.
        let (flat, flat_host) =
            common::random_tensor(&mut rng, &[1 + rows * hidden], dtype, 2.0, &device);
        let x = flat
            .narrow(0, 1, rows * hidden)
            .unwrap()
            .reshape(vec![1, rows, hidden])
            .unwrap();
        let (weight, weight_host) = common::random_tensor(&mut rng, &[hidden], dtype, 2.0, &device);
        let out = cuda::norm::rms_norm(&x, &weight, EPS).unwrap();
        assert_eq!(out.dims(), &[1, rows, hidden]);
        let expected = cpu_rms(&flat_host[1..], hidden, &weight_host);
        common::assert_close(
            &format!("unaligned rms_norm {dtype}"),
            &common::download(&out),
            &expected,
            dtype,
        );
    }
}

#[test]
fn bad_arguments_are_errors() {
    let Some(device) = common::gpu_or_skip("bad_arguments_are_errors") else {
        return;
    };
    let mut rng = TestRng::new("bad_arguments_are_errors");
    let (x, _) = common::random_tensor(&mut rng, &[4, 8], DType::F16, 1.0, &device);
    let (weight, _) = common::random_tensor(&mut rng, &[8], DType::F16, 1.0, &device);
    let (short_weight, _) = common::random_tensor(&mut rng, &[7], DType::F16, 1.0, &device);
    let (bf16_weight, _) = common::random_tensor(&mut rng, &[8], DType::BF16, 1.0, &device);

    let err = cuda::norm::rms_norm(&common::non_contiguous(&x), &weight, EPS).unwrap_err();
    assert!(matches!(err, Error::NotContiguous { .. }), "{err:?}");
    let err = cuda::norm::rms_norm(&x, &short_weight, EPS).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err:?}");
    let err = cuda::norm::rms_norm(&x, &bf16_weight, EPS).unwrap_err();
    assert!(matches!(err, Error::DType { .. }), "{err:?}");
    let err = cuda::norm::rms_norm(&x, &weight, f32::NAN).unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err:?}");
    let host_weight = Tensor::from_slice(&[1.0f32; 8], 8).unwrap();
    let err = cuda::norm::rms_norm(&x, &host_weight, EPS).unwrap_err();
    assert!(matches!(err, Error::Device { .. }), "{err:?}");
    // A residual that shares storage with another tensor cannot be updated in place.
    let mut shared = x.clone();
    let err = cuda::norm::add_rms_norm(&x, &mut shared, &weight, EPS).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err:?}");
}

#[test]
fn host_tensors_are_refused_without_a_gpu() {
    let x = Tensor::from_slice(&[1.0f32, 2.0], vec![1, 2]).unwrap();
    let weight = Tensor::from_slice(&[1.0f32, 1.0], 2).unwrap();
    let err = cuda::norm::rms_norm(&x, &weight, EPS).unwrap_err();
    assert!(
        matches!(err, Error::Device { op: "rms_norm", .. }),
        "{err:?}"
    );
}

#[test]
fn dual_layer_norm_matches_two_cpu_layer_norms() {
    let Some(device) = common::gpu_or_skip("dual_layer_norm_matches_two_cpu_layer_norms") else {
        return;
    };
    let mut rng = TestRng::new("dual_layer_norm_matches_two_cpu_layer_norms");
    for dtype in FLOAT_DTYPES {
        for w_dtype in weight_dtypes(dtype) {
            for (rows, hidden) in CASES {
                let what = |part: &str| {
                    format!(
                        "add_layer_norm_dual {part} {dtype} weight {w_dtype} [{rows}, {hidden}]"
                    )
                };
                let inp = inputs(&mut rng, &device, dtype, w_dtype, rows, hidden);
                let (weight2, weight2_host) =
                    common::random_tensor(&mut rng, &[hidden], w_dtype, 2.0, &device);
                let (bias2, bias2_host) =
                    common::random_tensor(&mut rng, &[hidden], w_dtype, 1.0, &device);
                let mut residual =
                    common::upload(&inp.residual_host, &[rows, hidden], dtype, &device);
                common::poison_pool(&device, 2 * rows * hidden * dtype.size_in_bytes());
                let (first, second) = cuda::norm::add_layer_norm_dual(
                    &inp.x,
                    &mut residual,
                    (&inp.weight, &inp.bias),
                    (&weight2, &bias2),
                    EPS,
                )
                .unwrap_or_else(|e| panic!("{}: {e}", what("")));
                let new_residual = cpu_add(&inp.x_host, &inp.residual_host, dtype);
                common::assert_close(
                    &what("residual"),
                    &common::download(&residual),
                    &new_residual,
                    dtype,
                );
                let expected = cpu_layer(&new_residual, hidden, &inp.weight_host, &inp.bias_host);
                common::assert_close(&what("first"), &common::download(&first), &expected, dtype);
                let expected = cpu_layer(&new_residual, hidden, &weight2_host, &bias2_host);
                common::assert_close(
                    &what("second"),
                    &common::download(&second),
                    &expected,
                    dtype,
                );
            }
        }
    }
}
