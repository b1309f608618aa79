//! GELU, SiLU-and-multiply and add kernels against the CPU oracles in `cpu::activation` (add
//! against the f32 sum rounded to the dtype).
#![cfg(feature = "cuda")]

mod common;

use common::{FLOAT_DTYPES, ODD_SIZES, TestRng};
use pagoda_kernels::{Error, cpu, cuda};
use pagoda_tensor::{CudaDevice, DType, Tensor};

/// Shapes: every odd size flat, a multiple of the vector width, and a 2-D shape.
fn shapes() -> Vec<Vec<usize>> {
    let mut shapes: Vec<Vec<usize>> = ODD_SIZES.iter().map(|&n| vec![n]).collect();
    shapes.push(vec![4096]);
    shapes.push(vec![67, 128]);
    shapes
}

/// A random tensor uniform in `[-scale, scale)` whose first element is close to `scale`.
///
/// The error measure is relative to the largest expected magnitude. A tensor holding only tiny
/// results (GELU of very negative inputs, which f16 keeps only as subnormals) would measure the
/// rounding of those instead of the kernel, so every tensor also holds one full-scale input,
/// and with it a full-scale result.
fn full_scale_tensor(
    rng: &mut TestRng,
    dims: &[usize],
    dtype: DType,
    scale: f32,
    device: &CudaDevice,
) -> (Tensor, Vec<f32>) {
    let mut values = rng.uniform(dims.iter().product(), scale);
    values[0] = 0.99 * scale;
    let values = common::rounded(&values, dtype);
    (common::upload(&values, dims, dtype, device), values)
}

#[test]
fn activations_match_the_cpu_oracle() {
    let Some(device) = common::gpu_or_skip("activations_match_the_cpu_oracle") else {
        return;
    };
    let mut rng = TestRng::new("activations_match_the_cpu_oracle");
    for dtype in FLOAT_DTYPES {
        for dims in shapes() {
            let len: usize = dims.iter().product();
            let bytes = len * dtype.size_in_bytes();
            let what = |op: &str| format!("{op} {dtype} {dims:?}");
            // Wide enough to reach both tails of GELU and the saturation of SiLU.
            let (x, x_host) = full_scale_tensor(&mut rng, &dims, dtype, 12.0, &device);
            let (y, y_host) = full_scale_tensor(&mut rng, &dims, dtype, 3.0, &device);

            for tanh in [false, true] {
                common::poison_pool(&device, bytes);
                let out = cuda::activation::gelu(&x, tanh).unwrap();
                assert_eq!((out.dims(), out.dtype()), (dims.as_slice(), dtype));
                let mut expected = x_host.clone();
                if tanh {
                    cpu::activation::gelu_tanh(&mut expected);
                } else {
                    cpu::activation::gelu_exact(&mut expected);
                }
                common::assert_close(
                    &what(if tanh { "gelu_tanh" } else { "gelu" }),
                    &common::download(&out),
                    &expected,
                    dtype,
                );
            }

            common::poison_pool(&device, bytes);
            let out = cuda::activation::silu_and_mul(&x, &y).unwrap();
            let mut expected = vec![f32::NAN; len];
            cpu::activation::silu_and_mul(&x_host, &y_host, &mut expected).unwrap();
            common::assert_close(
                &what("silu_and_mul"),
                &common::download(&out),
                &expected,
                dtype,
            );

            common::poison_pool(&device, bytes);
            let out = cuda::activation::add(&x, &y).unwrap();
            let expected: Vec<f32> = x_host.iter().zip(&y_host).map(|(a, b)| a + b).collect();
            common::assert_close(&what("add"), &common::download(&out), &expected, dtype);
        }
    }
}

#[test]
fn unaligned_views_take_the_scalar_path() {
    let Some(device) = common::gpu_or_skip("unaligned_views_take_the_scalar_path") else {
        return;
    };
    let mut rng = TestRng::new("unaligned_views_take_the_scalar_path");
    for dtype in FLOAT_DTYPES {
        let (flat, host) = common::random_tensor(&mut rng, &[1025], dtype, 3.0, &device);
        let a = flat.narrow(0, 1, 1024).unwrap();
        let b = flat.narrow(0, 0, 1024).unwrap();
        let out = cuda::activation::add(&a, &b).unwrap();
        let expected: Vec<f32> = host[1..]
            .iter()
            .zip(&host[..1024])
            .map(|(a, b)| a + b)
            .collect();
        common::assert_close(
            &format!("unaligned add {dtype}"),
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
    let (a, _) = common::random_tensor(&mut rng, &[4, 6], DType::F32, 1.0, &device);
    let (b, _) = common::random_tensor(&mut rng, &[4, 5], DType::F32, 1.0, &device);
    let (c, _) = common::random_tensor(&mut rng, &[4, 6], DType::BF16, 1.0, &device);
    assert!(matches!(
        cuda::activation::add(&a, &b).unwrap_err(),
        Error::Shape { .. }
    ));
    assert!(matches!(
        cuda::activation::silu_and_mul(&a, &c).unwrap_err(),
        Error::DType { .. }
    ));
    let err = cuda::activation::gelu(&common::non_contiguous(&a), false).unwrap_err();
    assert!(matches!(err, Error::NotContiguous { .. }), "{err:?}");
    let ids = common::upload_u32(&[1, 2, 3], &device);
    assert!(matches!(
        cuda::activation::gelu(&ids, false).unwrap_err(),
        Error::DType { .. }
    ));
}

#[test]
fn host_tensors_are_refused_without_a_gpu() {
    let x = Tensor::from_slice(&[1.0f32, 2.0], 2).unwrap();
    assert!(matches!(
        cuda::activation::gelu(&x, true).unwrap_err(),
        Error::Device { .. }
    ));
}
