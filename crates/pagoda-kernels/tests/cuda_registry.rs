//! The NVRTC kernel registry on a real GPU: every module compiles, the disk cache is used and
//! survives corruption, and compiler errors carry the log.
#![cfg(feature = "cuda")]

mod common;

use pagoda_kernels::Error;
use pagoda_kernels::cuda::registry::{KernelCache, KernelModule, Origin, Target, compile_source, function};

fn temp_cache_dir(tag: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!("pagoda-kernel-cache-{tag}-{}-{nanos}", std::process::id()))
}

#[test]
fn every_module_compiles_and_loads() {
    let Some(device) = common::gpu_or_skip("every_module_compiles_and_loads") else { return };
    let target = Target::for_device(&device).unwrap();
    let cache = KernelCache::disabled();
    for module in KernelModule::ALL {
        let compiled = cache.load_or_compile(module, &target).unwrap_or_else(|e| panic!("{module}: {e}"));
        assert_eq!(compiled.origin, Origin::Compiled);
    }
    // A kernel of each of this crate's own modules resolves, and a second lookup is the same.
    for (module, name) in [
        (KernelModule::Norm, "rms_norm_f16"),
        (KernelModule::Activation, "silu_and_mul_bf16"),
        (KernelModule::Embedding, "embedding_f32"),
    ] {
        function(&device, module, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        function(&device, module, name).unwrap_or_else(|e| panic!("{name} again: {e}"));
    }
}

#[test]
fn an_unknown_kernel_is_an_error_naming_it() {
    let Some(device) = common::gpu_or_skip("an_unknown_kernel_is_an_error_naming_it") else { return };
    let err = function(&device, KernelModule::Norm, "no_such_kernel").unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Cuda { .. }), "{err:?}");
    assert!(message.contains("no_such_kernel") && message.contains("norm.cu"), "{message}");
}

#[test]
fn the_disk_cache_is_reused_and_a_corrupt_entry_is_recompiled() {
    let Some(device) = common::gpu_or_skip("the_disk_cache_is_reused") else { return };
    let target = Target::for_device(&device).unwrap();
    let dir = temp_cache_dir("reuse");
    let cache = KernelCache::at(&dir);

    let first = cache.load_or_compile(KernelModule::Activation, &target).unwrap();
    assert_eq!(first.origin, Origin::Compiled);
    let path = first.cache_path.clone().expect("a cache directory is in use");
    assert!(path.exists(), "{} was written", path.display());

    let second = cache.load_or_compile(KernelModule::Activation, &target).unwrap();
    assert_eq!(second.origin, Origin::DiskCache);
    assert_eq!(second.image, first.image);

    // Flip one byte in the middle of the payload: the checksum catches it.
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&path, &bytes).unwrap();
    let third = cache.load_or_compile(KernelModule::Activation, &target).unwrap();
    assert_eq!(third.origin, Origin::Compiled);
    assert_eq!(third.image, first.image);

    // A truncated entry too; afterwards the rewritten entry is read again.
    std::fs::write(&path, &bytes[..10]).unwrap();
    assert_eq!(cache.load_or_compile(KernelModule::Activation, &target).unwrap().origin, Origin::Compiled);
    assert_eq!(cache.load_or_compile(KernelModule::Activation, &target).unwrap().origin, Origin::DiskCache);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_compile_error_carries_the_log_and_module() {
    let Some(device) = common::gpu_or_skip("a_compile_error_carries_the_log") else { return };
    let target = Target::for_device(&device).unwrap();
    let source = "#include \"common.cuh\"\nextern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }\n";
    let err = compile_source("broken_module", source, &target).unwrap_err();
    match &err {
        Error::Nvrtc { module, log, .. } => {
            assert_eq!(*module, "broken_module");
            assert!(log.contains("undefined_name"), "log: {log}");
        }
        other => panic!("expected an NVRTC error, got {other:?}"),
    }
    assert!(err.to_string().contains("broken_module"), "{err}");
}
