//! CUDA RoPE (GPT-NeoX rotate half, in place) against the CPU oracle.
#![cfg(feature = "cuda")]

mod common;

use common::{
    FLOAT_DTYPES, TestRng, assert_close, download, gpu_or_skip, random_tensor, upload, upload_u32,
};
use pagoda_kernels::cpu::rope::{Llama3RopeScaling, RopeTable};
use pagoda_kernels::cuda::rope::{CudaRopeTable, apply_rope};
use pagoda_kernels::{Error, cpu};
use pagoda_tensor::DType;

const MAX_POSITIONS: usize = 4096;

#[test]
fn matches_the_cpu_including_partial_rotation() {
    let Some(device) = gpu_or_skip("rope_matches_the_cpu") else {
        return;
    };
    let mut rng = TestRng::new("rope_matches_the_cpu");
    let llama3 = Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 1024,
    };
    // (tokens, heads, head_dim, rotary_dim, scaling): full rotation, Pythia's partial one
    // (rotary_pct 0.25 of 80), odd sizes, a single token.
    let cases = [
        (1, 1, 2, 2, None),
        (5, 3, 64, 64, None),
        (7, 4, 80, 20, None),
        (67, 2, 128, 128, Some(llama3)),
        (3, 5, 6, 2, None),
        (129, 1, 10, 6, None),
    ];
    for (tokens, heads, head_dim, rotary_dim, scaling) in cases {
        let table = RopeTable::new(rotary_dim, 10000.0, MAX_POSITIONS, scaling).unwrap();
        let gpu_table = CudaRopeTable::new(&table, &device).unwrap();
        assert_eq!(
            (gpu_table.rotary_dim(), gpu_table.max_positions()),
            (rotary_dim, MAX_POSITIONS)
        );
        let mut positions = rng.below(tokens, MAX_POSITIONS as u32);
        positions[0] = (MAX_POSITIONS - 1) as u32;
        if tokens > 1 {
            positions[1] = 0;
        }
        let positions_gpu = upload_u32(&positions, &device);
        for dtype in FLOAT_DTYPES {
            let (mut x, values) =
                random_tensor(&mut rng, &[tokens, heads, head_dim], dtype, 2.0, &device);
            apply_rope(&mut x, &positions_gpu, &gpu_table).unwrap();
            let mut expected = values.clone();
            cpu::rope::apply_rope(&mut expected, heads, head_dim, &positions, &table).unwrap();
            let what = format!("rope {tokens}x{heads}x{head_dim} rotary {rotary_dim} {dtype}");
            let actual = download(&x);
            assert_close(&what, &actual, &expected, dtype);
            // The dimensions past rotary_dim are untouched, bit for bit.
            for (a, (e, v)) in actual
                .chunks(head_dim)
                .zip(expected.chunks(head_dim).zip(values.chunks(head_dim)))
            {
                assert_eq!(a[rotary_dim..], v[rotary_dim..], "{what}: tail changed");
                assert_eq!(e[rotary_dim..], v[rotary_dim..]);
            }
        }
    }
}

#[test]
fn a_position_outside_the_table_gives_nan_not_a_wrong_rotation() {
    let Some(device) = gpu_or_skip("rope_position_outside_the_table") else {
        return;
    };
    let table = RopeTable::new(4, 10000.0, 8, None).unwrap();
    let gpu_table = CudaRopeTable::new(&table, &device).unwrap();
    let values = [
        1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0,
    ];
    let mut x = upload(&values, &[2, 1, 6], DType::F32, &device);
    apply_rope(&mut x, &upload_u32(&[3, 8], &device), &gpu_table).unwrap();
    let actual = download(&x);
    let mut expected = values[..6].to_vec();
    cpu::rope::apply_rope(&mut expected, 1, 6, &[3], &table).unwrap();
    assert_close("in-table token", &actual[..6], &expected, DType::F32);
    assert!(actual[6..10].iter().all(|v| v.is_nan()), "{actual:?}");
    assert_eq!(actual[10..], [11.0, 12.0]);
}

#[test]
fn bad_inputs_are_errors() {
    let Some(device) = gpu_or_skip("rope_bad_inputs") else {
        return;
    };
    let table =
        CudaRopeTable::new(&RopeTable::new(8, 10000.0, 16, None).unwrap(), &device).unwrap();
    let positions = upload_u32(&[1, 2], &device);
    let mut narrow = upload(&[0.0; 2 * 3 * 6], &[2, 3, 6], DType::F16, &device);
    assert!(
        matches!(
            apply_rope(&mut narrow, &positions, &table),
            Err(Error::Shape { .. })
        ),
        "rotary_dim > head_dim"
    );
    let mut x = upload(&[0.0; 2 * 3 * 8], &[2, 3, 8], DType::F16, &device);
    assert!(matches!(
        apply_rope(&mut x, &upload_u32(&[1], &device), &table),
        Err(Error::Shape { .. })
    ));
    let float_positions = upload(&[1.0, 2.0], &[2], DType::F32, &device);
    assert!(matches!(
        apply_rope(&mut x, &float_positions, &table),
        Err(Error::DType { .. })
    ));
    let mut flat = upload(&[0.0; 16], &[2, 8], DType::F16, &device);
    assert!(matches!(
        apply_rope(&mut flat, &positions, &table),
        Err(Error::Shape { .. })
    ));
    let mut strided = x.transpose(0, 1).unwrap();
    assert!(matches!(
        apply_rope(&mut strided, &upload_u32(&[1, 2, 3], &device), &table),
        Err(Error::NotContiguous { .. })
    ));
    // A tensor sharing its storage (with the view above, then a clone) cannot be rotated in place.
    assert!(apply_rope(&mut x, &positions, &table).is_err());
    drop(strided);
    let shared = x.clone();
    assert!(apply_rope(&mut x, &positions, &table).is_err());
    drop(shared);
    apply_rope(&mut x, &positions, &table).unwrap();
}
