#!/usr/bin/env python3
"""Peer benchmark: the Flash Interp "neuron map" computed with numpy (OpenBLAS) or PyTorch.

For every layer L, with dirs_L [d_ff, d] (neuron directions) and wu [vocab, d] (the LM head):

    logits = dirs_L @ wu.T                          # [d_ff, vocab], float32

and, for both polarities (+logits and -logits), per row (neuron):
  * lse      - logsumexp over the whole vocabulary,
  * top-100  - token ids and logits, sorted by descending logit (of that polarity),
  * lse_top  - logsumexp of those top-100 logits.

Inputs (written by the Rust tool): DIR/wu.npy [vocab, d] f32, DIR/dirs_00.npy .. DIR/dirs_NN.npy
[d_ff, d] f32. Reading the files is timed separately ("load_seconds") and is not part of
"seconds" = matmul_seconds + post_seconds.

Usage:
    python3 scripts/peer_map.py --dir DIR [--backend numpy|torch] [--threads N] [--chunk ROWS]
                                [--json] [--check-out layer0.npz]

--check-out saves layer 0 as an uncompressed .npz with float32 arrays pos_lse, neg_lse,
pos_lse_top, neg_lse_top [d_ff], pos_logits, neg_logits [d_ff, 100] and uint32 arrays
pos_ids, neg_ids [d_ff, 100] (most likely first; neg logits are those of -logits).

Exit codes: 0 ok, 2 bad arguments/inputs, 3 torch requested but not importable.
"""

import argparse
import glob
import json
import os
import sys
import time

K = 100


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="directory with wu.npy and dirs_NN.npy")
    p.add_argument("--backend", choices=["numpy", "torch"], default="numpy")
    p.add_argument("--threads", type=int, default=0, help="threads (default: all usable cores)")
    p.add_argument("--chunk", type=int, default=0, help="rows per matmul chunk (default: a whole layer)")
    p.add_argument("--layers", type=int, default=0, help="only the first N layers (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON line with the timings")
    p.add_argument("--check-out", metavar="FILE", help="save layer-0 results as .npz for verification")
    return p.parse_args()


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


args = parse_args()
THREADS = args.threads if args.threads > 0 else usable_cores()
# Thread pools are sized when the BLAS / OpenMP runtimes load: set this before importing numpy.
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[var] = str(THREADS)

import numpy as np  # noqa: E402


# ----------------------------------------------------------------------------------- numpy

class NumpyBackend:
    name = "numpy"

    def __init__(self, wu):
        self.wu_t = wu.T  # a transposed view: BLAS reads it as-is, no copy
        self.buf = None  # logits, reused across chunks and layers
        self.tmp = None  # scratch for exp, reused likewise

    def _bufs(self, n):
        vocab = self.wu_t.shape[1]
        if self.buf is None or self.buf.shape[0] < n:
            self.buf = np.empty((n, vocab), dtype=np.float32)
            self.tmp = np.empty((n, vocab), dtype=np.float32)
        return self.buf[:n], self.tmp[:n]

    def matmul(self, dirs):
        x, _ = self._bufs(dirs.shape[0])
        np.matmul(dirs, self.wu_t, out=x)
        return x

    @staticmethod
    def _sorted_top(x, idx, descending):
        """Gather x at the (unordered) candidate columns idx and sort them."""
        vals = np.take_along_axis(x, idx, axis=1)
        order = np.argsort(-vals if descending else vals, axis=1, kind="stable")
        return np.take_along_axis(vals, order, axis=1), np.take_along_axis(idx, order, axis=1)

    @staticmethod
    def _lse_small(v):
        # v sorted with its max in column 0
        m = v[:, :1]
        return (m[:, 0] + np.log(np.exp(v - m).sum(axis=1))).astype(np.float32)

    def post(self, x):
        n, vocab = x.shape
        k = min(K, vocab)
        _, tmp = self._bufs(n)
        # top-k of +logits (largest) and of -logits (smallest of logits), from the same array
        idx = np.argpartition(x, vocab - k, axis=1)[:, vocab - k:]
        pos_v, pos_i = self._sorted_top(x, idx, descending=True)
        idx = np.argpartition(x, k - 1, axis=1)[:, :k]
        neg_v, neg_i = self._sorted_top(x, idx, descending=False)
        neg_v = -neg_v
        # logsumexp of +logits: max-shift into scratch, exp and sum in place
        mx = pos_v[:, :1]  # row max = top-1
        np.subtract(x, mx, out=tmp)
        np.exp(tmp, out=tmp)
        pos_lse = mx[:, 0] + np.log(tmp.sum(axis=1))
        # logsumexp of -logits: min-shift, done in place on x (last use of the logits)
        mn = -neg_v[:, :1]  # row min
        np.subtract(mn, x, out=x)
        np.exp(x, out=x)
        neg_lse = -mn[:, 0] + np.log(x.sum(axis=1))
        return {
            "pos_lse": pos_lse, "pos_ids": pos_i, "pos_logits": pos_v, "pos_lse_top": self._lse_small(pos_v),
            "neg_lse": neg_lse, "neg_ids": neg_i, "neg_logits": neg_v, "neg_lse_top": self._lse_small(neg_v),
        }


# ----------------------------------------------------------------------------------- torch

class TorchBackend:
    name = "torch"

    def __init__(self, wu, torch):
        self.torch = torch
        self.wu_t = torch.from_numpy(wu).T  # transposed view, no copy
        self.buf = None

    def matmul(self, dirs):
        t = self.torch
        d = t.from_numpy(dirs)
        n, vocab = d.shape[0], self.wu_t.shape[1]
        if self.buf is None or self.buf.shape[0] < n:
            self.buf = t.empty((n, vocab), dtype=t.float32)
        x = self.buf[:n]
        t.matmul(d, self.wu_t, out=x)
        return x

    def post(self, x):
        t = self.torch
        k = min(K, x.shape[1])
        pos_v, pos_i = t.topk(x, k, dim=1, largest=True, sorted=True)
        neg_v, neg_i = t.topk(x, k, dim=1, largest=False, sorted=True)
        neg_v = neg_v.neg()
        pos_lse = t.logsumexp(x, dim=1)
        neg_lse = t.logsumexp(x.neg_(), dim=1)  # last use of the logits: negate in place
        return {
            "pos_lse": pos_lse, "pos_ids": pos_i, "pos_logits": pos_v, "pos_lse_top": t.logsumexp(pos_v, dim=1),
            "neg_lse": neg_lse, "neg_ids": neg_i, "neg_logits": neg_v, "neg_lse_top": t.logsumexp(neg_v, dim=1),
        }


# ------------------------------------------------------------------------------------ main

def to_numpy(a):
    return a if isinstance(a, np.ndarray) else a.numpy()


def main():
    wu_path = os.path.join(args.dir, "wu.npy")
    layer_paths = sorted(glob.glob(os.path.join(args.dir, "dirs_[0-9][0-9].npy")))
    if not os.path.exists(wu_path) or not layer_paths:
        print(f"peer_map: {args.dir} must hold wu.npy and dirs_00.npy ...", file=sys.stderr)
        return 2
    if args.layers > 0:
        layer_paths = layer_paths[: args.layers]

    torch_version = None
    if args.backend == "torch":
        try:
            import torch
        except ImportError as e:
            print(f"peer_map: --backend torch needs PyTorch, which is not importable here ({e}). "
                  "Install it (python3 -m pip install torch) or use --backend numpy.", file=sys.stderr)
            return 3
        torch.set_num_threads(THREADS)
        torch_version = torch.__version__
        torch.set_grad_enabled(False)

    t0 = time.perf_counter()
    wu = np.ascontiguousarray(np.load(wu_path), dtype=np.float32)
    load_s = time.perf_counter() - t0
    vocab, d = wu.shape
    if vocab < K:
        print(f"peer_map: vocab {vocab} < {K}", file=sys.stderr)
        return 2
    be = TorchBackend(wu, torch) if args.backend == "torch" else NumpyBackend(wu)

    matmul_s = post_s = 0.0
    neurons = 0
    d_ff = None
    for li, path in enumerate(layer_paths):
        t0 = time.perf_counter()
        dirs = np.ascontiguousarray(np.load(path), dtype=np.float32)
        load_s += time.perf_counter() - t0
        if dirs.ndim != 2 or dirs.shape[1] != d:
            print(f"peer_map: {path} has shape {dirs.shape}, expected [d_ff, {d}]", file=sys.stderr)
            return 2
        d_ff = dirs.shape[0]
        chunk = args.chunk if args.chunk > 0 else d_ff
        keep = [] if (li == 0 and args.check_out) else None
        for s in range(0, d_ff, chunk):
            t0 = time.perf_counter()
            x = be.matmul(dirs[s:s + chunk])
            t1 = time.perf_counter()
            res = be.post(x)
            t2 = time.perf_counter()
            matmul_s += t1 - t0
            post_s += t2 - t1
            if keep is not None:
                keep.append({k: to_numpy(v) for k, v in res.items()})
        neurons += d_ff
        if keep is not None:
            out = {k: np.concatenate([c[k] for c in keep]) for k in keep[0]}
            for k in out:
                out[k] = out[k].astype(np.uint32 if k.endswith("_ids") else np.float32)
            np.savez(args.check_out, **out)

    total = matmul_s + post_s
    report = {
        "backend": be.name, "seconds": total, "matmul_seconds": matmul_s, "post_seconds": post_s,
        "load_seconds": load_s, "neurons": neurons, "layers": len(layer_paths), "d_ff": d_ff,
        "d": d, "vocab": vocab, "threads": THREADS, "chunk": args.chunk if args.chunk > 0 else d_ff,
        "numpy": np.__version__,
    }
    if torch_version:
        report["torch"] = torch_version
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{be.name}: {len(layer_paths)} layers x {d_ff} neurons, d={d}, vocab={vocab}, "
              f"{THREADS} threads: {total:.3f} s (matmul {matmul_s:.3f} s, post {post_s:.3f} s; "
              f"load {load_s:.3f} s not counted), {neurons / total:,.0f} neurons/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
