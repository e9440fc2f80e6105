//! The source the binary is built from, for `--version` (FLASH_INTERP_VERSION: the crate's
//! version, the commit, and "-dirty" when the backend's or `shared`'s files differ from it), so
//! that a report made elsewhere (the GPU check) says which source it ran.
//!
//! With the `cuda` feature: compile the map's reduction kernel (kernels/map.cu) and the fused
//! decoding kernels (kernels/decode.cu) to PTX with nvcc, for the architecture in
//! CUDA_COMPUTE_CAP (default 80; scripts/build-cuda.sh sets 90). The PTX is embedded in the
//! binary and loaded by the driver at run time (src/map/gpu.rs, src/model/fused.rs).
use std::{env, path::PathBuf, process::Command};

/// git's answer (read-only: `--no-optional-locks` keeps `status` from rewriting the index).
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").arg("--no-optional-locks").args(args).output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn source_version() {
    // Only this project's own repository counts (not one it is vendored into).
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
    let ours = git(&["rev-parse", "--show-toplevel"]).zip(root.canonicalize().ok()).is_some_and(|(top, root)| std::path::Path::new(&top) == root);
    let source = match git(&["rev-parse", "--short=12", "HEAD"]).filter(|_| ours) {
        Some(commit) => {
            let dirty = git(&["status", "--porcelain", "--", ".", "../shared", "../Cargo.lock"]).is_some_and(|s| !s.is_empty());
            format!("{commit}{}", if dirty { "-dirty" } else { "" })
        }
        None => "unknown commit".into(),
    };
    println!("cargo:rustc-env=FLASH_INTERP_VERSION={} ({source})", env::var("CARGO_PKG_VERSION").unwrap());
    // Rerun on a commit or checkout (HEAD, the branch it names, packed refs) and on any change to
    // the sources (which rebuilds the crate anyway). Only paths that exist: a missing one would
    // rerun this on every build.
    let git_dir = git(&["rev-parse", "--git-dir"]).map(PathBuf::from).filter(|_| ours);
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    let refs = git_dir.iter().flat_map(|d| [Some(d.join("HEAD")), Some(d.join("packed-refs")), branch.as_ref().map(|b| d.join(b))]).flatten();
    for p in refs.chain(["src", "kernels", "../shared/src"].map(PathBuf::from)).filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}

fn main() {
    source_version();
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/map.cu");
    println!("cargo:rerun-if-changed=kernels/decode.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = env::var_os("CUDA_ROOT").map(|r| PathBuf::from(r).join("bin/nvcc")).filter(|p| p.exists()).unwrap_or_else(|| "nvcc".into());
    for kernel in ["map", "decode"] {
        let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join(format!("{kernel}.ptx"));
        let status = Command::new(&nvcc)
            .args(["-ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
            .arg(&out)
            .arg(format!("kernels/{kernel}.cu"))
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e} (the cuda feature needs nvcc: see scripts/build-cuda.sh)", nvcc.display()));
        assert!(status.success(), "nvcc failed on kernels/{kernel}.cu");
    }
}
