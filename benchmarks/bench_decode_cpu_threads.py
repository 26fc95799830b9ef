"""The CPU decoder's two thread settings against the PyTorch twin (issue 19): how long OpenBLAS's idle
workers spin before they sleep (backend.tune_blas_wait, 2^N cycles; 28 is OpenBLAS's own default) and
from which batch rows x cache length the attention is split over two threads
(decode_cpu.SPLIT_ROWS_X_LENGTH).

Each configuration "WAIT:SPLIT" decodes the same greedy tokens as bench_sample.py (its model: 6L/6H/384,
vocab 65, random init, a one-token prompt, --new-tokens tokens). The runs are interleaved, round after
round: the twin, then every configuration, so that a machine's drift hits all alike; each configuration's
figure is the median over rounds of (the twin's time in that round / its own), and the best-of ratio.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE taskset -c 0,1 python benchmarks/bench_decode_cpu_threads.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import _common as C
import numpy as np

from bench_sample import TorchGPT
from tensor import backend
from tinygrad_lm import decode_cpu
from tinygrad_lm.model import GPT, GPTConfig
from tinygrad_lm.sample import generate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--configs", nargs="+", default=[f"{backend.BLAS_WAIT_LOG2}:{decode_cpu.SPLIT_ROWS_X_LENGTH}", "28:1024", "28:4096"],
                    help="WAIT:SPLIT pairs: OpenBLAS's idle wait 2^WAIT cycles, the attention split from "
                         "batch rows x cache length SPLIT (the first: the defaults, as the sample CLI runs)")
    args = ap.parse_args()
    import torch
    backend.tune_host_allocator()
    C.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs]
    cfg = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, pos_encoding="learned")
    model = GPT(cfg, seed=0).eval()
    twin = TorchGPT(model.state_dict(), cfg)
    n = args.new_tokens
    applied = backend.tune_blas_wait(configs[0][0])
    res: dict = {"machine": C.machine_info(args.threads), "openblas_wait_applied": applied, "new_tokens": n,
                 "rounds": args.rounds, "load_at_start": [round(x, 2) for x in os.getloadavg()],
                 "batches": {}}

    def seconds(f) -> float:
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    for B in args.batches:
        prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, 1))
        theirs = twin.generate_greedy(prompt, n)
        times: dict = {"torch": []}
        for wait, split in configs:
            times[f"{wait}:{split}"] = []
        for _ in range(args.rounds):
            times["torch"].append(seconds(lambda: twin.generate_greedy(prompt, n)))
            for wait, split in configs:
                backend.tune_blas_wait(wait)
                decode_cpu.SPLIT_ROWS_X_LENGTH = split
                generate(model, prompt, 2, temperature=0)   # the new threads' first call
                out: list = []
                times[f"{wait}:{split}"].append(seconds(lambda: out.append(generate(model, prompt, n, temperature=0))))
                if not np.array_equal(out[0], theirs):
                    raise SystemExit(f"batch {B}, {wait}:{split}: tokens differ from the twin's")
        row = {"torch_ms_per_step": round(1000 * min(times["torch"]) / n, 3)}
        for key, ts in times.items():
            if key == "torch":
                continue
            row[key] = {"ms_per_step": round(1000 * min(ts) / n, 3),
                        "vs_torch_median_of_rounds": round(statistics.median(t / o for t, o in zip(times["torch"], ts)), 3),
                        "vs_torch_best": round(min(times["torch"]) / min(ts), 3)}
        res["batches"][str(B)] = row
        print(f"batch {B}: {row}", file=sys.stderr, flush=True)
    res["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    C.emit(res)


if __name__ == "__main__":
    main()
