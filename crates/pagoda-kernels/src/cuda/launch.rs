//! Kernel launches that may overlap the end of the kernel before them (programmatic dependent
//! launch, compute capability 9.0 and later).
//!
//! A decode step is a few hundred short kernels, and between two of them the GPU drains the
//! first grid before it starts the second: a few microseconds per boundary in which the memory
//! system idles. A kernel launched through [`DependentLaunch`] may be scheduled while the
//! previous kernel of the stream is still finishing; it runs what does not depend on that kernel
//! (address arithmetic, pulling its weights into L2) and then waits at
//! `wait_for_prior_kernels()` (common.cuh) until the previous grid has completed and its writes
//! are visible. Only kernels that make that call before they read activations or write anything
//! may be launched this way; every other kernel keeps the ordinary launch.
//!
//! `PAGODA_DEPENDENT_LAUNCH=0` turns the overlap off (every launch is ordinary), for comparing the
//! two and for ruling it out when debugging.

use std::ffi::c_void;
use std::sync::OnceLock;

use pagoda_tensor::CudaDevice;
use pagoda_tensor::cudarc::driver::sys;
use pagoda_tensor::cudarc::driver::{
    CudaFunction, DevicePtr, DevicePtrMut, DriverError, LaunchConfig,
};

/// Whether launches may overlap: the environment allows it (it does unless
/// `PAGODA_DEPENDENT_LAUNCH=0`) and the device is Hopper or later.
fn overlap_allowed(device: &CudaDevice) -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let enabled =
        *ENABLED.get_or_init(|| std::env::var("PAGODA_DEPENDENT_LAUNCH").as_deref() != Ok("0"));
    enabled
        && device
            .context()
            .compute_capability()
            .is_ok_and(|(major, _)| major >= 9)
}

/// One kernel argument: a value the caller holds, or a buffer's device address held here.
enum Arg {
    Value(*mut c_void),
    /// An index into `DependentLaunch::addresses`.
    Address(usize),
}

/// The arguments of one launch of a kernel that waits for its predecessor itself, gathered like
/// cudarc's `launch_builder`: each argument is passed by the address of its value.
pub(crate) struct DependentLaunch<'a> {
    device: &'a CudaDevice,
    function: &'a CudaFunction,
    /// Device addresses of the buffer arguments.
    addresses: Vec<sys::CUdeviceptr>,
    args: Vec<Arg>,
}

impl<'a> DependentLaunch<'a> {
    pub fn new(device: &'a CudaDevice, function: &'a CudaFunction) -> Self {
        Self {
            device,
            function,
            addresses: Vec::new(),
            args: Vec::new(),
        }
    }

    /// A buffer argument: the kernel receives its device address.
    pub fn buffer<T>(&mut self, buffer: &impl DevicePtr<T>) -> &mut Self {
        // Event tracking is off on pagoda's contexts (one stream per device orders everything),
        // so the guard has nothing to record.
        let (address, _guard) = buffer.device_ptr(self.device.stream());
        self.push_address(address)
    }

    fn push_address(&mut self, address: sys::CUdeviceptr) -> &mut Self {
        self.args.push(Arg::Address(self.addresses.len()));
        self.addresses.push(address);
        self
    }

    /// A buffer the kernel writes: the kernel receives its device address.
    pub fn buffer_mut<T>(&mut self, buffer: &mut impl DevicePtrMut<T>) -> &mut Self {
        let (address, _guard) = buffer.device_ptr_mut(self.device.stream());
        self.push_address(address)
    }

    /// A by-value argument (a number, a device address held as `u64`, a `#[repr(C)]` struct).
    pub fn value<T: Copy>(&mut self, value: &'a T) -> &mut Self {
        self.args
            .push(Arg::Value(std::ptr::from_ref(value) as *mut c_void));
        self
    }

    /// Enqueues the kernel on the device's stream, allowed to overlap the previous kernel when
    /// the device and environment allow it.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and type, every buffer
    /// must hold what the kernel reads and writes for `config`, and the kernel must call
    /// `wait_for_prior_kernels()` before it reads memory an earlier launch wrote or writes
    /// memory at all.
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
        let stream = self.device.stream();
        self.device.context().bind_to_thread()?;
        let mut attribute = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: Default::default(),
            value: sys::CUlaunchAttributeValue { pad: [0; 64] },
        };
        attribute.value.programmaticStreamSerializationAllowed = 1;
        let overlap = overlap_allowed(self.device);
        let launch_config = sys::CUlaunchConfig {
            gridDimX: config.grid_dim.0,
            gridDimY: config.grid_dim.1,
            gridDimZ: config.grid_dim.2,
            blockDimX: config.block_dim.0,
            blockDimY: config.block_dim.1,
            blockDimZ: config.block_dim.2,
            sharedMemBytes: config.shared_mem_bytes,
            hStream: stream.cu_stream(),
            attrs: if overlap {
                &mut attribute
            } else {
                std::ptr::null_mut()
            },
            numAttrs: u32::from(overlap),
        };
        // SAFETY: the caller vouches for the arguments (see above); the configuration and the
        // attribute live until the call returns, and the argument values until then too
        // (`self` borrows them).
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
