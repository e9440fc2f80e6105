#!/usr/bin/env python3
"""Peer benchmark on a GPU: the Flash Interp "neuron map" computed with PyTorch, reading a Hugging
Face model directory (config.json, model.safetensors or sharded with model.safetensors.index.json).

For every layer L, with dirs_L = model.layers.L.mlp.up_proj.weight [d_ff, d] (the neurons'
directions) and W_U = lm_head.weight [vocab, d] (model.embed_tokens.weight when the embeddings are
tied or there is no lm_head), in chunks of --chunk rows:

    logits = dirs_chunk @ W_U.T                      # in --dtype, then .float() for the reductions

and, for both polarities (+logits and -logits), per row (neuron):
  * lse      - logsumexp over the whole vocabulary,
  * top-k    - token ids and logits (torch.topk, sorted: most likely first),
  * lse_top  - logsumexp of those top-k logits (a [rows, k] reduction: next to nothing).
With --moments also the mean, std, skew and kurtosis of +logits over the vocabulary (what the
Rust map computes as well, for its neuron classes).

The results stay on the device until a layer is done, then are copied to the host (as a tool
that keeps the map would). All weights are loaded to the device first, in --dtype, and that is
timed separately ("load_seconds"); "seconds" is the map alone. One chunk of layer 0 goes through
the whole computation once before timing starts (cuBLAS / kernel set-up), untimed: "warmup": true.

Usage:
    python3 scripts/peer_map_gpu.py --model DIR [--device cuda] [--dtype bf16|f16|f32|tf32]
                                    [--chunk 2048] [--layers N] [--rows N] [--k 100] [--moments]
                                    [--logits dtype|f32]
                                    [--json] [--check-out layer0.npz]

--dtype tf32 is f32 weights with TF32 matmuls (torch.set_float32_matmul_precision("high"));
f32 is full-precision matmuls ("highest"). --logits f32 has a bf16/f16 matmul write f32 logits
itself (torch.mm(..., out_dtype=torch.float32): CUDA and torch >= 2.8 only; elsewhere it falls
back to the default, says so on stderr and in "logits_note"), as cuBLAS's GemmEx does for the
Rust map, instead of rounding them to the dtype and converting. --rows N maps only the first N
neurons of each layer (quick tests on a CPU). --device cpu works too (slowly), for testing.

--check-out saves layer 0 as an uncompressed .npz: float32 pos_lse, neg_lse, pos_lse_top,
neg_lse_top [rows], float32 pos_logits, neg_logits [rows, k] and uint32 pos_ids, neg_ids
[rows, k] (most likely first; neg logits are those of -logits); with --moments also float32
mean, std, skew, kurtosis [rows].

JSON (one line with --json): peer, model, device, device_name, torch, cuda, safetensors,
lm_head (the tensor used), dtype, logits_dtype, logits_note, matmul_precision, chunk, k, moments,
layers, d_ff, rows_per_layer, d, vocab, neurons, seconds (the whole timed loop, host copies
included), neurons_per_second, matmul_seconds, reduce_seconds, copy_seconds (summed CUDA events
on a GPU, wall clock on a CPU: "timers"), load_seconds (on a CPU safetensors maps the file
lazily: ~0), load_bytes (as stored), warmup (true: one chunk of layer 0 went through untimed),
warmup_rows, peak_memory_bytes (CUDA; null on a CPU).

Exit codes: 0 ok, 2 bad arguments or inputs, 3 torch / safetensors not importable,
4 the device is not available.
"""

import argparse
import json
import os
import re
import sys
import time

from peer_torch import DTYPES, device_and_dtype


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    p.add_argument("--dtype", default="bf16", choices=DTYPES, help="weights and matmul dtype (default: bf16)")
    p.add_argument("--chunk", type=int, default=2048, help="rows per matmul chunk (default: 2048)")
    p.add_argument("--layers", type=int, default=0, help="only the first N layers (default: all)")
    p.add_argument("--rows", type=int, default=0, help="only the first N neurons of each layer (tests)")
    p.add_argument("--logits", choices=["dtype", "f32"], default="dtype",
                   help="the matmul's output: in --dtype then .float() (default), or f32 straight from the "
                        "matmul (torch.mm(..., out_dtype=torch.float32): CUDA, torch >= 2.8; falls back to dtype)")
    p.add_argument("--k", type=int, default=100, help="top tokens per neuron and polarity (default: 100)")
    p.add_argument("--moments", action="store_true", help="also the mean/std/skew/kurtosis of +logits")
    p.add_argument("--json", action="store_true", help="print one JSON line with the timings")
    p.add_argument("--check-out", metavar="FILE", help="save layer-0 results as .npz for verification")
    a = p.parse_args()
    if a.chunk <= 0 or a.k <= 0 or a.layers < 0 or a.rows < 0:
        p.error("--chunk and --k must be positive, --layers and --rows not negative")
    return a


def fail(code, msg):
    print(f"peer_map_gpu: {msg}", file=sys.stderr)
    return code


# ------------------------------------------------------------------------- the model's tensors

UP_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.up_proj\.weight$")


def tensor_files(model_dir):
    """{tensor name: file} for a single model.safetensors or a sharded one (the index)."""
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        return {k: os.path.join(model_dir, v) for k, v in wm.items()}
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    out = {}
    for fn in files:
        path = os.path.join(model_dir, fn)
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                out[k] = path
    return out


def pick_names(names, config):
    """The LM head's tensor name and the up_proj names by layer."""
    ups = {}
    for n in names:
        m = UP_RE.search(n)
        # Skip vision towers etc. of multimodal checkpoints: keep the text model's (shortest) name.
        if m and ("vision" not in n) and (int(m.group(1)) not in ups or len(n) < len(ups[int(m.group(1))])):
            ups[int(m.group(1))] = n
    tied = config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False))
    heads = sorted((n for n in names if n.endswith("lm_head.weight")), key=len)
    embeds = sorted((n for n in names if n.endswith("embed_tokens.weight") and "vision" not in n), key=len)
    if heads and not tied:
        head = heads[0]
    elif embeds:
        head = embeds[0]
    elif heads:
        head = heads[0]
    else:
        head = None
    return head, [ups[i] for i in sorted(ups)]


def load_tensors(files, names, device, dtype):
    """Load `names` straight to `device`, converted there to `dtype`; returns them and the bytes read."""
    from safetensors import safe_open

    by_file = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    dev = str(device)  # "cpu" or "cuda:N"
    out, nbytes = {}, 0
    for path, ns in by_file.items():
        with safe_open(path, framework="pt", device=dev) as f:
            for n in ns:
                t = f.get_tensor(n)
                nbytes += t.numel() * t.element_size()
                out[n] = t.to(dtype).contiguous()
                del t
    return out, nbytes


# ----------------------------------------------------------------------------------------- map

def main():
    args = parse_args()
    if not os.path.isdir(args.model):
        return fail(2, f"{args.model} is not a directory")
    cfg_path = os.path.join(args.model, "config.json")
    if not os.path.exists(cfg_path):
        return fail(2, f"{args.model} has no config.json")
    with open(cfg_path) as f:
        config = json.load(f)
    try:
        import numpy as np
        import torch
        import safetensors
    except ImportError as e:
        return fail(3, f"needs numpy, torch and safetensors ({e}); pip install torch safetensors numpy")

    setup = device_and_dtype(torch, args.device, args.dtype)
    if len(setup) == 2:
        return fail(*setup)
    device, dtype, precision = setup
    cuda = device.type == "cuda"

    try:
        files = tensor_files(args.model)
    except (OSError, ValueError, KeyError) as e:
        return fail(2, f"reading the safetensors of {args.model}: {e}")
    head_name, up_names = pick_names(files.keys(), config)
    if head_name is None or not up_names:
        return fail(2, f"{args.model}: no lm_head / embed_tokens or no layers.N.mlp.up_proj.weight tensors")
    if args.layers > 0:
        up_names = up_names[: args.layers]

    # ---- load (untimed for the map)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        w, load_bytes = load_tensors(files, [head_name] + up_names, device, dtype)
    except torch.cuda.OutOfMemoryError as e:  # type: ignore[attr-defined]
        return fail(4, f"out of device memory loading the weights: {e}")
    if cuda:
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - t0
    wu = w.pop(head_name)
    ups = [w.pop(n) for n in up_names]
    vocab, d = wu.shape
    k = min(args.k, vocab)
    for n, u in zip(up_names, ups):
        if u.dim() != 2 or u.shape[1] != d:
            return fail(2, f"{n} has shape {tuple(u.shape)}, expected [d_ff, {d}]")
    wu_t = wu.t()  # a transposed view: the matmul reads it as-is

    def reduce(x):
        """x: [n, vocab] float32 logits (consumed: negated in place). Device tensors."""
        pos_v, pos_i = torch.topk(x, k, dim=1, largest=True, sorted=True)
        neg_v, neg_i = torch.topk(x, k, dim=1, largest=False, sorted=True)
        neg_v = neg_v.neg()
        r = {}
        if args.moments:
            mean = x.mean(dim=1, keepdim=True)
            c = x - mean
            c2 = c * c
            var = c2.mean(dim=1)
            r["mean"] = mean[:, 0]
            r["std"] = var.sqrt()
            r["skew"] = (c2 * c).mean(dim=1) / var.pow(1.5)
            r["kurtosis"] = (c2 * c2).mean(dim=1) / (var * var)
            del c, c2
        r["pos_lse"] = torch.logsumexp(x, dim=1)
        r["neg_lse"] = torch.logsumexp(x.neg_(), dim=1)  # last use of the logits
        r.update(pos_ids=pos_i, pos_logits=pos_v, pos_lse_top=torch.logsumexp(pos_v, dim=1),
                 neg_ids=neg_i, neg_logits=neg_v, neg_lse_top=torch.logsumexp(neg_v, dim=1))
        return r

    logits_dtype = "f32" if dtype == torch.float32 else f"{args.dtype} (then .float())"
    logits_note = None
    out_f32 = False
    if args.logits == "f32" and dtype != torch.float32:
        try:
            torch.mm(ups[0][:8], wu_t, out_dtype=torch.float32)
            out_f32, logits_dtype = True, "f32 (out_dtype)"
        except (TypeError, RuntimeError, NotImplementedError) as e:
            logits_note = f"--logits f32 unsupported here, used {args.dtype}: {str(e).splitlines()[0][:200]}"
            print(f"peer_map_gpu: {logits_note}", file=sys.stderr)

    def logits_of(rows):
        if out_f32:
            return torch.mm(rows, wu_t, out_dtype=torch.float32)
        return (rows @ wu_t).float()  # in the dtype; .float() is a no-op for f32 / tf32

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    # ---- warm-up: one chunk of layer 0, untimed
    warm_rows = ups[0][: min(args.chunk, args.rows or ups[0].shape[0])]
    res = reduce(logits_of(warm_rows))
    for v in res.values():
        v.cpu()
    del res
    sync()

    # ---- the map
    events = []  # CUDA events per chunk: start, after the matmul, after the reductions
    copy_events = []  # and per layer: before and after gathering and copying to the host
    matmul_s = reduce_s = copy_s = 0.0
    neurons = 0
    d_ff = None
    check = None
    sync()
    t_start = time.perf_counter()
    for li, up in enumerate(ups):
        d_ff = up.shape[0]
        n_rows = min(args.rows, d_ff) if args.rows else d_ff
        parts = []
        for s in range(0, n_rows, args.chunk):
            rows = up[s: min(s + args.chunk, n_rows)]
            if cuda:
                e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                e[0].record()
                x = logits_of(rows)
                e[1].record()
                parts.append(reduce(x))
                e[2].record()
                events.append(e)
            else:
                t0 = time.perf_counter()
                x = logits_of(rows)
                t1 = time.perf_counter()
                parts.append(reduce(x))
                t2 = time.perf_counter()
                matmul_s += t1 - t0
                reduce_s += t2 - t1
            del x
        # the layer is done: gather on the device (ids as int32, as a tool would keep them), one
        # copy of each result to the host
        if cuda:
            c = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            c[0].record()
        t0 = time.perf_counter()
        host = {}
        for name in parts[0]:
            t = torch.cat([p[name] for p in parts])
            host[name] = (t.to(torch.int32) if name.endswith("_ids") else t).cpu()
        if cuda:
            c[1].record()
            copy_events.append(c)
        else:
            copy_s += time.perf_counter() - t0
        del parts
        neurons += n_rows
        if li == 0 and args.check_out:
            check = host
        del host
    sync()
    total = time.perf_counter() - t_start
    if cuda:
        matmul_s = sum(e[0].elapsed_time(e[1]) for e in events) / 1e3
        reduce_s = sum(e[1].elapsed_time(e[2]) for e in events) / 1e3
        copy_s = sum(c[0].elapsed_time(c[1]) for c in copy_events) / 1e3

    if check is not None:
        out = {}
        for name in ("pos_lse", "neg_lse", "pos_lse_top", "neg_lse_top", "pos_logits", "neg_logits",
                     "pos_ids", "neg_ids"):
            out[name] = check[name].numpy().astype(np.uint32 if name.endswith("_ids") else np.float32)
        if args.moments:
            for name in ("mean", "std", "skew", "kurtosis"):
                out[name] = check[name].numpy().astype(np.float32)
        np.savez(args.check_out, **out)

    report = {
        "peer": f"PyTorch {torch.__version__}",
        "model": os.path.abspath(args.model),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "safetensors": safetensors.__version__,
        "lm_head": head_name,
        "dtype": args.dtype,
        "logits_dtype": logits_dtype,
        "logits_note": logits_note,
        "matmul_precision": precision,
        "chunk": args.chunk,
        "k": k,
        "moments": args.moments,
        "layers": len(ups),
        "d_ff": d_ff,
        "rows_per_layer": min(args.rows, d_ff) if args.rows else d_ff,
        "d": d,
        "vocab": vocab,
        "neurons": neurons,
        "seconds": total,
        "neurons_per_second": neurons / total if total > 0 else None,
        "matmul_seconds": matmul_s,
        "reduce_seconds": reduce_s,
        "copy_seconds": copy_s,
        "timers": "cuda events" if cuda else "wall clock",
        "load_seconds": load_s,
        "load_bytes": load_bytes,
        "warmup": True,
        "warmup_rows": warm_rows.shape[0],
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"PyTorch {torch.__version__} on {report['device_name']} ({args.dtype}): {len(ups)} layers x "
              f"{report['rows_per_layer']} neurons, d={d}, vocab={vocab}, chunk {args.chunk}: {total:.3f} s "
              f"(matmul {matmul_s:.3f} s, reduce {reduce_s:.3f} s, copy {copy_s:.3f} s; "
              f"load {load_s:.3f} s not counted), {neurons / total:,.0f} neurons/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
