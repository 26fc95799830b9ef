"""GPT-2 interop at 124M size (issue 20): loading a Hugging Face checkpoint and sampling from it,
ours beside transformers' GPT2LMHeadModel when transformers is importable.

A random GPT-2 124M (12 layers, 12 heads, width 768, vocab 50257, 1024 positions; speed and memory do
not depend on the weights) is written to a temporary directory as config.json + model.safetensors.

* load: each loader runs in a fresh process, which reports the seconds to a model ready on the CPU and
  its peak resident memory (VmHWM) above the process after its imports; with CuPy and a GPU also
  the seconds to the model on the GPU and CuPy's memory-pool bytes. The weights are 498 MB in float32.
* sample: batch 1, a one-token prompt, 64 new tokens, greedy, KV cache: ours (tinygrad_lm.sample.generate)
  and transformers' generate(do_sample=False, use_cache=True); best of --repeats runs; tokens/s. The two
  greedy continuations are compared token by token (random weights make near-ties, so a late
  divergence from float round-off is possible and reported, not asserted).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_hf.py [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _common as C  # noqa: F401  (puts the repository root on sys.path)
import numpy as np

GPT2 = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)

# run in a fresh process: argv = [dir, loader, device]; prints one JSON line
LOAD_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[4])
d, loader, device = sys.argv[1], sys.argv[2], sys.argv[3]
def rss():  # this process's peak resident bytes (VmHWM: unlike ru_maxrss, not inherited from the parent)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
if loader == "ours":
    from tinygrad_lm.hf import load_hf
else:
    import torch, transformers
    torch.set_num_threads(int(sys.argv[5]))
base = rss()
t0, c0 = time.perf_counter(), time.process_time()
if loader == "ours":
    model = load_hf(d)
else:
    model = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
out = {"load_s": time.perf_counter() - t0, "load_cpu_s": time.process_time() - c0,
       "peak_rss_bytes_above_imports": rss() - base, "rss_after_imports_bytes": base}
if device == "cuda":
    t0 = time.perf_counter()
    if loader == "ours":
        import cupy
        model.to("cuda")
        cupy.cuda.Device().synchronize()
        pool = cupy.get_default_memory_pool()
        out["gpu_pool_used_bytes"], out["gpu_pool_total_bytes"] = pool.used_bytes(), pool.total_bytes()
    else:
        model.to("cuda")
        torch.cuda.synchronize()
        out["gpu_allocated_bytes"] = torch.cuda.memory_allocated()
    out["to_gpu_s"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def write_checkpoint(d: str) -> float:
    from tinygrad_lm.hf import export_hf
    from tinygrad_lm.model import GPT, GPTConfig
    model = GPT(GPTConfig(**GPT2, pos_encoding="learned"), seed=0)
    t0 = time.perf_counter()
    export_hf(model, d)
    return time.perf_counter() - t0


def measure_load(d: str, loader: str, device: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, "-c", LOAD_CHILD, d, loader, device, C._ROOT, str(threads)],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def sample_ours(d: str, device: str, n: int, repeats: int) -> tuple[float, list[int]]:
    from tinygrad_lm.hf import load_hf
    from tinygrad_lm.sample import generate
    model = load_hf(d)
    if device == "cuda":
        model.to("cuda")
    prompt = np.array([[50256]])
    best, out = (float("inf"), 0.0), None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = generate(model, prompt, n, temperature=0.0)
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best, [int(t) for t in out[0, 1:]]


def sample_transformers(d: str, device: str, n: int, repeats: int) -> tuple[float, list[int]]:
    import torch
    import transformers
    model = transformers.GPT2LMHeadModel.from_pretrained(d).eval().to(device)
    prompt = torch.tensor([[50256]], device=device)
    best, out = (float("inf"), 0.0), None
    with torch.no_grad():
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                 pad_token_id=50256, attention_mask=torch.ones_like(prompt))
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best, [int(t) for t in out[0, 1:].tolist()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    try:
        import transformers  # noqa: F401
        import torch  # noqa: F401
        peer = True
    except ImportError:
        peer = False
    C.set_threads(args.threads)
    result: dict = {"benchmark": "bench_hf", "model": {**GPT2, "parameters": 124439808}, "device": args.device,
                    "tokens": args.tokens, "transformers": None}
    with tempfile.TemporaryDirectory() as d:
        result["export_s"] = round(write_checkpoint(d), 3)
        result["file_bytes"] = os.path.getsize(os.path.join(d, "model.safetensors"))
        loads = {"ours": measure_load(d, "ours", args.device, args.threads)}
        if peer:
            import transformers
            result["transformers"] = transformers.__version__
            loads["transformers"] = measure_load(d, "transformers", args.device, args.threads)
        result["load"] = loads
        (wall, cpu), ours_ids = sample_ours(d, args.device, args.tokens, args.repeats)
        ours_tps = args.tokens / wall
        result["sample_tokens_per_s"] = {"ours": round(ours_tps, 2)}
        result["sample_cpu_s_of_best_run"] = {"ours": round(cpu, 3)}  # process CPU time, all threads
        if peer and args.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                peer, result["transformers_sampling"] = False, "skipped: this torch has no CUDA"
        if peer:
            import torch
            torch.set_num_threads(args.threads)
            (wall, cpu), hf_ids = sample_transformers(d, args.device, args.tokens, args.repeats)
            hf_tps = args.tokens / wall
            result["sample_tokens_per_s"]["transformers"] = round(hf_tps, 2)
            result["sample_cpu_s_of_best_run"]["transformers"] = round(cpu, 3)
            result["sample_ratio_ours_over_transformers"] = round(ours_tps / hf_tps, 3)
            same = next((i for i, (a, b) in enumerate(zip(ours_ids, hf_ids)) if a != b), len(ours_ids))
            result["greedy_tokens_equal_before_first_difference"] = same
            if "load_s" in loads["ours"] and "load_s" in loads["transformers"]:
                result["load_ratio_ours_over_transformers"] = round(loads["ours"]["load_s"]
                                                                    / loads["transformers"]["load_s"], 3)
    result["machine"] = C.machine_info(args.threads)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
