//! The embedding gather against `cpu::embedding`, and its zero rows for out-of-range ids.
#![cfg(feature = "cuda")]

mod common;

use common::{FLOAT_DTYPES, TestRng};
use half::{bf16, f16};
use pagoda_kernels::cpu::gemm::Weights;
use pagoda_kernels::{Error, cpu, cuda};
use pagoda_tensor::{DType, Tensor};

fn cpu_embedding(table: &[f32], dtype: DType, hidden: usize, ids: &[u32]) -> Vec<f32> {
    let mut out = vec![f32::NAN; ids.len() * hidden];
    let f16s: Vec<f16> = table.iter().map(|&v| f16::from_f32(v)).collect();
    let bf16s: Vec<bf16> = table.iter().map(|&v| bf16::from_f32(v)).collect();
    let weights = match dtype {
        DType::F16 => Weights::F16(&f16s),
        DType::BF16 => Weights::BF16(&bf16s),
        _ => Weights::F32(table),
    };
    cpu::embedding::embedding(weights, hidden, ids, &mut out).unwrap();
    out
}

#[test]
fn gathers_match_the_cpu_oracle() {
    let Some(device) = common::gpu_or_skip("gathers_match_the_cpu_oracle") else {
        return;
    };
    let mut rng = TestRng::new("gathers_match_the_cpu_oracle");
    for dtype in FLOAT_DTYPES {
        for (vocab, hidden, tokens) in [
            (1, 1, 1),
            (7, 3, 5),
            (50, 67, 129),
            (1000, 576, 67),
            (300, 4096, 3),
            (5, 4097, 4),
        ] {
            let (table, table_host) =
                common::random_tensor(&mut rng, &[vocab, hidden], dtype, 2.0, &device);
            let ids_host = rng.below(tokens, vocab as u32);
            let ids = common::upload_u32(&ids_host, &device);
            common::poison_pool(&device, tokens * hidden * dtype.size_in_bytes());
            let out = cuda::embedding::embedding(&table, &ids).unwrap();
            assert_eq!((out.dims(), out.dtype()), (&[tokens, hidden][..], dtype));
            let expected = cpu_embedding(&table_host, dtype, hidden, &ids_host);
            let actual = common::download(&out);
            // A gather copies bits: it must be exact.
            assert_eq!(
                actual, expected,
                "embedding {dtype} vocab {vocab} hidden {hidden} tokens {tokens}"
            );
        }
    }
}

#[test]
fn out_of_range_ids_give_zero_rows() {
    let Some(device) = common::gpu_or_skip("out_of_range_ids_give_zero_rows") else {
        return;
    };
    let mut rng = TestRng::new("out_of_range_ids_give_zero_rows");
    let (table, table_host) = common::random_tensor(&mut rng, &[4, 16], DType::F16, 2.0, &device);
    let ids = common::upload_u32(&[2, 4, u32::MAX, 0], &device);
    common::poison_pool(&device, 4 * 16 * 2);
    let out = common::download(&cuda::embedding::embedding(&table, &ids).unwrap());
    assert_eq!(&out[..16], &table_host[32..48]);
    assert!(
        out[16..48].iter().all(|&v| v == 0.0),
        "rows of out-of-range ids are zero"
    );
    assert_eq!(&out[48..], &table_host[..16]);
}

#[test]
fn bad_arguments_are_errors() {
    let Some(device) = common::gpu_or_skip("bad_arguments_are_errors") else {
        return;
    };
    let mut rng = TestRng::new("bad_arguments_are_errors");
    let (table, _) = common::random_tensor(&mut rng, &[4, 16], DType::F32, 1.0, &device);
    let (float_ids, _) = common::random_tensor(&mut rng, &[3], DType::F32, 1.0, &device);
    assert!(matches!(
        cuda::embedding::embedding(&table, &float_ids).unwrap_err(),
        Error::DType { .. }
    ));
    let flat = table.reshape(vec![64]).unwrap();
    let ids = common::upload_u32(&[0], &device);
    assert!(matches!(
        cuda::embedding::embedding(&flat, &ids).unwrap_err(),
        Error::Shape { .. }
    ));
    let err = cuda::embedding::embedding(&common::non_contiguous(&table), &ids).unwrap_err();
    assert!(matches!(err, Error::NotContiguous { .. }), "{err:?}");
}

#[test]
fn host_tensors_are_refused_without_a_gpu() {
    let table = Tensor::from_slice(&[1.0f32, 2.0], vec![1, 2]).unwrap();
    let ids = Tensor::from_slice(&[0u32], 1).unwrap();
    assert!(matches!(
        cuda::embedding::embedding(&table, &ids).unwrap_err(),
        Error::Device { .. }
    ));
}
