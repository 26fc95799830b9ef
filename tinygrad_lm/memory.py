"""How much memory a GPT needs, estimated before building it, so an impossible setting
(say `--block-size 100000`) is refused at once with a message instead of failing after
allocating gigabytes.

    est = estimate(cfg, batch_size=12, precision="fp32", training=True)   # name -> bytes
    check_fits(cfg, 12, "fp32", "cpu", training=True)                    # UserError if too big

The terms (4-byte floats unless said otherwise; P parameters, B batch, T block_size,
C n_embd, H n_head, L n_layer, V the embedding's rows, padded_vocab_size):

    parameters      4P (+ 2P of 16-bit weight copies under fp16/bf16)
    gradients       4P                      (training)
    optimizer       8P: AdamW's two moments (training)
    attention       2 B H T^2 per layer: the scores and the probabilities
    layer_other     16 B T C per layer: LayerNorm outputs, q/k/v, attention and MLP outputs,
                    the 4C-wide MLP hidden before and after GELU, residuals
    logits          B T V (3 B T V in training: logits, probabilities, their gradient)
    kv_cache        2 L B T C (inference: the sampler's key/value buffers)

Training keeps every layer's activations for the backward pass (L x); inference frees
each layer's after the next, so only one layer's count. This overestimates somewhat
(the CPU attention frees masked scores in pieces), which is the safe side: the point is
to refuse the hopeless, within about 2x of what a run really takes.
"""
from __future__ import annotations

import os
from typing import Any

from tinygrad_lm.errors import UserError

__all__ = ["param_shapes", "num_parameters", "estimate", "check_fits", "available_bytes"]


def param_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of GPT(cfg), in `named_parameters()` order (lm_head is tied to wte)."""
    C, V = cfg.n_embd, cfg.padded_vocab_size
    out: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, C)}
    if cfg.pos_encoding == "learned":
        out["transformer.wpe.weight"] = (cfg.block_size, C)

    def linear(name: str, n_out: int, n_in: int) -> None:
        out[name + ".weight"] = (n_out, n_in)
        if cfg.bias:
            out[name + ".bias"] = (n_out,)

    def norm(name: str) -> None:
        out[name + ".weight"] = (C,)
        if cfg.bias:
            out[name + ".bias"] = (C,)

    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}"
        norm(h + ".ln_1")
        linear(h + ".attn.c_attn", 3 * C, C)
        linear(h + ".attn.c_proj", C, C)
        norm(h + ".ln_2")
        linear(h + ".mlp.c_fc", 4 * C, C)
        linear(h + ".mlp.c_proj", C, 4 * C)
    norm("transformer.ln_f")
    return out


def num_parameters(cfg: Any) -> int:
    """The closed form: V C (+ T C learned positions) + L (12 C^2 + 13 C with biases, 12 C^2 + 2 C
    without) + final LayerNorm."""
    C, L = cfg.n_embd, cfg.n_layer
    per_layer = 12 * C * C + (13 * C if cfg.bias else 2 * C)
    pos = cfg.block_size * C if cfg.pos_encoding == "learned" else 0
    return cfg.padded_vocab_size * C + pos + L * per_layer + (2 * C if cfg.bias else C)


def estimate(model_cfg: Any, batch_size: int, precision: str = "fp32", training: bool = True,
             tp: int = 1) -> dict[str, int]:
    """Bytes per term (module docstring) and their "total", for a batch of batch_size x block_size,
    on one rank of a tp-way tensor-parallel group: parameters, gradients, optimizer moments,
    attention and logits divided by tp; the other activations kept whole (the replicated ones
    dominate them: the safe side)."""
    B, T, C, H, L, V = (int(batch_size), model_cfg.block_size, model_cfg.n_embd, model_cfg.n_head,
                        model_cfg.n_layer, model_cfg.padded_vocab_size)
    P = num_parameters(model_cfg)
    f = 4
    est = {"parameters": f * P + (2 * P if precision in ("fp16", "bf16") else 0),
           "gradients": f * P if training else 0,
           "optimizer": 2 * f * P if training else 0}
    layers = L if training else 1
    est["attention scores+probabilities"] = layers * 2 * B * H * T * T * f
    est["other activations"] = layers * 16 * B * T * C * f
    est["logits"] = (3 if training else 1) * B * T * V * f
    est["kv_cache"] = 0 if training else 2 * L * B * T * C * f
    for k in ("parameters", "gradients", "optimizer", "attention scores+probabilities", "logits"):
        est[k] = -(-est[k] // tp)
    est["total"] = sum(est.values())
    return est


def available_bytes(device: str = "cpu") -> tuple[int | None, str]:
    """(bytes free for this process, where the number came from); None when it cannot be told."""
    if device == "cuda":
        try:
            import cupy
            free, _ = cupy.cuda.runtime.memGetInfo()
            pool = cupy.get_default_memory_pool()
            return int(free) + int(pool.total_bytes() - pool.used_bytes()), "free GPU memory (cudaMemGetInfo)"
        except Exception:  # no CuPy or no device: the caller reports that elsewhere
            return None, "unknown"
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available physical pages (sysconf)"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def check_fits(model_cfg: Any, batch_size: int, precision: str, device: str, training: bool,
               budget: int | None = None, tp: int = 1) -> None:
    """Raise UserError naming the estimate, the budget and the biggest term when the estimate
    exceeds `budget` (default: what the device has free). Does nothing when that is unknown."""
    where = "given budget"
    if budget is None:
        budget, where = available_bytes(device)
        if budget is None:
            return
    est = estimate(model_cfg, batch_size, precision, training, tp)
    if est["total"] <= budget:
        return
    name, size = max(((k, v) for k, v in est.items() if k != "total"), key=lambda kv: kv[1])
    what = "training" if training else "sampling"
    raise UserError(f"{what} this model needs about {_gb(est['total'])} of memory (batch {batch_size}, "
                    f"--block-size {model_cfg.block_size}, {num_parameters(model_cfg):,} parameters, {precision}), "
                    f"more than the {_gb(budget)} available ({where}, {device}); the biggest term is {name}: "
                    f"{_gb(size)}. Lower --block-size, --batch-size or the model size")
