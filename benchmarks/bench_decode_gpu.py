"""GPU decode speed (issue 19): ours (the eager KV-cached sampler, and the CUDA-graph decoder of
tinygrad_lm/decode_cuda.py) against PyTorch with a static KV cache + SDPA, eager and with the decode
step captured as a CUDA graph (torch.cuda.CUDAGraph, static input/output tensors, gpt-fast style),
the same weights, side by side in one run.

Each row: one model, one precision, one batch size; greedy decoding of `--new-tokens` tokens from a
1-token prompt. Figures: microseconds per decode step (all rows of the batch advance one token),
tokens/s (B / step time), and the fraction of the HBM bandwidth bound: (weight bytes + KV-cache bytes
read per step) / --hbm-bytes-per-s, divided by the measured step time. Graph decoders are timed in
steady state (capture excluded: PyTorch's is captured once per run, as ours); eager ones over the
whole call. Time to first token: a `--prefill`-token prompt, prefill + the first pick, synchronised.
Greedy tokens of every implementation are compared with ours (eager) and the first mismatch reported.

    python benchmarks/bench_decode_gpu.py --device cuda                        # the GPU figures
    python benchmarks/bench_decode_gpu.py --device cpu --models small --batches 1 --new-tokens 16
                                                                               # the PyTorch peer's code, eager, on the CPU
Fusion variants (issue 19: the bf16 decoder's extra kernels), one run, ours CUDA graph only, each row
with the kernels of one captured step (benchmarks/count_decode_kernels.py) and PyTorch's graph beside it:

    python benchmarks/bench_decode_gpu.py --device cuda --variants before,after-splitk,after-nosplitk

  before          the residual add of a 16-bit branch as cast + add, c_fc then the GELU kernel, and
                  cuBLASLt's first heuristic algorithm (the code before these fusions)
  after-splitk    one-kernel residual add, GELU in c_fc's GEMM epilogue, cuBLASLt's first algorithm
  after-nosplitk  as after-splitk, with the first algorithm without split-K for products of <= 64 rows
                  (tensor/cuda/cublaslt.py: NO_SPLIT_K_ROWS; its default is 64, i.e. this variant)
It prints one compact line per row to stderr, then the JSON (with the cuBLASLt choices per case).

Precision bf16: ours through nn.amp.autocast_ (products in bfloat16) with the blocks' Linear weights
and biases stored in bfloat16 (inference keeps no float32 master copy, so no cast per product; the tied
embedding / lm_head stays float32), PyTorch with all its weights in bfloat16; both KV caches bfloat16.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Iterator

import _common as C  # noqa: F401  (puts the repository root on sys.path)
import numpy as np

from tinygrad_lm.model import GPT, GPTConfig

MODELS = {  # learned positions (nanoGPT's shakespeare-char shape), vocabulary 65, block 256
    "small": dict(n_layer=6, n_head=6, n_embd=384),     # 10.7 M parameters
    "large": dict(n_layer=12, n_head=12, n_embd=768),   # 85 M
}


# ------------------------------------------------------------------ the PyTorch peer
class TorchStaticGPT:
    """The same GPT in PyTorch with a static KV cache (B, H, block, D) per layer, written at device
    positions with index_copy_, attention over the whole cache with a causal mask row per position
    (gpt-fast's decode step): nothing depends on host values, so the step can be captured."""

    def __init__(self, state: dict, cfg: GPTConfig, batch: int, device: str, dtype) -> None:
        import torch
        self.torch, self.cfg = torch, cfg
        self.w = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device=device, dtype=dtype) for k, v in state.items()}
        H, D, L = cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        self.caches = [(torch.zeros(batch, H, L, D, device=device, dtype=dtype),
                        torch.zeros(batch, H, L, D, device=device, dtype=dtype)) for _ in range(cfg.n_layer)]
        self.causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        self.idx = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None

    def forward(self, idx, pos):
        """idx (B, t) at positions pos (t,) (device) -> logits of the last position (B, V); fills the caches."""
        F, w, c = self.torch.nn.functional, self.w, self.cfg
        B, t = idx.shape
        C_, H = c.n_embd, c.n_head
        x = w["transformer.wte.weight"][idx] + w["transformer.wpe.weight"][pos]
        mask = self.causal[pos][None, None]                 # (1, 1, t, L): keys <= each position
        for i, (kc, vc) in enumerate(self.caches):
            p = f"transformer.h.{i}."
            h = F.layer_norm(x, (C_,), w[p + "ln_1.weight"], w[p + "ln_1.bias"], 1e-5)
            qkv = F.linear(h, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"])
            q, k, v = qkv.view(B, t, 3, H, C_ // H).permute(2, 0, 3, 1, 4)
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
            y = y.transpose(1, 2).reshape(B, t, C_)
            x = x + F.linear(y, w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"])
            h = F.layer_norm(x, (C_,), w[p + "ln_2.weight"], w[p + "ln_2.bias"], 1e-5)
            h = F.gelu(F.linear(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"]), approximate="tanh")
            x = x + F.linear(h, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
        x = F.layer_norm(x[:, -1], (C_,), w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], 1e-5)
        return x @ w["transformer.wte.weight"].T

    def step(self) -> None:
        """One decode step on the static buffers: idx at pos -> the greedy pick into idx, pos + 1."""
        logits = self.forward(self.idx, self.pos)
        self.idx.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)

    def prefill(self, prompt) -> None:
        """The whole prompt (B, T) in one forward; idx = the first pick, pos = T."""
        torch = self.torch
        T = prompt.shape[1]
        logits = self.forward(prompt, torch.arange(T, device=prompt.device))
        self.idx.copy_(logits.argmax(-1, keepdim=True))
        self.pos.fill_(T)

    def capture(self) -> None:
        torch = self.torch
        self.pos.fill_(0)  # the warm-up steps write cache columns 0, 1 (a prefill overwrites them); a
        self.idx.zero_()   # position left past the cache by an earlier generate would index out of bounds
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up on the side stream, as torch.cuda.graphs recommends
                self.step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def generate(self, prompt, n: int, graph: bool, timed_from: int | None = None) -> tuple:
        """Greedy: prompt (B, T) host ints -> (tokens (B, n) host, seconds of steps timed_from..n-1, or of
        the whole call when timed_from is None)."""
        torch = self.torch
        dev = self.idx.device
        pinned = torch.empty((n, prompt.shape[0]), dtype=torch.long, pin_memory=dev.type == "cuda")
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.prefill(torch.from_numpy(prompt).to(dev))
            for i in range(n):
                if timed_from is not None and i == timed_from:
                    sync()
                    t0 = time.perf_counter()
                if i:
                    self.graph.replay() if graph else self.step()
                pinned[i].copy_(self.idx[:, 0], non_blocking=True)
            sync()
            return pinned.numpy().T.copy(), time.perf_counter() - t0


# ------------------------------------------------------------------ ours
def bf16_inference_(model) -> None:
    """autocast_(model, "bf16") and the blocks' Linear weights and biases stored in bfloat16 (in place), as
    the PyTorch twin, which is wholly bfloat16 (a float32 bias would be cast for every product's epilogue)."""
    from nn.amp import autocast_, low_dtype
    from nn.layers import Linear
    autocast_(model, "bf16")
    for m in model.transformer.h.modules():
        if isinstance(m, Linear):
            m.weight.data = m.weight.data.astype(low_dtype("bf16"))
            if m.bias is not None:
                m.bias.data = m.bias.data.astype(low_dtype("bf16"))


LOOKAHEAD = 2
VARIANTS = ("before", "after-splitk", "after-nosplitk")


@contextlib.contextmanager
def decode_variant(name: str) -> Iterator[None]:
    """Run the block inside with the issue-19 decode fusions switched as `name` says (see the module
    docstring; "current": as the code is). The switches are the fast paths' own: AddCUDA and
    LinearGeluCUDA declining (supports -> False) and cublaslt.NO_SPLIT_K_ROWS; restored after."""
    from tensor.cuda import cublaslt
    from tensor.cuda.linear import LinearGeluCUDA
    from tensor.cuda.residual import AddCUDA
    if name not in VARIANTS + ("current",):
        raise ValueError(f"decode_variant: {name!r} is not one of {VARIANTS + ('current',)}")
    saved = (AddCUDA.__dict__["supports"], LinearGeluCUDA.__dict__["supports"], cublaslt.NO_SPLIT_K_ROWS)
    off = staticmethod(lambda *args, **kwargs: False)
    try:
        if name == "before":
            AddCUDA.supports, LinearGeluCUDA.supports = off, off
        if name in ("before", "after-splitk"):
            cublaslt.NO_SPLIT_K_ROWS = 0
        elif name == "after-nosplitk":
            cublaslt.NO_SPLIT_K_ROWS = 64
        yield
    finally:
        AddCUDA.supports, LinearGeluCUDA.supports, cublaslt.NO_SPLIT_K_ROWS = saved


def ours_graph(model, prompt: np.ndarray, n: int) -> tuple:
    """The graph decoder, greedy: (tokens (B, n), seconds of steps 2 + LOOKAHEAD .. n-1). The clock starts
    when step 1 (eager, then the capture) is done; the steps queued by then are not counted."""
    from tensor.tensor import no_grad
    from tinygrad_lm.decode_cuda import GPUDecoder
    cp = __import__("cupy")
    with no_grad():
        dec = GPUDecoder(model, prompt, np.zeros(len(prompt), dtype=np.int64), n, temperature=0, lookahead=LOOKAHEAD)
        out, t0 = [], time.perf_counter()
        for i, toks in enumerate(dec):
            if i == 1:
                cp.cuda.Device().synchronize()
                t0 = time.perf_counter()
            out.append(toks)
    return np.stack(out, 1), time.perf_counter() - t0


def ours_eager(model, prompt: np.ndarray, n: int) -> tuple:
    from tinygrad_lm.sample import generate
    t0 = time.perf_counter()
    out = generate(model, prompt, n, temperature=0, cuda_graph=False)
    return out[:, prompt.shape[1]:], time.perf_counter() - t0


def ttft_ours(model, prompt: np.ndarray, graph: bool) -> float:
    from tinygrad_lm.sample import stream
    t0 = time.perf_counter()
    next(iter(stream(model, prompt, 1, temperature=0, cuda_graph=graph)))
    return time.perf_counter() - t0


def step_bytes(cfg: GPTConfig, n_params: int, batch: int, new: int, weight_bytes: int, cache_bytes: int) -> float:
    """Bytes a decode step must read, averaged over the run: every weight once, and the KV cache
    filled so far (mean length new / 2) for every row, layer, key and value."""
    mean_len = (1 + new) / 2
    return n_params * weight_bytes + 2 * cfg.n_layer * batch * mean_len * cfg.n_embd * cache_bytes


def first_mismatch(a: np.ndarray, b: np.ndarray):
    bad = np.flatnonzero((a != b).any(axis=0))
    return None if len(bad) == 0 else int(bad[0])


def best(fn, repeats: int):
    res = None
    for _ in range(repeats):
        r = fn()
        if res is None or r[1] < res[1]:
            res = r
    return res


def run_variants(args, res: dict) -> None:
    """Per model, precision, batch: ours CUDA graph (us per step, kernels per captured step) under each
    variant, PyTorch's CUDA graph once; greedy tokens of each variant against the first variant's."""
    from count_decode_kernels import count_step
    from tensor.cuda import cublaslt
    variants = args.variants.split(",")
    n = args.new_tokens
    for name, prec, model, B, prompt, twin in graph_cases(args.models, args.precisions, args.batches):
        _, secs = best(lambda: twin.generate(prompt, n, graph=True, timed_from=2), args.repeats)
        torch_us = 1e6 * secs / (n - 2)
        twin = None  # (its caches freed before ours run)
        first = None
        for v in variants:
            with decode_variant(v):
                kernels = count_step(model, B)["kernel_nodes"]
                ours_graph(model, prompt, 4)
                toks, secs = best(lambda: ours_graph(model, prompt, n), args.repeats)
            us_step = 1e6 * secs / (n - 2 - LOOKAHEAD)
            first = toks if first is None else first
            row = {"model": name, "precision": prec, "batch": B, "variant": v, "kernels_per_step": kernels,
                   "ours_graph_us_per_step": round(us_step, 1), "torch_graph_us_per_step": round(torch_us, 1),
                   "ours_graph_vs_torch_graph": round(torch_us / us_step, 3),
                   f"first_mismatch_vs_{variants[0]}": first_mismatch(toks, first)}
            res["rows"].append(row)
            print(f"{name:5s} {prec:4s} B={B:<3d} {v:15s} kernels {kernels:4d}  ours {us_step:7.1f} us  "
                  f"torch {torch_us:7.1f} us  ours/torch {torch_us / us_step:5.3f}x  "
                  f"tokens differ from {row[f'first_mismatch_vs_{variants[0]}']}", file=sys.stderr, flush=True)
    res["cublaslt_plans"] = [p for p in cublaslt.plan_summary() if p["m"] <= 64]


def graph_cases(models: str, precisions: str, batches: list) -> Iterator[tuple]:
    """(model name, precision, our model on the GPU, batch, a 1-token prompt (B, 1), PyTorch's twin with its
    decode step captured) for every model x precision x batch (bf16: bf16_inference_ and an all-bf16 twin)."""
    import torch
    rng = np.random.default_rng(0)
    for name in models.split(","):
        cfg = GPTConfig(vocab_size=65, block_size=256, pos_encoding="learned", **MODELS[name])
        for prec in precisions.split(","):
            model = GPT(cfg, seed=0).eval()
            state = model.state_dict()
            model.to("cuda")
            if prec == "bf16":
                bf16_inference_(model)
            for B in batches:
                prompt = rng.integers(0, cfg.vocab_size, (B, 1))
                twin = TorchStaticGPT(state, cfg, B, "cuda", torch.bfloat16 if prec == "bf16" else torch.float32)
                twin.generate(prompt, 4, graph=False)
                twin.capture()
                yield name, prec, model, B, prompt, twin


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--models", default="small,large")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=200, help="prompt tokens for the time to first token")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hbm-bytes-per-s", type=float, default=4.8e12, help="H200: 4.8 TB/s")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    ap.add_argument("--variants", default="", help=f"comma-separated of {','.join(VARIANTS)}: the fusion "
                    "comparison (ours CUDA graph and kernel counts only; see the module docstring)")
    args = ap.parse_args()

    import torch
    cuda = args.device == "cuda"
    if not cuda:
        C.set_threads(args.threads)
        torch.set_num_threads(args.threads)
    n = args.new_tokens
    res: dict = {"machine": C.machine_info(args.threads), "device": args.device, "new_tokens": n, "prompt_tokens": 1,
                 "hbm_bytes_per_s": args.hbm_bytes_per_s, "rows": []}
    if cuda:
        res["gpu"] = torch.cuda.get_device_name()
    if args.variants:
        if not cuda:
            raise SystemExit("--variants needs --device cuda (the CUDA-graph decoder)")
        run_variants(args, res)
        C.emit(res)
        return
    rng = np.random.default_rng(0)
    for name in args.models.split(","):
        cfg = GPTConfig(vocab_size=65, block_size=256, pos_encoding="learned", **MODELS[name])
        for prec in args.precisions.split(","):
            model = GPT(cfg, seed=0).eval()
            n_params = sum(p.data.size for p in model.parameters())
            state = model.state_dict()
            if cuda:
                model.to("cuda")
            if prec == "bf16":
                bf16_inference_(model)
            tdtype = torch.bfloat16 if prec == "bf16" else torch.float32
            wbytes = 2 if prec == "bf16" else 4
            for B in args.batches:
                prompt = rng.integers(0, cfg.vocab_size, (B, 1))
                row: dict = {"model": name, "params": n_params, "precision": prec, "batch": B}
                nbytes = step_bytes(cfg, n_params, B, n, wbytes, wbytes)
                impls: dict = {}
                ours_eager(model, prompt, 4)  # warm-up (kernels compiled)
                impls["ours_eager"] = best(lambda: ours_eager(model, prompt, n), args.repeats) + (n,)
                if cuda:
                    ours_graph(model, prompt, 4)
                    impls["ours_graph"] = best(lambda: ours_graph(model, prompt, n), args.repeats) + (n - 2 - LOOKAHEAD,)
                twin = TorchStaticGPT(state, cfg, B, args.device, tdtype)
                twin.generate(prompt, 4, graph=False)
                impls["torch_eager"] = best(lambda: twin.generate(prompt, n, graph=False), args.repeats) + (n,)
                if cuda:
                    twin.capture()
                    impls["torch_graph"] = best(lambda: twin.generate(prompt, n, graph=True, timed_from=2),
                                                args.repeats) + (n - 2,)
                ref = impls["ours_eager"][0]
                for key, (toks, secs, steps) in impls.items():
                    us_step = 1e6 * secs / steps
                    row[f"{key}_us_per_step"] = round(us_step, 1)
                    row[f"{key}_tok_s"] = round(B / us_step * 1e6, 1)
                    row[f"{key}_hbm_fraction"] = round(nbytes / args.hbm_bytes_per_s / (us_step * 1e-6), 4)
                    if key != "ours_eager":
                        row[f"{key}_first_mismatch_vs_ours_eager"] = first_mismatch(toks, ref)
                for key in [k for k in ("ours_eager", "ours_graph") if k in impls]:
                    for peer in [k for k in ("torch_eager", "torch_graph") if k in impls]:
                        row[f"{key}_vs_{peer}"] = round(row[f"{peer}_us_per_step"] / row[f"{key}_us_per_step"], 3)
                if B == 1:  # time to first token for a --prefill-token prompt
                    long = rng.integers(0, cfg.vocab_size, (1, args.prefill))
                    sync = __import__("cupy").cuda.Device().synchronize if cuda else (lambda: None)
                    for graph in ((False, True) if cuda else (False,)):
                        ttft_ours(model, long, graph)
                        t = min(ttft_ours(model, long, graph) for _ in range(args.repeats))
                        sync()
                        row[f"ttft_ms_ours_{'graph' if graph else 'eager'}"] = round(1e3 * t, 2)
                    tw = TorchStaticGPT(state, cfg, 1, args.device, tdtype)
                    tw.generate(long, 1, graph=False)
                    row["ttft_ms_torch"] = round(1e3 * min(tw.generate(long, 1, graph=False)[1]
                                                           for _ in range(args.repeats)), 2)
                res["rows"].append(row)
                print(row, file=sys.stderr, flush=True)
                twin = None
    C.emit(res)


if __name__ == "__main__":
    main()
