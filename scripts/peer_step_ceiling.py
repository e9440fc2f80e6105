#!/usr/bin/env python3
"""What batching can buy on this CPU: PyTorch's own f32 matmuls on a model's shapes (SmolLM2-135M
by default), one decoding step of N rows against a step of 2 (one steer stream: a normal and a
steered row), and PyTorch's f32 GEMM on large square matrices (the machine's practical f32 peak).

It leaves out attention, norms and sampling, and its weights are dense f32 (no dequantization),
so its step is a lower bound on any f32-activation step's cost. Compare with
`flash-interp bench-generate --streams 8` in the same session:

    python scripts/peer_step_ceiling.py --threads 2

Prints one JSON object: per row count the step time, row-tokens/s and GFLOP/s; the speed-up of
one step of N rows over N/2 steps of 2; the GFLOP/s that 4x one stream's tokens/s would need
(given `--one-stream` tok/s, ours), and that as a fraction of the square-GEMM peak.
"""
import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--d-ff", type=int, default=1536)
    ap.add_argument("--d-kv", type=int, default=192, help="n_kv_heads x head_dim")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--one-stream", type=float, default=None, help="our one steer stream's tokens/s (bench-generate --streams)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d, ff, kv = a.d_model, a.d_ff, a.d_kv
    g = torch.Generator().manual_seed(0)

    def mk(o, i):
        return torch.randn(o, i, generator=g) * 0.02

    layers = [[mk(d, d), mk(kv, d), mk(kv, d), mk(d, d), mk(ff, d), mk(ff, d), mk(d, ff)] for _ in range(a.layers)]
    head = mk(a.vocab, d)

    def step(x):
        for q, k, v, o, gate, up, down in layers:
            att = x @ q.T
            _ = x @ k.T
            _ = x @ v.T
            x = x + att @ o.T
            x = x + (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
        return x @ head.T

    def best_step(rows, reps=10):
        x = torch.randn(rows, d, generator=g)
        for _ in range(2):
            step(x)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps):
                step(x)
            best = min(best, (time.perf_counter() - t) / reps)
        return best

    flop = 2 * (a.layers * (2 * d * d + 2 * kv * d + 3 * d * ff) + a.vocab * d)  # per row-token
    out = {"threads": a.threads, "gflop_per_row_token": flop / 1e9, "steps": {}}
    for rows in sorted({1, 2, a.rows}):
        t = best_step(rows)
        out["steps"][rows] = {"ms": t * 1e3, "row_tokens_per_second": rows / t, "gflops": rows * flop / t / 1e9}
    s = out["steps"]
    out["batch_speedup"] = s[a.rows]["row_tokens_per_second"] / s[2]["row_tokens_per_second"]
    peak = 0.0
    with torch.no_grad():
        for n in (1024, 2048):
            x, y = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
            for _ in range(2):
                x @ y
            t = time.perf_counter()
            for _ in range(5):
                x @ y
            peak = max(peak, 2 * n**3 * 5 / (time.perf_counter() - t) / 1e9)
    out["square_gemm_gflops"] = peak
    if a.one_stream:
        need = 4 * a.one_stream * flop / 1e9
        out["gflops_for_4x_one_stream"] = need
        out["fraction_of_square_peak"] = need / peak
    print(json.dumps(out))


if __name__ == "__main__":
    main()
