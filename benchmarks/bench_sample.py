"""Sampler decode speed (issue 6): ours with and without the KV cache, and a PyTorch
KV-cached twin of the same model with the same weights, at batch 1, 8 and 32.

Model: nanoGPT's shakespeare-char shape (n_layer 6, n_head 6, n_embd 384, vocab 65,
block_size 256, learned positions), random init (speed does not depend on the weights).
Each run: a one-token prompt, 256 new tokens, greedy (both implementations must then give
the same tokens, checked below); also ours with temperature 0.8 / top-k 50 / top-p 0.95
to show what the filters cost. Tokens/s counts new tokens of all rows (B * 256 / seconds).
Best of `--repeats` runs (the uncached run, which is slow, once); the greedy runs of ours and the twin
alternate, and ours_vs_torch_median_of_pairs is the median of the per-pair ratios. Also the time to first token
for a --ttft-prompt-token prompt (prefill + one token, batch 1), ours and the twin interleaved,
and with --quantize int8 our model with int8 weights (the twin stays float32; issue 19). The BLAS
wait is tuned as `python -m tinygrad_lm sample` tunes it (backend.tune_blas_wait).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_sample.py
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import _common as C  # noqa: F401  (puts the repository root on sys.path)
import numpy as np

import tensor.functional as ours_F  # noqa: E402
from tinygrad_lm import decode_cpu
from tinygrad_lm.model import GPT, GPTConfig
from tinygrad_lm.sample import generate


# ------------------------------------------------------------------ the PyTorch twin
class TorchGPT:
    """The same GPT (learned positions, pre-LN, tanh GELU, tied lm_head) with a preallocated KV cache."""

    def __init__(self, state: dict, cfg: GPTConfig) -> None:
        import torch
        self.torch, self.cfg = torch, cfg
        self.w = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}

    def new_caches(self, batch: int) -> list:
        c, torch = self.cfg, self.torch
        shape = (batch, c.n_head, c.block_size, c.n_embd // c.n_head)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(c.n_layer)]

    def forward(self, idx, start: int, caches: list):
        """idx (B, t) LongTensor at positions start .. start+t-1 -> logits of the last position (B, V)."""
        F, w, c = self.torch.nn.functional, self.w, self.cfg
        B, t = idx.shape
        C, H = c.n_embd, c.n_head
        x = w["transformer.wte.weight"][idx] + w["transformer.wpe.weight"][start:start + t]
        for i, (kc, vc) in enumerate(caches):
            p = f"transformer.h.{i}."
            h = F.layer_norm(x, (C,), w[p + "ln_1.weight"], w[p + "ln_1.bias"], 1e-5)
            qkv = F.linear(h, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"])
            q, k, v = qkv.view(B, t, 3, H, C // H).permute(2, 0, 3, 1, 4)
            kc[:, :, start:start + t] = k
            vc[:, :, start:start + t] = v
            y = F.scaled_dot_product_attention(q, kc[:, :, :start + t], vc[:, :, :start + t],
                                               is_causal=(start == 0 and t > 1))
            y = y.transpose(1, 2).reshape(B, t, C)
            x = x + F.linear(y, w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"])
            h = F.layer_norm(x, (C,), w[p + "ln_2.weight"], w[p + "ln_2.bias"], 1e-5)
            h = F.gelu(F.linear(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"]), approximate="tanh")
            x = x + F.linear(h, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
        x = F.layer_norm(x[:, -1], (C,), w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], 1e-5)
        return x @ w["transformer.wte.weight"].T

    def generate_greedy(self, prompt: np.ndarray, n: int) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            seq = torch.from_numpy(prompt.astype(np.int64))
            caches = self.new_caches(seq.shape[0])
            logits = self.forward(seq, 0, caches)
            out = [seq]
            for i in range(n):
                nxt = logits.argmax(-1, keepdim=True)
                out.append(nxt)
                if i + 1 < n:
                    logits = self.forward(nxt, seq.shape[1] + i, caches)
            return torch.cat(out, 1).numpy()


CLOCK = time.perf_counter  # --clock process: CPU seconds of this process (every thread), set in main()


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = math.inf, None
    for _ in range(repeats):
        t0 = CLOCK()
        result = fn()
        best = min(best, CLOCK() - t0)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-uncached", action="store_true")
    ap.add_argument("--quantize", default="none", choices=("none", "int8"),
                    help="int8: our model with int8 weights (nn/quant.py); the twin stays float32")
    ap.add_argument("--clock", default="wall", choices=("wall", "process"),
                    help="process: CPU time of this process instead of wall time; with --threads 1 it is "
                         "nearly blind to other processes on a busy machine (not to cache and memory contention)")
    ap.add_argument("--ttft-prompt", type=int, default=200,
                    help="time to first token for a prompt of this many tokens at batch 1 (0 = skip)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter

    import torch
    from tensor import backend
    backend.tune_host_allocator()  # as `python -m tinygrad_lm sample` does
    blas_wait = backend.tune_blas_wait()  # likewise
    C.set_threads(args.threads)
    torch.set_num_threads(args.threads)

    cfg = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, pos_encoding="learned")
    model = GPT(cfg, seed=0).eval()
    twin = TorchGPT(model.state_dict(), cfg)
    if args.quantize == "int8":
        from nn.quant import quantize_
        quantize_(model)
    n = args.new_tokens
    rng = np.random.default_rng(0)
    res: dict = {"machine": C.machine_info(args.threads),
                 "model": {**cfg.to_dict(), "params": sum(p.data.size for p in model.parameters())},
                 "openblas_wait_log2": blas_wait and backend.BLAS_WAIT_LOG2,
                 "split_rows_x_length": decode_cpu.SPLIT_ROWS_X_LENGTH,
                 "new_tokens": n, "prompt_tokens": 1, "quantize": args.quantize, "clock": args.clock, "batches": {}}
    if args.ttft_prompt:  # prefill + the first token, batch 1, interleaved with the twin
        prompt = rng.integers(0, cfg.vocab_size, (1, min(args.ttft_prompt, cfg.block_size - 1)))
        fns = {"ours": lambda: generate(model, prompt, 1, temperature=0), "torch": lambda: twin.generate_greedy(prompt, 1)}
        best = {k: math.inf for k in fns}
        for _ in range(max(3, args.repeats)):  # ours, torch, ours, torch, ...: drift hits both alike
            for k, f in fns.items():
                C.settle(f, seconds=0.1)
                best[k] = min(best[k], best_time(f, 1)[0])
        res["time_to_first_token"] = {"prompt_tokens": prompt.shape[1], "ours_ms": C.ms(best["ours"]),
                                      "torch_ms": C.ms(best["torch"]), "ours_vs_torch": round(best["torch"] / best["ours"], 3)}
        print(f"time to first token: {res['time_to_first_token']}", file=sys.stderr, flush=True)

    for B in args.batches:
        prompt = rng.integers(0, cfg.vocab_size, (B, 1))
        row: dict = {}
        generate(model, prompt, 4, temperature=0)               # warm-up
        twin.generate_greedy(prompt, 2)
        # ours and the twin interleaved (ours, twin, ours, ...): a drifting machine hits both alike
        runs: dict = {"ours": [], "torch": []}
        for _ in range(args.repeats):
            t, ours = best_time(lambda: generate(model, prompt, n, temperature=0), 1)
            runs["ours"].append(t)
            t, theirs = best_time(lambda: twin.generate_greedy(prompt, n), 1)
            runs["torch"].append(t)
        t = min(runs["ours"])
        row["ours_cached_greedy_tok_s"] = B * n / t
        # the same decoding with every GEMM replaced by an empty result of its shape: what is left is our
        # Python and small-op overhead per token; the difference is what the BLAS products cost in the loop
        # (the prefill goes through functional.gemm, the decoding steps through decode_cpu.product)
        real_gemm, real_product = ours_F.gemm, decode_cpu.product
        ours_F.gemm = lambda a, b: np.zeros((a.shape[0], b.shape[1]), a.dtype)
        decode_cpu.product = lambda x, w, out, spare: None  # (out keeps its previous values)
        try:
            t_floor, _ = best_time(lambda: generate(model, prompt, n, temperature=0), args.repeats)
        finally:
            ours_F.gemm, decode_cpu.product = real_gemm, real_product
        row["ours_ms_per_step"] = 1000 * t / n
        row["ours_ms_per_step_without_gemms"] = 1000 * t_floor / n
        t, _ = best_time(lambda: generate(model, prompt, n, temperature=0.8, top_k=50, top_p=0.95, seed=0),
                         args.repeats)
        row["ours_cached_sampled_tok_s"] = B * n / t
        if B == 1 and not args.skip_uncached:
            t, unc = best_time(lambda: generate(model, prompt, n, temperature=0, use_cache=False), 1)
            row["ours_uncached_greedy_tok_s"] = B * n / t
            row["uncached_tokens_equal_cached"] = bool(np.array_equal(unc, ours))
            row["cache_speedup"] = row["ours_cached_greedy_tok_s"] / row["ours_uncached_greedy_tok_s"]
        t = min(runs["torch"])
        row["torch_cached_greedy_tok_s"] = B * n / t
        row["torch_ms_per_step"] = 1000 * t / n
        row["ours_vs_torch"] = row["ours_cached_greedy_tok_s"] / row["torch_cached_greedy_tok_s"]
        row["ours_vs_torch_median_of_pairs"] = statistics.median(a / b for a, b in zip(runs["torch"], runs["ours"]))
        row["torch_tokens_equal_ours"] = bool(np.array_equal(theirs, ours))  # (int8: expected to differ)
        row["torch_first_mismatch_step"] = (None if row["torch_tokens_equal_ours"] else
                                            int(np.argmax((theirs != ours).any(axis=0))) - 1)
        C.settle(lambda: generate(model, prompt, 2, temperature=0), seconds=0.2)
        res["batches"][str(B)] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}
        print(f"batch {B}: {res['batches'][str(B)]}", file=sys.stderr, flush=True)
    C.emit(res)


if __name__ == "__main__":
    main()
