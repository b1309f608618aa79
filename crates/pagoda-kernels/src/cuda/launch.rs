//! Launches of a kernel that may start while the kernel before it on the stream is still running
//! (programmatic dependent launch, compute capability 9.0 and later).
//!
//! A kernel whose launch is short next to the kernel before it pays for that launch in full when
//! it waits for the whole grid ahead of it to drain first: the grid is launched, its blocks
//! scheduled and its first instructions issued only after the last block before it exits. A
//! kernel launched through [`DependentLaunch`] is scheduled as soon as every block of the kernel
//! before it has called `allow_dependent_launch()` (common.cuh), so its blocks are already
//! resident when that kernel ends; they wait at `wait_for_prior_kernels()` until it has completed
//! and its writes are visible. Only kernels that make that call before they read anything an
//! earlier kernel wrote, and before they write anything, may be launched this way.
//!
//! `PAGODA_DEPENDENT_LAUNCH=0` makes every launch ordinary, for comparing the two and for ruling
//! the overlap out when debugging.

use std::ffi::c_void;
use std::sync::OnceLock;

use pagoda_tensor::CudaDevice;
use pagoda_tensor::cudarc::driver::sys;
use pagoda_tensor::cudarc::driver::{
    CudaFunction, DevicePtr, DevicePtrMut, DriverError, LaunchConfig,
};

/// Whether the environment allows overlapping launches (it does unless
/// `PAGODA_DEPENDENT_LAUNCH=0`).
pub(crate) fn overlap_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("PAGODA_DEPENDENT_LAUNCH").as_deref() != Ok("0"))
}

/// Whether `device` runs dependent launches: Hopper (compute capability 9.0) or later.
fn device_overlaps(device: &CudaDevice) -> bool {
    device
        .context()
        .compute_capability()
        .is_ok_and(|(major, _)| major >= 9)
}

/// One kernel argument: the address of a value the caller holds, or an index into
/// [`DependentLaunch::addresses`].
enum Arg {
    Value(*mut c_void),
    Address(usize),
}

/// The arguments of one launch of a kernel that waits for its predecessor itself, gathered as
/// cudarc's `launch_builder` gathers them: the driver receives each argument by the address of
/// its value.
pub(crate) struct DependentLaunch<'a> {
    device: &'a CudaDevice,
    function: &'a CudaFunction,
    /// Device addresses of the buffer arguments.
    addresses: Vec<sys::CUdeviceptr>,
    args: Vec<Arg>,
    overlap: bool,
}

impl<'a> DependentLaunch<'a> {
    /// A launch of `function` on `device`'s stream that overlaps the kernel before it when
    /// `overlap` is set, the environment allows it and the device supports it.
    pub fn new(device: &'a CudaDevice, function: &'a CudaFunction, overlap: bool) -> Self {
        Self {
            device,
            function,
            addresses: Vec::new(),
            args: Vec::new(),
            overlap: overlap && overlap_enabled() && device_overlaps(device),
        }
    }

    /// A buffer the kernel reads: it receives the device address.
    pub fn buffer<T>(&mut self, buffer: &impl DevicePtr<T>) -> &mut Self {
        // Event tracking is off on pagoda's contexts (one stream per device orders everything),
        // so the guard has nothing to record.
        let (address, _guard) = buffer.device_ptr(self.device.stream());
        self.push_address(address)
    }

    /// A buffer the kernel writes: it receives the device address.
    pub fn buffer_mut<T>(&mut self, buffer: &mut impl DevicePtrMut<T>) -> &mut Self {
        let (address, _guard) = buffer.device_ptr_mut(self.device.stream());
        self.push_address(address)
    }

    fn push_address(&mut self, address: sys::CUdeviceptr) -> &mut Self {
        self.args.push(Arg::Address(self.addresses.len()));
        self.addresses.push(address);
        self
    }

    /// A by-value argument (a number, a `#[repr(C)]` struct).
    pub fn value<T: Copy>(&mut self, value: &'a T) -> &mut Self {
        self.args
            .push(Arg::Value(std::ptr::from_ref(value) as *mut c_void));
        self
    }

    /// Enqueues the kernel on the device's stream.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and type, every buffer
    /// must hold what the kernel reads and writes for `config`, and the kernel must call
    /// `wait_for_prior_kernels()` before it reads memory an earlier kernel wrote or writes any.
    pub unsafe fn launch(&self, config: LaunchConfig) -> Result<(), DriverError> {
        // Every address is in place now, so pointers into `addresses` stay valid.
        let mut args: Vec<*mut c_void> = self
            .args
            .iter()
            .map(|arg| match *arg {
                Arg::Value(value) => value,
                Arg::Address(index) => {
                    std::ptr::from_ref::<sys::CUdeviceptr>(&self.addresses[index]) as *mut c_void
                }
            })
            .collect();
        self.device.context().bind_to_thread()?;
        let mut attribute = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: Default::default(),
            value: sys::CUlaunchAttributeValue { pad: [0; 64] },
        };
        attribute.value.programmaticStreamSerializationAllowed = 1;
        let launch_config = sys::CUlaunchConfig {
            gridDimX: config.grid_dim.0,
            gridDimY: config.grid_dim.1,
            gridDimZ: config.grid_dim.2,
            blockDimX: config.block_dim.0,
            blockDimY: config.block_dim.1,
            blockDimZ: config.block_dim.2,
            sharedMemBytes: config.shared_mem_bytes,
            hStream: self.device.stream().cu_stream(),
            attrs: if self.overlap {
                &mut attribute
            } else {
                std::ptr::null_mut()
            },
            numAttrs: u32::from(self.overlap),
        };
        // SAFETY: the caller vouches for the arguments (see above); the configuration and the
        // attribute live until the call returns, and the argument values as long as `self`,
        // which borrows them.
        unsafe {
            sys::cuLaunchKernelEx(
                &launch_config,
                self.function.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()
        }
    }
}
