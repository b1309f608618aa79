//! Views, copies and dtype conversions of CPU tensors, checked against
//! indices computed by hand or by a naive strided walk.

use half::{bf16, f16};
use pagoda_tensor::{DType, Device, Error, Layout, Storage, Tensor};
use proptest::prelude::*;

/// `0, 1, 2, ...` as f32 in the given shape.
fn iota(dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    Tensor::from_vec((0..n).map(|i| i as f32).collect::<Vec<_>>(), dims).unwrap()
}

/// Every element of `layout` read by the definition: for each row-major
/// logical index, `offset + sum(index[d] * stride[d])`.
fn naive_gather(data: &[f32], layout: &Layout) -> Vec<f32> {
    let dims = layout.dims();
    let n: usize = dims.iter().product();
    (0..n)
        .map(|flat| {
            let mut rest = flat;
            let mut pos = layout.offset();
            for d in (0..dims.len()).rev() {
                pos += (rest % dims[d]) * layout.strides()[d];
                rest /= dims[d];
            }
            data[pos]
        })
        .collect()
}

#[test]
fn construction_checks_element_count() {
    let err = Tensor::from_vec(vec![1.0f32; 5], [2, 3]).unwrap_err();
    assert!(
        matches!(err, Error::ElementCountMismatch { len: 5, .. }),
        "{err}"
    );
    let t = Tensor::from_slice(&[1u32, 2, 3, 4, 5, 6], [2, 3]).unwrap();
    assert_eq!(t.dims(), &[2, 3]);
    assert_eq!(t.dtype(), DType::U32);
    assert_eq!(t.device(), Device::Cpu);
    assert_eq!(t.elem_count(), 6);
    let scalar = Tensor::from_vec(vec![7i32], ()).unwrap();
    assert_eq!(scalar.to_vec::<i32>().unwrap(), vec![7]);
    for dtype in DType::ALL {
        let z = Tensor::zeros([3, 2], dtype, &Device::Cpu).unwrap();
        assert_eq!(z.dtype(), dtype);
        assert_eq!(z.to_vec_f32().unwrap(), vec![0.0; 6]);
    }
}

#[test]
fn narrow_transpose_permute_by_hand() {
    let t = iota(&[2, 3, 4]);
    // t[i, j, k] = 12 i + 4 j + k
    let n = t.narrow(2, 1, 2).unwrap();
    assert_eq!(n.dims(), &[2, 3, 2]);
    assert!(!n.is_contiguous());
    assert_eq!(
        n.to_vec::<f32>().unwrap(),
        vec![1., 2., 5., 6., 9., 10., 13., 14., 17., 18., 21., 22.]
    );
    let n0 = t.narrow(0, 1, 1).unwrap();
    assert!(n0.is_contiguous());
    assert_eq!(
        n0.as_slice::<f32>().unwrap(),
        &(12..24).map(|i| i as f32).collect::<Vec<_>>()[..]
    );

    let tr = t.transpose(0, 2).unwrap();
    assert_eq!(tr.dims(), &[4, 3, 2]);
    // tr[k, j, i] = 12 i + 4 j + k
    let v = tr.to_vec::<f32>().unwrap();
    for k in 0..4 {
        for j in 0..3 {
            for i in 0..2 {
                assert_eq!(v[k * 6 + j * 2 + i], (12 * i + 4 * j + k) as f32);
            }
        }
    }

    let p = t.permute(&[1, 2, 0]).unwrap();
    assert_eq!(p.dims(), &[3, 4, 2]);
    // p[j, k, i] = 12 i + 4 j + k
    let v = p.contiguous().unwrap();
    assert!(v.is_contiguous());
    let v = v.as_slice::<f32>().unwrap();
    for j in 0..3 {
        for k in 0..4 {
            for i in 0..2 {
                assert_eq!(v[j * 8 + k * 2 + i], (12 * i + 4 * j + k) as f32);
            }
        }
    }
}

#[test]
fn view_errors() {
    let t = iota(&[2, 3]);
    assert!(matches!(
        t.narrow(2, 0, 1),
        Err(Error::DimOutOfRange {
            dim: 2,
            rank: 2,
            ..
        })
    ));
    assert!(matches!(
        t.narrow(1, 2, 2),
        Err(Error::NarrowOutOfRange { size: 3, .. })
    ));
    assert!(matches!(
        t.narrow(1, usize::MAX, 2),
        Err(Error::NarrowOutOfRange { .. })
    ));
    assert!(matches!(
        t.transpose(0, 5),
        Err(Error::DimOutOfRange { .. })
    ));
    assert!(matches!(
        t.permute(&[0, 0]),
        Err(Error::InvalidPermutation { .. })
    ));
    assert!(matches!(
        t.permute(&[1]),
        Err(Error::InvalidPermutation { .. })
    ));
    assert!(matches!(
        t.reshape([4, 2]),
        Err(Error::ShapeMismatch { .. })
    ));
    let tr = t.transpose(0, 1).unwrap();
    assert!(matches!(
        tr.reshape([6]),
        Err(Error::NotContiguous { op: "reshape" })
    ));
    assert!(matches!(
        tr.as_slice::<f32>(),
        Err(Error::NotContiguous { .. })
    ));
    assert!(matches!(
        t.as_slice::<f16>(),
        Err(Error::DTypeMismatch {
            expected: DType::F16,
            got: DType::F32
        })
    ));
    assert!(matches!(
        t.to_vec::<u32>(),
        Err(Error::DTypeMismatch { .. })
    ));
}

#[test]
fn reshape_and_contiguous_share_storage_when_possible() {
    let t = iota(&[2, 3, 4]);
    let r = t.reshape([6, 4]).unwrap();
    assert_eq!(
        r.as_slice::<f32>().unwrap().as_ptr(),
        t.as_slice::<f32>().unwrap().as_ptr()
    );
    let c = r.contiguous().unwrap();
    assert_eq!(
        c.as_slice::<f32>().unwrap().as_ptr(),
        t.as_slice::<f32>().unwrap().as_ptr()
    );
    // A narrowed-then-reshaped view keeps its offset.
    let tail = t.narrow(0, 1, 1).unwrap().reshape([3, 4]).unwrap();
    assert_eq!(tail.layout().offset(), 12);
    assert_eq!(tail.to_vec::<f32>().unwrap()[0], 12.0);
    let copied = t.transpose(1, 2).unwrap().contiguous().unwrap();
    assert_ne!(
        copied.as_slice::<f32>().unwrap().as_ptr(),
        t.as_slice::<f32>().unwrap().as_ptr()
    );
}

#[test]
fn mutable_access_needs_unshared_owned_storage() {
    let mut t = iota(&[2, 2]);
    t.as_mut_slice::<f32>().unwrap()[3] = 42.0;
    assert_eq!(t.to_vec::<f32>().unwrap(), vec![0., 1., 2., 42.]);
    let view = t.narrow(0, 1, 1).unwrap();
    assert!(matches!(
        t.as_mut_slice::<f32>(),
        Err(Error::NotMutable { .. })
    ));
    drop(view);
    let mut row = t.narrow(0, 1, 1).unwrap();
    drop(t);
    assert_eq!(row.as_mut_slice::<f32>().unwrap(), &mut [2.0, 42.0]);
    assert!(matches!(
        row.as_mut_slice::<u8>(),
        Err(Error::DTypeMismatch { .. })
    ));
    match row.storage_mut().unwrap() {
        Storage::Cpu(cpu) => assert!(!cpu.is_mapped()),
        Storage::Cuda(_) => panic!("expected CPU storage"),
    }
}

#[test]
fn dtype_round_trips() {
    let values = [0.0f32, 1.0, -2.5, 0.375, 1024.0, -61440.0];
    let t = Tensor::from_slice(&values, [2, 3]).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let back = t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(back.to_vec::<f32>().unwrap(), values, "{dtype}");
    }
    let half = t.to_dtype(DType::F16).unwrap();
    assert_eq!(half.to_vec::<f16>().unwrap(), values.map(f16::from_f32));
    let b = Tensor::from_vec(vec![bf16::from_f32(3.0), bf16::from_f32(-0.5)], 2).unwrap();
    assert_eq!(
        b.to_dtype(DType::F16).unwrap().to_vec::<f16>().unwrap(),
        [f16::from_f32(3.0), f16::from_f32(-0.5)]
    );

    // Rounding to nearest: 1 + 2^-11 is halfway between two f16 values and rounds to even.
    let tie = Tensor::from_slice(&[1.0f32 + 2f32.powi(-11)], 1).unwrap();
    assert_eq!(
        tie.to_dtype(DType::F16).unwrap().to_vec_f32().unwrap(),
        [1.0]
    );

    let ints = Tensor::from_slice(&[-3i32, 0, 7, 1 << 20], 4).unwrap();
    let f = ints.to_dtype(DType::F32).unwrap();
    assert_eq!(f.to_vec::<f32>().unwrap(), [-3.0, 0.0, 7.0, 1048576.0]);
    assert_eq!(
        f.to_dtype(DType::I32).unwrap().to_vec::<i32>().unwrap(),
        [-3, 0, 7, 1 << 20]
    );
    // Integer conversions are exact (no f32 detour) and saturate.
    let big = Tensor::from_slice(&[u32::MAX, 16_777_217], 2).unwrap();
    assert_eq!(
        big.to_dtype(DType::I32).unwrap().to_vec::<i32>().unwrap(),
        [i32::MAX, 16_777_217]
    );
    let neg = Tensor::from_slice(&[-1.7f32, 300.0, f32::NAN], 3).unwrap();
    assert_eq!(
        neg.to_dtype(DType::U8).unwrap().to_vec::<u8>().unwrap(),
        [0, 255, 0]
    );
    assert_eq!(
        neg.to_dtype(DType::I32).unwrap().to_vec::<i32>().unwrap(),
        [-1, 300, 0]
    );

    // Conversion follows the view's logical order.
    let m = iota(&[2, 3])
        .transpose(0, 1)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    assert!(m.is_contiguous());
    assert_eq!(m.to_vec::<u32>().unwrap(), [0, 3, 1, 4, 2, 5]);
    assert_eq!(m.to_vec_f32().unwrap(), [0., 3., 1., 4., 2., 5.]);
}

#[test]
fn empty_tensors() {
    let t = Tensor::from_vec(Vec::<f32>::new(), [0, 3]).unwrap();
    assert!(t.is_contiguous());
    assert_eq!(
        t.transpose(0, 1).unwrap().to_vec::<f32>().unwrap(),
        Vec::<f32>::new()
    );
    assert_eq!(t.to_dtype(DType::BF16).unwrap().elem_count(), 0);
    let n = iota(&[2, 3]).narrow(1, 3, 0).unwrap();
    assert_eq!(n.to_vec_f32().unwrap(), Vec::<f32>::new());
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    let err = Tensor::zeros([2], DType::F32, &Device::Cuda(0)).unwrap_err();
    assert!(matches!(err, Error::CudaNotCompiled), "{err}");
    let err = iota(&[2]).to_device(&Device::Cuda(0)).unwrap_err();
    assert!(matches!(err, Error::CudaNotCompiled), "{err}");
    assert_eq!(
        iota(&[2])
            .to_device(&Device::Cpu)
            .unwrap()
            .to_vec_f32()
            .unwrap(),
        [0.0, 1.0]
    );
}

/// A view to take: kind (narrow, transpose, permute) and three random words for its arguments.
type ViewOp = (u8, usize, usize, usize);

/// A random shape and a random chain of views over it.
fn views() -> impl Strategy<Value = (Vec<usize>, Vec<ViewOp>)> {
    (
        prop::collection::vec(1usize..5, 1..5),
        prop::collection::vec(
            (0u8..3, any::<usize>(), any::<usize>(), any::<usize>()),
            0..5,
        ),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn views_match_the_stride_definition((dims, ops) in views()) {
        let base = iota(&dims);
        let data = base.to_vec::<f32>().unwrap();
        let mut t = base.clone();
        for (kind, a, b, c) in ops {
            let rank = t.rank();
            t = match kind {
                0 => {
                    let dim = a % rank;
                    let size = t.dims()[dim];
                    let start = b % (size + 1);
                    let len = c % (size - start + 1);
                    t.narrow(dim, start, len).unwrap()
                }
                1 => t.transpose(a % rank, b % rank).unwrap(),
                _ => {
                    let mut order: Vec<usize> = (0..rank).collect();
                    // A Fisher-Yates shuffle driven by the random words.
                    let mut seed = a ^ b.rotate_left(17) ^ c.rotate_left(31);
                    for i in (1..rank).rev() {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        order.swap(i, (seed >> 33) % (i + 1));
                    }
                    t.permute(&order).unwrap()
                }
            };
            let expected = naive_gather(&data, t.layout());
            prop_assert_eq!(t.to_vec::<f32>().unwrap(), expected.clone());
            let c = t.contiguous().unwrap();
            prop_assert!(c.is_contiguous());
            prop_assert_eq!(c.as_slice::<f32>().unwrap(), &expected[..]);
            prop_assert_eq!(t.to_dtype(DType::BF16).unwrap().to_vec_f32().unwrap(), expected.clone());
            let flat = c.reshape(c.elem_count()).unwrap();
            prop_assert_eq!(flat.to_vec::<f32>().unwrap(), expected);
        }
    }
}

#[test]
fn large_conversions_match_elementwise() {
    // Long enough for the parallel path, with a view that is not.
    let n = 70_000;
    let values: Vec<f32> = (0..n).map(|i| (i as f32 - 35_000.5) * 0.37).collect();
    let t = Tensor::from_slice(&values, [n / 2, 2]).unwrap();
    let expected: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
    assert_eq!(
        t.to_dtype(DType::BF16).unwrap().to_vec::<bf16>().unwrap(),
        expected
    );
    let column: Vec<f16> = values
        .iter()
        .step_by(2)
        .map(|&v| f16::from_f32(v))
        .collect();
    assert_eq!(
        t.narrow(1, 0, 1)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap()
            .to_vec::<f16>()
            .unwrap(),
        column
    );
    let ints: Vec<i32> = values.iter().map(|&v| v as i32).collect();
    assert_eq!(
        t.to_dtype(DType::I32).unwrap().to_vec::<i32>().unwrap(),
        ints
    );
}

#[test]
fn impossible_allocations_are_errors() {
    let err = Tensor::zeros([1 << 62, 4], DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::ShapeTooLarge { .. }), "{err}");
    let err = Tensor::zeros([usize::MAX, 2], DType::U8, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::ShapeTooLarge { .. }), "{err}");
}

#[test]
fn tensors_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Tensor>();
    send_sync::<pagoda_tensor::safetensors::SafeTensors>();
    send_sync::<pagoda_tensor::gguf::GgufFile>();
    assert_eq!(format!("{:?}", iota(&[2, 3])), "Tensor[2, 3]<f32, cpu>");
}
