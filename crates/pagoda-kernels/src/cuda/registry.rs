//! The kernel registry: every `kernels/<name>.cu` embedded in the binary, compiled by NVRTC for
//! the GPU in hand on first use, cached on disk, and loaded at most once per device.
//!
//! A launcher asks for a kernel with [`function`]`(device, KernelModule::Norm, "rms_norm_f16")`.
//! The first request for a module on a device compiles it (or reads the compiled image from the
//! disk cache) and loads it into the device's context; later requests are a table lookup.
//!
//! The disk cache lives in `$PAGODA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/pagoda/kernels`, else
//! `$HOME/.cache/pagoda/kernels`. An entry is keyed by a hash of the source and headers, the
//! target architecture, the compiler options and the NVRTC version, carries a checksum of its
//! payload, and is written to a temporary file and renamed into place, so a reader never sees a
//! half-written entry; an entry that is unreadable or fails its checks is compiled again.

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use pagoda_tensor::CudaDevice;
use pagoda_tensor::cudarc::driver::{CudaFunction, CudaModule};
use pagoda_tensor::cudarc::nvrtc::{Ptx, sys as nvrtc};

use crate::{Error, Result};

/// One `kernels/<name>.cu` source file: a group of kernels compiled and loaded together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelModule {
    /// `kernels/norm.cu`: RMSNorm and LayerNorm, plain and fused with the residual add.
    Norm,
    /// `kernels/activation.cu`: GELU, SiLU-and-multiply, elementwise add, bias broadcast.
    Activation,
    /// `kernels/embedding.cu`: embedding-row gather.
    Embedding,
    /// `kernels/softmax.cu`: row softmax.
    Softmax,
    /// `kernels/rope.cu`: rotary position embedding.
    Rope,
    /// `kernels/kv_write.cu`: writing K/V rows into cache pages.
    KvWrite,
    /// `kernels/paged_attention.cu`: attention over a paged KV cache.
    PagedAttention,
    /// `kernels/sampling.cu`: argmax and filtered sampling.
    Sampling,
    /// `kernels/gemv.cu`: skinny matrix products (a few rows of x against a weight matrix).
    Gemv,
    /// `kernels/flash_attention.cu`: tensor-core attention for prefill over the paged KV cache.
    FlashAttention,
    /// `kernels/nf4.cu`: NF4 weights, decoded or multiplied in their packed form.
    Nf4,
}

/// Our headers, handed to NVRTC by name so that `#include "common.cuh"` resolves without a
/// file system or include path.
const HEADERS: [(&str, &str); 3] = [
    ("common.cuh", include_str!("../../../../kernels/common.cuh")),
    (
        "activation.cuh",
        include_str!("../../../../kernels/activation.cuh"),
    ),
    ("mma.cuh", include_str!("../../../../kernels/mma.cuh")),
];

/// Options every module is compiled with (the target architecture is added per device).
/// `--use_fast_math` is left out on purpose: the kernels are held to the CPU oracles' accuracy.
const OPTIONS: [&str; 1] = ["-std=c++17"];

impl KernelModule {
    /// Every module, in a fixed order.
    pub const ALL: [KernelModule; 11] = [
        KernelModule::Norm,
        KernelModule::Activation,
        KernelModule::Embedding,
        KernelModule::Softmax,
        KernelModule::Rope,
        KernelModule::KvWrite,
        KernelModule::PagedAttention,
        KernelModule::Sampling,
        KernelModule::Gemv,
        KernelModule::FlashAttention,
        KernelModule::Nf4,
    ];

    /// The file stem: the module's source is `kernels/<name>.cu`.
    pub fn name(self) -> &'static str {
        match self {
            KernelModule::Norm => "norm",
            KernelModule::Activation => "activation",
            KernelModule::Embedding => "embedding",
            KernelModule::Softmax => "softmax",
            KernelModule::Rope => "rope",
            KernelModule::KvWrite => "kv_write",
            KernelModule::PagedAttention => "paged_attention",
            KernelModule::Sampling => "sampling",
            KernelModule::Gemv => "gemv",
            KernelModule::FlashAttention => "flash_attention",
            KernelModule::Nf4 => "nf4",
        }
    }

    /// The CUDA C source embedded at build time.
    pub fn source(self) -> &'static str {
        match self {
            KernelModule::Norm => include_str!("../../../../kernels/norm.cu"),
            KernelModule::Activation => include_str!("../../../../kernels/activation.cu"),
            KernelModule::Embedding => include_str!("../../../../kernels/embedding.cu"),
            KernelModule::Softmax => include_str!("../../../../kernels/softmax.cu"),
            KernelModule::Rope => include_str!("../../../../kernels/rope.cu"),
            KernelModule::KvWrite => include_str!("../../../../kernels/kv_write.cu"),
            KernelModule::PagedAttention => include_str!("../../../../kernels/paged_attention.cu"),
            KernelModule::Sampling => include_str!("../../../../kernels/sampling.cu"),
            KernelModule::Gemv => include_str!("../../../../kernels/gemv.cu"),
            KernelModule::FlashAttention => include_str!("../../../../kernels/flash_attention.cu"),
            KernelModule::Nf4 => include_str!("../../../../kernels/nf4.cu"),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for KernelModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kernels/{}.cu", self.name())
    }
}

/// What NVRTC is asked to produce for a device.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// The `--gpu-architecture` value: `sm_90a`, `sm_89`, ... for machine code, `compute_XY` for PTX.
    arch: String,
    /// Whether the output is a CUBIN (machine code for exactly this GPU) or PTX (which the
    /// driver compiles on load; used when this NVRTC predates the GPU).
    cubin: bool,
}

impl Target {
    /// The target for a GPU of compute capability `major.minor`, given the real architectures
    /// this NVRTC can emit machine code for (`None` when it cannot say).
    ///
    /// Machine code for the GPU's own architecture where possible, `sm_90a` on Hopper 9.0 (its
    /// arch-specific instructions: wgmma, setmaxnreg); otherwise PTX for the newest virtual
    /// architecture not above the GPU's, which the driver compiles on load.
    pub fn for_capability(major: u32, minor: u32, supported: Option<&[u32]>) -> Result<Target> {
        let capability = major * 10 + minor;
        let has_machine_code = supported.is_none_or(|archs| archs.contains(&capability));
        if has_machine_code {
            let suffix = if capability == 90 { "a" } else { "" };
            return Ok(Target {
                arch: format!("sm_{capability}{suffix}"),
                cubin: true,
            });
        }
        let newest =
            supported.and_then(|archs| archs.iter().copied().filter(|&a| a <= capability).max());
        match newest {
            Some(arch) => Ok(Target {
                arch: format!("compute_{arch}"),
                cubin: false,
            }),
            None => Err(Error::cuda(
                "load kernels",
                format!("NVRTC cannot target compute capability {major}.{minor}"),
            )),
        }
    }

    /// The target for `device`, from its compute capability and this NVRTC's architectures;
    /// worked out once per device and process (launchers that pick kernels by architecture ask
    /// on every call).
    pub fn for_device(device: &CudaDevice) -> Result<Target> {
        static KNOWN: Mutex<Vec<Option<Target>>> = Mutex::new(Vec::new());
        let ordinal = device.ordinal();
        // A poisoned lock only means another thread panicked; the table itself stays valid.
        if let Some(Some(known)) = KNOWN
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(ordinal)
        {
            return Ok(known.clone());
        }
        let target = Target::detect(device)?;
        let mut known = KNOWN.lock().unwrap_or_else(PoisonError::into_inner);
        if known.len() <= ordinal {
            known.resize(ordinal + 1, None);
        }
        known[ordinal] = Some(target.clone());
        Ok(target)
    }

    fn detect(device: &CudaDevice) -> Result<Target> {
        let (major, minor) = device.context().compute_capability().map_err(|e| {
            Error::cuda(
                "load kernels",
                format!(
                    "reading the compute capability of cuda:{}: {e}",
                    device.ordinal()
                ),
            )
        })?;
        let (Ok(major), Ok(minor)) = (u32::try_from(major), u32::try_from(minor)) else {
            return Err(Error::cuda(
                "load kernels",
                format!("invalid compute capability {major}.{minor}"),
            ));
        };
        let supported = nvrtc_supported_archs()?;
        Target::for_capability(major, minor, supported.as_deref())
    }

    /// The `--gpu-architecture` value.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Whether NVRTC emits machine code (CUBIN) rather than PTX.
    pub fn is_cubin(&self) -> bool {
        self.cubin
    }
}

/// A compiled module: the bytes `cuModuleLoadData` takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelImage {
    /// Machine code for one architecture.
    Cubin(Vec<u8>),
    /// PTX text (without the trailing NUL).
    Ptx(String),
}

impl KernelImage {
    fn into_ptx(self) -> Ptx {
        match self {
            KernelImage::Cubin(bytes) => Ptx::from_binary(bytes),
            KernelImage::Ptx(text) => Ptx::from_src(text),
        }
    }
}

/// Where a [`CompiledModule`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Compiled by NVRTC just now.
    Compiled,
    /// Read from the disk cache.
    DiskCache,
}

/// A module compiled for one target, with where it came from and its cache entry.
#[derive(Debug)]
pub struct CompiledModule {
    /// The compiled code.
    pub image: KernelImage,
    /// Compiled now, or read from disk.
    pub origin: Origin,
    /// The cache entry's path, when a cache directory is in use.
    pub cache_path: Option<PathBuf>,
}

/// The disk cache of compiled modules (or none, when no cache directory is known).
#[derive(Clone, Debug)]
pub struct KernelCache {
    dir: Option<PathBuf>,
}

impl KernelCache {
    /// The cache in `$PAGODA_KERNEL_CACHE`, `$XDG_CACHE_HOME/pagoda/kernels` or
    /// `$HOME/.cache/pagoda/kernels`, the first of these variables that is set and not empty.
    pub fn from_env() -> KernelCache {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let dir = var("PAGODA_KERNEL_CACHE")
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("pagoda").join("kernels")))
            .or_else(|| var("HOME").map(|d| d.join(".cache").join("pagoda").join("kernels")));
        KernelCache { dir }
    }

    /// A cache in `dir` (created when first written).
    pub fn at(dir: impl Into<PathBuf>) -> KernelCache {
        KernelCache {
            dir: Some(dir.into()),
        }
    }

    /// No disk cache: every load compiles.
    pub fn disabled() -> KernelCache {
        KernelCache { dir: None }
    }

    /// The cache directory, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// `module` compiled for `target`: read from the cache when a valid entry exists, else
    /// compiled and stored.
    ///
    /// Failing to write the cache is not an error (the cache only saves time); failing to
    /// compile is, with NVRTC's log.
    pub fn load_or_compile(&self, module: KernelModule, target: &Target) -> Result<CompiledModule> {
        let version = nvrtc_version()?;
        let key = cache_key(module, target, version);
        let path = self
            .dir
            .as_ref()
            .map(|dir| dir.join(entry_file_name(module, target, key)));
        if let Some(image) = path
            .as_deref()
            .and_then(|p| read_entry(p, key, target.cubin))
        {
            return Ok(CompiledModule {
                image,
                origin: Origin::DiskCache,
                cache_path: path,
            });
        }
        let image = compile(module, target)?;
        if let Some(path) = &path {
            // Best effort: a read-only or full disk leaves the kernels working, only slower to start.
            let _ = write_entry(path, key, &image);
        }
        Ok(CompiledModule {
            image,
            origin: Origin::Compiled,
            cache_path: path,
        })
    }
}

/// The process-wide disk cache, located from the environment on first use.
fn process_cache() -> &'static KernelCache {
    static CACHE: OnceLock<KernelCache> = OnceLock::new();
    CACHE.get_or_init(KernelCache::from_env)
}

/// A loaded module and the functions looked up in it so far.
struct LoadedModule {
    module: Arc<CudaModule>,
    functions: HashMap<String, CudaFunction>,
}

/// One device's modules, each loaded on first use. A slot's lock is held while its module
/// compiles, so concurrent first uses compile once, and other modules are not blocked.
struct DeviceModules {
    slots: [Mutex<Option<LoadedModule>>; KernelModule::ALL.len()],
}

/// The module tables of the devices seen so far, indexed by ordinal.
static DEVICE_MODULES: Mutex<Vec<Option<Arc<DeviceModules>>>> = Mutex::new(Vec::new());

fn device_modules(ordinal: usize) -> Arc<DeviceModules> {
    // A poisoned lock only means another thread panicked; the table itself stays valid.
    let mut table = DEVICE_MODULES
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if table.len() <= ordinal {
        table.resize(ordinal + 1, None);
    }
    Arc::clone(table[ordinal].get_or_insert_with(|| {
        Arc::new(DeviceModules {
            slots: std::array::from_fn(|_| Mutex::new(None)),
        })
    }))
}

/// The kernel `name` of `module`, loaded on `device` (compiling the module on first use).
///
/// Errors name the module and kernel: NVRTC failures carry the compiler log
/// ([`Error::Nvrtc`]); a name the module does not define is an [`Error::Cuda`].
pub fn function(device: &CudaDevice, module: KernelModule, name: &str) -> Result<CudaFunction> {
    let modules = device_modules(device.ordinal());
    let mut slot = modules.slots[module.index()]
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let loaded = match &mut *slot {
        Some(loaded) => loaded,
        empty @ None => empty.insert(load_module(device, module)?),
    };
    if let Some(function) = loaded.functions.get(name) {
        return Ok(function.clone());
    }
    let function = loaded.module.load_function(name).map_err(|e| {
        Error::cuda(
            "load kernels",
            format!(
                "kernel `{name}` not found in {module} on cuda:{}: {e}",
                device.ordinal()
            ),
        )
    })?;
    loaded.functions.insert(name.to_owned(), function.clone());
    Ok(function)
}

/// Compiles (or reads from the disk cache) and loads every module of `modules` on `device` that
/// is not loaded yet, each on a thread of its own, so that a server pays for the slowest module
/// once at start-up instead of for every module, one after the other, in its first requests.
/// The first error (in `modules` order) is returned; the modules that loaded stay loaded.
pub fn preload(device: &CudaDevice, modules: &[KernelModule]) -> Result<()> {
    let table = device_modules(device.ordinal());
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = modules
            .iter()
            .map(|&module| {
                let table = &table;
                scope.spawn(move || {
                    let mut slot = table.slots[module.index()]
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    if slot.is_none() {
                        *slot = Some(load_module(device, module)?);
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle.join().unwrap_or_else(|_| {
                    Err(Error::cuda(
                        "load kernels",
                        "a module-loading thread panicked",
                    ))
                })
            })
            .collect()
    });
    results.into_iter().collect()
}

/// Compiles (or reads from the disk cache) and loads `module` into `device`'s context.
fn load_module(device: &CudaDevice, module: KernelModule) -> Result<LoadedModule> {
    let target = Target::for_device(device)?;
    let compiled = process_cache().load_or_compile(module, &target)?;
    let loaded = device
        .context()
        .load_module(compiled.image.into_ptx())
        .map_err(|e| {
            Error::cuda(
                "load kernels",
                format!(
                    "loading {module} ({}) on cuda:{}: {e}",
                    target.arch,
                    device.ordinal()
                ),
            )
        })?;
    Ok(LoadedModule {
        module: loaded,
        functions: HashMap::new(),
    })
}

fn nvrtc_error(what: &str, result: nvrtc::nvrtcResult) -> Error {
    Error::cuda("load kernels", format!("NVRTC {what} failed: {result:?}"))
}

/// Fails instead of letting cudarc panic when libnvrtc cannot be opened.
fn require_nvrtc() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: this only tries to open the library with `dlopen`.
    if *PRESENT.get_or_init(|| unsafe { nvrtc::is_culib_present() }) {
        Ok(())
    } else {
        Err(Error::cuda(
            "load kernels",
            "the NVRTC library (libnvrtc) was not found",
        ))
    }
}

/// NVRTC's `(major, minor)` version (an error when libnvrtc cannot be loaded); part of the
/// cache key, since another compiler may emit other code for the same source.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    require_nvrtc()?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: both pointers are valid for writes of one c_int.
    unsafe { nvrtc::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| nvrtc_error("nvrtcVersion", e.0))?;
    Ok((major, minor))
}

/// The real architectures (`90` for `sm_90`) this NVRTC emits machine code for, or `None` when
/// it cannot list them.
fn nvrtc_supported_archs() -> Result<Option<Vec<u32>>> {
    require_nvrtc()?;
    let mut count: c_int = 0;
    // SAFETY: the pointer is valid for a write of one c_int.
    if unsafe { nvrtc::nvrtcGetNumSupportedArchs(&mut count) }
        .result()
        .is_err()
    {
        return Ok(None);
    }
    let mut archs: Vec<c_int> = vec![0; usize::try_from(count).unwrap_or(0)];
    // SAFETY: `archs` holds the `count` elements NVRTC writes.
    if unsafe { nvrtc::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .is_err()
    {
        return Ok(None);
    }
    Ok(Some(
        archs
            .into_iter()
            .filter_map(|a| u32::try_from(a).ok())
            .collect(),
    ))
}

/// Destroys an NVRTC program on every path out of [`compile`].
struct Program(nvrtc::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed only here.
        let _ = unsafe { nvrtc::nvrtcDestroyProgram(&mut self.0) };
    }
}

fn c_string(what: &str, text: &str) -> Result<CString> {
    CString::new(text)
        .map_err(|_| Error::cuda("load kernels", format!("{what} contains a NUL byte")))
}

fn lossy_string(bytes: &[c_char]) -> String {
    let bytes: Vec<u8> = bytes
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles `module` with NVRTC for `target`.
fn compile(module: KernelModule, target: &Target) -> Result<KernelImage> {
    compile_source(module.name(), module.source(), target)
}

/// Compiles CUDA C `source` (which may include our headers, e.g. `common.cuh`) with the
/// registry's options for `target`; `name` is the module name errors carry.
///
/// The registry compiles the embedded modules through this; it is public for experiments and
/// for testing the compiler path with sources of one's own.
pub fn compile_source(name: &'static str, source: &str, target: &Target) -> Result<KernelImage> {
    compile_program(name, source, target, &[]).map(|(image, _log)| image)
}

/// What ptxas gave one kernel of a module: its registers per thread and the bytes per thread it
/// spilled to local memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelResources {
    pub kernel: String,
    pub registers: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

/// Compiles `module` for `target` (machine code: an `sm_*` target) as the registry does and
/// reports each kernel's registers and spills, from ptxas's own account (`-v`). No GPU is needed:
/// a hot kernel that starts spilling shows here, before anything is timed.
pub fn kernel_resources(module: KernelModule, target: &Target) -> Result<Vec<KernelResources>> {
    if !target.cubin {
        return Err(Error::cuda(
            "kernel_resources",
            format!("{} is a PTX target: ptxas does not run", target.arch),
        ));
    }
    let (_, log) = compile_program(
        module.name(),
        module.source(),
        target,
        &["--ptxas-options=-v"],
    )?;
    Ok(parse_ptxas_resources(&log))
}

/// The per-kernel lines of a ptxas `-v` log: "Compiling entry function 'k'", then "N bytes
/// stack frame, S bytes spill stores, L bytes spill loads" and "Used R registers, ...".
fn parse_ptxas_resources(log: &str) -> Vec<KernelResources> {
    let number_before = |line: &str, unit: &str| -> Option<u32> {
        let end = line.find(unit)?;
        line[..end].split_whitespace().last()?.parse().ok()
    };
    let mut kernels: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or_default().to_owned();
            kernels.push(KernelResources {
                kernel,
                registers: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
            });
        } else if let Some(current) = kernels.last_mut() {
            if line.contains("bytes spill stores") {
                current.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                current.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") {
                current.registers = number_before(line, "registers").unwrap_or(0);
            }
        }
    }
    kernels
}

/// Compiles `source` as [`compile_source`] does, with `extra_options` after the registry's; also
/// returns the compiler's log.
fn compile_program(
    name: &'static str,
    source: &str,
    target: &Target,
    extra_options: &[&str],
) -> Result<(KernelImage, String)> {
    require_nvrtc()?;
    let source = c_string(name, source)?;
    let file_name = c_string("module name", &format!("{name}.cu"))?;
    let header_sources = HEADERS
        .iter()
        .map(|(name, text)| c_string(name, text))
        .collect::<Result<Vec<_>>>()?;
    let header_names = HEADERS
        .iter()
        .map(|(name, _)| c_string(name, name))
        .collect::<Result<Vec<_>>>()?;
    let header_source_ptrs: Vec<*const c_char> =
        header_sources.iter().map(|s| s.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();

    let mut raw = std::ptr::null_mut();
    // SAFETY: every pointer is to a NUL-terminated string that outlives the program (they are
    // dropped at the end of this function, after `program`), and the header arrays have
    // HEADERS.len() entries each.
    unsafe {
        nvrtc::nvrtcCreateProgram(
            &mut raw,
            source.as_ptr(),
            file_name.as_ptr(),
            HEADERS.len() as c_int,
            header_source_ptrs.as_ptr(),
            header_name_ptrs.as_ptr(),
        )
    }
    .result()
    .map_err(|e| nvrtc_error("nvrtcCreateProgram", e.0))?;
    let program = Program(raw);

    let arch_option = format!("--gpu-architecture={}", target.arch);
    let options = OPTIONS
        .iter()
        .copied()
        .chain(std::iter::once(arch_option.as_str()))
        .chain(extra_options.iter().copied())
        .map(|o| c_string("option", o))
        .collect::<Result<Vec<_>>>()?;
    let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: the program is live and `option_ptrs` holds `options.len()` valid C strings.
    let compiled = unsafe {
        nvrtc::nvrtcCompileProgram(program.0, option_ptrs.len() as c_int, option_ptrs.as_ptr())
    };
    if compiled != nvrtc::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Nvrtc {
            module: name,
            target: target.arch.clone(),
            log: program_log(&program),
        });
    }
    if target.cubin {
        let mut size = 0usize;
        // SAFETY: the program compiled; `size` is valid for a write.
        unsafe { nvrtc::nvrtcGetCUBINSize(program.0, &mut size) }
            .result()
            .map_err(|e| nvrtc_error("nvrtcGetCUBINSize", e.0))?;
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` holds the `size` bytes NVRTC writes.
        unsafe { nvrtc::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast()) }
            .result()
            .map_err(|e| nvrtc_error("nvrtcGetCUBIN", e.0))?;
        Ok((KernelImage::Cubin(cubin), program_log(&program)))
    } else {
        let mut size = 0usize;
        // SAFETY: the program compiled; `size` is valid for a write.
        unsafe { nvrtc::nvrtcGetPTXSize(program.0, &mut size) }
            .result()
            .map_err(|e| nvrtc_error("nvrtcGetPTXSize", e.0))?;
        let mut ptx: Vec<c_char> = vec![0; size];
        // SAFETY: `ptx` holds the `size` bytes NVRTC writes (including the NUL).
        unsafe { nvrtc::nvrtcGetPTX(program.0, ptx.as_mut_ptr()) }
            .result()
            .map_err(|e| nvrtc_error("nvrtcGetPTX", e.0))?;
        Ok((KernelImage::Ptx(lossy_string(&ptx)), program_log(&program)))
    }
}

/// NVRTC's log for `program` (errors and warnings), or a note that it could not be read.
fn program_log(program: &Program) -> String {
    let mut size = 0usize;
    // SAFETY: the program is live; `size` is valid for a write.
    if unsafe { nvrtc::nvrtcGetProgramLogSize(program.0, &mut size) }
        .result()
        .is_err()
    {
        return "(the compiler log could not be read)".to_owned();
    }
    let mut log: Vec<c_char> = vec![0; size.max(1)];
    // SAFETY: `log` holds at least the `size` bytes NVRTC writes.
    if unsafe { nvrtc::nvrtcGetProgramLog(program.0, log.as_mut_ptr()) }
        .result()
        .is_err()
    {
        return "(the compiler log could not be read)".to_owned();
    }
    lossy_string(&log)
}

/// 64-bit FNV-1a (Fowler, Noll, Vo): stable across Rust versions and platforms, unlike the
/// standard library's hasher, which matters for keys that outlive the process.
#[derive(Clone, Copy)]
struct Fnv1a(u64);

impl Fnv1a {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Self {
        Fnv1a(Self::OFFSET_BASIS)
    }

    fn bytes(mut self, bytes: &[u8]) -> Self {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(Self::PRIME);
        }
        self
    }

    /// Feeds a length-prefixed field, so that field boundaries are part of the hash.
    fn field(self, bytes: &[u8]) -> Self {
        self.bytes(&(bytes.len() as u64).to_le_bytes()).bytes(bytes)
    }
}

/// The cache key of `module` compiled for `target` by NVRTC `version`.
fn cache_key(module: KernelModule, target: &Target, version: (i32, i32)) -> u64 {
    let mut hash = Fnv1a::new()
        .field(module.name().as_bytes())
        .field(module.source().as_bytes());
    for (name, text) in HEADERS {
        hash = hash.field(name.as_bytes()).field(text.as_bytes());
    }
    for option in OPTIONS {
        hash = hash.field(option.as_bytes());
    }
    hash.field(target.arch.as_bytes())
        .field(&[u8::from(target.cubin)])
        .field(&version.0.to_le_bytes())
        .field(&version.1.to_le_bytes())
        .0
}

fn entry_file_name(module: KernelModule, target: &Target, key: u64) -> String {
    let ext = if target.cubin { "cubin" } else { "ptx" };
    format!("{}-{}-{key:016x}.{ext}", module.name(), target.arch)
}

/// Cache entry layout: MAGIC, key (u64 LE), payload length (u64 LE), payload checksum (u64 LE),
/// payload. The key guards against a file renamed or copied from elsewhere, the length and
/// checksum against truncation and corruption.
const MAGIC: &[u8; 8] = b"PGDKRN01";
const ENTRY_HEADER_LEN: usize = 8 + 3 * 8;

fn encode_entry(key: u64, image: &KernelImage) -> Vec<u8> {
    let payload = match image {
        KernelImage::Cubin(bytes) => bytes.as_slice(),
        KernelImage::Ptx(text) => text.as_bytes(),
    };
    let mut entry = Vec::with_capacity(ENTRY_HEADER_LEN + payload.len());
    entry.extend_from_slice(MAGIC);
    entry.extend_from_slice(&key.to_le_bytes());
    entry.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    entry.extend_from_slice(&Fnv1a::new().bytes(payload).0.to_le_bytes());
    entry.extend_from_slice(payload);
    entry
}

/// The image stored in `entry`, or `None` when the entry is not a valid one for `key`.
fn decode_entry(entry: &[u8], key: u64, cubin: bool) -> Option<KernelImage> {
    let (header, payload) = entry.split_at_checked(ENTRY_HEADER_LEN)?;
    let word = |i: usize| {
        header
            .get(8 + 8 * i..16 + 8 * i)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if &header[..8] != MAGIC || word(0)? != key || word(1)? != payload.len() as u64 {
        return None;
    }
    if word(2)? != Fnv1a::new().bytes(payload).0 || payload.is_empty() {
        return None;
    }
    if cubin {
        Some(KernelImage::Cubin(payload.to_vec()))
    } else {
        String::from_utf8(payload.to_vec())
            .ok()
            .map(KernelImage::Ptx)
    }
}

fn read_entry(path: &Path, key: u64, cubin: bool) -> Option<KernelImage> {
    decode_entry(&std::fs::read(path).ok()?, key, cubin)
}

/// Writes the entry to a temporary file beside `path` and renames it into place, so that
/// concurrent readers see the old entry, no entry, or the whole new one.
fn write_entry(path: &Path, key: u64, image: &KernelImage) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("cache entry has no directory"))?;
    std::fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
    let tmp = dir.join(format!(".{file_name}.{}.{nanos}.tmp", std::process::id()));
    let result = std::fs::File::create(&tmp)
        .and_then(|mut file| {
            file.write_all(&encode_entry(key, image))?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_resource_lines_are_read_per_kernel() {
        let log = "\
ptxas info    : 24 bytes gmem
ptxas info    : Compiling entry function 'spills_f16' for 'sm_90a'
ptxas info    : Function properties for spills_f16
ptxas         .     152 bytes stack frame, 154 bytes spill stores, 252 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 152 bytes cumulative stack size, 264 bytes smem
ptxas info    : Compile time = 346.328 ms
ptxas info    : Compiling entry function 'clean' for 'sm_90a'
ptxas info    : Function properties for clean
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 210 registers, used 1 barriers, 16640 bytes smem
";
        let resources = |kernel: &str, registers, stores, loads| KernelResources {
            kernel: kernel.to_owned(),
            registers,
            spill_store_bytes: stores,
            spill_load_bytes: loads,
        };
        assert_eq!(
            parse_ptxas_resources(log),
            [
                resources("spills_f16", 64, 154, 252),
                resources("clean", 210, 0, 0)
            ]
        );
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        std::env::temp_dir().join(format!(
            "pagoda-registry-{tag}-{}-{nanos}",
            std::process::id()
        ))
    }

    #[test]
    fn targets_follow_the_capability() {
        let hopper = Target::for_capability(9, 0, Some(&[75, 80, 86, 89, 90, 100])).unwrap();
        assert_eq!((hopper.arch(), hopper.is_cubin()), ("sm_90a", true));
        let ada = Target::for_capability(8, 9, None).unwrap();
        assert_eq!((ada.arch(), ada.is_cubin()), ("sm_89", true));
        // A GPU newer than the compiler gets PTX for the newest architecture below it.
        let newer = Target::for_capability(12, 1, Some(&[80, 90, 100])).unwrap();
        assert_eq!((newer.arch(), newer.is_cubin()), ("compute_100", false));
        assert!(Target::for_capability(5, 0, Some(&[75, 80])).is_err());
    }

    #[test]
    fn every_module_has_a_distinct_name_and_key() {
        let target = Target::for_capability(9, 0, None).unwrap();
        let mut names: Vec<_> = KernelModule::ALL.iter().map(|m| m.name()).collect();
        names.dedup();
        assert_eq!(names.len(), KernelModule::ALL.len());
        for (i, module) in KernelModule::ALL.iter().enumerate() {
            assert_eq!(module.index(), i);
        }
        let key = cache_key(KernelModule::Norm, &target, (13, 0));
        assert_ne!(key, cache_key(KernelModule::Activation, &target, (13, 0)));
        assert_ne!(key, cache_key(KernelModule::Norm, &target, (13, 1)));
        let ada = Target::for_capability(8, 9, None).unwrap();
        assert_ne!(key, cache_key(KernelModule::Norm, &ada, (13, 0)));
        assert_eq!(key, cache_key(KernelModule::Norm, &target, (13, 0)));
    }

    #[test]
    fn fnv1a_matches_published_values() {
        // Test vectors from the FNV reference (draft-eastlake-fnv, section 8).
        assert_eq!(Fnv1a::new().bytes(b"").0, 0xcbf2_9ce4_8422_2325);
        assert_eq!(Fnv1a::new().bytes(b"a").0, 0xaf63_dc4c_8601_ec8c);
        assert_eq!(Fnv1a::new().bytes(b"foobar").0, 0x8594_4171_f739_67e8);
    }

    #[test]
    fn entries_round_trip_and_reject_damage() {
        let image = KernelImage::Cubin((0..=255u8).collect());
        let entry = encode_entry(42, &image);
        assert_eq!(decode_entry(&entry, 42, true), Some(image.clone()));
        assert_eq!(decode_entry(&entry, 43, true), None, "another key");
        assert_eq!(
            decode_entry(&entry[..entry.len() - 1], 42, true),
            None,
            "truncated"
        );
        let mut flipped = entry.clone();
        flipped[ENTRY_HEADER_LEN + 7] ^= 1;
        assert_eq!(decode_entry(&flipped, 42, true), None, "payload bit flip");
        assert_eq!(decode_entry(b"garbage", 42, true), None);
        let ptx = KernelImage::Ptx(".version 8.0".to_owned());
        assert_eq!(decode_entry(&encode_entry(7, &ptx), 7, false), Some(ptx));
    }

    #[test]
    fn entries_are_written_atomically_and_reread() {
        let dir = temp_dir("write");
        let path = dir.join("norm-sm_90a-0000000000000001.cubin");
        let image = KernelImage::Cubin(vec![1, 2, 3]);
        write_entry(&path, 1, &image).unwrap();
        assert_eq!(read_entry(&path, 1, true), Some(image));
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
        std::fs::write(&path, b"corrupt").unwrap();
        assert_eq!(read_entry(&path, 1, true), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
