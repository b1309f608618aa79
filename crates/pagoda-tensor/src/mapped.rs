//! Read-only memory maps of checkpoint files, and tensors that read them in place.

use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

use crate::storage::{CpuStorage, Storage};
use crate::{DType, Error, Layout, Result, Shape, Tensor};

/// Maps `path` read-only.
pub(crate) fn map_file(path: &Path) -> Result<Arc<Mmap>> {
    let io_error = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    // SAFETY: the map is only ever read. As with every memory-mapped reader,
    // another process truncating or rewriting the file while it is mapped is
    // outside what this crate can guard against.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io_error)?;
    Ok(Arc::new(mmap))
}

/// A contiguous CPU tensor over bytes `range` of `mmap`: read in place when
/// the bytes are aligned for `dtype`, otherwise copied once into an owned buffer.
/// The caller has checked that the range lies in the map and matches `shape`.
pub(crate) fn mapped_tensor(
    mmap: &Arc<Mmap>,
    range: Range<usize>,
    dtype: DType,
    shape: Shape,
) -> Result<Tensor> {
    let cpu = match MappedBytes::new(Arc::clone(mmap), range.clone(), dtype) {
        Ok(mapped) => CpuStorage::Mapped(mapped),
        Err(Error::Misaligned { .. }) => {
            let bytes = mmap.get(range.clone()).ok_or(Error::StorageTooSmall {
                needed: range.end,
                len: mmap.len(),
            })?;
            CpuStorage::from_bytes(dtype, bytes)?
        }
        Err(e) => return Err(e),
    };
    Tensor::from_storage(Storage::Cpu(cpu), Layout::contiguous(shape))
}

/// An aligned byte range of a shared memory map, holding elements of one dtype.
#[derive(Clone)]
pub struct MappedBytes {
    mmap: Arc<Mmap>,
    range: Range<usize>,
    dtype: DType,
}

impl MappedBytes {
    /// Wraps `range` of `mmap` as elements of `dtype`.
    ///
    /// Fails with [`Error::Misaligned`] if the range does not start at an
    /// address aligned for `dtype`, or with [`Error::BadByteLength`]
    /// if it is not a whole number of elements; callers copy in the first case.
    pub fn new(mmap: Arc<Mmap>, range: Range<usize>, dtype: DType) -> Result<Self> {
        let size = dtype.size_in_bytes();
        if !range.len().is_multiple_of(size) {
            return Err(Error::BadByteLength {
                dtype,
                len: range.len(),
            });
        }
        let bytes = mmap.get(range.clone()).ok_or(Error::StorageTooSmall {
            needed: range.end / size,
            len: mmap.len() / size,
        })?;
        if bytes.as_ptr().align_offset(size) != 0 {
            return Err(Error::Misaligned {
                dtype,
                offset: range.start,
                align: size,
            });
        }
        Ok(MappedBytes { mmap, range, dtype })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap[self.range.clone()]
    }
}
