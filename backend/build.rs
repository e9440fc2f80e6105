//! With the `cuda` feature: compile the map's reduction kernel (kernels/map.cu) to PTX with nvcc,
//! for the architecture in CUDA_COMPUTE_CAP (default 80; scripts/build-cuda.sh sets 90). The PTX
//! is embedded in the binary and loaded by the driver at run time (src/map/gpu.rs).
use std::{env, path::PathBuf, process::Command};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/map.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("map.ptx");
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = env::var_os("CUDA_ROOT").map(|r| PathBuf::from(r).join("bin/nvcc")).filter(|p| p.exists()).unwrap_or_else(|| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["-ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&out)
        .arg("kernels/map.cu")
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e} (the cuda feature needs nvcc: see scripts/build-cuda.sh)", nvcc.display()));
    assert!(status.success(), "nvcc failed on kernels/map.cu");
}
