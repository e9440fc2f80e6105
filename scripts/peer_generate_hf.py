#!/usr/bin/env python3
"""Generation peer for `flash-interp bench-generate` on a Hugging Face directory: transformers'
greedy `generate` on the same device, dtype, prompt tokens and number of new tokens.

The model is loaded with AutoModelForCausalLM.from_pretrained(DIR, local_files_only=True) in
--dtype onto --device ("load_seconds", not part of any other timing). Generation is greedy
(do_sample=False) with the end-of-sequence token disabled, so exactly --max-new-tokens tokens
come out every run. One untimed warm-up generate of a few tokens comes first (with --cache static
or --compile: two whole runs, whose shapes the cache and the compiled graphs depend on); then each
of --runs timed runs measures the prefill (a generate of 1 new token: the time to the first
token) and the full generate of N tokens (CUDA synchronized around each timer). Per run:

    decode_tokens_per_second = (N - 1) / (total_seconds - prefill_seconds)
    tokens_per_second        = N / total_seconds

and the run with the median decode rate is reported (prefill and total are medians over runs).

Usage:
    python3 scripts/peer_generate_hf.py --model DIR [--device cuda] [--dtype bf16|f16|f32|tf32]
                                        [--prompt-ids 1,2,3 | --prompt TEXT] [--max-new-tokens 128]
                                        [--runs 3] [--cache dynamic|static] [--compile]
                                        [--attn sdpa|eager|...] [--json]

--prompt-ids takes the prompt's token ids as given (no BOS is added); --prompt TEXT is encoded by
the directory's tokenizer (AutoTokenizer, with its special tokens; where that fails, tokenizer.json
through the `tokenizers` library), raw, without a chat template; without either, a fixed story
prompt is encoded. --cache static with --compile is transformers' fast path
(torch.compile(model.forward, mode="reduce-overhead")); both are off by default (the plain
`generate` a user gets), and compiling takes minutes.

JSON (one line with --json): peer, transformers, torch, cuda, device, device_name, dtype,
torch_dtype, attn_implementation, cache, compile, prompt_tokens, tokenizer (null with
--prompt-ids), new_tokens, runs, warmup_generates (new-token counts of the untimed generates),
prefill_seconds, total_seconds, decode_tokens_per_second, tokens_per_second,
runs_decode_tokens_per_second, load_seconds, peak_gpu_memory_bytes (torch.cuda.max_memory_allocated
over the whole process; null on a CPU), peak_gpu_reserved_bytes, peak_rss_bytes (this process's
VmHWM), tokens (the generated ids of the reported run), tokens_agree_across_runs.

Exit codes: 0 ok, 2 bad arguments or inputs, 3 torch / transformers not importable, 4 the device
is not available, 5 generate did not produce exactly --max-new-tokens tokens.
"""

import argparse
import json
import os
import statistics
import sys
import time

from peer_torch import DTYPES, device_and_dtype

DEFAULT_PROMPT = "Write a long story about a dog who learns to fly."
WARMUP_TOKENS = 4


def fail(code, msg):
    print(f"peer_generate_hf: {msg}", file=sys.stderr)
    return code


def vm_hwm():
    """Peak resident memory of this process, in bytes (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def version_tuple(v):
    out = []
    for part in v.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt-ids", help="the prompt's token ids, comma-separated (e.g. 1,2,3)")
    g.add_argument("--prompt", help="the prompt as text (needs the directory's tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="greedy tokens per run (default: 128)")
    p.add_argument("--runs", type=int, default=3, help="timed runs (default: 3); the median is reported")
    p.add_argument("--cache", choices=["dynamic", "static"], default="dynamic", help="KV cache (default: dynamic)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward (use with --cache static)")
    p.add_argument("--attn", default=None, help="attn_implementation (default: transformers' own, sdpa)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    a = p.parse_args()
    if a.max_new_tokens < 2:
        p.error("--max-new-tokens must be at least 2 (the decode rate is over the tokens after the first)")
    if a.runs < 1:
        p.error("--runs must be at least 1")
    return a


def main():
    args = parse_args()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        return fail(2, f"{args.model} is not a Hugging Face directory (no config.json)")
    prompt_ids = None
    if args.prompt_ids is not None:
        try:
            prompt_ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t != ""]
        except ValueError:
            return fail(2, f"--prompt-ids must be comma-separated integers, not {args.prompt_ids!r}")
        if not prompt_ids:
            return fail(2, "--prompt-ids is empty")
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, GenerationConfig
    except ImportError as e:
        return fail(3, f"needs torch and transformers ({e}); pip install torch transformers safetensors")
    try:
        transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars on stderr
    except AttributeError:
        pass

    setup = device_and_dtype(torch, args.device, args.dtype)
    if len(setup) == 2:
        return fail(*setup)
    device, dtype, _ = setup
    cuda = device.type == "cuda"

    tokenizer = None
    if prompt_ids is None:
        text = args.prompt if args.prompt is not None else DEFAULT_PROMPT
        errors = []
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
            prompt_ids, tokenizer = list(tok(text)["input_ids"]), "AutoTokenizer"
        except Exception as e:  # noqa: BLE001  (any tokenizer trouble: try tokenizer.json as it is)
            errors.append(f"AutoTokenizer: {type(e).__name__}: {e}")
            try:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
                prompt_ids, tokenizer = list(tok.encode(text).ids), "tokenizers (tokenizer.json)"
            except Exception as e2:  # noqa: BLE001
                errors.append(f"tokenizers: {type(e2).__name__}: {e2}")
        if prompt_ids is None:
            return fail(2, f"could not tokenize the prompt with {args.model}'s tokenizer ({'; '.join(errors)}); "
                           "pass --prompt-ids instead")
        if errors:
            print(f"peer_generate_hf: {errors[0]}; used tokenizer.json through `tokenizers`", file=sys.stderr)

    # ---- load
    # transformers >= 4.56 calls it `dtype` (and warns about `torch_dtype`); older ones only know
    # `torch_dtype` (and would pass an unknown `dtype` on to the config, silently loading f32).
    tf_version = transformers.__version__
    dtype_kw = "dtype" if version_tuple(tf_version) >= (4, 56) else "torch_dtype"
    kw = {dtype_kw: dtype, "local_files_only": True}
    if args.attn:
        kw["attn_implementation"] = args.attn
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    try:
        try:
            # Straight onto the device (no full copy in host memory first) where this version can.
            device_map = {"": device.index} if cuda else None
            model = AutoModelForCausalLM.from_pretrained(args.model, device_map=device_map, **kw)
        except (ImportError, ValueError, TypeError) as e:
            # e.g. older versions: device_map needs `accelerate`
            print(f"peer_generate_hf: device_map failed ({type(e).__name__}: {str(e)[:200]}); loading, then .to()",
                  file=sys.stderr)
            model = AutoModelForCausalLM.from_pretrained(args.model, **kw)
        model = model.to(device)
    except OSError as e:
        return fail(2, f"loading {args.model}: {e}")
    except torch.cuda.OutOfMemoryError as e:  # type: ignore[attr-defined]
        return fail(4, f"out of device memory loading {args.model}: {e}")
    model.eval()
    if cuda:
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - t0
    params_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    attn_impl = getattr(model.config, "_attn_implementation", None)
    vocab = model.get_output_embeddings().weight.shape[0]
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        return fail(2, f"prompt ids out of the vocabulary [0, {vocab}): {bad[:8]}")
    if args.compile:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    attention_mask = torch.ones_like(input_ids)
    pad = model.config.pad_token_id if getattr(model.config, "pad_token_id", None) is not None else 0

    # Our own generation config replaces the directory's (generation_config.json may ask for
    # sampling, and recent versions fill a passed config's unset fields from the model's): greedy,
    # no end-of-sequence token at all, so generation neither stops at it nor suppresses it
    # (min_new_tokens would forbid the EOS token and change the greedy choice), and exactly n tokens.
    base = dict(do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=pad,
                bos_token_id=getattr(model.config, "bos_token_id", None),
                temperature=None, top_p=None, top_k=None, use_cache=True)
    if args.cache == "static":
        base["cache_implementation"] = "static"
    model.generation_config = GenerationConfig(**base)

    def gen_config(n):
        return GenerationConfig(max_new_tokens=n, **base)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def generate(n):
        sync()
        t = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config(n))
        sync()
        return time.perf_counter() - t, out[0, input_ids.shape[1]:].tolist()

    # ---- warm-up (untimed): a few tokens; with a static cache or compiled forward, a whole timed
    # run's calls (the cache's size and the compiled graphs depend on max_new_tokens)
    n = args.max_new_tokens
    warmup = [WARMUP_TOKENS] if args.cache == "dynamic" and not args.compile else [n, 1, n, 1]
    for w in warmup:
        generate(w)
    runs = []
    for _ in range(args.runs):
        prefill_s, first = generate(1)
        total_s, toks = generate(n)
        if len(toks) != n:
            return fail(5, f"generate made {len(toks)} tokens, not {n}")
        if first and toks and first[0] != toks[0]:
            print(f"peer_generate_hf: warning: the prefill's token {first[0]} != the run's first token {toks[0]}",
                  file=sys.stderr)
        runs.append({
            "prefill_seconds": prefill_s,
            "total_seconds": total_s,
            "decode_tokens_per_second": (n - 1) / max(total_s - prefill_s, 1e-9),
            "tokens_per_second": n / max(total_s, 1e-9),
            "tokens": toks,
        })
    best = sorted(runs, key=lambda r: r["decode_tokens_per_second"])[len(runs) // 2]
    report = {
        "peer": f"transformers {tf_version} (torch {torch.__version__})",
        "transformers": tf_version,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": args.dtype,
        "torch_dtype": params_dtype,
        "attn_implementation": attn_impl,
        "cache": args.cache,
        "compile": args.compile,
        "prompt_tokens": len(prompt_ids),
        "tokenizer": tokenizer,
        "new_tokens": n,
        "runs": args.runs,
        "warmup_generates": warmup,
        "prefill_seconds": statistics.median(r["prefill_seconds"] for r in runs),
        "total_seconds": statistics.median(r["total_seconds"] for r in runs),
        "decode_tokens_per_second": best["decode_tokens_per_second"],
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs),
        "runs_decode_tokens_per_second": [r["decode_tokens_per_second"] for r in runs],
        "load_seconds": load_s,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
        "peak_rss_bytes": vm_hwm(),
        "tokens": best["tokens"],
        "tokens_agree_across_runs": all(r["tokens"] == runs[0]["tokens"] for r in runs),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"transformers {tf_version} on {report['device_name']} ({args.dtype}, {attn_impl}, {args.cache} cache"
              f"{', compiled' if args.compile else ''}): {n} greedy tokens after {len(prompt_ids)} prompt tokens: "
              f"decode {report['decode_tokens_per_second']:.1f} tok/s, prefill {report['prefill_seconds']:.3f} s, "
              f"overall {report['tokens_per_second']:.1f} tok/s (load {load_s:.1f} s not counted)")
        print("tokens:", report["tokens"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
