//! Compiles the C++ bridge (`src/bridge/bridge.cpp`: c10d, which tch lacks) against the libtorch
//! tch links, and makes the binaries, tests and examples start without `LD_LIBRARY_PATH` and
//! see CUDA.
//!
//! torch-sys links libtorch but leaves no rpath in the executables, so they would fail with
//! `libtorch_cpu.so: cannot open shared object file`; and the linker's default `--as-needed`
//! drops `libtorch_cuda.so` (no symbol of it is referenced directly), so `Cuda::is_available()`
//! would be false even on a GPU machine. torch-sys publishes its lib dir as `cargo:libtorch_lib`,
//! which reaches this script as `DEP_TCH_LIBTORCH_LIB` because we depend on torch-sys directly.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE_DIR");
    for watched in ["build.rs", "tests", "examples", "benches", "src/bridge/bridge.cpp"] {
        println!("cargo:rerun-if-changed={watched}");
    }
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    // The real path, so the rpath survives the `.libtorch` link being re-pointed or removed.
    let lib = Path::new(&lib).canonicalize().unwrap_or_else(|_| lib.clone().into());
    bridge(&lib);
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

/// Compiles the bridge with the flags libtorch's wheel was built with (C++17, the new string
/// ABI) and c10d's Gloo switch, which without it leaves `ProcessGroupGloo.hpp` empty, silently.
/// Gloo's headers (not shipped in the wheel) come from Debian's `libgloo-dev`, which
/// `tools/setup` installs, or `GLOO_INCLUDE_DIR`; only its headers are used, never its
/// `libgloo.so`, whose symbols would clash with the copy inside `libtorch_cpu.so`. Without them
/// the bridge still builds, and making a Gloo group says what is missing.
fn bridge(lib: &Path) {
    let torch = lib.parent().expect("libtorch's lib dir has a parent");
    let include = torch.join("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("src/bridge/bridge.cpp")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        // libtorch's headers as system headers: their own warnings are not ours to fix.
        .flag("-isystem")
        .flag(include.to_str().expect("a UTF-8 libtorch path"))
        .flag("-isystem")
        .flag(include.join("torch/csrc/api/include").to_str().expect("a UTF-8 libtorch path"));
    let gloo = std::env::var_os("GLOO_INCLUDE_DIR")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain([std::path::PathBuf::from("/usr/include")])
        .find(|dir| dir.join("gloo/config.h").is_file());
    match gloo {
        Some(dir) => {
            build.define("USE_C10D_GLOO", None).define("CIFAR_HAVE_GLOO", None);
            // (/usr/include is searched already; naming it again would break `#include_next`.)
            if dir != Path::new("/usr/include") {
                build.flag("-isystem").flag(dir.to_str().expect("a UTF-8 gloo path"));
            }
        }
        None => println!(
            "cargo:warning=gloo's headers not found (Debian: libgloo-dev; or set GLOO_INCLUDE_DIR): \
             the bridge is built without the Gloo backend, so CPU training stays single-process"
        ),
    }
    let nccl = nccl(lib, &mut build);
    build.compile("cifar_bridge");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if let Some(cuda_lib) = nccl {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        // The wheel ships the CUDA runtime under its versioned name only.
        println!("cargo:rustc-link-search=native={}", cuda_lib.display());
        println!("cargo:rustc-link-arg=-l:libcudart.so.13");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", cuda_lib.display());
    }
}

/// Adds c10d's NCCL backend to the bridge where libtorch has CUDA and the headers it needs are
/// there: the wheel's own `nvidia/cu13` and `nvidia/nccl` headers, and the two header-only
/// packages it lacks (`nvidia-cuda-crt`, `nvidia-cuda-cccl`, which `tools/setup` installs).
/// Returns the CUDA runtime's lib dir when it did; without them, CUDA ranks are refused with
/// a message saying what is missing.
fn nccl(lib: &Path, build: &mut cc::Build) -> Option<std::path::PathBuf> {
    if !lib.join("libtorch_cuda.so").exists() {
        return None;
    }
    let site = lib.parent()?.parent()?;
    let cu = site.join("nvidia/cu13");
    let wanted = [
        cu.join("include/cuda_runtime_api.h"),
        cu.join("include/crt/host_config.h"),
        cu.join("include/cccl/cuda/std/version"),
        site.join("nvidia/nccl/include/nccl.h"),
        cu.join("lib/libcudart.so.13"),
    ];
    if let Some(missing) = wanted.iter().find(|p| !p.exists()) {
        println!(
            "cargo:warning=no NCCL backend in the bridge: {} is missing (tools/setup installs it)",
            missing.display()
        );
        return None;
    }
    build.define("USE_C10D_NCCL", None).define("USE_CUDA", None).define("CIFAR_HAVE_NCCL", None);
    for dir in [cu.join("include"), cu.join("include/cccl"), site.join("nvidia/nccl/include")] {
        build.flag("-isystem").flag(dir.to_str().expect("a UTF-8 CUDA path"));
    }
    Some(cu.join("lib"))
}
