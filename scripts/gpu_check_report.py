"""The report of scripts/gpu-check.sh, from the steps' outputs so far: run after every step, so
that a run cut short still leaves a report of what it did.

    python3 scripts/gpu_check_report.py OUT STEPS LAYERS MODEL_DIR
"""
import glob
import json
import os
import struct
import sys

out, steps, layers, model = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
final = os.environ.get("GPU_CHECK_FINAL") == "1"
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
report = {"gpu": (read("gpu", "txt") or "").strip(), "binary": (read("version", "out") or "").strip(), "model": model, "layers": layers,
          "steps": {}}
for st in sorted(glob.glob(os.path.join(steps, "*.status"))):
    name = os.path.basename(st)[:-len(".status")]
    report["steps"][name] = json.load(open(st))
    if report["steps"][name]["rc"] != 0:
        report["steps"][name]["stderr_tail"] = (read(name, "err") or "")[-1500:]
def device_check(dc):
    if not (dc and "models" in dc):
        return dc
    keys = ("model", "weights", "pass", "error", "tolerance", "search_pass", "search_top_cpu", "search_top_device", "sweep_pass",
            "sweep_max_abs_err", "greedy_prompt", "greedy_pass", "greedy_common_prefix", "greedy_parting", "detail_pass", "detail_max_logprob_err", "detail_unexplained",
            "batch_common_prefix", "batch_partings", "batch_jobs_per_step", "batch_pass", "fused_decode_blocks", "graph_replays")
    map_keys = ("final_norm", "pass", "lse_max_rel_err", "value_max_rel_err", "std_max_rel_err", "id_mismatches", "unexplained",
                "seconds_cpu", "seconds_device")
    return {"pass": dc.get("pass"), "models": [
        {k: m[k] for k in keys if k in m} | {"greedy_tokens": len(m.get("greedy_cpu", []))} | {"maps": [{k: a.get(k) for k in map_keys} for a in m.get("maps", [])]}
        for m in dc["models"]]}
report["device_check"] = device_check(js("device-check"))
report["device_check_fused"] = device_check(js("device-check-fused"))
report["bench_map"] = js("bench-map")
report["bench_generate"] = js("bench-generate")
report["bench_generate_fused"] = js("bench-generate-fused")
report["bench_generate_graph"] = js("bench-generate-graph")
# A peer that failed leaves the step's rc 0 and its result null: its error is on the step's stderr.
for name, key in (("bench-map", "bench_map"), ("bench-generate", "bench_generate")):
    r = report[key]
    if isinstance(r, dict) and r.get("peer") is None and name in report["steps"]:
        report["steps"][name].setdefault("stderr_tail", (read(name, "err") or "")[-1500:])
report["map_command"] = js("map-command")
# The bandwidth bound of greedy decoding: every weight read once per token. Asked of PyTorch
# once, at the end (importing it takes seconds); the datasheet's figure before that.
bw = None
if final:
    try:
        import torch
        p = torch.cuda.get_device_properties(0)
        if getattr(p, "memory_clock_rate", 0) and getattr(p, "memory_bus_width", 0):
            bw = 2 * p.memory_clock_rate * 1e3 * p.memory_bus_width / 8
        report["torch"] = torch.__version__
        report["hbm_bytes_per_second"] = bw
    except Exception as e:  # noqa: BLE001
        report["torch_error"] = str(e)
if bw is None:
    name = report["gpu"].lower()
    bw = 4.8e12 if "h200" in name else 3.35e12 if "h100" in name else None
    report["hbm_bytes_per_second"] = bw
# Bytes one decoded token reads: every weight but the embedding (one row of it), unless it is
# tied to the LM head.
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
bgf = report["bench_generate_fused"] or {}
bgg = report["bench_generate_graph"] or {}
def decode_rate(b):
    return ((b.get("ours") or {}).get("timing") or {}).get("decode_tokens_per_second")
ours, fused, graph = decode_rate(bg), decode_rate(bgf), decode_rate(bgg)
if bw and weights:
    bound = bw / weights
    report["decode_bound_tokens_per_second"] = bound
    report["decode_fraction_of_bound"] = ours / bound if ours else None
    report["decode_fraction_of_bound_fused"] = fused / bound if fused else None
    report["decode_fraction_of_bound_graph"] = graph / bound if graph else None
if ours and fused:
    report["decode_fused_over_plain"] = fused / ours
if ours and graph:
    report["decode_graph_over_plain"] = graph / ours
with open(os.path.join(out, "gpu-check.json.tmp"), "w") as f:
    json.dump(report, f, indent=1)
os.replace(os.path.join(out, "gpu-check.json.tmp"), os.path.join(out, "gpu-check.json"))
if not final:
    sys.exit(0)
print(json.dumps({k: report.get(k) for k in ("gpu", "device_check", "device_check_fused", "decode_fraction_of_bound",
                                              "decode_fraction_of_bound_fused", "decode_fraction_of_bound_graph", "decode_fused_over_plain",
                                              "decode_graph_over_plain")}, indent=1)[:8000])
bm = report.get("bench_map") or {}
print("map seconds:", bm.get("map_seconds"), "peer/ours:", bm.get("ratio_peer_over_ours"), "device phases:", bm.get("map_device_phases"))
print("generate:", {k: bg.get(k) for k in ("ratio_decode", "sweep_16_values_seconds", "decode_step")})
print("generate, fused:", {k: bgf.get(k) for k in ("fused_decode_blocks", "sweep_16_values_seconds", "decode_step")})
print("generate, graph:", {k: bgg.get(k) for k in ("fused_decode_blocks", "graph_replays", "decode_step")})
