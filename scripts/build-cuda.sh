#!/usr/bin/env bash
# Build flash-interp with the `cuda` feature on a machine without a GPU or a system CUDA, from
# PyPI's CUDA 13 packages, and pack the binary to carry to a GPU machine. Idempotent: each step
# is skipped when already done. Everything it installs lives in target/cuda/ (git-ignored).
#
#   bash scripts/build-cuda.sh           # release build, then target/cuda/flash-interp.xz
#   bash scripts/build-cuda.sh check     # only `cargo clippy --features cuda` (what CI runs)
#
# Environment: CUDA_COMPUTE_CAP (default 90: H100/H200), FLASH_INTERP_PYTHON (default python3).
# The binary needs, at run time, the driver's libcuda.so.1 and CUDA 13's libcublas.so.13,
# libcublasLt.so.13, libcudart.so.13 and libcurand.so.10 (scripts/gpu-check.sh finds them).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-build}
C=$PWD/target/cuda
V=$C/venv
R=$C/root
mkdir -p "$C"

# 1. The CUDA 13.0 toolchain from PyPI (the cu12 wheels ship no nvcc). Only the compiler and the
#    headers are needed to check; the libraries only to link.
#    Pinned to 13.0, the CUDA of the GPU machines' driver (580): the kernels are embedded as PTX
#    and JIT-compiled by the driver at run time, and a driver rejects PTX newer than its own CUDA
#    (nvcc 13.5 writes `.version 9.5`; driver 580 reads up to 9.0: CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
#    nvcc's compiler proper (cicc) and headers come in nvidia-nvvm and nvidia-cuda-crt: pin them too.
pkgs="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96"
pkgs="$pkgs nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88"
[ "$mode" = check ] || pkgs="$pkgs nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35"
ptx_max=9.0
if [ ! -x "$V/bin/pip" ]; then
    "${FLASH_INTERP_PYTHON:-python3}" -m venv "$V"
fi
stamp=$C/.installed-$(echo "$pkgs" | tr ' ' '+')
if [ ! -e "$stamp" ]; then
    "$V/bin/pip" install -q --disable-pip-version-check $pkgs
    touch "$stamp"
fi
N=$(echo "$V"/lib/python3.*/site-packages/nvidia/cu13)
[ -x "$N/bin/nvcc" ] || { echo "build-cuda: no nvcc in $N" >&2; exit 1; }
"$N/bin/nvcc" --version | grep -q 'release 13\.0' || { echo "build-cuda: $N/bin/nvcc is not CUDA 13.0" >&2; exit 1; }

# 2. A CUDA root the build scripts understand: nvcc finds ../nvvm/bin/cicc relative to the nvcc it
#    was called as, so bin/ holds links, not copies.
mkdir -p "$R/bin" "$R/lib64"
for f in "$N"/bin/*; do ln -sfn "$f" "$R/bin/$(basename "$f")"; done
ln -sfn "$N/nvvm" "$R/nvvm"
ln -sfn "$N/include" "$R/include"
for lib in cublas cublasLt cudart curand nvrtc; do
    so=$(ls "$N"/lib/lib$lib.so.* 2>/dev/null | head -1 || true)
    [ -n "$so" ] && ln -sfn "$so" "$R/lib64/lib$lib.so"
done

# 3. libcuda.so is the driver's and is in no wheel: link against a stub with the same soname that
#    defines every driver function cudarc declares (the GPU machine's real one is loaded at run
#    time). cudarc's source is in the registry once cargo has fetched it.
if [ ! -e "$R/lib64/libcuda.so" ]; then
    cargo fetch -q
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | head -1)
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$sys" | awk '{print "void "$4"(void){}"}' | sort -u > "$C/libcuda-stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$R/lib64/libcuda.so" "$C/libcuda-stub.c"
fi

export PATH="$R/bin:$PATH" CUDA_ROOT="$R" CUDA_HOME="$R" CUDA_PATH="$R" CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH="$R/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}"

# Every PTX the build scripts wrote (candle's kernels and ours, embedded in the binary) must be one
# the driver can read.
check_ptx() {
    for ptx in $(find "$1" -name '*.ptx'); do
        v=$(grep -m1 -oE '^\.version [0-9.]+' "$ptx" | cut -d' ' -f2)
        awk -v v="$v" -v m="$ptx_max" 'BEGIN { exit !(v + 0 <= m + 0) }' || { echo "build-cuda: $ptx is PTX $v, newer than $ptx_max" >&2; exit 1; }
    done
}

if [ "$mode" = check ]; then
    # candle-kernels compiles two things: PTX (every kernel the binary embeds and the driver loads,
    # compiled here for real and version-checked below) and libmoe.a, SASS of its MoE and quantized
    # matmul kernels that only a linked binary needs. A check links nothing, and that library is
    # 14 of nvcc's 15 CPU-minutes (timed file by file here), so the nvcc that candle's build
    # script calls (it reads $NVCC) writes empty objects for it; everything else goes to the real
    # nvcc. The full build below compiles all of it.
    K=$C/check-nvcc
    mkdir -p "$K/bin"
    ln -sfn "$N/include" "$K/include"
    ln -sfn "$R/lib64" "$K/lib64"
    cat > "$K/bin/nvcc" <<WRAP
#!/usr/bin/env bash
# Written by scripts/build-cuda.sh check: object files (-c) and their archive (--lib) are stubs.
out=; mode=
prev=
for a in "\$@"; do
    case "\$a" in -c) mode=obj ;; --lib) mode=lib ;; esac
    [ "\$prev" = -o ] && out=\$a
    prev=\$a
done
case "\$mode" in
    obj) exec cc -x c -c /dev/null -o "\$out" ;;
    lib) rm -f "\$out"; exec ar rcs "\$out" ;;
    *) exec "$R/bin/nvcc" "\$@" ;;
esac
WRAP
    chmod +x "$K/bin/nvcc"
    # The workspace's own target dir, profile and features, plus cuda: after scripts/test.sh's
    # `cargo clippy --workspace`, only what the feature changes (candle, its kernels, flash-interp
    # and what depends on them) is checked again; everything else is reused.
    NVCC=$K/bin/nvcc cargo clippy --workspace --all-targets --features flash-interp/cuda -- -D warnings
    check_ptx target/debug/build
    exit 0
fi

cargo build --release -p flash-interp --features cuda --target-dir "$C/target"
check_ptx "$C/target/release/build"
strip -o "$C/flash-interp" "$C/target/release/flash-interp"
xz -T0 -6 -c "$C/flash-interp" > "$C/flash-interp.xz.tmp" && mv "$C/flash-interp.xz.tmp" "$C/flash-interp.xz"
ls -l "$C/flash-interp" "$C/flash-interp.xz"
echo "build-cuda: target/cuda/flash-interp.xz (carry it: run(carry=[\"target/cuda/flash-interp.xz\"]))"
