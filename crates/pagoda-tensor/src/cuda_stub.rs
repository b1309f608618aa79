//! Stand-ins for the CUDA types when the crate is built without the `cuda`
//! feature, so that callers need no `#[cfg]`: every operation that would touch
//! a GPU returns [`Error::CudaNotCompiled`], and no value of these types can exist.

use crate::{DType, Error, Result};

/// Uninhabited: proves that code reached through a stub value cannot run.
#[derive(Clone, Copy, Debug)]
enum Never {}

/// A CUDA device handle; cannot be created without the `cuda` feature.
#[derive(Clone, Debug)]
pub struct CudaDevice {
    never: Never,
}

impl CudaDevice {
    /// Always fails with [`Error::CudaNotCompiled`].
    pub fn get(_ordinal: usize) -> Result<CudaDevice> {
        Err(Error::CudaNotCompiled)
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        match self.never {}
    }

    /// Blocks until all work queued on the device's stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        match self.never {}
    }

    /// Records the work `record` queues as a graph (see the CUDA build's documentation).
    pub fn capture<R, E: From<Error>>(
        &self,
        _record: impl FnOnce() -> std::result::Result<R, E>,
    ) -> std::result::Result<(DeviceGraph, R), E> {
        match self.never {}
    }
}

/// Recorded device work; cannot be created without the `cuda` feature.
#[derive(Debug)]
pub struct DeviceGraph {
    never: Never,
}

impl DeviceGraph {
    /// Queues the recorded work once more.
    pub fn replay(&self) -> Result<()> {
        match self.never {}
    }
}

/// Page-locked staging memory; cannot be created without the `cuda` feature.
pub struct PinnedUpload {
    never: Never,
}

impl PinnedUpload {
    /// Always fails with [`Error::CudaNotCompiled`].
    pub fn new(_device: &CudaDevice, _bytes: usize) -> Result<Self> {
        Err(Error::CudaNotCompiled)
    }

    /// Capacity in bytes.
    pub fn len(&self) -> usize {
        match self.never {}
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        match self.never {}
    }

    /// Stages `bytes` and queues their copy into `dst`.
    pub fn upload(&mut self, _bytes: &[u8], _dst: &mut CudaStorage) -> Result<()> {
        match self.never {}
    }
}

/// Device memory; cannot be created without the `cuda` feature.
pub struct CudaStorage {
    never: Never,
}

impl CudaStorage {
    /// Always fails with [`Error::CudaNotCompiled`].
    pub fn zeros(_device: &CudaDevice, _dtype: DType, _len: usize) -> Result<Self> {
        Err(Error::CudaNotCompiled)
    }

    /// Always fails with [`Error::CudaNotCompiled`].
    pub fn from_host_bytes(_device: &CudaDevice, _dtype: DType, _bytes: &[u8]) -> Result<Self> {
        Err(Error::CudaNotCompiled)
    }

    /// Copies elements `range` back to host memory as raw bytes.
    pub fn to_host_bytes(&self, _range: std::ops::Range<usize>) -> Result<Vec<u8>> {
        match self.never {}
    }

    /// Queues a copy of `src`'s elements `src_range` to elements `dst_start..` of this buffer.
    pub fn copy_from(
        &mut self,
        _dst_start: usize,
        _src: &CudaStorage,
        _src_range: std::ops::Range<usize>,
    ) -> Result<()> {
        match self.never {}
    }

    /// Queues a copy of this buffer's elements `src_range` to elements `dst_start..` of itself.
    pub fn copy_within(
        &mut self,
        _src_range: std::ops::Range<usize>,
        _dst_start: usize,
    ) -> Result<()> {
        match self.never {}
    }

    /// The device address of the first element.
    pub fn address(&self) -> u64 {
        match self.never {}
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self.never {}
    }

    /// Length in elements.
    pub fn len(&self) -> usize {
        match self.never {}
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        match self.never {}
    }

    /// The ordinal of the device holding the buffer.
    pub fn ordinal(&self) -> usize {
        match self.never {}
    }

    /// The device holding the buffer.
    pub fn device(&self) -> &CudaDevice {
        match self.never {}
    }
}
