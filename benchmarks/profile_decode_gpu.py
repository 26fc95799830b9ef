"""Which GPU kernels does one decode step run, and for how long? (issue 19)

    python benchmarks/profile_decode_gpu.py --models large --precisions bf16 --batches 1 32

Ours: the CUDA-graph decoder (tinygrad_lm/decode_cuda.py, as bench_decode_gpu.py sets it up); the peer:
PyTorch's static-cache twin with its decode step captured as a CUDA graph (bench_decode_gpu.TorchStaticGPT).
Both decode --new-tokens greedy tokens from a one-token prompt under torch.profiler (CUPTI records every
kernel, those replayed from a graph included, CuPy's and cuBLAS's too); kernels are grouped by name and
reported per decode step (time in µs and launches), largest first, with the summed kernel time per step,
the span from the first kernel to the last, and the GPU's idle time between kernels grouped by the kernel
that ends each gap.
The prefill and the capture run before the profiled generation. Prints JSON.
"""
from __future__ import annotations

import argparse
import collections
import json

import _common as C  # noqa: F401  (puts the repository root on sys.path)

from bench_decode_gpu import graph_cases, ours_graph


def kernels_per_step(run, steps: int, top: int) -> dict:
    """run() under torch.profiler (CUDA activity): {kernel_us_per_step, kernels: [name, us, launches per step]}."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0.0, 0])
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    for e in events:
        per[e.name][0] += e.time_range.elapsed_us()
        per[e.name][1] += 1
    # idle time of the GPU between consecutive kernels, by the kernel that follows the gap (what the GPU
    # waited for: a host launch, a graph's next node)
    gaps = collections.defaultdict(lambda: [0.0, 0])
    for a, b in zip(events, events[1:]):
        g = b.time_range.start - a.time_range.end
        if g > 0:
            gaps[b.name][0] += g
            gaps[b.name][1] += 1
    span = events[-1].time_range.end - events[0].time_range.start if events else 0.0
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])
    grows = sorted(gaps.items(), key=lambda kv: -kv[1][0])
    return {"kernel_us_per_step": round(sum(v[0] for v in per.values()) / steps, 1),
            "span_us_per_step": round(span / steps, 1),
            "idle_us_per_step": round(sum(v[0] for v in gaps.values()) / steps, 1),
            "launches_per_step": round(sum(v[1] for v in per.values()) / steps, 1),
            "kernels": [[k[:90], round(v[0] / steps, 2), round(v[1] / steps, 2)] for k, v in rows[:top]],
            "idle_before": [[k[:90], round(v[0] / steps, 2), round(v[1] / steps, 2)] for k, v in grows[:top]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="large")
    ap.add_argument("--precisions", default="bf16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    n = args.new_tokens
    out: dict = {"new_tokens": n, "rows": []}
    for name, prec, model, B, prompt, twin in graph_cases(args.models, args.precisions, args.batches):
        ours_graph(model, prompt, 4)  # compiled, captured once
        out["rows"].append({"model": name, "precision": prec, "batch": B,
                            "ours_graph": kernels_per_step(lambda: ours_graph(model, prompt, n), n, args.top),
                            "torch_graph": kernels_per_step(lambda: twin.generate(prompt, n, graph=True), n, args.top)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
