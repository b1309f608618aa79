//! Checked access to the device memory behind tensors, shared by every launcher: each check
//! names the op and the argument, so a bad call reads as "rms_norm: weight has dtype u32 ...".

use pagoda_tensor::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use pagoda_tensor::cudarc::driver::{CudaFunction, CudaView, CudaViewMut, DriverError};
use pagoda_tensor::{CudaDevice, CudaStorage, DType, Device, Layout, Shape, Storage, Tensor};

use crate::error::checked_product;
use crate::{Error, Result};

/// The floating dtypes every activation kernel is instantiated for.
pub(crate) const FLOAT_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The suffix a kernel instantiated for `dtype` carries (`rms_norm_f16`), if it is a float type.
pub(crate) fn dtype_suffix(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("f32"),
        DType::F16 => Some("f16"),
        DType::BF16 => Some("bf16"),
        _ => None,
    }
}

/// `<base>_<suffix of dtype>`: the name of `base` instantiated for a float `dtype`.
pub(crate) fn kernel_name(op: &'static str, base: &str, dtype: DType) -> Result<String> {
    let suffix = dtype_suffix(dtype)
        .ok_or_else(|| Error::dtype(op, format!("no {base} kernel for dtype {dtype}")))?;
    Ok(format!("{base}_{suffix}"))
}

/// The CUDA device all `tensors` live on; an error if one is on the host or on another GPU.
pub(crate) fn common_device(op: &'static str, tensors: &[(&str, &Tensor)]) -> Result<CudaDevice> {
    let mut ordinal = None;
    for &(name, tensor) in tensors {
        match (tensor.device(), ordinal) {
            (Device::Cpu, _) => {
                return Err(Error::device(
                    op,
                    format!("{name} is on the CPU; CUDA tensors are needed"),
                ));
            }
            (Device::Cuda(n), None) => ordinal = Some((n, name)),
            (Device::Cuda(n), Some((first, first_name))) if n != first => {
                return Err(Error::device(
                    op,
                    format!("{name} is on cuda:{n} but {first_name} is on cuda:{first}"),
                ));
            }
            (Device::Cuda(_), Some(_)) => {}
        }
    }
    let (ordinal, _) = ordinal.ok_or_else(|| Error::device(op, "no tensor given"))?;
    Ok(CudaDevice::get(ordinal)?)
}

/// Checks that `tensor` has one of the dtypes in `allowed`.
pub(crate) fn expect_dtype(
    op: &'static str,
    name: &str,
    tensor: &Tensor,
    allowed: &[DType],
) -> Result<()> {
    if allowed.contains(&tensor.dtype()) {
        return Ok(());
    }
    let allowed = allowed
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::dtype(
        op,
        format!(
            "{name} has dtype {}, expected one of {allowed}",
            tensor.dtype()
        ),
    ))
}

/// Checks that `tensor` has the dtype `expected` (that of another argument, `other`).
pub(crate) fn expect_same_dtype(
    op: &'static str,
    name: &str,
    tensor: &Tensor,
    other: &str,
    expected: DType,
) -> Result<()> {
    if tensor.dtype() == expected {
        return Ok(());
    }
    Err(Error::dtype(
        op,
        format!(
            "{name} has dtype {} but {other} has {expected}",
            tensor.dtype()
        ),
    ))
}

/// The dimensions of `tensor`, which must have rank `N`: `let [rows, cols] = dims_of(op, "x", &x)?;`.
pub(crate) fn dims_of<const N: usize>(
    op: &'static str,
    name: &str,
    tensor: &Tensor,
) -> Result<[usize; N]> {
    tensor.dims().try_into().map_err(|_| {
        Error::shape(
            op,
            format!("{name} has shape {:?}, expected rank {N}", tensor.dims()),
        )
    })
}

/// Checks that `tensor` has exactly the shape `dims`.
pub(crate) fn expect_dims(
    op: &'static str,
    name: &str,
    tensor: &Tensor,
    dims: &[usize],
) -> Result<()> {
    if tensor.dims() != dims {
        return Err(Error::shape(
            op,
            format!("{name} has shape {:?}, expected {dims:?}", tensor.dims()),
        ));
    }
    Ok(())
}

/// The byte range of a contiguous tensor's elements within its storage.
fn byte_range(op: &'static str, name: &str, tensor: &Tensor) -> Result<std::ops::Range<usize>> {
    if !tensor.is_contiguous() {
        return Err(Error::NotContiguous {
            op,
            name: name.to_owned(),
        });
    }
    let size = tensor.dtype().size_in_bytes();
    let start = tensor.layout().offset() * size;
    Ok(start..start + tensor.elem_count() * size)
}

/// The device memory of a contiguous CUDA tensor, exactly its elements (the view starts at the
/// tensor's offset). Non-contiguous tensors are refused: copying them would hide a slow path.
pub(crate) fn device_view<'t>(
    op: &'static str,
    name: &str,
    tensor: &'t Tensor,
) -> Result<CudaView<'t, u8>> {
    let range = byte_range(op, name, tensor)?;
    match tensor.storage() {
        Storage::Cuda(storage) => Ok(storage.slice().slice(range)),
        Storage::Cpu(_) => Err(Error::device(
            op,
            format!("{name} is on the CPU; a CUDA tensor is needed"),
        )),
    }
}

/// Mutable device memory of a contiguous CUDA tensor whose storage no other tensor shares.
pub(crate) fn device_view_mut<'t>(
    op: &'static str,
    name: &str,
    tensor: &'t mut Tensor,
) -> Result<CudaViewMut<'t, u8>> {
    let range = byte_range(op, name, tensor)?;
    let storage = tensor
        .storage_mut()
        .map_err(|e| Error::shape(op, format!("{name} cannot be written in place: {e}")))?;
    match storage {
        Storage::Cuda(storage) => Ok(storage.slice_mut().slice_mut(range)),
        Storage::Cpu(_) => Err(Error::device(
            op,
            format!("{name} is on the CPU; a CUDA tensor is needed"),
        )),
    }
}

/// Device memory for `dims` elements of `dtype`, left uninitialised: the caller's kernel must
/// write every element before the storage is read.
pub(crate) fn alloc_output(
    op: &'static str,
    device: &CudaDevice,
    dtype: DType,
    dims: &[usize],
) -> Result<CudaStorage> {
    let len = checked_product(op, dims)?;
    let bytes = len.checked_mul(dtype.size_in_bytes()).ok_or_else(|| {
        Error::shape(op, format!("an output of {dims:?} {dtype} overflows usize"))
    })?;
    // SAFETY: `u8` has no invalid bit patterns; callers write the elements before they are read.
    // CUDA rejects zero-size allocations, hence at least one byte.
    let slice = unsafe { device.stream().alloc::<u8>(bytes.max(1)) }.map_err(|e| {
        Error::cuda(
            op,
            format!("allocating {bytes} bytes on cuda:{}: {e}", device.ordinal()),
        )
    })?;
    Ok(CudaStorage::from_slice(device, dtype, len, slice)?)
}

/// Wraps `storage` as a contiguous tensor of shape `dims`.
pub(crate) fn into_tensor(storage: CudaStorage, dims: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        Layout::contiguous(Shape::from(dims.to_vec())),
    )?)
}

/// `value` as a kernel's `u32` argument, or a shape error naming it if it does not fit.
pub(crate) fn arg_u32(op: &'static str, name: &str, value: usize) -> Result<u32> {
    u32::try_from(value).map_err(|_| {
        Error::shape(
            op,
            format!("{name} = {value} exceeds the kernel's 32-bit index range"),
        )
    })
}

/// A failed kernel launch, naming the kernel.
pub(crate) fn launch_error(op: &'static str, kernel: &str, err: DriverError) -> Error {
    Error::cuda(op, format!("launching {kernel}: {err}"))
}

/// The device's SM count (at least one).
pub(crate) fn multiprocessor_count(op: &'static str, device: &CudaDevice) -> Result<usize> {
    let sms = device
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| Error::cuda(op, format!("querying the SM count: {e}")))?;
    Ok(usize::try_from(sms).unwrap_or(1).max(1))
}

/// Lets `kernel` (named `name`) launch with `bytes` of dynamic shared memory: above 48 KB a
/// kernel must opt in.
pub(crate) fn allow_dynamic_shared_memory(
    op: &'static str,
    device: &CudaDevice,
    kernel: &CudaFunction,
    name: &str,
    bytes: usize,
) -> Result<()> {
    let value = i32::try_from(bytes)
        .map_err(|_| Error::shape(op, format!("{name}: {bytes} bytes of shared memory")))?;
    device
        .context()
        .bind_to_thread()
        .and_then(|()| {
            kernel.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                value,
            )
        })
        .map_err(|e| {
            Error::cuda(
                op,
                format!("allowing {name} {bytes} bytes of shared memory: {e}"),
            )
        })
}
