"""The GPU decode-attention kernels alone (tensor/cuda/decode_attention.py) against PyTorch's
scaled_dot_product_attention on the same cache, as a decode step runs them: one query row per (batch,
head) over a (B, H, L, D) bfloat16 cache of which the first T columns are filled, `--layers` layers of
distinct caches, each side's calls captured as one CUDA graph and replayed (launch costs as in the
graph decoders). Ours reads the filled columns through the mask (the CUDA-graph decoder's way); the
PyTorch twin of bench_decode_gpu.py attends over its whole static cache with a boolean mask, and so does
`torch` here; `torch-filled` is SDPA over the filled columns only (k[:, :, :T]: no mask), a lower bound.

  vector[N]  the 16-byte-load kernel with VEC_TARGET_BLOCKS = N (the default build: the first)
  scalar     the one-warp-per-key kernel (the fallback for other head sizes and alignments)

µs per layer (graph replay time / layers), outputs checked equal to torch's (max |error|).

    python benchmarks/bench_decode_attention_gpu.py --batches 1 8 32 --lengths 64 128 256
"""
from __future__ import annotations

import argparse
import sys

import _common as C


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256], help="filled columns T")
    ap.add_argument("--cache", type=int, default=256, help="cache columns L")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--targets", type=int, nargs="+", default=None, help="VEC_TARGET_BLOCKS values to try")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()

    import cupy as cp
    import torch
    import torch.nn.functional as F

    import tensor.cuda.decode_attention as DA
    targets = args.targets or [DA.VEC_TARGET_BLOCKS]
    H, D, L, n = args.heads, args.head_dim, args.cache, args.layers
    rows = []
    for B in args.batches:
        for T in args.lengths:
            g = torch.Generator(device="cuda").manual_seed(B * 1000 + T)
            q = [torch.randn(B, H, 1, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(n)]
            k = [torch.randn(B, H, L, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(n)]
            v = [torch.randn(B, H, L, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(n)]
            mask = torch.zeros(B, L, dtype=torch.bool, device="cuda")
            mask[:, :T] = True
            tmask = mask[:, None, None, :]
            qc, kc, vc = ([cp.from_dlpack(x) for x in xs] for xs in (q, k, v))
            mc = cp.from_dlpack(mask)

            def torch_time(fn) -> tuple:
                outs = [None] * n
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for i in range(n):
                        fn(i)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for i in range(n):
                        outs[i] = fn(i)
                return _replay(lambda: graph.replay(), torch.cuda.synchronize, args.reps) / n, outs

            t_torch, ref = torch_time(lambda i: F.scaled_dot_product_attention(q[i], k[i], v[i], attn_mask=tmask))
            t_filled, _ = torch_time(lambda i: F.scaled_dot_product_attention(q[i], k[i][:, :, :T], v[i][:, :, :T]))
            row = {"B": B, "T": T, "L": L, "H": H, "D": D, "torch_us": round(t_torch, 2),
                   "torch_filled_us": round(t_filled, 2)}

            def ours_time(**kw) -> tuple:
                outs = [None] * n
                for i in range(n):
                    DA.decode_attention(qc[i], kc[i], vc[i], mc, **kw)
                stream = cp.cuda.Stream(non_blocking=True)
                with stream:
                    stream.begin_capture()
                    for i in range(n):
                        outs[i] = DA.decode_attention(qc[i], kc[i], vc[i], mc, **kw)
                    graph = stream.end_capture()
                t = _replay(lambda: graph.launch(stream=stream), stream.synchronize, args.reps) / n
                err = max(float(cp.abs(outs[i].astype(cp.float32) - cp.from_dlpack(ref[i]).astype(cp.float32)).max())
                          for i in range(n))
                return t, err

            keep = DA.VEC_TARGET_BLOCKS
            for tb in targets:
                DA.VEC_TARGET_BLOCKS = tb
                t, err = ours_time(kernel="vector")
                row[f"vector[{tb}]_us"], row[f"vector[{tb}]_err"] = round(t, 2), err
            DA.VEC_TARGET_BLOCKS = keep
            t, err = ours_time(kernel="scalar")
            row["scalar_us"], row["scalar_err"] = round(t, 2), err
            best = min(row[f"vector[{tb}]_us"] for tb in targets)
            row["torch_over_vector"] = round(t_torch / best, 3)
            print(f"B {B} T {T}: torch {t_torch:.2f} (filled {t_filled:.2f}) scalar {t:.2f} "
                  + " ".join(f"v{tb} {row[f'vector[{tb}]_us']:.2f}" for tb in targets) + " us/layer", file=sys.stderr)
            rows.append(row)
    C.emit({"bench": "decode_attention_gpu", "commit": C.git_rev(), "rows": rows})


def _replay(launch, sync, reps: int) -> float:
    """µs per replay: the best of 3 runs of `reps` replays back to back."""
    import time
    best = float("inf")
    for _ in range(3):
        launch()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            launch()
        sync()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e6


if __name__ == "__main__":
    main()
