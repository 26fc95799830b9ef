"""Time every backward build of the flash attention kernels (tensor/cuda/flash_attention.py: BWD_VARIANTS)
beside PyTorch's scaled_dot_product_attention (flash backend) on the same inputs, to pick BWD_DEFAULT.

bfloat16, causal, B * T = 16384 tokens: (H, D) = (12, 64) and (6, 128), T = 1024 and 4096. Per shape: our
forward once, then each variant's backward (fwd and bwd apart; CUDA events, the median of --reps rounds of 4
calls after warm-up), SDPA's forward and forward + backward (bwd = their difference), and each variant's dQ, dK,
dV against the default variant's (max |difference|; atomics make dQ's summation order vary run to run,
so a few bf16 ulps are expected). FLOP convention as benchmarks/bench_attention_gpu.py: forward
4 B H T^2 D / 2, backward 2.5x forward; TFLOP/s of the whole call (fwd + bwd).

    python benchmarks/tune_flash.py [--reps 15] [--out tune.json] [--variants base w8 ...] [--fwd-row-tiles 1 2] [--fwd-key-tiles 32 64]

Prints the JSON (or writes it to --out instead), then one table (one line per variant x shape; 'x sdpa' = our
TFLOP/s over SDPA's for the whole call, the goal is >= 0.8; 'bwd x' the same for the backward alone) and
the fastest backward per shape. Needs CuPy and PyTorch on one GPU.
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import _common as C  # (also puts the repository root on sys.path)
import numpy as np

SHAPES = [(16, 12, 1024, 64), (4, 12, 4096, 64), (16, 6, 1024, 128), (4, 6, 4096, 128)]   # B, H, T, D


def flops(B: int, H: int, T: int, D: int) -> tuple:
    fwd = 4.0 * B * H * T * T * D / 2
    return fwd, 2.5 * fwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=None, help="write the JSON here (instead of to stdout)")
    ap.add_argument("--variants", nargs="+", default=None, help="names in BWD_VARIANTS (default: all)")
    ap.add_argument("--fwd-row-tiles", type=int, nargs="+", default=None,
                    help="also time the forward with each of these query tiles per warp (FWD_ROW_TILES' MT)")
    ap.add_argument("--fwd-key-tiles", type=int, nargs="+", default=None,
                    help="also time the forward with each of these key tiles (FWD_KEY_TILES' N)")
    args = ap.parse_args()
    import ml_dtypes
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tensor import backend
    from tensor.cuda import flash_attention as FA
    cp = backend.cupy_module()
    defaults = {D: FA.default_variant("bfloat16", D) for D in sorted({s[3] for s in SHAPES})}
    variants = args.variants or list(FA.BWD_VARIANTS)
    variants = list(dict.fromkeys(list(defaults.values()) + variants))   # the defaults first, once
    t0 = time.perf_counter()
    # compile every module first: the shared ones (forward, dQ cast) one by one, then each variant's own
    # in parallel (CuPy releases the GIL in NVRTC)
    heads = sorted(defaults)
    for D in heads:
        FA._kernels("bfloat16", D, defaults[D])
    jobs = [(D, v) for D in heads for v in variants]
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda j: FA._kernels("bfloat16", j[0], j[1]), jobs))
    compile_s = time.perf_counter() - t0
    # ms per call: the median over --reps rounds of 4 calls queued between two CUDA events (back to back, so
    # the host's launch time hides behind the GPU's, as in a training step), after 2 warm-up calls
    cu_ms = C.event_timer(cp.cuda.Device().synchronize, cp.cuda.Event, cp.cuda.get_elapsed_time,
                          rounds=args.reps, warmup=2, median=True)
    th_ms = C.event_timer(torch.cuda.synchronize, lambda: torch.cuda.Event(enable_timing=True),
                          lambda a, b: a.elapsed_time(b), rounds=args.reps, warmup=2, median=True)
    rows = []
    head = (f"{'variant':<16} {'B':>3} {'H':>3} {'T':>5} {'D':>4} | {'fwd ms':>7} {'bwd ms':>7} {'TF/s':>6} "
            f"{'bwd TF/s':>8} | {'sdpa fwd':>8} {'sdpa bwd':>8} {'TF/s':>6} | {'x sdpa':>6} {'bwd x':>6} | "
            f"{'dq err':>8} {'dk err':>8} {'dv err':>8}")
    lines = [head]
    for B, H, T, D in SHAPES:
        ffl, bfl = flops(B, H, T, D)
        tq, tk, tv, tg = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        # the same bytes on both sides (torch's bfloat16 seen through int16, then as ml_dtypes' bfloat16)
        q, k, v, g = (cp.asarray(t.view(torch.int16)).view(np.uint16).view(ml_dtypes.bfloat16) for t in (tq, tk, tv, tg))
        for t in (tq, tk, tv):
            t.requires_grad_(True)

        def sdpa_fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

        def sdpa_both():
            return torch.autograd.grad(sdpa_fwd(), (tq, tk, tv), tg)
        s_fwd = th_ms(sdpa_fwd, 4)
        s_all = th_ms(sdpa_both, 4)
        torch.cuda.empty_cache()
        def f32(a):   # bfloat16 bits -> float32 on the GPU (integer ops only)
            return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        fwd_ms = cu_ms(lambda: FA.forward(q, k, v, None, True), 4)
        o, lse = FA.forward(q, k, v, None, True)
        # the forward's builds by query tiles per warp (FWD_ROW_TILES) and by key tile (FWD_KEY_TILES), each
        # against the default's O
        for table, values, key, what in ((FA.FWD_ROW_TILES, args.fwd_row_tiles, "fwd_by_row_tiles", "query tiles per warp"),
                                         (FA.FWD_KEY_TILES, args.fwd_key_tiles, "fwd_by_key_tile", "key tile")):
            if not values:
                continue
            keep, by = dict(table), {}
            for n in values:
                table[("bfloat16", D)] = n
                o2, _ = FA.forward(q, k, v, None, True)
                err = float(cp.abs(f32(o2) - f32(o)).max())
                by[n] = {"fwd_ms": round(cu_ms(lambda: FA.forward(q, k, v, None, True), 4), 4), "max_err": err}
            table.clear()
            table.update(keep)
            rows.append({"B": B, "H": H, "T": T, "D": D, key: by, "sdpa_fwd_ms": round(s_fwd, 4)})
            lines.append(f"forward {B}x{H}x{T}x{D}: sdpa {s_fwd:.3f} ms; by {what}: "
                         + ", ".join(f"{n}: {r['fwd_ms']:.3f} ms (max |O - default O| {r['max_err']:.2g})" for n, r in by.items()))
        ref = [f32(a) for a in FA.backward(g, q, k, v, o, lse, None, True, variant=defaults[D])]
        for name in variants:
            bwd_ms = cu_ms(lambda: FA.backward(g, q, k, v, o, lse, None, True, variant=name), 4)
            got = FA.backward(g, q, k, v, o, lse, None, True, variant=name)
            errs = [float(cp.abs(f32(a) - r).max()) for a, r in zip(got, ref)]
            total = fwd_ms + bwd_ms
            row = {"variant": name, "B": B, "H": H, "T": T, "D": D, "fwd_ms": round(fwd_ms, 4),
                   "bwd_ms": round(bwd_ms, 4), "tflops": round((ffl + bfl) / total / 1e9, 1),
                   "bwd_tflops": round(bfl / bwd_ms / 1e9, 1), "sdpa_fwd_ms": round(s_fwd, 4),
                   "sdpa_bwd_ms": round(s_all - s_fwd, 4), "sdpa_tflops": round((ffl + bfl) / s_all / 1e9, 1),
                   "x_sdpa": round(s_all / total, 3), "bwd_x_sdpa": round((s_all - s_fwd) / bwd_ms, 3),
                   "max_err": {"dq": errs[0], "dk": errs[1], "dv": errs[2]}}
            rows.append(row)
            lines.append(f"{name:<16} {B:>3} {H:>3} {T:>5} {D:>4} | {row['fwd_ms']:>7.3f} {row['bwd_ms']:>7.3f} "
                         f"{row['tflops']:>6} {row['bwd_tflops']:>8} | {s_fwd:>8.3f} {s_all - s_fwd:>8.3f} "
                         f"{row['sdpa_tflops']:>6} | {row['x_sdpa']:>6} {row['bwd_x_sdpa']:>6} | "
                         f"{errs[0]:>8.2g} {errs[1]:>8.2g} {errs[2]:>8.2g}")
        cp.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    best = {}
    for r in rows:
        if "variant" not in r:
            continue
        key = f"T{r['T']}_D{r['D']}"
        if key not in best or r["bwd_ms"] < best[key]["bwd_ms"]:
            best[key] = {"variant": r["variant"], "bwd_ms": r["bwd_ms"], "x_sdpa": r["x_sdpa"]}
    lines.append("fastest backward per shape: " + ", ".join(f"{k} {b['variant']} ({b['x_sdpa']}x sdpa)"
                                                             for k, b in best.items()))
    lines.append(f"compile {compile_s:.1f} s, total {time.perf_counter() - t0:.1f} s; x sdpa = our TFLOP/s / SDPA's "
                 f"(goal >= 0.8); errors: max |variant - the default| (bf16 values), defaults {defaults}")
    info = C.machine_info(1)
    try:
        info["cupy"] = cp.__version__
        info["torch"] = torch.__version__
        info["gpu"] = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:
        pass
    out = {"benchmark": "tune_flash", "git": C.git_rev(), "reps": args.reps, "defaults": defaults,
           "flop_convention": "fwd 4*B*H*T^2*D/2 (causal), bwd 2.5x fwd", "compile_s": round(compile_s, 1),
           "machine": info, "results": rows, "fastest": best}
    if args.out:   # the table last, so that the end of the output shows it
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    else:
        C.emit(out)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
