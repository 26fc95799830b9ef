"""Scatter-add of rows (embedding / integer-indexing backward): out[idx[i]] += src[i].

Compares, on embedding-backward shapes (ids N = B*T in {12*64, 16*256}, vocab V in
{65, 4096}, width C in {128, 384}, float32):
  add_at      np.add.at(out, idx, src)                      (unbuffered ufunc, the textbook way)
  reduceat    argsort idx, then np.add.reduceat over runs   (scatter_add_rows before issue 2)
  bincount    np.bincount on flattened (row*C + col) with weights, float64 accumulate, cast back
  onehot_mm   onehot(idx).T @ src  as one GEMM (V x N) @ (N x C)
  library     tensor.ops.indexing.scatter_add_rows as it is now: one-hot GEMM for ids seen
              more than 16 times, vectorized rounds (k-th occurrence of every id) for the rest
and checks every variant against add_at. One extra row draws Zipf-distributed ids
(like real tokens: a few ids very frequent) at N=4096, V=4096, C=384.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_scatter_add.py [--threads 2]

PyTorch's index_add_ (its embedding backward's CPU kernel) is timed alongside as the peer.
Times in microseconds, min over interleaved repeats.
"""
from __future__ import annotations

import argparse

import numpy as np

from _common import emit, interleaved, machine_info, set_threads, us

from tensor.ops.indexing import scatter_add_rows  # noqa: E402


REPEATS = 7


def add_at(idx, src, V):
    out = np.zeros((V,) + src.shape[1:], src.dtype)
    np.add.at(out, idx, src)
    return out


def reduceat(idx, src, V):
    out = np.zeros((V,) + src.shape[1:], src.dtype)
    order = np.argsort(idx, kind="stable")
    s = idx[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    out[s[starts]] = np.add.reduceat(src[order], starts, axis=0)
    return out


def bincount(idx, src, V):
    C = src[0].size
    flat = (idx[:, None] * C + np.arange(C)).ravel()
    return np.bincount(flat, weights=src.reshape(-1), minlength=V * C).reshape((V,) + src.shape[1:]).astype(src.dtype)


def onehot_mm(idx, src, V):
    onehot = (idx == np.arange(V)[:, None]).astype(src.dtype)  # (V, N)
    return (onehot @ src.reshape(len(idx), -1)).reshape((V,) + src.shape[1:])


VARIANTS = {"add_at": add_at, "reduceat": reduceat, "bincount": bincount, "onehot_mm": onehot_mm,
            "library": scatter_add_rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=0.4, help="seconds per variant and shape, roughly")
    ap.add_argument("--repeats", type=int, default=REPEATS, help="interleaved repeats (min and median over them)")
    args = ap.parse_args()
    import torch
    set_threads(args.threads)

    rng = np.random.default_rng(0)
    rows = []
    shapes = [(N, V, C, "uniform") for N in (12 * 64, 16 * 256) for V in (65, 4096) for C in (128, 384)]
    shapes.append((16 * 256, 4096, 384, "zipf"))
    for N, V, C, dist in shapes:
        if dist == "uniform":
            idx = rng.integers(0, V, N).astype(np.int64)
        else:
            idx = np.minimum(rng.zipf(1.2, N) - 1, V - 1).astype(np.int64)
        src = rng.standard_normal((N, C)).astype(np.float32)
        ref = add_at(idx, src, V)
        err = {k: float(np.abs(f(idx, src, V) - ref).max()) for k, f in VARIANTS.items()}
        tidx, tsrc = torch.from_numpy(idx), torch.from_numpy(src)
        fns = {k: (lambda f=f: f(idx, src, V)) for k, f in VARIANTS.items()}
        fns["torch_index_add"] = lambda: torch.zeros(V, C).index_add_(0, tidx, tsrc)
        t = interleaved(fns, min_time=args.min_time, repeats=args.repeats)
        times = {k: us(v["min_s"]) for k, v in t.items()}
        numpy_only = {k: v for k, v in times.items() if k in VARIANTS and k != "library"}
        rows.append({"N": N, "V": V, "C": C, "ids": dist, "max_count": int(np.bincount(idx).max()),
                     "us": times, "max_abs_err_vs_add_at": err,
                     "fastest": min(numpy_only, key=numpy_only.get)})
    emit({"benchmark": "scatter_add_rows", "dtype": "float32", "machine": machine_info(args.threads),
          "results": rows})


if __name__ == "__main__":
    main()
