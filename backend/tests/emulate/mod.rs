//! A CUDA kernel's launcher (`kernels/emulate/NAME_main.cpp`, which includes the kernel's source)
//! compiled against the emulator (`kernels/emulate/cuda_on_cpu.h`) with the host's C++ compiler
//! (`CXX`, default g++), for the tests that run kernels on the CPU.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The launcher `name`_main.cpp compiled, as an executable in the test's temporary folder.
pub fn compile(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("kernels/emulate/{name}_main.cpp"));
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}_kernel_on_cpu"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let out = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("running {cxx} (a C++20 compiler is needed to run the CUDA kernels on the CPU): {e}"));
    assert!(out.status.success(), "{cxx} failed on {}:\n{}", src.display(), String::from_utf8_lossy(&out.stderr));
    exe
}
