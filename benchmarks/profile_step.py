"""Where does a training step spend its time? Per-op totals of forward and backward.

    python benchmarks/profile_step.py --device cuda --precision bf16
    python benchmarks/profile_step.py --device cpu

Every op's forward and backward is timed with a device synchronisation around it, so the
per-op numbers are honest GPU times (the total is inflated by the added syncs). Prints JSON:
op -> milliseconds per step, forward and backward, sorted by total.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from nn.amp import autocast_  # noqa: E402
from nn.optim import AdamW  # noqa: E402
from tensor import backend  # noqa: E402
from tensor.tensor import Function  # noqa: E402
from tinygrad_lm.model import GPT, GPTConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    sync = (lambda: backend.cupy_module().cuda.Device().synchronize()) if a.device == "cuda" else (lambda: None)
    times: dict = collections.defaultdict(float)
    real_apply = Function.apply.__func__

    def timed_apply(cls, *inputs, **kw):
        sync()
        t0 = time.perf_counter()
        out = real_apply(cls, *inputs, **kw)
        sync()
        times[(cls.__name__, "forward")] += time.perf_counter() - t0
        return out
    Function.apply = classmethod(timed_apply)
    import tensor.ops as ops
    from nn.attention import CausalAttentionQKV

    def timed_backward(cls: type) -> None:
        real = cls.backward

        def tb(self, g):
            sync()
            t0 = time.perf_counter()
            r = real(self, g)
            sync()
            times[(cls.__name__, "backward")] += time.perf_counter() - t0
            return r
        cls.backward = tb
    for cls in list(ops.all_ops().values()) + [CausalAttentionQKV]:
        timed_backward(cls)
    cfg = GPTConfig(65, 256, 6, 6, 384, pos_encoding="learned")
    model = GPT(cfg).to(a.device)
    autocast_(model, a.precision)
    opt = AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 65, (a.batch, 257))
    for step in range(a.steps + 1):
        if step == 1:
            times.clear()
            sync()
            t_all = time.perf_counter()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        times[("AdamW.step", "update")] += time.perf_counter() - t0
        opt.zero_grad()
    sync()
    total = (time.perf_counter() - t_all) / a.steps * 1000
    per = collections.defaultdict(dict)
    for (name, kind), s in times.items():
        per[name][kind] = round(s / a.steps * 1000, 3)
    rows = sorted(per.items(), key=lambda kv: -sum(kv[1].values()))
    print(json.dumps({"device": a.device, "precision": a.precision, "batch": a.batch,
                      "step_ms_with_syncs": round(total, 2), "ops_ms_per_step": dict(rows)}, indent=1))


if __name__ == "__main__":
    main()
