//! Makes the binaries, tests and examples start without `LD_LIBRARY_PATH` and see CUDA.
//!
//! torch-sys links libtorch but leaves no rpath in the executables, so they would fail with
//! `libtorch_cpu.so: cannot open shared object file`; and the linker's default `--as-needed`
//! drops `libtorch_cuda.so` (no symbol of it is referenced directly), so `Cuda::is_available()`
//! would be false even on a GPU machine. torch-sys publishes its lib dir as `cargo:libtorch_lib`,
//! which reaches this script as `DEP_TCH_LIBTORCH_LIB` because we depend on torch-sys directly.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    for watched in ["build.rs", "tests", "examples", "benches"] {
        println!("cargo:rerun-if-changed={watched}");
    }
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    // The real path, so the rpath survives the `.libtorch` link being re-pointed or removed.
    let lib = Path::new(&lib).canonicalize().unwrap_or_else(|_| lib.clone().into());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        // Everything that may train: not cifar-prep, which uses only cifar-data and links no torch.
        // (Cargo refuses `-tests` etc. for a package without such targets.)
        let mut targets = vec!["-bin=cifar-train"];
        for (dir, target) in [("tests", "-tests"), ("examples", "-examples"), ("benches", "-benches")] {
            if Path::new(dir).is_dir() {
                targets.push(target);
            }
        }
        for target in targets {
            println!("cargo:rustc-link-arg{target}=-Wl,--push-state,--no-as-needed");
            println!("cargo:rustc-link-arg{target}=-ltorch_cuda");
            println!("cargo:rustc-link-arg{target}=-Wl,--pop-state");
        }
    }
}
