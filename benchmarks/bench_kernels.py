"""Fused CuPy kernels vs the array-API reference path, op by op, on the GPU (issue 7).

    python benchmarks/bench_kernels.py          # prints JSON: ms per call, reference / fused

Each op runs forward + backward on a GPT-sized tensor (batch 64, T 256, C 384, 6 heads,
vocab 65); tensor.dispatch.reference_only() selects the reference path for the "before" column.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import event_timer  # noqa: E402
import cupy as cp  # noqa: E402

import tensor.functional as F  # noqa: E402
from nn import Parameter  # noqa: E402
from nn.functional import causal_attention_qkv  # noqa: E402
from tensor.dispatch import reference_only  # noqa: E402
from nn.optim import AdamW  # noqa: E402
from tensor import Tensor  # noqa: E402

B, T, C, H, V = 64, 256, 384, 6, 65


def cases(dtype: str) -> dict:
    rng = cp.random.default_rng(0)
    x = Tensor(rng.standard_normal((B, T, 4 * C), dtype=np.float32).astype(dtype), requires_grad=True)
    h = Tensor(rng.standard_normal((B, T, C), dtype=np.float32).astype(dtype), requires_grad=True)
    w = Tensor(cp.ones(C, dtype=dtype), requires_grad=True)
    qkv = Tensor(rng.standard_normal((B, T, 3 * C), dtype=np.float32).astype(dtype), requires_grad=True)
    logits = Tensor(rng.standard_normal((B * T, V), dtype=np.float32).astype(dtype), requires_grad=True)
    tgt = cp.asarray(np.random.default_rng(0).integers(0, V, B * T))
    p = Parameter(cp.zeros((4 * C, C), dtype=np.float32))
    p.grad = cp.ones_like(p.data)
    opt = AdamW([p], lr=1e-3)

    def fb(fn, inp):
        def go():
            out = fn()
            out.backward(cp.ones(out.shape, dtype=out.dtype))
            inp.grad = None
        return go
    return {
        "gelu": fb(lambda: x.gelu(), x),
        "layer_norm": fb(lambda: F.layer_norm(h, w, w), h),
        "attention (causal softmax)": fb(lambda: causal_attention_qkv(qkv, H), qkv),
        "cross_entropy": fb(lambda: F.cross_entropy(logits, tgt), logits),
        "adamw_step (1.5M params)": lambda: opt.step(),
    }


def main() -> None:
    time_ms = event_timer(cp.cuda.Device().synchronize, cp.cuda.Event, cp.cuda.get_elapsed_time)
    out = {"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "cupy": cp.__version__,
           "shape": dict(B=B, T=T, C=C, H=H, V=V), "ops": {}}
    for dtype in ("float32", "float16"):
        for name in cases(dtype):
            row = {}
            with reference_only():
                row["reference_ms"] = round(time_ms(cases(dtype)[name]), 3)
            row["fused_ms"] = round(time_ms(cases(dtype)[name]), 3)
            row["speedup"] = round(row["reference_ms"] / row["fused_ms"], 2)
            out["ops"][f"{name} [{dtype}]"] = row
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
