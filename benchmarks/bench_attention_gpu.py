"""Causal attention forward + backward on the GPU, bfloat16: our flash kernels
(tensor/cuda/flash_attention.py) vs PyTorch's scaled_dot_product_attention (is_causal=True, the
flash backend) vs our cuBLAS + fused-softmax path (tensor/cuda/attention.py: causal_forward /
causal_backward, which forms the (B, H, T, T) probabilities).

Shapes: B * T = 16384 tokens, H = 12 heads of D = 64 or H = 6 of D = 128, T in 512 / 1024 / 2048 / 4096.
FLOP convention (the same for all three): forward 4 * B * H * T^2 * D / 2 (two GEMMs, half the
scores under the causal mask), backward 2.5 x forward (five GEMMs, recomputation not counted);
TFLOP/s = (forward + backward) / time. Time: CUDA events around --reps calls after warm-up.
Memory: peak bytes allocated during one forward + backward beyond the inputs (q, k, v, dO):
ours from CuPy's memory pool (its high-water mark after free_all_blocks), torch from
torch.cuda.max_memory_allocated.

    python benchmarks/bench_attention_gpu.py [--reps 20] [--T 1024 2048 4096]

Prints a summary table (one line per shape as it finishes, flash's forward and backward times apart),
then JSON: per shape, each contender's ms, TFLOP/s and peak MiB, and the ratios flash / torch and
flash / cublas (time ratios > 1: flash is slower; tensor/cuda/attention.py's SCORES_BUDGET rule
should follow the flash / cublas column).
"""
from __future__ import annotations

import argparse

import _common as C  # (also puts the repository root on sys.path)
import numpy as np


def flops(B: int, H: int, T: int, D: int) -> float:
    fwd = 4.0 * B * H * T * T * D / 2
    return fwd * 3.5


def _peak_cupy(cp, fn) -> int:
    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    pool.free_all_blocks()
    base = pool.total_bytes()
    fn()
    cp.cuda.Device().synchronize()
    return pool.total_bytes() - base


def ours(B: int, H: int, T: int, D: int, reps: int) -> dict:
    import ml_dtypes
    from tensor import backend
    from tensor.cuda import flash_attention as FA
    from tensor.cuda.attention import causal_backward, causal_forward
    cp = backend.cupy_module()
    time_ms = C.event_timer(cp.cuda.Device().synchronize, cp.cuda.Event, cp.cuda.get_elapsed_time, rounds=1)
    rng = np.random.default_rng(0)
    q, k, v, g = (cp.asarray(rng.standard_normal((B, H, T, D)).astype(ml_dtypes.bfloat16)) for _ in range(4))

    def flash():
        o, lse = FA.forward(q, k, v, None, True)
        return FA.backward(g, q, k, v, o, lse, None, True)

    def cublas():
        o, p, keep = causal_forward(q, k, v)
        return causal_backward(g, q, k, v, p, keep)

    o0, lse0 = FA.forward(q, k, v, None, True)
    out = {"flash_fwd_ms": round(time_ms(lambda: FA.forward(q, k, v, None, True), reps), 3),
           "flash_bwd_ms": round(time_ms(lambda: FA.backward(g, q, k, v, o0, lse0, None, True), reps), 3)}
    for name, fn in (("flash", flash), ("cublas", cublas)):
        try:
            ms = time_ms(fn, reps)
            out[name] = {"ms": round(ms, 3), "tflops": round(flops(B, H, T, D) / ms / 1e9, 1),
                         "peak_mib": round(_peak_cupy(cp, fn) / 2**20, 1)}
        except Exception as e:  # the cuBLAS path's (B, H, T, T) buffers may not fit
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    cp.get_default_memory_pool().free_all_blocks()
    return out


def torch_sdpa(B: int, H: int, T: int, D: int, reps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v, g = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)

    def step():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.autograd.grad(o, (q, k, v), g)

    ms = C.event_timer(torch.cuda.synchronize, lambda: torch.cuda.Event(enable_timing=True),
                       lambda a, b: a.elapsed_time(b), rounds=1)(step, reps)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {"ms": round(ms, 3), "tflops": round(flops(B, H, T, D) / ms / 1e9, 1), "peak_mib": round(peak / 2**20, 1)}


HEADER = (f"{'B':>3} {'H':>3} {'T':>5} {'D':>4} | {'flash ms':>8} {'fwd':>6} {'bwd':>6} {'TF/s':>6} {'MiB':>7} | "
          f"{'cublas ms':>9} {'TF/s':>6} {'MiB':>7} | {'torch ms':>8} {'TF/s':>6} {'MiB':>7} | "
          f"{'fl/torch':>8} {'fl/cublas':>9}  (time ratios: > 1 = flash slower)")


def _line(row: dict) -> str:
    """One row of the summary table (errors as '-')."""
    def cell(d: dict, key: str, w: int) -> str:
        return f"{d[key]:>{w}}" if key in d else f"{'-':>{w}}"
    fl, cb, th, r = row["flash"], row["cublas"], row["torch"], row["ratios"]
    return (f"{row['B']:>3} {row['H']:>3} {row['T']:>5} {row['D']:>4} | {cell(fl, 'ms', 8)} "
            f"{cell(row, 'flash_fwd_ms', 6)} {cell(row, 'flash_bwd_ms', 6)} {cell(fl, 'tflops', 6)} "
            f"{cell(fl, 'peak_mib', 7)} | {cell(cb, 'ms', 9)} {cell(cb, 'tflops', 6)} {cell(cb, 'peak_mib', 7)} | "
            f"{cell(th, 'ms', 8)} {cell(th, 'tflops', 6)} {cell(th, 'peak_mib', 7)} | "
            f"{cell(r, 'time_flash_over_torch', 8)} {cell(r, 'time_flash_over_cublas', 9)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    print(HEADER, flush=True)
    rows = []
    for H, D in ((12, 64), (6, 128)):
        for T in args.T:
            B = max(1, args.tokens // T)
            row = {"B": B, "H": H, "T": T, "D": D, "dtype": "bfloat16", "gflop": round(flops(B, H, T, D) / 1e9, 1)}
            row.update(ours(B, H, T, D, args.reps))
            try:
                row["torch"] = torch_sdpa(B, H, T, D, args.reps)
            except Exception as e:
                row["torch"] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
            ratios = {}
            for peer in ("torch", "cublas"):
                if "ms" in row["flash"] and "ms" in row[peer]:
                    ratios[f"time_flash_over_{peer}"] = round(row["flash"]["ms"] / row[peer]["ms"], 3)
                    ratios[f"peak_mem_flash_over_{peer}"] = round(row["flash"]["peak_mib"] / max(row[peer]["peak_mib"],
                                                                                                 1e-9), 3)
            row["ratios"] = ratios
            rows.append(row)
            print(_line(row), flush=True)
    info = C.machine_info(1)
    try:
        import cupy
        info["cupy"] = cupy.__version__
        info["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:
        pass
    C.emit({"benchmark": "attention_gpu", "git": C.git_rev(), "reps": args.reps,
            "flop_convention": "fwd 4*B*H*T^2*D/2 (causal), bwd 2.5x fwd", "machine": info, "results": rows})


if __name__ == "__main__":
    main()
