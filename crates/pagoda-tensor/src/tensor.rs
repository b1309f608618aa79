//! The `Tensor` type: shared storage seen through a strided layout.

use std::fmt;
use std::sync::Arc;

use crate::cuda::{CudaDevice, CudaStorage};
use crate::storage::{CpuStorage, Storage};
use crate::{DType, Device, Element, Error, Layout, Result, Shape};

/// An n-dimensional array: a reference-counted [`Storage`] seen through a [`Layout`].
///
/// Cloning is cheap and shares the storage; views (`narrow`, `transpose`,
/// `permute`, `reshape`) share it too and only change the layout.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    layout: Layout,
    dtype: DType,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor{}<{}, {}>",
            self.shape(),
            self.dtype,
            self.device()
        )
    }
}

impl Tensor {
    /// A tensor over `storage` with `layout`, which must stay inside the storage.
    pub fn from_storage(storage: impl Into<Arc<Storage>>, layout: Layout) -> Result<Tensor> {
        let storage = storage.into();
        if layout.required_len() > storage.len() {
            return Err(Error::StorageTooSmall {
                needed: layout.required_len(),
                len: storage.len(),
            });
        }
        let dtype = storage.dtype();
        Ok(Tensor {
            storage,
            layout,
            dtype,
        })
    }

    /// A contiguous tensor taking ownership of `data`; `data.len()` must equal the shape's element count.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.checked_elem_count() != Some(data.len()) {
            return Err(Error::ElementCountMismatch {
                shape,
                len: data.len(),
            });
        }
        let storage = Storage::Cpu(CpuStorage::from_vec(data)?);
        Tensor::from_storage(storage, Layout::contiguous(shape))
    }

    /// A contiguous tensor holding a copy of `data`.
    pub fn from_slice<T: Element>(data: &[T], shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.checked_elem_count() != Some(data.len()) {
            return Err(Error::ElementCountMismatch {
                shape,
                len: data.len(),
            });
        }
        Tensor::from_vec(data.to_vec(), shape)
    }

    /// A contiguous tensor of zeros.
    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        // Allocations larger than isize::MAX bytes abort rather than fail.
        let len = shape
            .checked_elem_count()
            .filter(|n| {
                n.checked_mul(dtype.size_in_bytes())
                    .is_some_and(|b| b <= isize::MAX as usize)
            })
            .ok_or_else(|| Error::ShapeTooLarge {
                shape: shape.clone(),
                dtype,
            })?;
        let storage = match *device {
            Device::Cpu => Storage::Cpu(CpuStorage::zeros(dtype, len)?),
            Device::Cuda(ordinal) => {
                Storage::Cuda(CudaStorage::zeros(&CudaDevice::get(ordinal)?, dtype, len)?)
            }
        };
        Tensor::from_storage(storage, Layout::contiguous(shape))
    }

    /// The size of each dimension.
    pub fn dims(&self) -> &[usize] {
        self.layout.dims()
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        self.layout.shape()
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape().rank()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Where the data lives.
    pub fn device(&self) -> Device {
        self.storage.device()
    }

    /// How logical indices map onto the storage.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The number of elements.
    pub fn elem_count(&self) -> usize {
        self.layout.elem_count()
    }

    /// Whether the elements are dense and row-major in the storage.
    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }

    /// The storage, which may be shared with other tensors and larger than this view.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Mutable access to the storage, if no other tensor shares it.
    pub fn storage_mut(&mut self) -> Result<&mut Storage> {
        Arc::get_mut(&mut self.storage).ok_or(Error::NotMutable {
            reason: "the storage is shared with another tensor",
        })
    }

    fn with_layout(&self, layout: Layout) -> Tensor {
        Tensor {
            storage: Arc::clone(&self.storage),
            layout,
            dtype: self.dtype,
        }
    }

    /// The view of `len` entries of dimension `dim` starting at `start`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        Ok(self.with_layout(self.layout.narrow(dim, start, len)?))
    }

    /// The same elements under a new shape; a view if the tensor is contiguous, else an error.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        Ok(self.with_layout(self.layout.reshape(shape)?))
    }

    /// The view with dimensions `d0` and `d1` swapped.
    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Tensor> {
        Ok(self.with_layout(self.layout.transpose(d0, d1)?))
    }

    /// The view whose dimension `i` is this tensor's dimension `dims[i]`.
    pub fn permute(&self, dims: &[usize]) -> Result<Tensor> {
        Ok(self.with_layout(self.layout.permute(dims)?))
    }

    /// The elements, converted to `dtype`, in a new contiguous host buffer.
    fn to_cpu_storage(&self, dtype: DType) -> Result<CpuStorage> {
        if self.elem_count() == 0 {
            return CpuStorage::zeros(dtype, 0);
        }
        match &*self.storage {
            Storage::Cpu(cpu) => cpu.copy_strided(&self.layout, dtype),
            Storage::Cuda(cuda) => {
                // Copy only the span the view touches, then gather on the host.
                let start = self.layout.offset();
                let bytes = cuda.to_host_bytes(start..self.layout.required_len())?;
                let host = CpuStorage::from_bytes(cuda.dtype(), &bytes)?;
                let local = Layout::new(self.shape().clone(), self.layout.strides().to_vec(), 0)?;
                host.copy_strided(&local, dtype)
            }
        }
    }

    /// A contiguous host tensor on `device` from host elements.
    fn upload(host: CpuStorage, shape: &Shape, device: Device) -> Result<Tensor> {
        let storage = match device {
            Device::Cpu => Storage::Cpu(host),
            Device::Cuda(ordinal) => {
                let device = CudaDevice::get(ordinal)?;
                Storage::Cuda(CudaStorage::from_host_bytes(
                    &device,
                    host.dtype(),
                    host.as_bytes(),
                )?)
            }
        };
        Tensor::from_storage(storage, Layout::contiguous(shape.clone()))
    }

    /// This tensor if it is contiguous, else a contiguous copy on the same device.
    ///
    /// A CUDA tensor is gathered through host memory: this crate has no device kernels.
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        Tensor::upload(
            self.to_cpu_storage(self.dtype)?,
            self.shape(),
            self.device(),
        )
    }

    /// A contiguous copy converted to `dtype` (this tensor itself if it already has it).
    ///
    /// Float-to-float conversions round to nearest; conversions to integers
    /// truncate toward zero and saturate, NaN becoming 0. A CUDA tensor is
    /// converted through host memory: this crate has no device kernels.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        Tensor::upload(self.to_cpu_storage(dtype)?, self.shape(), self.device())
    }

    /// A contiguous copy on `device` (this tensor itself if it is already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if *device == self.device() {
            return Ok(self.clone());
        }
        if let (Device::Cuda(ordinal), Storage::Cpu(cpu), Some(range)) = (
            *device,
            &*self.storage,
            self.layout.contiguous_range().filter(|r| !r.is_empty()),
        ) {
            // Upload straight from the source buffer (possibly a memory map), no staging copy.
            let size = self.dtype.size_in_bytes();
            let bytes = &cpu.as_bytes()[range.start * size..range.end * size];
            let cuda = CudaStorage::from_host_bytes(&CudaDevice::get(ordinal)?, self.dtype, bytes)?;
            return Tensor::from_storage(
                Storage::Cuda(cuda),
                Layout::contiguous(self.shape().clone()),
            );
        }
        Tensor::upload(self.to_cpu_storage(self.dtype)?, self.shape(), *device)
    }

    /// The storage positions of a contiguous tensor's elements. An empty view
    /// may sit past the end of its storage (e.g. `narrow(d, size, 0)`).
    fn element_range(&self) -> std::ops::Range<usize> {
        self.layout.offset()..self.layout.offset() + self.elem_count()
    }

    fn check_host_access<T: Element>(&self, op: &'static str) -> Result<()> {
        if T::DTYPE != self.dtype {
            return Err(Error::DTypeMismatch {
                expected: T::DTYPE,
                got: self.dtype,
            });
        }
        if !self.device().is_cpu() {
            return Err(Error::NotOnCpu {
                op,
                device: self.device(),
            });
        }
        if !self.is_contiguous() {
            return Err(Error::NotContiguous { op });
        }
        Ok(())
    }

    /// The elements of a contiguous CPU tensor of element type `T`, without copying
    /// (also for tensors read in place from a memory-mapped file).
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        self.check_host_access::<T>("as_slice")?;
        let Storage::Cpu(cpu) = &*self.storage else {
            return Err(Error::NotOnCpu {
                op: "as_slice",
                device: self.device(),
            });
        };
        let elements = cpu.as_slice::<T>()?;
        let range = self.element_range();
        if range.is_empty() {
            return Ok(&[]);
        }
        let len = elements.len();
        elements.get(range).ok_or(Error::StorageTooSmall {
            needed: self.layout.required_len(),
            len,
        })
    }

    /// The elements of a contiguous CPU tensor of element type `T`, mutably.
    ///
    /// Fails if the storage is shared with another tensor (clone or view) or
    /// is a read-only memory map.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        self.check_host_access::<T>("as_mut_slice")?;
        let range = self.element_range();
        let needed = self.layout.required_len();
        let device = self.device();
        match self.storage_mut()? {
            Storage::Cpu(_) if range.is_empty() => Ok(&mut []),
            Storage::Cpu(cpu) => {
                let elements = cpu.as_mut_slice::<T>()?;
                let len = elements.len();
                elements
                    .get_mut(range)
                    .ok_or(Error::StorageTooSmall { needed, len })
            }
            Storage::Cuda(_) => Err(Error::NotOnCpu {
                op: "as_mut_slice",
                device,
            }),
        }
    }

    /// A row-major copy of the elements, from any layout and device; the dtype must be `T`.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::DTypeMismatch {
                expected: T::DTYPE,
                got: self.dtype,
            });
        }
        self.to_cpu_storage(T::DTYPE)?.into_vec()
    }

    /// A row-major copy of the elements converted to `f32`, from any layout, device and dtype.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        self.to_cpu_storage(DType::F32)?.into_vec()
    }
}
