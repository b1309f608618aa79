//! CUDA device memory through cudarc: a registry of one context and stream per
//! device ordinal, and byte buffers with host<->device copies.

use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaGraph, CudaSlice, CudaStream, DriverError, PinnedHostSlice};

use crate::{DType, Error, Result};

/// One CUDA device: its primary context and the stream all copies are queued on.
///
/// Cheap to clone; [`CudaDevice::get`] hands out the same context and stream
/// for an ordinal every time.
#[derive(Clone, Debug)]
pub struct CudaDevice {
    ordinal: usize,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

/// Devices created so far, indexed by ordinal.
static DEVICES: Mutex<Vec<Option<CudaDevice>>> = Mutex::new(Vec::new());

fn driver_error(context: impl std::fmt::Display, err: DriverError) -> Error {
    Error::Cuda(format!("{context}: {err}"))
}

/// Lets the device's stream-ordered memory pool keep what is freed instead of returning it to the
/// driver at every synchronisation. Without it each engine step (which synchronises to read its
/// tokens) would unmap and map its activation buffers again, costing milliseconds per step.
fn keep_freed_memory(context: &CudaContext, ordinal: usize) -> Result<()> {
    use cudarc::driver::sys;
    let mut pool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    context
        .bind_to_thread()
        .map_err(|e| driver_error(format_args!("binding cuda:{ordinal}"), e))?;
    // SAFETY: the context is current on this thread; `pool` receives the device's default pool,
    // which lives as long as the device, and the attribute takes a pointer to a u64.
    let status = unsafe {
        let status = sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device());
        if status == sys::CUresult::CUDA_SUCCESS {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        } else {
            status
        }
    };
    match status {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        // Devices without memory pools allocate synchronously; nothing to keep.
        sys::CUresult::CUDA_ERROR_NOT_SUPPORTED => Ok(()),
        other => Err(Error::Cuda(format!(
            "cuda:{ordinal}: configuring the memory pool: {other:?}"
        ))),
    }
}

impl CudaDevice {
    /// The device of `ordinal`, created on first use.
    pub fn get(ordinal: usize) -> Result<CudaDevice> {
        // A poisoned lock only means another thread panicked mid-insert; the
        // vector itself is always valid.
        let mut devices = DEVICES.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(Some(device)) = devices.get(ordinal) {
            return Ok(device.clone());
        }
        let device = Self::create(ordinal)?;
        if devices.len() <= ordinal {
            devices.resize(ordinal + 1, None);
        }
        devices[ordinal] = Some(device.clone());
        Ok(device)
    }

    fn create(ordinal: usize) -> Result<CudaDevice> {
        // cudarc panics if the driver library is missing when first used; ask
        // first so that a machine without a GPU gets an error instead.
        // SAFETY: this only tries to open the library with `dlopen`.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Cuda(format!(
                "cuda:{ordinal}: the CUDA driver library (libcuda) was not found"
            )));
        }
        let count =
            CudaContext::device_count().map_err(|e| driver_error("counting CUDA devices", e))?;
        if usize::try_from(count).is_ok_and(|count| ordinal >= count) {
            return Err(Error::Cuda(format!(
                "cuda:{ordinal} requested but only {count} device(s) exist"
            )));
        }
        let context = CudaContext::new(ordinal)
            .map_err(|e| driver_error(format_args!("creating context on cuda:{ordinal}"), e))?;
        keep_freed_memory(&context, ordinal)?;
        // SAFETY: all work of a device runs on its one stream (kernels, copies, cuBLAS), so stream
        // order alone puts every read after the write it depends on; per-buffer events would only
        // add two event objects to every allocation and a record to every launch.
        unsafe { context.disable_event_tracking() };
        // A stream of our own rather than the legacy default stream, which cannot be captured
        // into a CUDA graph.
        let stream = context
            .new_stream()
            .map_err(|e| driver_error(format_args!("creating a stream on cuda:{ordinal}"), e))?;
        Ok(CudaDevice {
            ordinal,
            context,
            stream,
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's primary context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    /// The stream that allocations and copies of this crate are queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Blocks until all work queued on the device's stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error(format_args!("synchronizing cuda:{}", self.ordinal), e))
    }

    /// Records the work that `record` queues on the device's stream as a CUDA graph instead of
    /// running it, and returns the graph with `record`'s result.
    ///
    /// Nothing runs while recording: the graph does the work each time it is replayed, with the
    /// same kernels, arguments and buffer addresses. So everything a replay reads must live in
    /// buffers that outlast the graph and are rewritten in place between replays, and every
    /// buffer allocated while recording must be dropped before `record` returns (the graph then
    /// allocates and frees it itself, at fixed addresses, on each replay). Anything that
    /// synchronises the stream or copies from pageable host memory fails the capture; the
    /// error is returned and the stream is usable again.
    pub fn capture<R, E: From<Error>>(
        &self,
        record: impl FnOnce() -> std::result::Result<R, E>,
    ) -> std::result::Result<(DeviceGraph, R), E> {
        let ordinal = self.ordinal;
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| {
                driver_error(
                    format_args!("starting a graph capture on cuda:{ordinal}"),
                    e,
                )
            })?;
        let recorded = record();
        // The capture ends whatever `record` did, so that a failure leaves a usable stream.
        let graph = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| driver_error(format_args!("instantiating a graph on cuda:{ordinal}"), e));
        let value = recorded?;
        let graph = graph?.ok_or_else(|| {
            Error::Cuda(format!(
                "cuda:{ordinal}: the graph capture recorded nothing"
            ))
        })?;
        graph
            .upload()
            .map_err(|e| driver_error(format_args!("uploading a graph to cuda:{ordinal}"), e))?;
        Ok((DeviceGraph { graph, ordinal }, value))
    }
}

/// Work recorded by [`CudaDevice::capture`], replayed on the device's stream with one launch.
pub struct DeviceGraph {
    graph: CudaGraph,
    ordinal: usize,
}

impl DeviceGraph {
    /// Queues the recorded work once more; returns without waiting for it.
    pub fn replay(&self) -> Result<()> {
        self.graph.launch().map_err(|e| {
            driver_error(
                format_args!("replaying a graph on cuda:{}", self.ordinal),
                e,
            )
        })
    }
}

impl std::fmt::Debug for DeviceGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceGraph")
            .field("ordinal", &self.ordinal)
            .finish_non_exhaustive()
    }
}

/// Page-locked host memory for a device buffer that is rewritten from the host often (the
/// per-step metadata of a forward pass): its uploads are asynchronous DMA copies, which a CUDA
/// graph's inputs need and which pageable memory cannot give.
pub struct PinnedUpload {
    host: PinnedHostSlice<u8>,
    device: CudaDevice,
}

impl PinnedUpload {
    /// Staging room for `bytes` bytes.
    pub fn new(device: &CudaDevice, bytes: usize) -> Result<Self> {
        // SAFETY: the memory starts uninitialised; it is zeroed below, before anything reads it or
        // copies it to the device.
        let mut host = unsafe { device.context.alloc_pinned::<u8>(bytes.max(1)) }.map_err(|e| {
            driver_error(
                format_args!(
                    "allocating {bytes} pinned bytes for cuda:{}",
                    device.ordinal
                ),
                e,
            )
        })?;
        host.as_mut_slice()
            .map_err(|e| driver_error("waiting for a pinned buffer", e))?
            .fill(0);
        Ok(Self {
            host,
            device: device.clone(),
        })
    }

    /// Capacity in bytes.
    pub fn len(&self) -> usize {
        self.host.len()
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }

    /// Copies `bytes` into the staging memory, then queues the copy of the whole staging memory
    /// to the start of `dst` (on the same device, at least [`Self::len`] bytes long; bytes past
    /// `bytes` carry whatever earlier uploads left there). Waits first for the previous upload to
    /// have left the staging memory, which in a loop of synchronised steps it already has.
    pub fn upload(&mut self, bytes: &[u8], dst: &mut CudaStorage) -> Result<()> {
        let capacity = self.host.len();
        let dst_bytes = dst.len * dst.dtype.size_in_bytes();
        if bytes.len() > capacity || capacity > dst_bytes {
            return Err(Error::Cuda(format!(
                "uploading {} bytes through {capacity} pinned bytes into {dst_bytes} device bytes",
                bytes.len()
            )));
        }
        if dst.device.ordinal != self.device.ordinal {
            return Err(Error::Cuda(format!(
                "pinned memory of cuda:{} cannot upload to cuda:{}",
                self.device.ordinal, dst.device.ordinal
            )));
        }
        let host = self
            .host
            .as_mut_slice()
            .map_err(|e| driver_error("waiting for a pinned buffer", e))?;
        host[..bytes.len()].copy_from_slice(bytes);
        let ordinal = self.device.ordinal;
        let mut view = dst.slice.slice_mut(..capacity);
        self.device
            .stream
            .memcpy_htod(&self.host, &mut view)
            .map_err(|e| {
                driver_error(
                    format_args!("uploading {capacity} bytes to cuda:{ordinal}"),
                    e,
                )
            })
    }
}

/// Device memory holding elements of one dtype, as raw bytes.
///
/// Kernels reinterpret the bytes as their element type (see
/// [`CudaSlice::transmute`]); keeping one untyped buffer type lets a tensor
/// change dtype without a separate storage variant per type.
pub struct CudaStorage {
    /// At least one byte, even for empty tensors: CUDA rejects zero-size allocations.
    slice: CudaSlice<u8>,
    len: usize,
    dtype: DType,
    device: CudaDevice,
}

impl CudaStorage {
    fn byte_len(dtype: DType, len: usize) -> Result<usize> {
        len.checked_mul(dtype.size_in_bytes())
            .ok_or(Error::Cuda(format!(
                "{len} elements of {dtype} overflow the address space"
            )))
    }

    /// `len` zero elements of `dtype` on `device`.
    pub fn zeros(device: &CudaDevice, dtype: DType, len: usize) -> Result<Self> {
        let bytes = Self::byte_len(dtype, len)?;
        let slice = device.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(|e| {
            driver_error(
                format_args!("allocating {bytes} bytes on cuda:{}", device.ordinal),
                e,
            )
        })?;
        Ok(CudaStorage {
            slice,
            len,
            dtype,
            device: device.clone(),
        })
    }

    /// Copies little-endian host bytes holding elements of `dtype` to `device`.
    pub fn from_host_bytes(device: &CudaDevice, dtype: DType, bytes: &[u8]) -> Result<Self> {
        if !bytes.len().is_multiple_of(dtype.size_in_bytes()) {
            return Err(Error::BadByteLength {
                dtype,
                len: bytes.len(),
            });
        }
        let len = bytes.len() / dtype.size_in_bytes();
        if bytes.is_empty() {
            return Self::zeros(device, dtype, 0);
        }
        let slice = device.stream.clone_htod(bytes).map_err(|e| {
            driver_error(
                format_args!("copying {} bytes to cuda:{}", bytes.len(), device.ordinal),
                e,
            )
        })?;
        Ok(CudaStorage {
            slice,
            len,
            dtype,
            device: device.clone(),
        })
    }

    /// Wraps device memory produced elsewhere (e.g. a kernel's output);
    /// `slice` must hold at least `len` elements of `dtype`.
    pub fn from_slice(
        device: &CudaDevice,
        dtype: DType,
        len: usize,
        slice: CudaSlice<u8>,
    ) -> Result<Self> {
        let bytes = Self::byte_len(dtype, len)?;
        if slice.len() < bytes {
            return Err(Error::StorageTooSmall {
                needed: len,
                len: slice.len() / dtype.size_in_bytes(),
            });
        }
        Ok(CudaStorage {
            slice,
            len,
            dtype,
            device: device.clone(),
        })
    }

    /// Copies elements `range` back to host memory as raw bytes.
    pub fn to_host_bytes(&self, range: Range<usize>) -> Result<Vec<u8>> {
        if range.start > range.end || range.end > self.len {
            return Err(Error::StorageTooSmall {
                needed: range.end,
                len: self.len,
            });
        }
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let size = self.dtype.size_in_bytes();
        let view = self.slice.slice(range.start * size..range.end * size);
        let ordinal = self.device.ordinal;
        let bytes = self.device.stream.clone_dtoh(&view).map_err(|e| {
            driver_error(
                format_args!("copying {} bytes from cuda:{ordinal}", range.len() * size),
                e,
            )
        })?;
        // A copy into pageable memory has completed when it returns, but an
        // explicit sync also surfaces errors of earlier asynchronous work here.
        self.device.synchronize()?;
        Ok(bytes)
    }

    /// Queues a copy of `src`'s elements `src_range` to elements `dst_start..` of this buffer
    /// (same dtype, same device); returns without waiting for it.
    pub fn copy_from(
        &mut self,
        dst_start: usize,
        src: &CudaStorage,
        src_range: Range<usize>,
    ) -> Result<()> {
        if src.dtype != self.dtype || src.device.ordinal != self.device.ordinal {
            return Err(Error::Cuda(format!(
                "copying {} on cuda:{} into {} on cuda:{}",
                src.dtype, src.device.ordinal, self.dtype, self.device.ordinal
            )));
        }
        let count = src_range.end.saturating_sub(src_range.start);
        let dst_end = dst_start.saturating_add(count);
        if src_range.start > src_range.end || src_range.end > src.len || dst_end > self.len {
            return Err(Error::Cuda(format!(
                "copying elements {src_range:?} of {} to {dst_start}.. of {}",
                src.len, self.len
            )));
        }
        if count == 0 {
            return Ok(());
        }
        let size = self.dtype.size_in_bytes();
        let from = src
            .slice
            .slice(src_range.start * size..src_range.end * size);
        let mut to = self.slice.slice_mut(dst_start * size..dst_end * size);
        self.device.stream.memcpy_dtod(&from, &mut to).map_err(|e| {
            driver_error(
                format_args!(
                    "copying {} bytes on cuda:{}",
                    count * size,
                    self.device.ordinal
                ),
                e,
            )
        })
    }

    /// Queues a device-to-device copy of this buffer's elements `src_range` to elements
    /// `dst_start..` of the same buffer, as [`slice::copy_within`] does on the host; returns
    /// without waiting for it. The two ranges must not overlap unless they are the same (a copy
    /// onto itself, which queues nothing): the driver's copy has no defined order between them.
    pub fn copy_within(&mut self, src_range: Range<usize>, dst_start: usize) -> Result<()> {
        let count = src_range.end.saturating_sub(src_range.start);
        let dst_end = dst_start.saturating_add(count);
        if src_range.start > src_range.end || src_range.end > self.len || dst_end > self.len {
            return Err(Error::Cuda(format!(
                "copying elements {src_range:?} to {dst_start}.. within {} elements",
                self.len
            )));
        }
        if count == 0 || src_range.start == dst_start {
            return Ok(());
        }
        if src_range.start < dst_end && dst_start < src_range.end {
            return Err(Error::Cuda(format!(
                "copying elements {src_range:?} to {dst_start}..{dst_end}: the ranges overlap"
            )));
        }
        use cudarc::driver::DevicePtrMut;
        let size = self.dtype.size_in_bytes();
        let ordinal = self.device.ordinal;
        let stream = &self.device.stream;
        self.device
            .context
            .bind_to_thread()
            .map_err(|e| driver_error(format_args!("binding cuda:{ordinal}"), e))?;
        let (base, _record) = self.slice.device_ptr_mut(stream);
        // Both ranges are within `len` elements, which the allocation holds.
        let src = base + (src_range.start * size) as u64;
        let dst = base + (dst_start * size) as u64;
        // SAFETY: `src` and `dst` address `count * size` bytes each inside this buffer's
        // allocation (checked above), the ranges do not overlap, and the copy is queued on the
        // device's one stream, after every earlier write to the buffer and before any later read.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, count * size, stream.cu_stream())
        }
        .map_err(|e| {
            driver_error(
                format_args!(
                    "copying {} bytes within a buffer on cuda:{ordinal}",
                    count * size
                ),
                e,
            )
        })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Length in elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ordinal of the device holding the buffer.
    pub fn ordinal(&self) -> usize {
        self.device.ordinal
    }

    /// The device holding the buffer.
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// The device address of the first element: identifies the memory (e.g. to check that a
    /// recorded graph is replayed over the buffers it was recorded with).
    pub fn address(&self) -> u64 {
        use cudarc::driver::DevicePtr;
        let (address, _sync) = self.slice.device_ptr(&self.device.stream);
        address
    }

    /// The device memory (may be longer than `len` elements).
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.slice
    }

    /// The device memory, for kernels that write into it.
    pub fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.slice
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPU 0, or `None` (with a message) when there is none and `PAGODA_REQUIRE_GPU` is not `1`.
    fn gpu(test: &str) -> Option<CudaDevice> {
        match CudaDevice::get(0) {
            Ok(device) => Some(device),
            Err(err) if std::env::var("PAGODA_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
                panic!("{test}: PAGODA_REQUIRE_GPU=1 but no GPU is usable: {err}")
            }
            Err(err) => {
                eprintln!("{test}: skipped: no GPU ({err})");
                None
            }
        }
    }

    fn words(storage: &CudaStorage) -> Vec<u32> {
        storage
            .to_host_bytes(0..storage.len())
            .unwrap()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    #[test]
    fn copy_within_matches_the_host_copy() {
        let Some(device) = gpu("copy_within_matches_the_host_copy") else {
            return;
        };
        let mut host: Vec<u32> = (0..1000).map(|i| i * 7 + 3).collect();
        let bytes: Vec<u8> = host.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut storage = CudaStorage::from_host_bytes(&device, DType::U32, &bytes).unwrap();
        // Forward, backward, adjacent, onto itself and empty, applied in order.
        for (src, dst) in [
            (0..100, 500),
            (450..550, 10),
            (900..1000, 800),
            (5..25, 5),
            (3..3, 999),
        ] {
            host.copy_within(src.clone(), dst);
            storage.copy_within(src, dst).unwrap();
        }
        assert_eq!(words(&storage), host);

        // Past the end (either range), reversed, and overlapping either way.
        let reversed = Range { start: 10, end: 5 };
        for (src, dst) in [
            (0..10, 995),
            (990..1001, 0),
            (reversed, 0),
            (0..10, 5),
            (5..10, 1),
        ] {
            let err = storage.copy_within(src.clone(), dst).unwrap_err();
            assert!(matches!(err, Error::Cuda(_)), "{src:?} -> {dst}: {err}");
        }
        assert_eq!(words(&storage), host, "a refused copy changed the buffer");
    }
}
