"""The CPU decoding step's two big pieces, ours against PyTorch's (issue 19), one at a time: the weight
products of one step and the attention over the cache.

Products: the 24 weight products of one step of bench_sample.py's model (6 layers of 384 x 1152, 384 x 384,
384 x 1536 and 1536 x 384 weights, float32, each layer's own arrays, so that they stream from memory as in a
step) at batch B, by every way NumPy can be asked for them:
  transposed   W @ x.T into a (out, B) buffer, copied back (tinygrad_lm/decode_cpu.py's `product`, B > 1)
  direct       x @ W.T straight into the output (decode_cpu's choice at B = 1, a GEMV)
  stored_WT    x @ Wt with W kept transposed, (in, out) contiguous
  gemv_loop    one GEMV per row of x (W read B times, from cache after the first)
  rows_split   W's rows halved over two Python threads, OpenBLAS on one thread each
  chunk256     x @ W.T by blocks of 256 rows of W (each block's product while it sits in L2)
  einsum       np.einsum without BLAS
against torch.nn.functional.linear (MKL on x86). Attention: one query row per head against L cached keys
and values in each of the 6 layers' caches (tensor/cpu/attention.py's decode_attention, on one BLAS thread
as the decoder runs it, and split over two threads as it does from rows x L = 1024), against
F.scaled_dot_product_attention.

Both sides on --threads threads (OpenBLAS's count set per call, as the decoder does; torch.set_num_threads).
The ways are interleaved round after round; the figure is each one's median over rounds, in microseconds
per step (products) or per step's 6 layers (attention). Every NumPy way is checked equal to `transposed`.
The ratios are PyTorch's time over ours (the fastest NumPy way; for attention the faster thread count):
above 1, ours is faster.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE taskset -c 0,1 python benchmarks/bench_decode_cpu_pieces.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import _common as C
import numpy as np

from profile_decode_cpu import direct_product, transposed_product
from tensor import backend
from tensor.cpu.attention import decode_attention

N_LAYER, C_EMBD, N_HEAD, BLOCK = 6, 384, 6, 256
SHAPES = [(3 * C_EMBD, C_EMBD), (C_EMBD, C_EMBD), (4 * C_EMBD, C_EMBD), (C_EMBD, 4 * C_EMBD)]   # (out, in)


def product_ways(W: list, x: dict, y: dict, B: int, blas: backend.BlasThreads, pool: ThreadPoolExecutor,
                 threads: int) -> dict:
    """{name: a function computing every y[out] = x[in] @ W.T of one step}."""
    spare = np.empty(4 * C_EMBD * B, np.float32)
    WT = [[np.ascontiguousarray(w.T) for w in ws] for ws in W]
    every = [w for ws in W for w in ws]

    def transposed() -> None:
        blas.set(threads)
        for w in every:
            transposed_product(x[w.shape[1]], w, y[w.shape[0]], spare)

    def direct() -> None:
        blas.set(threads)
        for w in every:
            direct_product(x[w.shape[1]], w, y[w.shape[0]], spare)

    def stored_wt() -> None:
        blas.set(threads)
        for wt in (w for ws in WT for w in ws):
            np.matmul(x[wt.shape[0]], wt, out=y[wt.shape[1]])

    def gemv_loop() -> None:
        blas.set(threads)
        for w in every:
            xx, yy = x[w.shape[1]], y[w.shape[0]]
            for b in range(B):
                np.matmul(w, xx[b], out=yy[b])

    def rows_split() -> None:
        blas.set(1)
        for w in every:
            n = w.shape[0] // 2
            xx, yy = x[w.shape[1]], y[w.shape[0]]
            rest = pool.submit(np.matmul, xx, w[n:].T, out=yy[:, n:])
            np.matmul(xx, w[:n].T, out=yy[:, :n])
            rest.result()

    def chunk256() -> None:
        blas.set(threads)
        for w in every:
            xx, yy = x[w.shape[1]], y[w.shape[0]]
            for r in range(0, w.shape[0], 256):
                np.matmul(xx, w[r:r + 256].T, out=yy[:, r:r + 256])

    def einsum() -> None:
        for w in every:
            np.einsum("bk,nk->bn", x[w.shape[1]], w, out=y[w.shape[0]], optimize=False)

    return {"transposed": transposed, "direct": direct, "stored_WT": stored_wt, "gemv_loop": gemv_loop,
            "rows_split": rows_split, "chunk256": chunk256, "einsum": einsum}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--length", type=int, default=128, help="cached positions (bench_sample's mean: 128)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20, help="calls per timing")
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F
    backend.tune_host_allocator()
    backend.tune_blas_wait()   # as the sample CLI
    C.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    blas = backend.BlasThreads.find()
    if blas is None:
        raise SystemExit("bench_decode_cpu_pieces: NumPy's BLAS is not OpenBLAS (its thread count cannot be set per call)")
    pool = ThreadPoolExecutor(1)
    rng = np.random.default_rng(0)
    W = [[rng.standard_normal(s, dtype=np.float32) * 0.02 for s in SHAPES] for _ in range(N_LAYER)]
    TW = [[torch.from_numpy(w) for w in ws] for ws in W]
    D, L = C_EMBD // N_HEAD, args.length

    def timeit(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(args.reps):
            fn()
        return (time.perf_counter() - t0) / args.reps * 1e6

    res: dict = {"machine": C.machine_info(args.threads), "loadavg_at_start": os.getloadavg(), "length": L,
                 "unit": "us per step (median over rounds)", "batches": {}}
    for B in args.batches:
        x = {s[1]: rng.standard_normal((B, s[1]), dtype=np.float32) for s in SHAPES}
        y = {s[0]: np.empty((B, s[0]), np.float32) for s in SHAPES}
        tx = {k: torch.from_numpy(v) for k, v in x.items()}
        ways = product_ways(W, x, y, B, blas, pool, args.threads)
        ways["transposed"]()
        want = {k: v.copy() for k, v in y.items()}
        for name, fn in ways.items():
            fn()
            for k in y:
                np.testing.assert_allclose(y[k], want[k], rtol=1e-4, atol=1e-4, err_msg=name)

        def torch_linear() -> None:
            with torch.inference_mode():
                for ws in TW:
                    for w in ws:
                        F.linear(tx[w.shape[1]], w)

        kv = [rng.standard_normal((2, B, N_HEAD, BLOCK, D), dtype=np.float32) for _ in range(N_LAYER)]
        tkv = [torch.from_numpy(a) for a in kv]
        q = rng.standard_normal((B, N_HEAD, 1, D), dtype=np.float32)
        tq = torch.from_numpy(q)
        o = np.empty_like(q)
        scores = np.empty((B, N_HEAD, 1, BLOCK), np.float32)

        def attention_one_thread() -> None:
            blas.set(1)
            for a in kv:
                decode_attention(q, a[0, :, :, :L], a[1, :, :, :L], o, scores=scores[..., :L])

        def attention_two_threads() -> None:
            blas.set(1)
            h = B // 2
            for a in kv:
                rest = pool.submit(decode_attention, q[h:], a[0, h:, :, :L], a[1, h:, :, :L], o[h:], None,
                                   scores[h:, ..., :L])
                decode_attention(q[:h], a[0, :h, :, :L], a[1, :h, :, :L], o[:h], scores=scores[:h, ..., :L])
                rest.result()

        def torch_attention() -> None:
            with torch.inference_mode():
                for a in tkv:
                    F.scaled_dot_product_attention(tq, a[0, :, :, :L], a[1, :, :, :L])

        fns = {f"products_{k}": v for k, v in ways.items()}
        fns.update({"products_torch": torch_linear, "attention_one_thread": attention_one_thread,
                    "attention_torch": torch_attention})
        if B > 1:
            fns["attention_two_threads"] = attention_two_threads
        times: dict = {k: [] for k in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                times[name].append(timeit(fn))
        row = {k: round(statistics.median(v), 1) for k, v in times.items()}
        best = min((v, k) for k, v in row.items() if k.startswith("products_") and k != "products_torch")
        row["products_best_numpy"] = best[1]
        row["products_torch_over_best_numpy"] = round(row["products_torch"] / best[0], 3)
        att = min(row["attention_one_thread"], row.get("attention_two_threads", float("inf")))
        row["attention_torch_over_ours"] = round(row["attention_torch"] / att, 3)
        res["batches"][str(B)] = row
        print(f"batch {B}: {row}", flush=True)
    blas.set(args.threads)
    res["loadavg_at_end"] = os.getloadavg()
    C.emit(res)


if __name__ == "__main__":
    main()
