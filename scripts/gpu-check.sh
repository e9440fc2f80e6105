#!/usr/bin/env bash
# The one-shot check on a GPU machine (which has no Rust and reaches no registry, but has Python
# with PyTorch and transformers). Build first, here: `bash scripts/build-cuda.sh`, then run from
# the repository root on the GPU machine, carrying the packed binary:
#
#   run(command="bash scripts/gpu-check.sh", carry=["target/cuda/flash-interp.xz"], timeout_s=480)
#
# Steps (each bounded by a timeout; a failed step is recorded and the next one still runs):
#   1. the machine: GPU, driver, CUDA libraries (found and put on LD_LIBRARY_PATH), Python;
#   2. correctness: `device-check`: tiny synthetic models, and a 2-layer SmolLM2-shaped one, on
#      the CPU and on the GPU in the same binary: map, search, sweep, greedy tokens, three greedy
#      requests at once through the server's batch on the GPU, f32 and bf16;
#   3. speed, on a random-weight Llama-3.1-8B-shaped model written to this machine's disk:
#      (a) our full map (`bench --device cuda`: 458,752 neurons, model resident) against
#          (b) the PyTorch peer (scripts/peer_map_gpu.py) on the same GPU, weights and dtype;
#      (c) greedy generation tokens/s and a 16-value sweep (`bench-generate --device cuda`)
#          against (d) HF transformers' generate on the same directory, and (c) again with
#          decoding steps replayed from a captured CUDA graph of the fused step
#          (FLASH_INTERP_CUDA_GRAPH=1), and with the fused step alone (FLASH_INTERP_FUSED_DECODE=1;
#          both checked for correctness in step 2 too);
#      and the `map` command end to end (weights streamed from the file).
# Every step's time limit is cut to what is left of GPU_CHECK_BUDGET seconds (default 450: run it
# with timeout_s=480), and the report is rewritten after each step, so a run cut short still
# reports what it did. What comes back from the machine is at most 8 files: $OUT/gpu-check.json
# (the report), $OUT/log.txt and $OUT/steps.tar.gz (each step's output, status and stderr).
# Correctness runs first, then the map (the paper's headline), then generation.
# GPU_CHECK_ONLY="device-check synth bench-map" runs only the steps named (for a rerun with little
# device time left); the others are recorded as skipped.
# A dry run of the script's plumbing on a CPU machine, with a small shape and the CPU build:
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_BIN=target/release/flash-interp GPU_CHECK_SHAPE=smollm2-135m \
#   GPU_CHECK_LAYERS=2 OUT=/tmp/gc bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
W=${GPU_CHECK_WORK:-/tmp/fi-gpu-check}
S=$W/steps
SHAPE=${GPU_CHECK_SHAPE:-llama-3.1-8b}
LAYERS=${GPU_CHECK_LAYERS:-32}
DEV=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_BUDGET:-450}
PY=${FLASH_INTERP_PYTHON:-python3}
M=$W/$SHAPE-$LAYERS
mkdir -p "$OUT" "$S"
rm -f "$S"/*
t0=$(date +%s)
log() { echo "[gpu-check +$(($(date +%s) - t0))s] $*" | tee -a "$OUT/log.txt" >&2; }

# The report so far, and every step's files in one archive.
# (The archive is written beside and renamed, so that a run cut short never leaves half of one.)
report() {
    timeout -k 5 60 "$PY" scripts/gpu_check_report.py "$OUT" "$S" "$LAYERS" "$M" || log "report: failed"
    tar -czf "$W/steps.tar.gz.part" -C "$W" steps 2> /dev/null && mv "$W/steps.tar.gz.part" "$OUT/steps.tar.gz"
}

# step NAME LIMIT CMD...: stdout to NAME.out, stderr to NAME.err, status and seconds to
# NAME.status; the limit is cut to the budget left (less 20 s for the report), and a step with
# under 30 s left is skipped.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - t0) - 20))
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then
        log "$name: skipped (not in GPU_CHECK_ONLY)"
        echo '{"rc": -1, "seconds": 0, "skipped": true}' > "$S/$name.status"
        return 1
    fi
    if [ "$left" -lt 30 ]; then
        log "$name: skipped, ${left}s of the budget left"
        echo '{"rc": -1, "seconds": 0, "skipped": true}' > "$S/$name.status"
        report
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    log "$name (limit ${limit}s): $*"
    local s e rc
    s=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" > "$S/$name.out" 2> "$S/$name.err"
    rc=$?
    e=$(date +%s.%N)
    awk -v rc="$rc" -v s="$s" -v e="$e" -v l="$limit" 'BEGIN { printf "{\"rc\": %d, \"seconds\": %.3f, \"limit\": %d}\n", rc, e - s, l }' > "$S/$name.status"
    log "$name: rc=$rc"
    tail -3 "$S/$name.err" >&2
    report
    return $rc
}

# 1. The machine.
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv,noheader > "$S/gpu.txt" 2>&1
nvidia-smi > "$S/nvidia-smi.txt" 2>&1
log "GPU: $(cat "$S/gpu.txt")"
# The CUDA 13 libraries the binary links. The driver's libcuda.so.1 is the loader's to find
# (a copy under a cuda-compat folder would not match the driver); the rest come with PyTorch's
# nvidia-* packages. Looked for where they usually are first (PyTorch's own, preferred, so that
# the binary and the peers load the same cuBLAS; then /usr/local/cuda and the loader cache), and
# only what is still missing by a search of the whole disk (which can take a minute).
LIBS="libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10 libnvrtc.so.13"
nv=$(timeout 30 "$PY" -c 'import nvidia; print(" ".join(list(nvidia.__path__)))' 2> /dev/null)
found=$(for d in $nv; do ls -d "$d"/*/lib 2> /dev/null; done | while read -r d; do ls "$d"/lib*.so.* 2> /dev/null; done
    ls /usr/local/cuda*/lib64/lib*.so.* /usr/local/cuda*/targets/*/lib/lib*.so.* 2> /dev/null
    ldconfig -p 2> /dev/null | awk '{ print $NF }')
missing=""
for lib in $LIBS; do echo "$found" | grep -q "/$lib" || missing="$missing $lib"; done
if [ -n "$missing" ]; then
    log "  searching the disk for:$missing"
    found="$found
$(timeout 90 find / \( -path /proc -o -path /sys -o -path /dev -o -path '*/compat' \) -prune -o \
        \( -name 'libcublas.so.13*' -o -name 'libcublasLt.so.13*' -o -name 'libcudart.so.13*' -o -name 'libcurand.so.10*' \
        -o -name 'libnvrtc.so.13*' \) -print 2> /dev/null)"
fi
libdirs=""
for lib in $LIBS; do
    f=$(echo "$found" | grep "/$lib" | head -1)
    log "  $lib: ${f:-MISSING}"
    [ -n "$f" ] && libdirs="$libdirs:$(dirname "$f")"
done
log "  libcuda.so.1: $(ldconfig -p 2> /dev/null | grep -m1 'libcuda.so.1 ' || echo 'not in the loader cache')"
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# The binary (xz, or Python's lzma where there is no xz).
BIN=${GPU_CHECK_BIN:-$W/flash-interp}
if [ -z "${GPU_CHECK_BIN:-}" ]; then
    xz -dc target/cuda/flash-interp.xz > "$BIN" 2> /dev/null ||
        "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' target/cuda/flash-interp.xz "$BIN" ||
        log "binary: could not unpack target/cuda/flash-interp.xz (was it carried?)"
    chmod +x "$BIN"
fi
ldd "$BIN" > "$S/ldd.txt" 2>&1
grep -q 'not found' "$S/ldd.txt" && log "binary: libraries not found: $(grep 'not found' "$S/ldd.txt" | tr -s ' \t\n' ' ')"
step version 30 "$BIN" --version

# 2. Correctness: CPU and GPU in the same binary. The CPU reference is the exact f32 product
#    (not the AMX split-bf16 one, on an Intel host), so that the f32 tolerances measure the GPU.
FLASH_INTERP_NO_AMX=1 step device-check 180 "$BIN" --device "$DEV" device-check --synth smollm2-135m --synth-layers 2
#    The same with decoding steps through the fused kernels (kernels/decode.cu), replayed from a
#    captured CUDA graph: the models whose heads fit them (the SmolLM2 shape) decode through them
#    on the GPU (`fused_decode_blocks`), the greedy answer's steps after its second as replays
#    (`graph_replays`); the server's batch runs the fused step without replays.
FLASH_INTERP_CUDA_GRAPH=1 FLASH_INTERP_NO_AMX=1 step device-check-fused 180 "$BIN" --device "$DEV" device-check --synth smollm2-135m --synth-layers 2

# 3. Speed at the real shape.
if [ ! -f "$M/config.json" ]; then
    step synth 240 "$BIN" synth --shape "$SHAPE" --layers "$LAYERS" --dtype bf16 --out "$M"
fi
export FLASH_INTERP_PYTHON=$PY FLASH_INTERP_CACHE=$W/cache
step bench-map 300 "$BIN" --device "$DEV" --model "$M" --weights bf16 --json bench
step bench-generate 300 "$BIN" --device "$DEV" --model "$M" --weights bf16 --json bench-generate --tokens 128 --runs 1
FLASH_INTERP_CUDA_GRAPH=1 step bench-generate-graph 200 "$BIN" --device "$DEV" --model "$M" --weights bf16 --json bench-generate --tokens 128 --runs 1 --no-peer
FLASH_INTERP_FUSED_DECODE=1 step bench-generate-fused 200 "$BIN" --device "$DEV" --model "$M" --weights bf16 --json bench-generate --tokens 128 --runs 1 --no-peer
step map-command 200 "$BIN" --device "$DEV" --model "$M" --weights bf16 --json map --rebuild

GPU_CHECK_FINAL=1 report
log "done"
