#!/usr/bin/env python3
"""Generation peer for `flash-interp bench-generate`: llama.cpp through llama-cpp-python on the
same GGUF, the same prompt tokens and the same number of greedy tokens.

Prints one JSON line: prefill seconds, decode tokens/s (tokens after the first, over the time
after the first), overall tokens/s, peak RSS, and the tokens it chose (llama.cpp quantizes the
activations to 8 bits, so its greedy tokens may differ from the f32 reference).
"""
import argparse
import json
import statistics
import sys
import time


def vm_hwm():
    """Peak resident memory of this process, in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens-json", required=True, help="the prompt's token ids, as a JSON list")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed (pip install llama-cpp-python)", file=sys.stderr)
        sys.exit(2)
    prompt = json.loads(args.tokens_json)
    threads = args.threads or None
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=max(512, len(prompt) + args.new + 8),
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        verbose=False,
    )

    def once(n):
        llm.reset()
        start = time.perf_counter()
        first = None
        out = []
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if first is None:
                first = time.perf_counter()
            out.append(tok)
            if len(out) == n or tok == llm.token_eos():
                break
        end = time.perf_counter()
        return start, first, end, out

    once(8)  # warm-up
    runs = []
    for _ in range(args.runs):
        start, first, end, out = once(args.new)
        runs.append(
            {
                "prefill_seconds": first - start,
                "decode_tokens_per_second": (len(out) - 1) / max(end - first, 1e-9),
                "tokens_per_second": len(out) / max(end - start, 1e-9),
                "tokens": out,
            }
        )
    best = sorted(runs, key=lambda r: r["decode_tokens_per_second"])[len(runs) // 2]
    print(
        json.dumps(
            {
                "peer": "llama.cpp (llama-cpp-python %s)" % getattr(llama_cpp, "__version__", "?"),
                "threads": threads,
                "prefill_seconds": statistics.median(r["prefill_seconds"] for r in runs),
                "decode_tokens_per_second": best["decode_tokens_per_second"],
                "tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs),
                # This process's own peak (getrusage's ru_maxrss would include the parent's
                # peak, which a child inherits at fork on Linux).
                "peak_rss_bytes": vm_hwm(),
                "tokens": best["tokens"],
            }
        )
    )


if __name__ == "__main__":
    main()
