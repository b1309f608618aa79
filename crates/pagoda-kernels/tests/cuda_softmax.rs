//! The CUDA row softmax against the CPU oracle, on every path of the kernel: rows held by one
//! block, by a cluster of 2, 4 or 8 blocks (Hopper), the online form for longer rows, and the
//! streamed form (Hopper: a persistent grid of clusters pipelining rows through shared memory).
#![cfg(feature = "cuda")]

mod common;

use common::{
    FLOAT_DTYPES, TestRng, assert_close, download, gpu_or_skip, non_contiguous, poison_pool,
    random_tensor, rounded, upload,
};
use pagoda_kernels::{Error, cpu, cuda};
use pagoda_tensor::{CudaDevice, DType, Tensor};

/// `softmax_rows` of `values` (`[rows, cols]`, already rounded to `dtype`) on the GPU and on the CPU.
fn gpu_and_cpu(
    device: &pagoda_tensor::CudaDevice,
    values: &[f32],
    rows: usize,
    cols: usize,
    dtype: DType,
) -> (Vec<f32>, Vec<f32>) {
    let x = upload(values, &[rows, cols], dtype, device);
    poison_pool(device, rows * cols * 4);
    let y =
        cuda::softmax::softmax_rows(&x).unwrap_or_else(|e| panic!("{rows} x {cols} {dtype}: {e}"));
    assert_eq!((y.dims(), y.dtype()), (x.dims(), dtype));
    let mut expected = values.to_vec();
    cpu::softmax::softmax_rows(&mut expected, cols).unwrap();
    (download(&y), expected)
}

#[test]
fn matches_the_cpu_on_every_path() {
    let Some(device) = gpu_or_skip("matches_the_cpu_on_every_path") else {
        return;
    };
    let mut rng = TestRng::new("matches_the_cpu_on_every_path");
    // One block (e8, e16, e32), clusters of 2 and 4 (Hopper), and the online form, which before
    // Hopper also takes every row past 32768 columns.
    let shapes = [
        (67, 1),
        (5, 3),
        (9, 67),
        (4, 129),
        (3, 1000),
        (3, 4096),
        (3, 4097),
        (2, 16384),
        (2, 16385),
        (2, 40_000),
        (2, 100_003),
        (1, 200_000),
        (2, 262_144),
        (2, 300_001),
    ];
    for dtype in FLOAT_DTYPES {
        for (rows, cols) in shapes {
            let (_, values) = random_tensor(&mut rng, &[rows, cols], dtype, 8.0, &device);
            let (actual, expected) = gpu_and_cpu(&device, &values, rows, cols, dtype);
            assert_close(
                &format!("softmax {rows} x {cols} {dtype}"),
                &actual,
                &expected,
                dtype,
            );
        }
    }
}

#[test]
fn every_form_matches_the_cpu() {
    let Some(device) = gpu_or_skip("every_form_matches_the_cpu") else {
        return;
    };
    let mut rng = TestRng::new("every_form_matches_the_cpu");
    let clusters = cuda::softmax::clusters_available(&device).unwrap();
    // Row lengths that leave every form a ragged last word, thread and block.
    for cols in [1, 13, 4099, 33_333] {
        for dtype in FLOAT_DTYPES {
            let rows = 3;
            let (x, values) = random_tensor(&mut rng, &[rows, cols], dtype, 8.0, &device);
            let mut expected = values.clone();
            cpu::softmax::softmax_rows(&mut expected, cols).unwrap();
            for form in cuda::softmax::candidate_forms(cols, dtype, clusters) {
                poison_pool(&device, rows * cols * 4);
                let y = cuda::softmax::softmax_rows_with(&x, form)
                    .unwrap_or_else(|e| panic!("{form:?} {cols} {dtype}: {e}"));
                assert_close(
                    &format!("{form:?} {rows} x {cols} {dtype}"),
                    &download(&y),
                    &expected,
                    dtype,
                );
            }
        }
    }
    // A form that cannot hold the row is an error, not a partial result.
    let (x, _) = random_tensor(&mut rng, &[1, 9000], DType::F16, 8.0, &device);
    let one_block = cuda::softmax::SoftmaxForm::Held {
        blocks: 1,
        per_thread: 8,
    };
    assert!(cuda::softmax::softmax_rows_with(&x, one_block).is_err());
}

/// The GPU when it has clusters and bulk copies (Hopper), which the streamed forms need; `None`
/// after printing why the test skips.
fn hopper_or_skip(test: &str) -> Option<CudaDevice> {
    let device = gpu_or_skip(test)?;
    if !cuda::softmax::clusters_available(&device).unwrap() {
        eprintln!("{test}: skipped: needs compute capability 9.0+");
        return None;
    }
    Some(device)
}

/// The streamed forms among `candidate_forms`.
fn streamed_forms(cols: usize, dtype: DType) -> Vec<cuda::softmax::SoftmaxForm> {
    cuda::softmax::candidate_forms(cols, dtype, true)
        .into_iter()
        .filter(|form| matches!(form, cuda::softmax::SoftmaxForm::Streamed { .. }))
        .collect()
}

#[test]
fn every_streamed_form_matches_the_cpu() {
    let Some(device) = hopper_or_skip("every_streamed_form_matches_the_cpu") else {
        return;
    };
    let mut rng = TestRng::new("every_streamed_form_matches_the_cpu");
    // Rows of whole 16-byte words (multiples of 8 columns suit every dtype): fewer columns than
    // blocks have words (blocks without any), ragged last segments, rows too long for one held
    // block; row counts below and past one row per cluster, and enough rows per cluster (2000
    // short rows) that every block reuses each of its stages several times.
    let shapes = [
        (1, 8),
        (3, 24),
        (17, 264),
        (2000, 264),
        (33, 4104),
        (3, 33_336),
        (17, 100_000),
        (1, 128_256),
        (3, 128_256),
    ];
    for dtype in FLOAT_DTYPES {
        for (rows, cols) in shapes {
            let forms = streamed_forms(cols, dtype);
            assert!(!forms.is_empty(), "{rows} x {cols} {dtype}");
            let (x, values) = random_tensor(&mut rng, &[rows, cols], dtype, 8.0, &device);
            let mut expected = values.clone();
            cpu::softmax::softmax_rows(&mut expected, cols).unwrap();
            for form in forms {
                poison_pool(&device, rows * cols * 4);
                let y = cuda::softmax::softmax_rows_with(&x, form)
                    .unwrap_or_else(|e| panic!("{form:?} {rows} x {cols} {dtype}: {e}"));
                assert_close(
                    &format!("{form:?} {rows} x {cols} {dtype}"),
                    &download(&y),
                    &expected,
                    dtype,
                );
            }
        }
    }
}

#[test]
fn streamed_forms_keep_masked_large_and_undefined_rows() {
    let Some(device) = hopper_or_skip("streamed_forms_keep_masked_large_and_undefined_rows") else {
        return;
    };
    let mut rng = TestRng::new("streamed_forms_keep_masked_large_and_undefined_rows");
    let rows = 7;
    for dtype in FLOAT_DTYPES {
        for cols in [264, 33_336, 128_256] {
            let mut values = rounded(&rng.uniform(rows * cols, 4.0), dtype);
            let row = |r: usize| r * cols..(r + 1) * cols;
            // Row 0: leading -inf entries (whole blocks of them) and a scattering of them.
            for (i, v) in values[row(0)].iter_mut().enumerate() {
                if i < cols / 2 || i % 7 == 3 {
                    *v = f32::NEG_INFINITY;
                }
            }
            // Row 1: logits far above 88, where exp would overflow without the max subtracted.
            for v in &mut values[row(1)] {
                *v = rounded(&[*v + 1000.0], dtype)[0];
            }
            // Row 2: all -inf. Row 3: its last eighth -inf but for a NaN at the end, so that
            // with 8 blocks the last block holding columns has a max of -inf and a NaN. Row 4: one +inf. Row 5: one NaN among
            // finite values. Row 6 stays random. Rows 2 to 5 come out as NaN.
            values[row(2)].fill(f32::NEG_INFINITY);
            values[3 * cols + cols * 7 / 8..4 * cols].fill(f32::NEG_INFINITY);
            values[4 * cols - 1] = f32::NAN;
            values[4 * cols + cols / 3] = f32::INFINITY;
            values[5 * cols + cols / 5] = f32::NAN;
            let mut expected = values.clone();
            cpu::softmax::softmax_rows(&mut expected, cols).unwrap();
            let x = upload(&values, &[rows, cols], dtype, &device);
            for form in streamed_forms(cols, dtype) {
                poison_pool(&device, rows * cols * 4);
                let actual = download(&cuda::softmax::softmax_rows_with(&x, form).unwrap());
                for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
                    assert_eq!(
                        a.is_nan(),
                        e.is_nan(),
                        "{form:?} {dtype} {cols}: element {i} is {a}, the CPU's {e}"
                    );
                }
                assert!(
                    actual[row(2).start..row(6).start]
                        .iter()
                        .all(|v| v.is_nan())
                );
                let finite = |v: &[f32]| {
                    v.iter()
                        .map(|&x| if x.is_nan() { 0.0 } else { x })
                        .collect::<Vec<_>>()
                };
                assert_close(
                    &format!("{form:?}: special rows of {cols} {dtype}"),
                    &finite(&actual),
                    &finite(&expected),
                    dtype,
                );
            }
        }
    }
}

#[test]
fn misaligned_inputs_do_not_stream() {
    let Some(device) = hopper_or_skip("misaligned_inputs_do_not_stream") else {
        return;
    };
    let mut rng = TestRng::new("misaligned_inputs_do_not_stream");
    let (rows, cols) = (3, 128_256);
    // A view starting one element into its allocation: rows of whole words, none aligned.
    let (buffer, values) = random_tensor(&mut rng, &[rows * cols + 8], DType::F16, 8.0, &device);
    let x = buffer
        .narrow(0, 1, rows * cols)
        .and_then(|t| t.reshape(&[rows, cols][..]))
        .unwrap();
    let mut expected = values[1..=rows * cols].to_vec();
    cpu::softmax::softmax_rows(&mut expected, cols).unwrap();
    let forms = streamed_forms(cols, DType::F16);
    assert!(!forms.is_empty());
    for form in forms {
        assert!(matches!(
            cuda::softmax::softmax_rows_with(&x, form),
            Err(Error::Shape { .. })
        ));
    }
    let y = cuda::softmax::softmax_rows(&x).unwrap();
    assert_close("misaligned rows", &download(&y), &expected, DType::F16);
}

#[test]
fn masked_large_and_undefined_rows_behave_as_on_the_cpu() {
    let Some(device) = gpu_or_skip("masked_large_and_undefined_rows") else {
        return;
    };
    let mut rng = TestRng::new("masked_large_and_undefined_rows");
    for dtype in FLOAT_DTYPES {
        for cols in [5, 4097, 20_000, 300_000] {
            let mut values = rounded(&rng.uniform(4 * cols, 4.0), dtype);
            // Row 0: leading -inf entries and a scattering of them (causal masks look like this).
            for (i, v) in values[..cols].iter_mut().enumerate() {
                if i < cols / 2 || i % 7 == 3 {
                    *v = f32::NEG_INFINITY;
                }
            }
            // Row 1: logits far above 88, where exp would overflow without the max subtracted.
            for v in &mut values[cols..2 * cols] {
                *v = rounded(&[*v + 1000.0], dtype)[0];
            }
            // Row 2: all -inf, which has no softmax: NaN, as on the CPU. Row 3 stays random.
            values[2 * cols..3 * cols].fill(f32::NEG_INFINITY);

            let (actual, expected) = gpu_and_cpu(&device, &values, 4, cols, dtype);
            for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
                assert_eq!(
                    a.is_nan(),
                    e.is_nan(),
                    "{dtype} {cols}: element {i} is {a}, the CPU's {e}"
                );
            }
            let finite = |v: &[f32]| {
                v.iter()
                    .map(|&x| if x.is_nan() { 0.0 } else { x })
                    .collect::<Vec<_>>()
            };
            assert_close(
                &format!("special rows of {cols} {dtype}"),
                &finite(&actual),
                &finite(&expected),
                dtype,
            );
            assert!(actual[2 * cols..3 * cols].iter().all(|v| v.is_nan()));
        }
    }
}

#[test]
fn higher_rank_inputs_are_rows_of_the_last_dimension() {
    let Some(device) = gpu_or_skip("higher_rank_inputs") else {
        return;
    };
    let mut rng = TestRng::new("higher_rank_inputs");
    let (x, values) = random_tensor(&mut rng, &[2, 3, 50], DType::F32, 5.0, &device);
    let y = cuda::softmax::softmax_rows(&x).unwrap();
    assert_eq!(y.dims(), &[2, 3, 50]);
    let mut expected = values;
    cpu::softmax::softmax_rows(&mut expected, 50).unwrap();
    assert_close("rank 3", &download(&y), &expected, DType::F32);

    let empty = upload(&[], &[0, 7], DType::F16, &device);
    assert_eq!(cuda::softmax::softmax_rows(&empty).unwrap().dims(), &[0, 7]);
}

#[test]
fn bad_inputs_are_errors() {
    let Some(device) = gpu_or_skip("bad_inputs_are_errors") else {
        return;
    };
    let mut rng = TestRng::new("bad_inputs_are_errors");
    let (x, _) = random_tensor(&mut rng, &[4, 6], DType::F16, 1.0, &device);
    assert!(matches!(
        cuda::softmax::softmax_rows(&non_contiguous(&x)),
        Err(Error::NotContiguous { .. })
    ));
    let no_columns = upload(&[], &[3, 0], DType::F32, &device);
    assert!(matches!(
        cuda::softmax::softmax_rows(&no_columns),
        Err(Error::Shape { .. })
    ));
    let on_host = Tensor::from_slice(&[1.0f32, 2.0], 2).unwrap();
    assert!(matches!(
        cuda::softmax::softmax_rows(&on_host),
        Err(Error::Device { .. })
    ));
    let integers = x.to_dtype(DType::U32).unwrap();
    assert!(matches!(
        cuda::softmax::softmax_rows(&integers),
        Err(Error::DType { .. })
    ));
}
