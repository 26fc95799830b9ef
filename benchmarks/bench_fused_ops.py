"""The fused paths of a bf16 training step, op by op at the 12L/768 T1024 B16 shapes (16384 rows),
ours against PyTorch (autocast bf16) in one run (issue 18):

    python benchmarks/bench_fused_ops.py            # prints JSON: ms per call (forward + backward), ratios

  gelu        (16384, 3072) bfloat16, forward + backward; also GB/s of the forward (read + write)
  linear      c_fc: x (16384, 768) bfloat16 @ W (3072, 768) float32 master + bias, forward + backward;
              ours with the bias in cuBLASLt's epilogue and without (the bias kernels), PyTorch's
              autocast F.linear
  layer_norm  float32 (16384, 768) -> the bfloat16 input of the next product, forward + backward;
              ours writing bfloat16 directly and ours as LayerNorm + cast, PyTorch's LayerNorm + cast
              (autocast keeps layer_norm in float32; its Linear casts)

    python benchmarks/bench_fused_ops.py --ce-only [--rows 16384 --vocab 50304]   # cross-entropy alone

  cross_entropy  bfloat16 logits (rows, vocab) (the GPT's lm head output), forward and forward +
              backward through F.cross_entropy, and the two kernels alone (ce_fwd, ce_bwd) at 256 and
              512 threads a row, with the bytes each moves as TB/s; PyTorch's F.cross_entropy on the
              same bfloat16 logits

CUDA events around `reps` calls after a warm-up; the best of 3 rounds.
"""
from __future__ import annotations

import argparse
import json

import _common as C  # (also puts the repository root on sys.path)
import numpy as np

ROWS, EMB, HID = 16384, 768, 3072


def ours() -> dict:
    import cupy as cp

    import tensor.functional as F
    from nn.amp import low_dtype
    from tensor import Tensor
    from tensor.cuda import cublaslt
    bf16 = low_dtype("bf16")
    time_ms = C.event_timer(cp.cuda.Device().synchronize, cp.cuda.Event, cp.cuda.get_elapsed_time)
    rng = cp.random.default_rng(0)
    res = {}

    x = Tensor(rng.standard_normal((ROWS, HID), dtype=np.float32).astype(bf16), requires_grad=True)
    g = rng.standard_normal((ROWS, HID), dtype=np.float32).astype(bf16)

    def gelu_fb():
        x.grad = None
        x.gelu().backward(Tensor(g))
    res["gelu_fwd"] = time_ms(lambda: x.gelu())
    res["gelu_fwd_bwd"] = time_ms(gelu_fb)

    xin = Tensor(rng.standard_normal((ROWS, EMB), dtype=np.float32).astype(bf16), requires_grad=True)
    w = Tensor(rng.standard_normal((HID, EMB), dtype=np.float32) * 0.02, requires_grad=True)
    b = Tensor(cp.zeros(HID, dtype=np.float32), requires_grad=True)
    gl = rng.standard_normal((ROWS, HID), dtype=np.float32).astype(bf16)

    def linear_fb():
        for t in (xin, w, b):
            t.grad = None
        F.linear(xin, w, b, compute_dtype=bf16).backward(Tensor(gl))
    res["linear_fwd_bwd_fused"] = time_ms(linear_fb)
    keep = cublaslt._supports
    cublaslt._supports = lambda *a: False   # the bias kernels (bias_add_rows, colsum) instead
    try:
        res["linear_fwd_bwd_unfused"] = time_ms(linear_fb)
    finally:
        cublaslt._supports = keep

    h = Tensor(rng.standard_normal((ROWS, EMB), dtype=np.float32), requires_grad=True)
    lw = Tensor(cp.ones(EMB, dtype=np.float32), requires_grad=True)
    lb = Tensor(cp.zeros(EMB, dtype=np.float32), requires_grad=True)
    gn = rng.standard_normal((ROWS, EMB), dtype=np.float32).astype(bf16)

    def ln_fb(fused: bool):
        def go():
            for t in (h, lw, lb):
                t.grad = None
            y = F.layer_norm(h, lw, lb, out_dtype=bf16) if fused else F.layer_norm(h, lw, lb).astype(bf16)
            y.backward(Tensor(gn))
        return go
    res["layer_norm_bf16_fwd_bwd_fused"] = time_ms(ln_fb(True))
    res["layer_norm_bf16_fwd_bwd_cast"] = time_ms(ln_fb(False))
    return res


def torch_peer() -> dict:
    import torch
    import torch.nn.functional as TF
    dev = "cuda"
    time_ms = C.event_timer(torch.cuda.synchronize, lambda: torch.cuda.Event(enable_timing=True), lambda a, b: a.elapsed_time(b))
    gen = torch.Generator(device=dev).manual_seed(0)
    res = {}
    x = torch.randn((ROWS, HID), device=dev, generator=gen).bfloat16().requires_grad_()
    g = torch.randn((ROWS, HID), device=dev, generator=gen).bfloat16()

    def gelu_fb():
        x.grad = None
        TF.gelu(x, approximate="tanh").backward(g)
    res["gelu_fwd"] = time_ms(lambda: TF.gelu(x, approximate="tanh"))
    res["gelu_fwd_bwd"] = time_ms(gelu_fb)

    xin = torch.randn((ROWS, EMB), device=dev, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn((HID, EMB), device=dev, generator=gen) * 0.02).requires_grad_()
    b = torch.zeros(HID, device=dev, requires_grad=True)
    gl = torch.randn((ROWS, HID), device=dev, generator=gen).bfloat16()

    def linear_fb():
        for t in (xin, w, b):
            t.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = TF.linear(xin, w, b)
        y.backward(gl)
    res["linear_fwd_bwd"] = time_ms(linear_fb)

    h = torch.randn((ROWS, EMB), device=dev, generator=gen).requires_grad_()
    lw, lb = torch.ones(EMB, device=dev, requires_grad=True), torch.zeros(EMB, device=dev, requires_grad=True)
    gn = torch.randn((ROWS, EMB), device=dev, generator=gen).bfloat16()

    def ln_fb():
        for t in (h, lw, lb):
            t.grad = None
        TF.layer_norm(h, (EMB,), lw, lb).bfloat16().backward(gn)
    res["layer_norm_bf16_fwd_bwd"] = time_ms(ln_fb)
    return res


def ce_ours(rows: int, vocab: int) -> dict:
    import cupy as cp

    import tensor.functional as F
    from nn.amp import low_dtype
    from tensor import Tensor
    from tensor.cuda import cross_entropy as ce
    time_ms = C.event_timer(cp.cuda.Device().synchronize, cp.cuda.Event, cp.cuda.get_elapsed_time)
    rng = cp.random.default_rng(0)
    x = Tensor(rng.standard_normal((rows, vocab), dtype=np.float32).astype(low_dtype("bf16")), requires_grad=True)
    t = rng.integers(0, vocab, rows).astype(np.int64)

    def fb():
        x.grad = None
        F.cross_entropy(x, t).backward()
    res = {"fwd": time_ms(lambda: F.cross_entropy(x, t)), "fwd_bwd": time_ms(fb)}
    keep = ce.MAX_THREADS
    try:
        for nt in (256, 512):
            ce.MAX_THREADS = nt
            lse, _ = ce.cross_entropy_forward(x.data, t, -100)
            scale = cp.full(1, 1.0 / rows, np.float32)
            res[f"kernel_fwd_{nt}"] = time_ms(lambda: ce.cross_entropy_forward(x.data, t, -100))
            res[f"kernel_bwd_{nt}"] = time_ms(lambda: ce.cross_entropy_backward(x.data, t, lse, scale, -100))
    finally:
        ce.MAX_THREADS = keep
    return res


def ce_torch(rows: int, vocab: int) -> dict:
    import torch
    import torch.nn.functional as TF
    time_ms = C.event_timer(torch.cuda.synchronize, lambda: torch.cuda.Event(enable_timing=True), lambda a, b: a.elapsed_time(b))
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((rows, vocab), device="cuda", generator=gen).bfloat16().requires_grad_()
    t = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)

    def fb():
        x.grad = None
        TF.cross_entropy(x, t).backward()
    with torch.no_grad():
        fwd = time_ms(lambda: TF.cross_entropy(x, t))
    return {"fwd": fwd, "fwd_bwd": time_ms(fb)}


def ce_results(rows: int, vocab: int) -> dict:
    o, t = ce_ours(rows, vocab), ce_torch(rows, vocab)
    nbytes = rows * vocab * 2   # one bfloat16 pass over the logits
    out = {
        "shapes": {"rows": rows, "vocab": vocab, "dtype": "bfloat16"},
        "ours_ms": {k: round(v, 4) for k, v in o.items()},
        "torch_ms": {k: round(v, 4) for k, v in t.items()},
        "kernel_tb_per_s": {k: round((nbytes if "fwd" in k else 2 * nbytes) / v / 1e9, 2)
                            for k, v in o.items() if k.startswith("kernel_")},
        "torch_over_ours": {"fwd": round(t["fwd"] / o["fwd"], 3), "fwd_bwd": round(t["fwd_bwd"] / o["fwd_bwd"], 3)},
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ce-only", action="store_true", help="only cross-entropy (bfloat16 logits (rows, vocab))")
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--vocab", type=int, default=50304)
    args = ap.parse_args()
    if args.ce_only:
        print(json.dumps(ce_results(args.rows, args.vocab), indent=1))
        return
    o, t = ours(), torch_peer()
    gelu_bytes = 2 * ROWS * HID * 2
    out = {
        "shapes": {"rows": ROWS, "emb": EMB, "hidden": HID, "dtype": "bfloat16"},
        "ours_ms": {k: round(v, 4) for k, v in o.items()},
        "torch_ms": {k: round(v, 4) for k, v in t.items()},
        "gelu_fwd_tb_per_s": {"ours": round(gelu_bytes / o["gelu_fwd"] / 1e9, 2),
                              "torch": round(gelu_bytes / t["gelu_fwd"] / 1e9, 2)},
        "torch_over_ours": {   # > 1: ours is faster
            "gelu_fwd": round(t["gelu_fwd"] / o["gelu_fwd"], 3),
            "gelu_fwd_bwd": round(t["gelu_fwd_bwd"] / o["gelu_fwd_bwd"], 3),
            "linear_fwd_bwd_fused": round(t["linear_fwd_bwd"] / o["linear_fwd_bwd_fused"], 3),
            "linear_fwd_bwd_unfused": round(t["linear_fwd_bwd"] / o["linear_fwd_bwd_unfused"], 3),
            "layer_norm_bf16_fused": round(t["layer_norm_bf16_fwd_bwd"] / o["layer_norm_bf16_fwd_bwd_fused"], 3),
            "layer_norm_bf16_cast": round(t["layer_norm_bf16_fwd_bwd"] / o["layer_norm_bf16_fwd_bwd_cast"], 3),
        },
    }
    out["cross_entropy"] = ce_results(args.rows, args.vocab)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
