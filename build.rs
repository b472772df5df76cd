//! Link-time set-up that torch-sys leaves to us (the README's "Two commands" section says why):
//!
//! * an rpath to the libtorch lib directory, so the binary runs without LD_LIBRARY_PATH;
//! * `libtorch_cuda.so` linked with `--no-as-needed`, without which the linker drops it
//!   (no symbol of it is referenced) and CUDA is silently unavailable at run time;
//! * the small C++ shim `src/cuda.cpp` (CUDA graph capture/replay, GPU memory
//!   statistics, TF32 and autocast settings), compiled against the same libtorch headers when libtorch has CUDA.
//!   Without it the crate still builds, with `cuda::available() == false`;
//! * the fused decoder loss for the CPU (`src/cpu.cpp`, its row kernel `src/xent.c`, see
//!   `src/xent.rs`), on x86-64 when libtorch ships the autograd headers and its OpenMP
//!   runtime. Without it `xent::decoded_loss` is the decoder followed by `cross_entropy`.

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ptb_cuda_shim)");
    println!("cargo::rustc-check-cfg=cfg(ptb_gloo)");
    println!("cargo::rustc-check-cfg=cfg(ptb_cpu_kernel)");
    println!("cargo:rerun-if-changed=src/cpu.cpp");
    println!("cargo:rerun-if-changed=src/xent.c");
    println!("cargo:rerun-if-changed=src/dist.cpp");
    println!("cargo:rerun-if-changed=src/shim.hpp");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE");
    println!("cargo:rerun-if-changed=src/cuda.cpp");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");

    // Exported by torch-sys (its `links = "tch"`): the libtorch lib directory it linked.
    let lib = PathBuf::from(env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not export DEP_TCH_LIBTORCH_LIB"));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());

    let has_cuda = lib.join("libtorch_cuda.so").exists();
    if has_cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }

    let include = lib.parent().map(|p| p.join("include")).unwrap_or_default();
    build_gloo_shim(&include);
    build_cpu_kernel(&include, &lib);
    match (has_cuda, cuda_headers(&lib)) {
        (true, Some(cuda_include)) if include.join("ATen/cuda/CUDAGraph.h").exists() => {
            libtorch_cpp(&include).include(&cuda_include).file("src/cuda.cpp").compile("ptb_cuda_shim");
            for l in ["torch_cuda", "c10_cuda", "torch_cpu", "c10"] {
                println!("cargo:rustc-link-lib=dylib={l}");
            }
            println!("cargo:rustc-cfg=ptb_cuda_shim");
        }
        (true, None) => println!(
            "cargo:warning=libtorch has CUDA but no CUDA runtime headers were found \
             (set CUDA_HOME); building without CUDA graph support"
        ),
        _ => {}
    }
}

/// A C++ compilation against libtorch's headers, with the flags its own build used.
fn libtorch_cpp(include: &Path) -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .pic(true)
        .warnings(false)
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT");
    b
}

/// The torch.distributed shim (`src/dist.cpp`): c10d's TCPStore and ProcessGroupGloo live in
/// libtorch_cpu, but ProcessGroupGloo.hpp needs gloo's headers, which the torch wheel does
/// not ship; Debian's libgloo-dev has them (GLOO_INCLUDE names another directory holding
/// `gloo/`). Without them ptb-lm builds without multi-process training (`dist::available()`
/// is false, and `--nproc` says what to install).
fn build_gloo_shim(include: &Path) {
    let gloo = env::var("GLOO_INCLUDE").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("/usr/include"));
    // Built again once the headers are installed.
    println!("cargo:rerun-if-changed={}", gloo.join("gloo/algorithm.h").display());
    let header = include.join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp");
    if !(gloo.join("gloo/algorithm.h").exists() && header.exists()) {
        return;
    }
    libtorch_cpp(include).include(&gloo).flag("-DUSE_C10D_GLOO").file("src/dist.cpp").compile("ptb_dist_shim");
    for l in ["torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
    println!("cargo:rustc-cfg=ptb_gloo");
}

/// The fused decoder loss (`src/cpu.cpp`, `src/xent.c`). The row kernel is compiled with
/// AVX2 and FMA (called only on CPUs that have them) and OpenMP, linked to the OpenMP
/// runtime libtorch itself loads (`libgomp*.so*` beside it), so that both share one pool of
/// threads.
fn build_cpu_kernel(include: &Path, lib: &Path) {
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64")
        || !include.join("torch/csrc/autograd/custom_function.h").exists()
    {
        return;
    }
    let gomp = std::fs::read_dir(lib).ok().and_then(|entries| {
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with("libgomp") && n.contains(".so"))
            .collect();
        names.sort();
        names.into_iter().next()
    });
    let Some(gomp) = gomp else {
        println!("cargo:warning=no libgomp beside libtorch; building without the fused CPU loss");
        return;
    };
    // The shim first: it calls the kernel, and the linker reads archives in order.
    libtorch_cpp(include).file("src/cpu.cpp").compile("ptb_cpu_shim");
    cc::Build::new()
        .pic(true)
        .warnings(false)
        .flag("-O3")
        .flag("-mavx2")
        .flag("-mfma")
        .flag("-fopenmp")
        .file("src/xent.c")
        .compile("ptb_xent_kernel");
    for l in ["torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
    println!("cargo:rustc-link-arg=-l:{gomp}");
    println!("cargo:rustc-cfg=ptb_cpu_kernel");
}

/// The directory holding `cuda_runtime_api.h`: CUDA_HOME, the PyPI wheel's nvidia
/// packages beside torch, or /usr/local/cuda.
fn cuda_headers(torch_lib: &Path) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(home) = env::var("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("include"));
    }
    // site-packages/torch/lib -> site-packages/nvidia/<cuXX>/include
    if let Some(site) = torch_lib.parent().and_then(Path::parent) {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("include")).collect();
            dirs.sort();
            candidates.extend(dirs);
        }
        candidates.push(site.join("nvidia/cuda_runtime/include"));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates.into_iter().find(|d| d.join("cuda_runtime_api.h").exists())
}
