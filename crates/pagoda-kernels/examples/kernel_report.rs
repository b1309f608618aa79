//! What ptxas made of a kernel module, without a GPU: each kernel's registers and spilled bytes,
//! and optionally the cubin itself for a disassembler (`scripts/kernel-sass.sh` runs nvdisasm on
//! it). The module is compiled exactly as the registry compiles it on a GPU machine.
//!
//! ```sh
//! LD_LIBRARY_PATH=$(scripts/fetch-nvrtc.sh) cargo run --release -p pagoda-kernels \
//!     --features cuda --example kernel_report -- paged_attention [--arch 90a] [--cubin OUT]
//! ```

use std::process::ExitCode;

use pagoda_kernels::cuda::registry::{
    KernelCache, KernelImage, KernelModule, Target, kernel_resources,
};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("kernel_report: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut module_name = None;
    let mut arch = "90a".to_owned();
    let mut cubin_path = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--arch" => arch = args.next().ok_or("--arch needs a value such as 90a")?,
            "--cubin" => cubin_path = Some(args.next().ok_or("--cubin needs a path")?),
            name if module_name.is_none() && !name.starts_with('-') => {
                module_name = Some(name.to_owned())
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    let names: Vec<&str> = KernelModule::ALL.iter().map(|m| m.name()).collect();
    let module_name = module_name.ok_or(format!("which module? one of {names:?}"))?;
    let module = KernelModule::ALL
        .into_iter()
        .find(|m| m.name() == module_name)
        .ok_or(format!(
            "no module {module_name:?}; the modules are {names:?}"
        ))?;
    let target = target_for(&arch)?;

    let mut kernels = kernel_resources(module, &target).map_err(|e| e.to_string())?;
    kernels.sort_by(|a, b| a.kernel.cmp(&b.kernel));
    println!(
        "{module_name} for sm_{arch}: {} kernels\n{:<56} {:>9} {:>12} {:>12}",
        kernels.len(),
        "kernel",
        "registers",
        "spill store",
        "spill load"
    );
    for k in &kernels {
        println!(
            "{:<56} {:>9} {:>12} {:>12}",
            k.kernel, k.registers, k.spill_store_bytes, k.spill_load_bytes
        );
    }

    if let Some(path) = cubin_path {
        let compiled = KernelCache::disabled()
            .load_or_compile(module, &target)
            .map_err(|e| e.to_string())?;
        let KernelImage::Cubin(bytes) = compiled.image else {
            return Err(format!("sm_{arch} gave PTX, not a cubin"));
        };
        std::fs::write(&path, bytes).map_err(|e| format!("writing {path}: {e}"))?;
        eprintln!("kernel_report: cubin written to {path}");
    }
    Ok(())
}

/// The registry's target for an architecture given as `90a`, `89`, `80`.
fn target_for(arch: &str) -> Result<Target, String> {
    let digits: String = arch.chars().take_while(char::is_ascii_digit).collect();
    let capability: u32 = digits
        .parse()
        .map_err(|_| format!("--arch {arch:?}: expected digits such as 90a"))?;
    let target = Target::for_capability(capability / 10, capability % 10, None)
        .map_err(|e| e.to_string())?;
    if target.arch() != format!("sm_{arch}") {
        return Err(format!(
            "--arch {arch}: the registry compiles that GPU for {}",
            target.arch()
        ));
    }
    Ok(target)
}
