"""The CPU decoding step's attention over the cache alone (tensor/cpu/attention.py: decode_attention),
against PyTorch's scaled_dot_product_attention on the same cache, and two alternatives, per batch and
cache length: one query row per head, 6 layers of distinct caches (B, H, 256, D) cycled as in a step
(so the filled part streams from memory, as it does in decoding), H = 6, D = 64, float32.

  blas         decode_attention as the step calls it: np.matmul over (B, H) slices (one BLAS GEMV each)
  einsum       the same softmax, both products as np.einsum (no BLAS: no per-slice calls, no BLAS threads)
  two_threads  decode_attention over the two halves of the batch, one on a worker thread (NumPy
               releases the GIL inside matmul and the ufuncs), for a second core's memory bandwidth
  torch        F.scaled_dot_product_attention(q, k[:, :, :T], v[:, :, :T]) (PyTorch's CPU kernel, its threads)

ms per token (6 layers), wall clock, the variants interleaved (benchmarks/_common.py: interleaved), and
each variant's speed relative to torch (> 1: faster than PyTorch). Outputs are checked equal to blas.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE taskset -c 6,7 python benchmarks/bench_decode_attention.py --threads 2
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import _common as C
import numpy as np

from tensor.cpu.attention import decode_attention

H, D, MAX_LEN, LAYERS = 6, 64, 256, 6


def einsum_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, scores: np.ndarray) -> None:
    """decode_attention's formulas with np.einsum for the two products."""
    s = np.einsum("bhqd,bhtd->bhqt", q, k, out=scores)
    s *= 1.0 / math.sqrt(q.shape[-1])
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    np.einsum("bhqt,bhtd->bhqd", s, v, out=out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 192, 256])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    torch = None
    if not args.no_torch:
        import torch
        import torch.nn.functional as F
    C.set_threads(args.threads)
    pool = ThreadPoolExecutor(max_workers=1)
    rng = np.random.default_rng(0)
    res: dict = {"machine": C.machine_info(args.threads), "unit": "ms per token (6 layers)", "rows": []}
    for B in args.batches:
        kv = [rng.standard_normal((2, B, H, MAX_LEN, D), dtype=np.float32) for _ in range(LAYERS)]
        q = rng.standard_normal((B, H, 1, D), dtype=np.float32)
        out = np.empty((B, H, 1, D), np.float32)
        scores = np.empty((B, H, 1, MAX_LEN), np.float32)
        tq = tkv = None
        if torch is not None:
            tq, tkv = torch.from_numpy(q), [torch.from_numpy(c) for c in kv]
        half = (B + 1) // 2
        for T in args.lengths:
            sc = scores[..., :T]

            def blas() -> None:
                for c in kv:
                    decode_attention(q, c[0][:, :, :T], c[1][:, :, :T], out, scores=sc)

            def einsum() -> None:
                for c in kv:
                    einsum_attention(q, c[0][:, :, :T], c[1][:, :, :T], out, sc)

            def two_threads() -> None:
                for c in kv:
                    k, v = c[0][:, :, :T], c[1][:, :, :T]
                    f = pool.submit(decode_attention, q[half:], k[half:], v[half:], out[half:], scores=sc[half:])
                    decode_attention(q[:half], k[:half], v[:half], out[:half], scores=sc[:half])
                    f.result()

            fns = {"blas": blas, "einsum": einsum}
            if B > 1:
                fns["two_threads"] = two_threads
            if torch is not None:
                def torch_sdpa() -> None:
                    with torch.no_grad():
                        for c in tkv:
                            F.scaled_dot_product_attention(tq, c[0][:, :, :T], c[1][:, :, :T])
                fns["torch"] = torch_sdpa
            want = None
            for name, fn in fns.items():  # every variant computes blas's output
                if name == "torch":
                    got = F.scaled_dot_product_attention(tq, tkv[-1][0][:, :, :T], tkv[-1][1][:, :, :T]).numpy()
                else:
                    fn()
                    got = out.copy()
                if want is None:
                    want = got
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)
            times = C.interleaved(fns, repeats=args.repeats)
            row: dict = {"batch": B, "cache_len": T}
            for name, t in times.items():
                row[f"{name}_ms"] = round(1000 * t["min_s"], 3)
            if "torch" in times:
                for name in fns:
                    if name != "torch":
                        row[f"{name}_vs_torch"] = round(times["torch"]["min_s"] / times[name]["min_s"], 2)
            res["rows"].append(row)
            print(row, flush=True, file=sys.stderr)
    pool.shutdown()
    res["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    C.emit(res)


if __name__ == "__main__":
    main()
