//! Host<->device copies of CUDA tensors. Built only with the `cuda` feature;
//! skipped (with a message) when no CUDA device can be opened.
#![cfg(feature = "cuda")]

use half::{bf16, f16};
use pagoda_tensor::{CudaDevice, DType, Device, Error, Storage, Tensor};

fn gpu() -> Option<Device> {
    match CudaDevice::get(0) {
        Ok(_) => Some(Device::Cuda(0)),
        Err(e) => {
            eprintln!("skipping: no CUDA device ({e})");
            None
        }
    }
}

fn iota(dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    Tensor::from_vec((0..n).map(|i| i as f32).collect::<Vec<_>>(), dims).unwrap()
}

#[test]
fn devices_are_created_once_per_ordinal() {
    let Some(_) = gpu() else { return };
    let a = CudaDevice::get(0).unwrap();
    let b = CudaDevice::get(0).unwrap();
    assert!(std::sync::Arc::ptr_eq(a.context(), b.context()));
    assert!(std::sync::Arc::ptr_eq(a.stream(), b.stream()));
    let err = Tensor::zeros([2], DType::F32, &Device::Cuda(1 << 20)).unwrap_err();
    assert!(matches!(err, Error::Cuda(_)), "{err}");
}

#[test]
fn round_trips_every_dtype() {
    let Some(gpu) = gpu() else { return };
    let host = iota(&[3, 5]);
    for dtype in DType::ALL {
        let t = host.to_dtype(dtype).unwrap();
        let d = t.to_device(&gpu).unwrap();
        assert_eq!(d.device(), gpu);
        assert_eq!(d.dtype(), dtype);
        assert!(matches!(d.storage(), Storage::Cuda(_)));
        assert!(matches!(
            d.as_slice::<f32>(),
            Err(Error::DTypeMismatch { .. }) | Err(Error::NotOnCpu { .. })
        ));
        assert_eq!(
            d.to_vec_f32().unwrap(),
            host.to_vec::<f32>().unwrap(),
            "{dtype}"
        );
        let back = d.to_device(&Device::Cpu).unwrap();
        assert_eq!(back.device(), Device::Cpu);
        assert_eq!(
            back.to_vec_f32().unwrap(),
            host.to_vec::<f32>().unwrap(),
            "{dtype}"
        );
    }
    let h = Tensor::from_slice(&[f16::from_f32(1.5), f16::from_f32(-2.0)], 2).unwrap();
    assert_eq!(
        h.to_device(&gpu).unwrap().to_vec::<f16>().unwrap(),
        h.to_vec::<f16>().unwrap()
    );
    let b = Tensor::from_slice(&[bf16::from_f32(3.0)], 1).unwrap();
    assert_eq!(
        b.to_device(&gpu).unwrap().to_vec::<bf16>().unwrap(),
        b.to_vec::<bf16>().unwrap()
    );
}

#[test]
fn zeros_and_views_on_the_device() {
    let Some(gpu) = gpu() else { return };
    for dtype in DType::ALL {
        let z = Tensor::zeros([4, 3], dtype, &gpu).unwrap();
        assert_eq!(z.to_vec_f32().unwrap(), vec![0.0; 12]);
    }
    let host = iota(&[2, 3, 4]);
    let d = host.to_device(&gpu).unwrap();
    let views = [
        (host.narrow(2, 1, 2).unwrap(), d.narrow(2, 1, 2).unwrap()),
        (host.narrow(0, 1, 1).unwrap(), d.narrow(0, 1, 1).unwrap()),
        (host.transpose(0, 2).unwrap(), d.transpose(0, 2).unwrap()),
        (
            host.permute(&[1, 2, 0]).unwrap(),
            d.permute(&[1, 2, 0]).unwrap(),
        ),
    ];
    for (h, g) in views {
        let expected = h.to_vec::<f32>().unwrap();
        assert_eq!(g.to_vec::<f32>().unwrap(), expected);
        let c = g.contiguous().unwrap();
        assert!(c.is_contiguous());
        assert_eq!(c.device(), gpu);
        assert_eq!(c.to_vec::<f32>().unwrap(), expected);
        let converted = g.to_dtype(DType::BF16).unwrap();
        assert_eq!(converted.device(), gpu);
        assert_eq!(converted.to_vec_f32().unwrap(), expected);
        assert_eq!(
            g.to_device(&Device::Cpu).unwrap().to_vec::<f32>().unwrap(),
            expected
        );
    }
    let empty = Tensor::zeros([0, 3], DType::F16, &gpu).unwrap();
    assert_eq!(empty.to_vec::<f16>().unwrap(), Vec::<f16>::new());
    assert_eq!(
        d.narrow(1, 3, 0).unwrap().to_vec_f32().unwrap(),
        Vec::<f32>::new()
    );
    CudaDevice::get(0).unwrap().synchronize().unwrap();
}
