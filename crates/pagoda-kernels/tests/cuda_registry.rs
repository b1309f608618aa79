//! The NVRTC kernel registry: every module compiles, the disk cache is used and survives
//! corruption, compiler errors carry the log, and kernels load on a GPU.
//!
//! Compiling needs only libnvrtc, not a GPU: those tests run wherever the library can be loaded
//! (for Hopper when no GPU is present) and skip elsewhere.
#![cfg(feature = "cuda")]

mod common;

use pagoda_kernels::Error;
use pagoda_kernels::cuda::registry::{
    KernelCache, KernelModule, Origin, Target, compile_source, function, kernel_resources,
    nvrtc_version, preload,
};
use pagoda_tensor::CudaDevice;

fn temp_cache_dir(tag: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!(
        "pagoda-kernel-cache-{tag}-{}-{nanos}",
        std::process::id()
    ))
}

/// The target to compile for: the GPU's when there is one, else Hopper's; `None` after printing
/// a skip when libnvrtc cannot be loaded (a failure under `PAGODA_REQUIRE_GPU=1` or
/// `PAGODA_REQUIRE_NVRTC=1`, which CI sets).
fn nvrtc_target_or_skip(test: &str) -> Option<Target> {
    if let Err(err) = nvrtc_version() {
        for required in ["PAGODA_REQUIRE_GPU", "PAGODA_REQUIRE_NVRTC"] {
            if std::env::var(required).is_ok_and(|v| v == "1") {
                panic!("{test}: {required}=1 but NVRTC is unusable: {err}");
            }
        }
        eprintln!("{test}: skipped: no NVRTC ({err})");
        return None;
    }
    match CudaDevice::get(0) {
        Ok(device) => Some(Target::for_device(&device).unwrap()),
        Err(_) => Some(Target::for_capability(9, 0, None).unwrap()),
    }
}

#[test]
fn every_module_compiles() {
    let Some(target) = nvrtc_target_or_skip("every_module_compiles") else {
        return;
    };
    // One thread per module: NVRTC compiles programs independently, and a machine without a GPU
    // (CI) runs this for every kernel.
    std::thread::scope(|scope| {
        let compiles: Vec<_> = KernelModule::ALL
            .into_iter()
            .map(|module| {
                let target = &target;
                scope.spawn(move || {
                    (
                        module,
                        KernelCache::disabled().load_or_compile(module, target),
                    )
                })
            })
            .collect();
        for compile in compiles {
            let (module, compiled) = compile.join().expect("a compile thread panicked");
            let compiled =
                compiled.unwrap_or_else(|e| panic!("{module} for {}: {e}", target.arch()));
            assert_eq!(compiled.origin, Origin::Compiled);
        }
    });
}

/// The kernels that spill registers to local memory, as NVRTC 13.5 (the test suite's) builds them
/// for sm_90a: the flash-attention forms at 255 registers (4 to 44 bytes), the eight-row-tile NF4
/// product, the f32 logprobs, the online softmax of 16-bit rows (4 bytes), and the softmax forms
/// that hold 64 values per thread at 64 registers: f32 (260 to 340 bytes: the values alone fill
/// the registers) and bf16 (36 to 52 bytes, where f16's words, refreshed the same way, fit).
const KNOWN_SPILLS: [&str; 21] = [
    "flash_attention_d128_m1w8n64g_bf16",
    "flash_attention_d128_m1w8n64g_f16",
    "flash_attention_d128_m2w4n64l_bf16",
    "flash_attention_d128_m2w4n64l_f16",
    "flash_attention_d96_m2w4n64l_bf16",
    "flash_attention_d96_m2w4n64l_f16",
    "flash_attention_d128_m2w4n64_bf16",
    "flash_attention_d128_m2w4n64_f16",
    "nf4_linear_bf16_m8",
    "nf4_linear_f16_m8",
    "logprobs_f32",
    "softmax_online_bf16",
    "softmax_online_f16",
    "softmax_c1_e64_bf16",
    "softmax_c2_e64_bf16",
    "softmax_c4_e64_bf16",
    "softmax_c8_e64_bf16",
    "softmax_c1_e64_f32",
    "softmax_c2_e64_f32",
    "softmax_c4_e64_f32",
    "softmax_c8_e64_f32",
];

#[test]
fn no_kernel_spills_but_the_known_ones() {
    let Some(target) = nvrtc_target_or_skip("no_kernel_spills_but_the_known_ones") else {
        return;
    };
    if !target.is_cubin() {
        eprintln!("no_kernel_spills_but_the_known_ones: skipped: a PTX target runs no ptxas");
        return;
    }
    let reports = std::thread::scope(|scope| {
        let reports: Vec<_> = KernelModule::ALL
            .into_iter()
            .map(|module| {
                let target = &target;
                scope.spawn(move || (module, kernel_resources(module, target)))
            })
            .collect();
        reports
            .into_iter()
            .map(|report| report.join().expect("a compile thread panicked"))
            .collect::<Vec<_>>()
    });
    let mut new_spills = Vec::new();
    for (module, report) in reports {
        let kernels = report.unwrap_or_else(|e| panic!("{module} for {}: {e}", target.arch()));
        assert!(!kernels.is_empty(), "{module}: ptxas reported no kernel");
        for k in kernels {
            let spills = k.spill_store_bytes + k.spill_load_bytes > 0;
            if spills && !KNOWN_SPILLS.contains(&k.kernel.as_str()) {
                new_spills.push(format!(
                    "{} ({} registers, {} bytes stored, {} loaded)",
                    k.kernel, k.registers, k.spill_store_bytes, k.spill_load_bytes
                ));
            }
        }
    }
    assert!(
        new_spills.is_empty(),
        "kernels that spill for {}: {new_spills:#?}",
        target.arch()
    );
}

#[test]
fn kernels_load_on_the_gpu() {
    let Some(device) = common::gpu_or_skip("kernels_load_on_the_gpu") else {
        return;
    };
    for (module, name) in [
        (KernelModule::Norm, "add_rms_norm_f16_f32"),
        (KernelModule::Activation, "silu_and_mul_bf16"),
        (KernelModule::Embedding, "embedding_f32"),
    ] {
        function(&device, module, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        // The second lookup comes from the device's table.
        function(&device, module, name).unwrap_or_else(|e| panic!("{name} again: {e}"));
    }
}

#[test]
fn preloading_loads_every_module_at_once() {
    let Some(device) = common::gpu_or_skip("preloading_loads_every_module_at_once") else {
        return;
    };
    preload(&device, &KernelModule::ALL).unwrap_or_else(|e| panic!("preloading: {e}"));
    // Loaded already: a second preload and the lookups only read the device's table.
    preload(&device, &KernelModule::ALL).unwrap_or_else(|e| panic!("preloading again: {e}"));
    for (module, name) in [
        (KernelModule::Sampling, "argmax_f16"),
        (KernelModule::Gemv, "gemv_bf16"),
    ] {
        function(&device, module, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn an_unknown_kernel_is_an_error_naming_it() {
    let Some(device) = common::gpu_or_skip("an_unknown_kernel_is_an_error_naming_it") else {
        return;
    };
    let err = function(&device, KernelModule::Norm, "no_such_kernel").unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Cuda { .. }), "{err:?}");
    assert!(
        message.contains("no_such_kernel") && message.contains("norm.cu"),
        "{message}"
    );
}

#[test]
fn the_disk_cache_is_reused_and_a_corrupt_entry_is_recompiled() {
    let Some(target) = nvrtc_target_or_skip("the_disk_cache_is_reused") else {
        return;
    };
    let dir = temp_cache_dir("reuse");
    let cache = KernelCache::at(&dir);

    let first = cache
        .load_or_compile(KernelModule::Embedding, &target)
        .unwrap();
    assert_eq!(first.origin, Origin::Compiled);
    let path = first
        .cache_path
        .clone()
        .expect("a cache directory is in use");
    assert!(path.exists(), "{} was written", path.display());

    let second = cache
        .load_or_compile(KernelModule::Embedding, &target)
        .unwrap();
    assert_eq!(second.origin, Origin::DiskCache);
    assert_eq!(second.image, first.image);

    // Flip one byte in the middle of the payload: the checksum catches it.
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&path, &bytes).unwrap();
    let third = cache
        .load_or_compile(KernelModule::Embedding, &target)
        .unwrap();
    assert_eq!(third.origin, Origin::Compiled);
    assert_eq!(third.image, first.image);

    // A truncated entry too; afterwards the rewritten entry is read again.
    std::fs::write(&path, &bytes[..10]).unwrap();
    let origin = |cache: &KernelCache| {
        cache
            .load_or_compile(KernelModule::Embedding, &target)
            .unwrap()
            .origin
    };
    assert_eq!(origin(&cache), Origin::Compiled);
    assert_eq!(origin(&cache), Origin::DiskCache);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_compile_error_carries_the_log_and_module() {
    let Some(target) = nvrtc_target_or_skip("a_compile_error_carries_the_log") else {
        return;
    };
    let source = "#include \"common.cuh\"\n\
                  extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }\n";
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

#[test]
fn the_shared_header_compiles_for_pre_ampere_targets() {
    // Below sm_80 the bf16 rounding takes the integer path instead of `cvt.rn.bf16.f32`.
    if nvrtc_target_or_skip("the_shared_header_compiles_for_pre_ampere").is_none() {
        return;
    }
    let turing = Target::for_capability(7, 5, None).unwrap();
    for module in [
        KernelModule::Norm,
        KernelModule::Activation,
        KernelModule::Embedding,
    ] {
        KernelCache::disabled()
            .load_or_compile(module, &turing)
            .unwrap_or_else(|e| panic!("{module} for sm_75: {e}"));
    }
}
