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
#          against (d) HF transformers' generate on the same directory;
#      and the `map` command end to end (weights streamed from the file).
# Writes $OUT/gpu-check.json (and each step's output under $OUT/steps/).
# A dry run of the script's plumbing on a CPU machine, with a small shape and the CPU build:
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_BIN=target/release/flash-interp GPU_CHECK_SHAPE=smollm2-135m \
#   GPU_CHECK_LAYERS=2 OUT=/tmp/gc bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
W=${GPU_CHECK_WORK:-/tmp/fi-gpu-check}
SHAPE=${GPU_CHECK_SHAPE:-llama-3.1-8b}
LAYERS=${GPU_CHECK_LAYERS:-32}
DEV=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$OUT/steps" "$W"
t0=$(date +%s)
log() { echo "[gpu-check +$(($(date +%s) - t0))s] $*" | tee -a "$OUT/steps/log.txt" >&2; }

# step NAME TIMEOUT CMD...: stdout to steps/NAME.out, stderr to steps/NAME.err, status and seconds
# to steps/NAME.status.
step() {
    local name=$1 limit=$2
    shift 2
    log "$name: $*"
    local s e rc
    s=$(date +%s.%N)
    timeout "$limit" "$@" > "$OUT/steps/$name.out" 2> "$OUT/steps/$name.err"
    rc=$?
    e=$(date +%s.%N)
    awk -v rc="$rc" -v s="$s" -v e="$e" 'BEGIN { printf "{\"rc\": %d, \"seconds\": %.3f}\n", rc, e - s }' > "$OUT/steps/$name.status"
    log "$name: rc=$rc"
    tail -3 "$OUT/steps/$name.err" >&2
    return $rc
}

# 1. The machine.
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv,noheader > "$OUT/steps/gpu.txt" 2>&1
nvidia-smi > "$OUT/steps/nvidia-smi.txt" 2>&1
log "GPU: $(cat "$OUT/steps/gpu.txt")"
PY=${FLASH_INTERP_PYTHON:-python3}
# The CUDA 13 libraries the binary links (libcuda.so.1 comes with the driver).
libdirs=""
for lib in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10 libcuda.so.1; do
    f=$(find / -xdev \( -path /proc -o -path /sys \) -prune -o -name "$lib*" -print 2>/dev/null | head -1)
    log "  $lib: ${f:-MISSING}"
    [ -n "$f" ] && libdirs="$libdirs:$(dirname "$f")"
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# The binary.
BIN=${GPU_CHECK_BIN:-$W/flash-interp}
if [ -z "${GPU_CHECK_BIN:-}" ] && [ -f target/cuda/flash-interp.xz ]; then
    xz -dc target/cuda/flash-interp.xz > "$BIN" && chmod +x "$BIN"
fi
ldd "$BIN" > "$OUT/steps/ldd.txt" 2>&1
step version 30 "$BIN" --version

# 2. Correctness: CPU and GPU in the same binary.
step device-check 180 "$BIN" --device "$DEV" device-check --synth smollm2-135m --synth-layers 2

# 3. Speed at the real shape.
M=$W/$SHAPE-$LAYERS
if [ ! -f "$M/config.json" ]; then
    step synth 240 "$BIN" synth --shape "$SHAPE" --layers "$LAYERS" --dtype bf16 --out "$M"
fi
export FLASH_INTERP_PYTHON=$PY FLASH_INTERP_CACHE=$W/cache
step bench-map 300 "$BIN" --device "$DEV" --model "$M" --weights bf16 --json bench
step bench-generate 300 "$BIN" --device "$DEV" --model "$M" --weights bf16 --json bench-generate --tokens 128 --runs 1
step map-command 200 "$BIN" --device "$DEV" --model "$M" --weights bf16 --json map --rebuild

# The report.
"$PY" - "$OUT" "$LAYERS" "$M" <<'EOF'
import json, os, sys, glob
out, layers, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
steps = os.path.join(out, "steps")
def read(name, kind):
    try:
        with open(os.path.join(steps, f"{name}.{kind}")) as f:
            return f.read()
    except OSError:
        return None
def js(name):
    text = read(name, "out")
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        try:
            return json.loads(text.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"unparsed": text[-2000:]}
report = {"gpu": (read("gpu", "txt") or "").strip(), "model": model, "layers": layers, "steps": {}}
for st in sorted(glob.glob(os.path.join(steps, "*.status"))):
    name = os.path.basename(st)[:-len(".status")]
    report["steps"][name] = json.load(open(st))
    if report["steps"][name]["rc"] != 0:
        report["steps"][name]["stderr_tail"] = (read(name, "err") or "")[-1500:]
dc = js("device-check")
if dc and "models" in dc:
    report["device_check"] = {"pass": dc["pass"], "models": [
        {k: m[k] for k in ("model", "weights", "pass", "search_pass", "sweep_max_abs_err", "greedy_common_prefix", "batch_common_prefix", "batch_jobs_per_step", "batch_pass")} |
        {"maps": [{k: a[k] for k in ("final_norm", "pass", "lse_max_rel_err", "value_max_rel_err", "id_mismatches", "unexplained", "seconds_cpu", "seconds_device")} for a in m["maps"]]}
        for m in dc["models"]]}
report["bench_map"] = js("bench-map")
report["bench_generate"] = js("bench-generate")
report["map_command"] = js("map-command")
# The bandwidth bound of greedy decoding: every weight read once per token.
try:
    import torch
    p = torch.cuda.get_device_properties(0)
    bw = None
    if getattr(p, "memory_clock_rate", 0) and getattr(p, "memory_bus_width", 0):
        bw = 2 * p.memory_clock_rate * 1e3 * p.memory_bus_width / 8
    report["torch"] = torch.__version__
    report["hbm_bytes_per_second"] = bw
except Exception as e:  # noqa: BLE001
    report["torch_error"] = str(e)
    bw = None
if bw is None:
    name = report["gpu"].lower()
    bw = 4.8e12 if "h200" in name else 3.35e12 if "h100" in name else None
    report["hbm_bytes_per_second"] = bw
# Bytes one decoded token reads: every weight but the embedding (one row of it), unless it is
# tied to the LM head.
import struct
sizes = {}
for f in glob.glob(model + "/*.safetensors"):
    with open(f, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        for name, t in json.loads(fh.read(n)).items():
            if name != "__metadata__":
                sizes[name] = t["data_offsets"][1] - t["data_offsets"][0]
weights = sum(sizes.values())
if "lm_head.weight" in sizes:
    weights -= sizes.get("model.embed_tokens.weight", 0)
report["weight_bytes_per_token"] = weights
bg = report["bench_generate"] or {}
ours = ((bg.get("ours") or {}).get("timing") or {}).get("decode_tokens_per_second")
if bw and weights and ours:
    bound = bw / weights
    report["decode_bound_tokens_per_second"] = bound
    report["decode_fraction_of_bound"] = ours / bound
json.dump(report, open(os.path.join(out, "gpu-check.json"), "w"), indent=1)
print(json.dumps({k: report.get(k) for k in ("gpu", "device_check", "decode_fraction_of_bound")}, indent=1)[:6000])
bm = report.get("bench_map") or {}
print("map seconds:", bm.get("map_seconds"), "peer/ours:", bm.get("ratio_peer_over_ours"))
print("generate:", {k: bg.get(k) for k in ("ratio_decode", "sweep_16_values_seconds")})
EOF
log "done"
