"""Where the CPU decoding step's time goes (tinygrad_lm/decode_cpu.py), per batch: the weight
products, the attention over the cache, GELU, the norms, and the rest (embedding, residual adds,
the k/v store, Python), timed around each call inside real steps; and the whole step with each
layout of the B > 1 products (x @ W.T directly, or W @ x.T then a transposing copy, the rule
`decode_cpu.product` keeps), so that the rule can be re-measured on another machine.

Model: bench_sample.py's (6 layers, 6 heads, 384 wide, vocab 65, block 256); a one-token prompt,
then --new-tokens steps (the cache grows from 1 to --new-tokens positions, as in bench_sample).
ms per token, best of --repeats runs. Threads: OPENBLAS_NUM_THREADS (or threadpoolctl when installed).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 taskset -c 0 \\
        python benchmarks/profile_decode_cpu.py --threads 1 --clock process
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import _common as C  # noqa: F401  (puts the repository root on sys.path)
import numpy as np

from tensor.tensor import no_grad
from tinygrad_lm import decode_cpu
from tinygrad_lm.model import GPT, GPTConfig

CLOCK = time.perf_counter


def transposed_product(x: np.ndarray, w: np.ndarray, out: np.ndarray, spare: np.ndarray) -> None:
    """W @ x.T into the spare buffer, copied back transposed (decode_cpu.product's B > 1 path)."""
    t = spare[:w.shape[0] * x.shape[0]].reshape(w.shape[0], x.shape[0])
    np.matmul(w, x.T, out=t)
    out[...] = t.T


def direct_product(x: np.ndarray, w: np.ndarray, out: np.ndarray, spare: np.ndarray) -> None:
    np.matmul(x, w.T, out=out)


def run(model: GPT, B: int, n: int, pieces: bool) -> tuple[float, dict]:
    """n decoding steps after a one-token prompt: (seconds, {piece: seconds}) (pieces: timed calls)."""
    cfg = model.config
    caches = model.new_caches(B)
    tokens = np.zeros((B, 1), dtype=np.int64)
    with no_grad():
        model(tokens, positions=np.zeros((B, 1), dtype=np.int64), caches=caches)
    dec = decode_cpu.CPUDecoder(model, caches, np.zeros(B, dtype=np.int64))
    spent: dict = {}
    if pieces:
        def timed(name, fn):
            def call(*a, **k):
                t0 = CLOCK()
                r = fn(*a, **k)
                spent[name] = spent.get(name, 0.0) + CLOCK() - t0
                return r
            return call
        dec.linear = timed("products", dec.linear)
        dec.norm = timed("norms", dec.norm)
        dec.gelu = timed("gelu", dec.gelu)
        # the decoder's attention call as a whole (its halves may run on two threads at once: timing the
        # kernel function inside would count both)
        dec.attention = timed("attention", dec.attention)
    t0 = CLOCK()
    for i in range(1, min(n, cfg.block_size - 1) + 1):
        dec.step(tokens[:, 0], np.full(B, i, dtype=np.int64))
    return CLOCK() - t0, spent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=255)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clock", default="wall", choices=("wall", "process"))
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    from tensor import backend
    backend.tune_host_allocator()
    backend.tune_blas_wait()  # as `python -m tinygrad_lm sample` does
    C.set_threads(args.threads)
    cfg = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, pos_encoding="learned")
    model = GPT(cfg, seed=0).eval()
    n = min(args.new_tokens, cfg.block_size - 1)
    res: dict = {"machine": C.machine_info(args.threads), "clock": args.clock, "new_tokens": n, "batches": {}}
    real_product = decode_cpu.product
    for B in args.batches:
        row: dict = {}
        run(model, B, 4, False)  # warm-up
        best, split = math.inf, {}
        for _ in range(args.repeats):
            total, spent = run(model, B, n, True)
            if total < best:
                best, split = total, spent
        row["step_ms"] = round(1000 * best / n, 3)
        for k in ("products", "attention", "gelu", "norms"):
            row[f"{k}_ms"] = round(1000 * split.get(k, 0.0) / n, 3)
        row["rest_ms"] = round(row["step_ms"] - sum(row[f"{k}_ms"] for k in ("products", "attention", "gelu", "norms")), 3)
        if B > 1:  # the whole step with each product layout, interleaved
            times = {"transposed": math.inf, "direct": math.inf}
            try:
                for _ in range(args.repeats):
                    for name, fn in (("transposed", transposed_product), ("direct", direct_product)):
                        decode_cpu.product = fn
                        times[name] = min(times[name], run(model, B, n, False)[0])
            finally:
                decode_cpu.product = real_product
            row["step_ms_W_xT_then_copy"] = round(1000 * times["transposed"] / n, 3)
            row["step_ms_x_WT_direct"] = round(1000 * times["direct"] / n, 3)
        res["batches"][str(B)] = row
        print(f"batch {B}: {row}", flush=True, file=sys.stderr)
    C.emit(res)


if __name__ == "__main__":
    main()
