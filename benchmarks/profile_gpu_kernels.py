"""Which GPU kernels does a training step run, and for how long? (issue 7)

    python benchmarks/profile_gpu_kernels.py --precisions fp32,bf16 --impl ours,torch
    python benchmarks/profile_gpu_kernels.py --impl ours --mode cprofile --gc freeze   # host-side time of ours
    python benchmarks/profile_gpu_kernels.py --config gpt2-124m --batch 16 --precisions bf16 --steps 3

Records every CUDA kernel of a few full training steps (ours on CuPy, and the PyTorch twin for
comparison) with CUPTI through torch.profiler -- CUPTI sees all kernels of the process, CuPy's
and cuBLAS's included -- without adding synchronisations, and prints JSON: per implementation
and precision, the synced wall time per step, the summed kernel time per step, and the kernels
grouped by name (ms per step, calls per step), largest first. PyTorch is only the profiler here
(and the peer); ours never imports it in the library.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import time

import _common as C  # noqa: F401  (puts the repository root on sys.path)

import bench_train as BT


def _short(name: str, width: int = 90) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


GC = "default"


def _gc_setup() -> None:
    import gc
    if GC == "freeze":
        gc.collect()
        gc.freeze()
    elif GC == "off":
        gc.disable()


def profile(step, data: list, sync, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile
    for x, y in data[:3]:  # warm-up: compilation, pools
        step(x, y)
    sync()
    _gc_setup()
    t0 = time.perf_counter()
    for x, y in data[3:3 + steps]:
        step(x, y)
    sync()
    wall = (time.perf_counter() - t0) / steps * 1000
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for x, y in data[3:3 + steps]:
            step(x, y)
        sync()
    per = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            r = per[e.name]
            r[0] += e.time_range.elapsed_us() / 1000.0
            r[1] += 1
    total = sum(v[0] for v in per.values()) / steps
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])
    res = {"wall_ms_per_step": round(wall, 2), "kernel_ms_per_step": round(total, 2),
           "kernels": [{"name": _short(k), "ms": round(v[0] / steps, 3), "calls": v[1] // steps}
                       for k, v in rows[:40]]}
    return res


def cprofile(step, data: list, sync, steps: int) -> list:
    """Host-side profile (cProfile) of `steps` steps: the top functions by own time."""
    import cProfile
    import pstats
    for x, y in data[:3]:
        step(x, y)
    sync()
    _gc_setup()
    pr = cProfile.Profile()
    pr.enable()
    for x, y in data[3:3 + steps]:
        step(x, y)
    sync()
    pr.disable()
    st = pstats.Stats(pr)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:30]
    return [{"fn": f"{k[0].split('/')[-1]}:{k[1]}:{k[2]}", "calls_per_step": v[1] // steps,
             "own_ms_per_step": round(v[2] / steps * 1000, 3), "cum_ms_per_step": round(v[3] / steps * 1000, 3)}
            for k, v in rows]


def ours(precision: str, batch: int, cfg, data_ids, steps: int, mode: str = "kernels") -> dict:
    from nn.amp import LossScaler, autocast_
    from nn.optim import AdamW
    from nn.utils import clip_grad_norm_
    from tensor import backend
    from tinygrad_lm.model import GPT
    cp = backend.cupy_module()
    model = GPT(cfg, seed=0).to("cuda")
    autocast_(model, precision)
    scaler = LossScaler(enabled=precision == "fp16")
    params = model.parameters()
    opt = AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                 {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
    data = [(backend.to_device(x, "cuda"), backend.to_device(y, "cuda"))
            for x, y in BT.batches(data_ids, steps + 3, batch, cfg.block_size)]

    def step(x, y):
        _, loss = model(x, y)
        scaler.scale(loss).backward()
        if scaler.unscale_(params):
            clip_grad_norm_(params, 1.0, error_if_nonfinite=False, sync=False)
            opt.step()
        scaler.update()
        opt.zero_grad()
    sync = cp.cuda.Device().synchronize
    if mode == "cprofile":
        return {"host_profile": cprofile(step, data, sync, steps)}
    return profile(step, data, sync, steps)


def twin(precision: str, batch: int, cfg, data_ids, steps: int, mode: str = "kernels") -> dict:
    import sys
    import torch
    import torch.nn.functional as TF
    sys.path.insert(0, os.path.join(C._ROOT, "examples"))
    from export_to_pytorch import NanoGPT
    model = NanoGPT(dataclasses.replace(cfg, vocab_size=cfg.padded_vocab_size, pad_vocab_to=1)).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True)
    low = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    data = [(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda())
            for x, y in BT.batches(data_ids, steps + 3, batch, cfg.block_size)]

    def step(x, y):
        with torch.autocast("cuda", dtype=low or torch.bfloat16, enabled=low is not None):
            logits = model(x)
            loss = TF.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return profile(step, data, torch.cuda.synchronize, steps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--impl", default="ours,torch")
    p.add_argument("--config", default="gpt-medium", choices=sorted(BT.CONFIGS), help="a model of bench_train.py")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--data", default=BT.DEFAULT_DATA)
    p.add_argument("--gc", default="default", choices=["default", "freeze", "off"],
                   help="Python's garbage collector during the steps: as is, gc.freeze() after set-up, or off")
    p.add_argument("--mode", default="kernels", choices=["kernels", "cprofile"],
                   help="kernels: every CUDA kernel, grouped by name; cprofile: host-side Python profile (ours only)")
    a = p.parse_args()
    cfg = BT.model_config(a.config)
    ids = BT.token_ids(a.data, cfg.vocab_size)
    out = {"config": a.config, "batch": a.batch, "steps": a.steps}
    global GC
    GC = a.gc
    for prec in a.precisions.split(","):
        for impl in a.impl.split(","):
            fn = ours if impl == "ours" else twin
            out[f"{impl}_{prec}"] = fn(prec, a.batch, cfg, ids, a.steps, a.mode)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
