"""Training throughput (issues 4, 7, 18): tokens/s of one full training step, ours vs PyTorch
eager and torch.compile, with peak GPU memory and MFU.

Same architecture (our GPT and the PyTorch twin `NanoGPT` of examples/export_to_pytorch.py,
learned positions, tied lm_head), same initial weights (ours, copied into the twin), the
same batches (windows of tinyshakespeare, a pure function of (seed, step)), the same
recipe: AdamW lr 1e-3, betas (0.9, 0.99), eps 1e-8, weight decay 0.1 on 2-D weights only,
gradient clipping at global norm 1.0.

One step = forward + loss + backward + clip + AdamW step + zero_grad. Ours runs the pieces
the Trainer runs (nn.amp.autocast_, LossScaler for fp16, clip_grad_norm_ with sync=False
on the GPU, nn.optim.AdamW); PyTorch runs eager mode (`torch`) or the same twin through
`torch.compile(model)` (`torch-compile`, as nanoGPT's compile=True; the warm-up steps, at least 3,
absorb the compilation) with torch.autocast(dtype=bfloat16/float16) for bf16/fp16,
torch.amp.GradScaler for fp16, and AdamW as nanoGPT configures it (fused=True on CUDA, the
default foreach on the CPU). Precision `tf32` is float32 with TF32 GEMMs on both sides
(ours: tensor.backend.set_tf32, `--tf32`; torch: torch.backends.cuda.matmul.allow_tf32 and
torch.backends.cudnn.allow_tf32).

Configs: shakespeare-char and gpt-medium (char vocabulary 65, tinyshakespeare batches), gpt-12l
(12L/12H/768, T 1024, B 16, vocabulary 4096) and gpt2-124m (the same body, GPT-2's vocabulary
50257 padded to 50304 rows: ours through pad_vocab_to 64, the twin with 50304 rows), whose batches
are uniform random ids of the vocabulary (the speed does not depend on the text).

MFU (model FLOPs utilisation), nanoGPT's estimate_mfu convention: 6 N + 12 L T C FLOPs per token
(N the parameters without the position table, the tied wte counted once; the second term the
attention's QK^T and PV, causal masking not discounted), times tokens/s, over the H200's dense
peak of the precision's GEMMs: bf16/fp16 790e12, tf32 495e12, fp32 67e12 FLOP/s (`--peak-flops`
overrides).

Each implementation x precision runs in its OWN subprocess, so peak memory (RSS, and on
CUDA the GPU memory: CuPy's pool high-water total_bytes() / torch.cuda.max_memory_reserved())
belongs to one implementation. The parent alternates them (ours, torch, ours, torch, ...)
so drift of a shared machine hits both alike, and reports the ratios ours / torch.
tokens/s = batch * block / (median time of a timed step); on CUDA every timed step ends
with a device synchronisation, unless `--sync-every N`: then the timed steps run in groups of N
between synchronisations (0: one group), each step of a group timed as the group's mean -- how a
training loop runs that reads the loss once per log interval (tinygrad_lm's Trainer and nanoGPT's
train.py: every 10 steps), so the host queues the next step's work while the GPU finishes this one. On the CPU each implementation's step is also split into its
parts (forward, backward, clip, optimizer, zero_grad: `phases_ms`, medians). On CUDA the fp32 ours-worker also times our KV-cached sampler
(tinygrad_lm.sample.generate, greedy, 256 new tokens from a one-token prompt, batch 1 and 8)
on the trained model, in float32 as `python -m tinygrad_lm sample` runs it.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_train.py --config shakespeare-char
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_train.py --config gpt-medium --steps 4
    python benchmarks/bench_train.py --device cuda --config gpt-medium --precisions fp32,bf16,fp16
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import _common as C  # noqa: F401  (puts the repository root on sys.path)
import numpy as np

CONFIGS = {
    # nanoGPT's CPU recipe for shakespeare_char
    "shakespeare-char": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_cpu=12, batch_cuda=12),
    # nanoGPT's GPU shakespeare_char model ("baby GPT", 10.7M parameters)
    "gpt-medium": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_cpu=16, batch_cuda=64),
    # issue 18's GPT-2-sized body with a 4096-token vocabulary (89 M parameters)
    "gpt-12l": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_cpu=1, batch_cuda=16, vocab=4096),
    # GPT-2 small, the gpt2-124m preset: 50257 tokens, the table padded to 50304 rows
    # a small body on GPT-2's padded vocabulary: a quick check of the large-vocabulary path on the CPU
    "gpt2-vocab-tiny": dict(n_layer=2, n_head=2, n_embd=128, block_size=128, batch_cpu=16, batch_cuda=16, vocab=50257,
                            pad_vocab_to=64),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_cpu=1, batch_cuda=16, vocab=50257,
                      pad_vocab_to=64),
}
VOCAB = 65  # tinyshakespeare's characters (the default vocabulary of a config)
PEAK_FLOPS = {"bf16": 790e12, "fp16": 790e12, "tf32": 495e12, "fp32": 67e12}  # H200 dense, per precision
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
IMPLS = ("ours", "ours-graph", "torch", "torch-compile")
OURS, PEERS = ("ours", "ours-graph"), ("torch", "torch-compile")
HYPER = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, grad_clip=1.0)
DEFAULT_DATA = "/work/shared/data/tinyshakespeare.txt"


def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    return env


def model_config(name: str):
    from tinygrad_lm.model import GPTConfig
    c = CONFIGS[name]
    return GPTConfig(vocab_size=c.get("vocab", VOCAB), block_size=c["block_size"], n_layer=c["n_layer"],
                     n_head=c["n_head"], n_embd=c["n_embd"], dropout=0.0, bias=True, pos_encoding="learned",
                     pad_vocab_to=c.get("pad_vocab_to", 1))


def twin_config(name: str):
    """The PyTorch twin's config: the same model, its table as many rows as ours (the padding included)."""
    import dataclasses
    cfg = model_config(name)
    return dataclasses.replace(cfg, vocab_size=cfg.padded_vocab_size, pad_vocab_to=1)


def flops_per_token(cfg, n_params: int) -> int:
    """nanoGPT's estimate_mfu: 6 N (N without the position table) + 12 L T C (attention)."""
    n = n_params - (cfg.block_size * cfg.n_embd if cfg.pos_encoding == "learned" else 0)
    return 6 * n + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


# ------------------------------------------------------------------ data
def token_ids(data: str | None, vocab: int = VOCAB) -> np.ndarray:
    """tinyshakespeare as char ids (vocab 65); random ids in [0, vocab) when the file is missing or the
    vocabulary is not the characters'."""
    if vocab != VOCAB:
        return np.random.default_rng(0).integers(0, vocab, 4_000_000, dtype=np.int64)
    if data and os.path.isfile(data):
        text = open(data, encoding="utf-8").read()
        chars = sorted(set(text))
        if len(chars) == VOCAB:
            lut = {ch: i for i, ch in enumerate(chars)}
            return np.array([lut[ch] for ch in text], dtype=np.int64)
    return np.random.default_rng(0).integers(0, VOCAB, 1_000_000, dtype=np.int64)


def batches(ids: np.ndarray, n: int, batch: int, block: int, seed: int = 1337) -> list:
    """n batches (x, y) of (batch, block) int64; batch k is a pure function of (seed, k)."""
    out = []
    for k in range(n):
        starts = np.random.default_rng([seed, k]).integers(0, len(ids) - block - 1, size=batch)
        w = np.stack([ids[s:s + block + 1] for s in starts])
        out.append((w[:, :-1].copy(), w[:, 1:].copy()))
    return out


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


# ------------------------------------------------------------------ workers
def freeze_gc() -> None:
    """What the Trainer does before its loop (tinygrad_lm/trainer.py), done for both workers alike:
    the objects built during set-up leave the cyclic garbage collector's generations."""
    import gc
    gc.collect()
    gc.freeze()


class Phases:
    """Where a CPU step's time goes: `mark(name)` after each part (forward, backward, clip,
    optimizer, zero_grad) records the time since the previous mark. Only on the CPU, where an
    op's work is done when it returns (on the GPU the marks would time the host's queueing).
    `medians_ms(skip)`: the median of each part over the steps after the first `skip`."""

    def __init__(self, on: bool) -> None:
        self.on, self.t, self.times = on, 0.0, {}

    def start(self) -> None:
        self.t = time.perf_counter()

    def mark(self, name: str) -> None:
        if self.on:
            now = time.perf_counter()
            self.times.setdefault(name, []).append(now - self.t)
            self.t = now

    def medians_ms(self, skip: int) -> dict:
        return {k: round(statistics.median(v[skip:]) * 1e3, 3) for k, v in self.times.items() if v[skip:]}


def time_steps(step, data: list, sync, warmup: int, every: int = 1) -> tuple[list, list]:
    """Run step(x, y) over the batches, the steps after `warmup` timed between device synchronisations,
    in groups of `every` steps (1: each step alone; 0: all of them as one group), each step of a group
    counted as the group's mean; returns (seconds per timed step, every step's loss as returned)."""
    times, losses = [], []
    for x, y in data[:warmup]:
        losses.append(step(x, y))
        sync()
    timed = data[warmup:]
    every = every or len(timed)
    for g in range(0, len(timed), every):
        group = timed[g:g + every]
        sync()
        t0 = time.perf_counter()
        for x, y in group:
            losses.append(step(x, y))
        sync()
        times += [(time.perf_counter() - t0) / len(group)] * len(group)
    return times, losses


def worker_ours(a: argparse.Namespace, graph: bool = False) -> dict:
    from nn.amp import LossScaler, autocast_
    from nn.optim import AdamW
    from nn.utils import clip_grad_norm_
    from tensor import backend
    from tinygrad_lm.model import GPT
    backend.tune_host_allocator()  # as the trainer does (python -m tinygrad_lm train)
    backend.set_tf32(a.precision == "tf32")  # `train --tf32`
    amp = "fp32" if a.precision == "tf32" else a.precision

    C.set_threads(a.threads)
    rss_import = current_rss_mib()
    cfg = model_config(a.config)
    model = GPT(cfg, seed=0)
    w = np.load(a.weights)
    model.load_state_dict({k: w[k] for k in w.files}, strict=True)
    del w
    cuda = a.device == "cuda"
    if cuda:
        cp = backend.cupy_module()
        model.to("cuda")
        sync = cp.cuda.Device().synchronize
    else:
        def sync() -> None: ...
    autocast_(model, amp)
    scaler = LossScaler(enabled=a.precision == "fp16")
    params = model.parameters()
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = AdamW([{"params": decay, "weight_decay": HYPER["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
                lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"])
    data = batches(token_ids(a.data, cfg.vocab_size), a.warmup + a.steps, a.batch_size, cfg.block_size)
    if cuda:
        data = [(backend.to_device(x, "cuda"), backend.to_device(y, "cuda")) for x, y in data]
    model.train()

    captured = None
    if graph:
        from nn.cuda_graph import CapturedStep
        captured = CapturedStep(model, a.batch_size, cfg.block_size)

    phases = Phases(not cuda)

    def step(x, y):
        phases.start()
        if captured is not None:  # the Trainer's --cuda-graph step
            loss = captured(x, y, scaler.scale_value if scaler.enabled else 1.0)
        else:
            _, loss = model(x, y)
            phases.mark("forward")
            scaler.scale(loss).backward()
            phases.mark("backward")
            loss = loss.data
        if scaler.unscale_(params):  # fp16: False (step skipped) after an overflow
            clip_grad_norm_(params, HYPER["grad_clip"], error_if_nonfinite=False, sync=not cuda)
            phases.mark("clip")
            opt.step()
            phases.mark("optimizer")
        scaler.update()
        opt.zero_grad()
        phases.mark("zero_grad")
        return loss

    freeze_gc()
    times, losses = time_steps(step, data, sync, a.warmup, a.sync_every)  # losses stay on the device
    losses = [float(backend.to_numpy(v)) for v in losses]
    res = {"step_times_s": times, "losses": losses, "rss_after_import_mib": rss_import,
           "optimizer": "nn.optim.AdamW (per-parameter)", "phases_ms": phases.medians_ms(a.warmup)}
    if a.precision == "fp16":
        res["loss_scale_final"] = scaler.scale_value
        res["skipped_steps"] = scaler.skipped_steps
    if cuda:
        pool = cp.get_default_memory_pool()
        name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
        res["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        res["cupy"] = cp.__version__
        res["gpu_pool_total_mib"] = pool.total_bytes() / 2**20   # the pool only grows: the high-water mark
        if captured is not None:  # + the graph's own pool (its temporaries)
            res["gpu_pool_total_mib"] += captured.pool.total_bytes() / 2**20
        res["gpu_pool_used_mib_at_end"] = pool.used_bytes() / 2**20
        if a.decode_tokens > 0 and a.precision == "fp32" and not graph:  # the sampler as `python -m tinygrad_lm sample` runs it
            try:
                res["decode"] = decode_ours(model, cfg, a.decode_tokens, a.decode_batches, sync)
            except Exception as e:  # keep the training numbers
                res["decode"] = {"error": f"{type(e).__name__}: {e}"}
            res["gpu_pool_total_mib_after_decode"] = pool.total_bytes() / 2**20
    return res


def decode_ours(model, cfg, n: int, batch_sizes: list, sync) -> dict:
    """Greedy KV-cached decoding of n tokens after a one-token prompt (best of 3)."""
    from tinygrad_lm.sample import generate
    # with a one-token prompt every step stays inside the KV cache when n <= block_size; past it
    # the sampler recomputes the cropped window each step (see tinygrad_lm/sample.py)
    out = {"new_tokens": n, "prompt_tokens": 1, "block_size": cfg.block_size, "all_steps_cached": n <= cfg.block_size}
    rng = np.random.default_rng(0)
    for B in batch_sizes:
        prompt = rng.integers(0, cfg.vocab_size, (B, 1))
        generate(model, prompt, 8, temperature=0, use_cache=True)  # warm-up (kernel compilation)
        best = float("inf")
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            generate(model, prompt, n, temperature=0, use_cache=True)
            sync()
            best = min(best, time.perf_counter() - t0)
        out[f"batch_{B}_tok_s"] = B * n / best
    return out


def worker_torch(a: argparse.Namespace, compiled: bool = False) -> dict:
    import torch
    import torch.nn.functional as TF
    C.set_threads(a.threads)  # NumPy's BLAS and torch.set_num_threads
    rss_import = current_rss_mib()
    sys.path.insert(0, os.path.join(C._ROOT, "examples"))
    from export_to_pytorch import NanoGPT

    tf32 = a.precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32  # (both off is PyTorch's default)
    torch.backends.cudnn.allow_tf32 = tf32
    cfg = twin_config(a.config)
    dev = torch.device(a.device)
    model = NanoGPT(cfg)
    w = np.load(a.weights)
    sd = {k: torch.from_numpy(np.ascontiguousarray(w[k])) for k in w.files}
    del w
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"twin state_dict mismatch: missing {missing}, unexpected {unexpected}")
    del sd
    model.to(dev).train()
    fwd = torch.compile(model) if compiled else model  # nanoGPT's compile=True: the model, not the optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    fused = a.device == "cuda"  # nanoGPT: fused AdamW on CUDA
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": HYPER["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"], **({"fused": True} if fused else {}))
    low = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.precision]
    scaler = torch.amp.GradScaler(a.device, enabled=a.precision == "fp16")
    data = batches(token_ids(a.data, model_config(a.config).vocab_size), a.warmup + a.steps, a.batch_size,
                   cfg.block_size)
    data = [(torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)) for x, y in data]
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    phases = Phases(a.device == "cpu")

    def step(x, y):
        phases.start()
        with torch.autocast(a.device, dtype=low or torch.bfloat16, enabled=low is not None):
            logits = fwd(x)
            loss = TF.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        phases.mark("forward")
        scaler.scale(loss).backward()
        phases.mark("backward")
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), HYPER["grad_clip"])
        phases.mark("clip")
        scaler.step(opt)
        phases.mark("optimizer")
        scaler.update()
        opt.zero_grad(set_to_none=True)
        phases.mark("zero_grad")
        return loss.detach()

    freeze_gc()
    times, losses = time_steps(step, data, sync, a.warmup, a.sync_every)
    res = {"step_times_s": times, "losses": [float(v) for v in losses], "rss_after_import_mib": rss_import,
           "optimizer": "torch.optim.AdamW " + ("fused" if fused else "foreach (default)"),
           "compiled": compiled, "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
           "phases_ms": phases.medians_ms(a.warmup),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "torch_blas": torch_blas_info(torch)}
    if a.precision == "fp16":
        res["loss_scale_final"] = float(scaler.get_scale())
    if a.device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
        res["gpu_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        res["gpu_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def torch_blas_info(torch) -> dict:
    """Which BLAS / CPU kernels the torch build uses (from torch.__config__.show())."""
    import re
    show = torch.__config__.show()
    info = dict(re.findall(r"\b(BLAS_INFO|LAPACK_INFO|USE_MKLDNN|USE_OPENMP)=([^,\s]+)", show))
    cap = re.search(r"CPU capability usage: (\S+)", show)
    if cap:
        info["cpu_capability"] = cap.group(1)
    return info


def run_worker(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    if a.worker in ("torch", "torch-compile"):
        res = worker_torch(a, compiled=a.worker == "torch-compile")
    else:
        res = worker_ours(a, graph=a.worker == "ours-graph")
    cfg = model_config(a.config)
    tokens = a.batch_size * cfg.block_size
    med = statistics.median(res["step_times_s"])
    res.update({"impl": a.worker, "precision": a.precision, "device": a.device, "tokens_per_step": tokens,
                "median_step_s": med, "min_step_s": min(res["step_times_s"]), "tokens_per_s": tokens / med,
                "peak_rss_mib": rss_mib(), "worker_wall_s": time.perf_counter() - t0,
                "loadavg_1m_at_end": round(os.getloadavg()[0], 2)})
    print("RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------ parent
def spawn(a: argparse.Namespace, impl: str, precision: str, weights: str) -> dict:
    warmup = max(a.warmup, 3) if impl == "torch-compile" else a.warmup  # the first steps compile
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--precision", precision,
           "--device", a.device, "--config", a.config, "--batch-size", str(a.batch_size), "--steps", str(a.steps),
           "--warmup", str(warmup), "--sync-every", str(a.sync_every), "--threads", str(a.threads), "--weights", weights, "--data", a.data or "",
           "--decode-tokens", str(a.decode_tokens), "--decode-batches", ",".join(map(str, a.decode_batches))]
    p = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(a.threads))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return {"impl": impl, "precision": precision, "error": f"exit {p.returncode}: {p.stderr.strip()[-2000:]}"}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="shakespeare-char")
    ap.add_argument("--precisions", default="fp32",
                    help="comma-separated from fp32,tf32,bf16,fp16 (tf32: float32 with TF32 GEMMs on both sides)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's batch for the device")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--sync-every", type=int, default=1,
                    help="CUDA: timed steps between device synchronisations (1: every step; 0: once at the end)")
    ap.add_argument("--repeats", type=int, default=2, help="ours, torch, ours, torch, ... per precision")
    ap.add_argument("--impls", default="ours,torch",
                    help="from ours, ours-graph (CUDA: forward+backward replayed as a CUDA graph, "
                         "nn/cuda_graph.py, as `train --cuda-graph`), torch (eager), torch-compile")
    ap.add_argument("--peak-flops", type=float, default=None,
                    help="the accelerator's peak FLOP/s for MFU (default: the H200's for the precision)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--decode-tokens", type=int, default=256, help="CUDA: our KV-cached sampler (0 = skip)")
    ap.add_argument("--decode-batches", default="1,8")
    ap.add_argument("--out", help="also write the JSON here")
    # internal: one worker
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.batch_size is None:
        a.batch_size = CONFIGS[a.config]["batch_cuda" if a.device == "cuda" else "batch_cpu"]
    a.decode_batches = [int(b) for b in str(a.decode_batches).split(",") if b]
    if a.device != "cuda" and not a.worker:
        a.decode_tokens = 0
    if a.worker:
        run_worker(a)
        return

    precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
    for p in precisions:
        if p not in PRECISIONS:
            ap.error(f"unknown precision {p!r}; expected one of {', '.join(PRECISIONS)}")
    impls = [i.strip() for i in a.impls.split(",") if i.strip()]
    for i in impls:
        if i not in IMPLS:
            ap.error(f"unknown implementation {i!r}; expected one of {', '.join(IMPLS)}")
    from tinygrad_lm.model import GPT
    C.set_threads(a.threads)  # (the workers set their own; this one only makes machine_info say so)
    cfg = model_config(a.config)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "init.npz")
        model = GPT(cfg, seed=0)
        np.savez(weights, **model.state_dict())
        n_params = model.num_parameters()
        del model
        fpt = flops_per_token(cfg, n_params)
        runs: list = []
        for rep in range(a.repeats):
            for prec in precisions:
                for impl in impls:
                    r = spawn(a, impl, prec, weights)
                    r["repeat"] = rep
                    runs.append(r)
                    msg = r.get("error") or f"{r['tokens_per_s']:,.0f} tok/s, peak RSS {r['peak_rss_mib']:.0f} MiB"
                    print(f"[{rep}] {impl} {prec}: {msg}", file=sys.stderr, flush=True)

    summary: dict = {}
    for prec in precisions:
        row: dict = {}
        for impl in impls:
            ok = [r for r in runs if r["impl"] == impl and r["precision"] == prec and "error" not in r]
            if not ok:
                continue
            row[impl] = {"tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in ok],
                         "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in ok), 1),
                         # the fastest step: less sensitive to other processes on a shared machine
                         "tokens_per_s_best_step": round(max(r["tokens_per_step"] / r["min_step_s"] for r in ok), 1),
                         "peak_rss_mib": round(max(r["peak_rss_mib"] for r in ok), 1),
                         "loss_first": round(ok[0]["losses"][0], 4), "loss_last": round(ok[0]["losses"][-1], 4)}
            for key in ("gpu_pool_total_mib", "gpu_max_reserved_mib", "gpu_max_allocated_mib"):
                if key in ok[0]:
                    row[impl][key] = round(max(r[key] for r in ok), 1)
            peak = a.peak_flops or PEAK_FLOPS[prec]
            row[impl]["mfu"] = round(fpt * row[impl]["tokens_per_s"] / peak, 4)
            row[impl]["achieved_tflops"] = round(fpt * row[impl]["tokens_per_s"] / 1e12, 1)
            if "decode" in ok[0]:
                row[impl]["decode"] = ok[0]["decode"]
            if ok[0].get("phases_ms"):  # CPU: median over the runs of each part's median
                row[impl]["phases_ms"] = {k: round(statistics.median(r["phases_ms"][k] for r in ok), 3)
                                          for k in ok[0]["phases_ms"]}
        # every ours / peer pair: tokens/s and peak GPU memory (ours: CuPy's pool total; the peer's
        # torch.cuda.max_memory_allocated, and max_memory_reserved, its caching allocator's pool)
        ratios: dict = {}
        for o_impl in (i for i in OURS if i in row):
            for p_impl in (i for i in PEERS if i in row):
                o, q = row[o_impl], row[p_impl]
                r = {"tokens_per_s": round(o["tokens_per_s"] / q["tokens_per_s"], 3),
                     "best_step": round(o["tokens_per_s_best_step"] / q["tokens_per_s_best_step"], 3)}
                if "gpu_pool_total_mib" in o and "gpu_max_allocated_mib" in q:
                    r["gpu_mem_vs_allocated"] = round(o["gpu_pool_total_mib"] / q["gpu_max_allocated_mib"], 3)
                    r["gpu_mem_vs_reserved"] = round(o["gpu_pool_total_mib"] / q["gpu_max_reserved_mib"], 3)
                ratios[f"{o_impl}/{p_impl}"] = r
        if ratios:
            row["ratios"] = ratios
        if "ours-graph" in row and "torch" in row:
            row["ratio_ours_graph_over_torch_tokens_per_s"] = round(
                row["ours-graph"]["tokens_per_s"] / row["torch"]["tokens_per_s"], 3)
            row["ratio_ours_graph_best_step"] = round(
                row["ours-graph"]["tokens_per_s_best_step"] / row["torch"]["tokens_per_s_best_step"], 3)
        if "ours" in row and "torch" in row:
            o = [r for r in runs if r["impl"] == "ours" and r["precision"] == prec and "error" not in r]
            t = [r for r in runs if r["impl"] == "torch" and r["precision"] == prec and "error" not in r]
            # pairwise ratios: each ours run against the torch run next to it
            pair = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(o, t)]
            row["ratio_ours_over_torch_tokens_per_s"] = round(row["ours"]["tokens_per_s"] / row["torch"]["tokens_per_s"], 3)
            row["ratio_pairwise"] = [round(v, 3) for v in pair]
            row["ratio_best_step"] = round(row["ours"]["tokens_per_s_best_step"] / row["torch"]["tokens_per_s_best_step"], 3)
            row["ratio_ours_over_torch_peak_rss"] = round(row["ours"]["peak_rss_mib"] / row["torch"]["peak_rss_mib"], 3)
            if "gpu_pool_total_mib" in row["ours"] and "gpu_max_reserved_mib" in row["torch"]:
                row["ratio_ours_over_torch_gpu_mem"] = round(
                    row["ours"]["gpu_pool_total_mib"] / row["torch"]["gpu_max_reserved_mib"], 3)
        summary[prec] = row

    out = {"benchmark": "bench_train", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "git": C.git_rev(),
           "machine": C.machine_info(a.threads), "loadavg_at_start": [round(v, 2) for v in load_start],
           "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],
           "mfu_convention": "nanoGPT estimate_mfu: (6 N + 12 L T C) x tokens/s / peak, N without wpe; peak "
                             + (f"{a.peak_flops:g} FLOP/s (--peak-flops)" if a.peak_flops else
                                "H200 dense " + ", ".join(f"{k} {PEAK_FLOPS[k]:g}" for k in precisions)),
           "flops_per_token": fpt,
           "config": {"name": a.config, **cfg.to_dict(), "batch_size": a.batch_size, "params": n_params,
                      "tokens_per_step": a.batch_size * cfg.block_size, **{k: v for k, v in HYPER.items()}},
           "device": a.device, "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats,
           "order": "for each repeat, for each precision: " + ", ".join(impls),
           "summary": summary, "runs": runs, "wall_s": round(time.perf_counter() - t_start, 1)}
    C.emit(out, a.out)


if __name__ == "__main__":
    main()
