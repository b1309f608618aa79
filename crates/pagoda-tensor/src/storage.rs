//! The buffers behind tensors: host vectors, memory-mapped files, device memory.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::cuda::CudaStorage;
use crate::mapped::MappedBytes;
use crate::{DType, Device, Element, Error, Layout, Result};

/// A tensor's buffer, on the host or on a CUDA device.
pub enum Storage {
    /// Host memory.
    Cpu(CpuStorage),
    /// Device memory.
    Cuda(CudaStorage),
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Storage<{}, {}>[{}]",
            self.dtype(),
            self.device(),
            self.len()
        )
    }
}

impl Storage {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }

    /// The device holding the buffer.
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.ordinal()),
        }
    }

    /// Length in elements.
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
            Storage::Cuda(s) => s.len(),
        }
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs `$body` with `$v` bound to the typed vector of an owned [`CpuStorage`];
/// `$mapped` handles the memory-mapped case with `$m` bound to its bytes.
macro_rules! match_owned {
    ($storage:expr, $v:ident => $body:expr, $m:ident => $mapped:expr) => {
        match $storage {
            CpuStorage::F32($v) => $body,
            CpuStorage::F16($v) => $body,
            CpuStorage::BF16($v) => $body,
            CpuStorage::U8($v) => $body,
            CpuStorage::I32($v) => $body,
            CpuStorage::U32($v) => $body,
            CpuStorage::Mapped($m) => $mapped,
        }
    };
}

/// Calls `$f::<T>($args)` with `T` the Rust type of the runtime dtype `$dtype`.
macro_rules! dispatch_dtype {
    ($dtype:expr, $f:ident ( $($args:expr),* )) => {
        match $dtype {
            DType::F32 => $f::<f32>($($args),*),
            DType::F16 => $f::<f16>($($args),*),
            DType::BF16 => $f::<bf16>($($args),*),
            DType::U8 => $f::<u8>($($args),*),
            DType::I32 => $f::<i32>($($args),*),
            DType::U32 => $f::<u32>($($args),*),
        }
    };
}

/// Host memory: a vector of the element type (and so aligned for it), or a
/// byte range of a memory-mapped file that was checked to be aligned.
pub enum CpuStorage {
    /// Owned `f32` elements.
    F32(Vec<f32>),
    /// Owned `f16` elements.
    F16(Vec<f16>),
    /// Owned `bf16` elements.
    BF16(Vec<bf16>),
    /// Owned `u8` elements.
    U8(Vec<u8>),
    /// Owned `i32` elements.
    I32(Vec<i32>),
    /// Owned `u32` elements.
    U32(Vec<u32>),
    /// Elements read in place from a memory-mapped file.
    Mapped(MappedBytes),
}

fn typed_vec<T: Element>(v: Vec<T>) -> Result<CpuStorage> {
    fn cast<T: Element, U: Element>(v: Vec<T>) -> Result<Vec<U>> {
        bytemuck::allocation::try_cast_vec(v).map_err(|_| Error::DTypeMismatch {
            expected: U::DTYPE,
            got: T::DTYPE,
        })
    }
    // `T::DTYPE` names the Rust type, so each cast is a no-op re-labelling of the vector.
    Ok(match T::DTYPE {
        DType::F32 => CpuStorage::F32(cast(v)?),
        DType::F16 => CpuStorage::F16(cast(v)?),
        DType::BF16 => CpuStorage::BF16(cast(v)?),
        DType::U8 => CpuStorage::U8(cast(v)?),
        DType::I32 => CpuStorage::I32(cast(v)?),
        DType::U32 => CpuStorage::U32(cast(v)?),
    })
}

fn zeros_of<T: Element>(len: usize) -> Result<CpuStorage> {
    typed_vec(vec![T::zeroed(); len])
}

fn from_bytes_of<T: Element>(bytes: &[u8]) -> Result<CpuStorage> {
    typed_vec::<T>(bytemuck::pod_collect_to_vec(bytes))
}

/// Converts one element; the branches are on constants and fold away.
fn convert<S: Element, D: Element>(x: S) -> D {
    if S::DTYPE.is_float() && D::DTYPE.is_float() {
        // f32 holds every f16/bf16 value exactly, so this rounds only once.
        D::from_f32(x.to_f32())
    } else {
        // f64 holds every value of every dtype here exactly.
        D::from_f64(x.to_f64())
    }
}

/// Contiguous conversions at least this long are split over the rayon pool
/// (converting a checkpoint on load is the large case).
const PARALLEL_CONVERT_LEN: usize = 1 << 16;

/// Copies the elements of `layout` out of `src` in row-major order, converting each.
fn gather_convert<S: Element, D: Element>(src: &[S], layout: &Layout) -> Vec<D> {
    let blocks = layout.strided_blocks();
    let block_len = blocks.block_len();
    if let Some(range) = layout
        .contiguous_range()
        .filter(|r| r.len() >= PARALLEL_CONVERT_LEN)
        && S::DTYPE != D::DTYPE
    {
        return src[range].par_iter().map(|&x| convert(x)).collect();
    }
    let mut out = Vec::with_capacity(layout.elem_count());
    for start in blocks {
        let run = &src[start..start + block_len];
        if S::DTYPE == D::DTYPE {
            out.extend_from_slice(bytemuck::cast_slice::<S, D>(run));
        } else {
            out.extend(run.iter().map(|&x| convert::<S, D>(x)));
        }
    }
    out
}

fn gather_to<D: Element>(src: &CpuStorage, layout: &Layout) -> Result<CpuStorage> {
    fn run<S: Element, D: Element>(src: &CpuStorage, layout: &Layout) -> Result<Vec<D>> {
        Ok(gather_convert::<S, D>(src.as_slice::<S>()?, layout))
    }
    let converted: Vec<D> = match src.dtype() {
        DType::F32 => run::<f32, D>(src, layout)?,
        DType::F16 => run::<f16, D>(src, layout)?,
        DType::BF16 => run::<bf16, D>(src, layout)?,
        DType::U8 => run::<u8, D>(src, layout)?,
        DType::I32 => run::<i32, D>(src, layout)?,
        DType::U32 => run::<u32, D>(src, layout)?,
    };
    typed_vec(converted)
}

impl CpuStorage {
    /// Takes ownership of a vector.
    pub fn from_vec<T: Element>(data: Vec<T>) -> Result<Self> {
        typed_vec(data)
    }

    /// `len` zero elements of `dtype`.
    pub fn zeros(dtype: DType, len: usize) -> Result<Self> {
        dispatch_dtype!(dtype, zeros_of(len))
    }

    /// Copies raw little-endian bytes into an owned, aligned buffer of `dtype`.
    pub fn from_bytes(dtype: DType, bytes: &[u8]) -> Result<Self> {
        if !bytes.len().is_multiple_of(dtype.size_in_bytes()) {
            return Err(Error::BadByteLength {
                dtype,
                len: bytes.len(),
            });
        }
        dispatch_dtype!(dtype, from_bytes_of(bytes))
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::U8(_) => DType::U8,
            CpuStorage::I32(_) => DType::I32,
            CpuStorage::U32(_) => DType::U32,
            CpuStorage::Mapped(m) => m.dtype(),
        }
    }

    /// Length in elements.
    pub fn len(&self) -> usize {
        self.as_bytes().len() / self.dtype().size_in_bytes()
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the elements are read in place from a memory-mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self, CpuStorage::Mapped(_))
    }

    /// The elements as raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match_owned!(self, v => bytemuck::cast_slice(v), m => m.bytes())
    }

    /// The elements as a slice of `T`, which must match the dtype.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        if T::DTYPE != self.dtype() {
            return Err(Error::DTypeMismatch {
                expected: T::DTYPE,
                got: self.dtype(),
            });
        }
        bytemuck::try_cast_slice(self.as_bytes()).map_err(|_| Error::Misaligned {
            dtype: T::DTYPE,
            offset: 0,
            align: std::mem::align_of::<T>(),
        })
    }

    /// The elements as a mutable slice of `T`; memory-mapped storage is read-only.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        let dtype = self.dtype();
        if T::DTYPE != dtype {
            return Err(Error::DTypeMismatch {
                expected: T::DTYPE,
                got: dtype,
            });
        }
        let bytes: &mut [u8] = match_owned!(
            self,
            v => bytemuck::cast_slice_mut(v.as_mut_slice()),
            _m => return Err(Error::NotMutable { reason: "the storage is a read-only memory map" })
        );
        bytemuck::try_cast_slice_mut(bytes).map_err(|_| Error::Misaligned {
            dtype,
            offset: 0,
            align: std::mem::align_of::<T>(),
        })
    }

    /// Copies the elements selected by `layout` into a new owned buffer in
    /// row-major order, converting them to `dtype`.
    ///
    /// Float-to-float conversions round to nearest; conversions to integer
    /// types truncate toward zero and saturate (NaN becomes 0).
    pub fn copy_strided(&self, layout: &Layout, dtype: DType) -> Result<CpuStorage> {
        if layout.required_len() > self.len() {
            return Err(Error::StorageTooSmall {
                needed: layout.required_len(),
                len: self.len(),
            });
        }
        dispatch_dtype!(dtype, gather_to(self, layout))
    }
}

impl CpuStorage {
    /// The elements as a vector of `T` (no copy for owned storage).
    pub fn into_vec<T: Element>(self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype() {
            return Err(Error::DTypeMismatch {
                expected: T::DTYPE,
                got: self.dtype(),
            });
        }
        let dtype = self.dtype();
        match_owned!(
            self,
            v => bytemuck::allocation::try_cast_vec(v)
                .map_err(|_| Error::DTypeMismatch { expected: T::DTYPE, got: dtype }),
            m => Ok(bytemuck::pod_collect_to_vec(m.bytes()))
        )
    }
}
