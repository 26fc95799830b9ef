"""Export our GPT's weights to a PyTorch state_dict that a nanoGPT-style model loads.

    python examples/export_to_pytorch.py --checkpoint runs/demo --out gpt.pt   # a trained run
    python examples/export_to_pytorch.py --out gpt.pt                          # a fresh tiny GPT

Our parameter names and layouts already are nanoGPT's (docs/DESIGN.md): `transformer.wte.weight`
(V, C), `transformer.h.0.attn.c_attn.weight` (3C, C), ... and a Linear weight is (out, in)
exactly like `torch.nn.Linear`'s. So the export is a plain copy, no transposes; the one
addition is `lm_head.weight`, which nanoGPT lists separately although it is tied to wte.

The script then builds `NanoGPT` below, a minimal nanoGPT-compatible PyTorch model, loads
the file with `load_state_dict(..., strict=False)`, and checks that its logits match ours.

The differences from nanoGPT are ours to declare: with pos_encoding="sinusoidal" (our
default) the token embedding is multiplied by sqrt(C) and a fixed sinusoid table (a buffer,
not a weight) is added instead of nanoGPT's learned `wpe`; with pos_encoding="learned"
(the shakespeare-char preset) the model is nanoGPT's exactly.

Needs PyTorch (`pip install torch`); nothing here is pickled except by torch.save itself.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
import torch.nn as tnn  # noqa: E402
from torch.nn import functional as TF  # noqa: E402

from nn.layers import sinusoidal_table  # noqa: E402
from nn.serialization import load_model  # noqa: E402
from tinygrad_lm import checkpoint as ckpt_io  # noqa: E402
from tinygrad_lm.model import GPT, GPTConfig  # noqa: E402


# ---------------------------------------------------------------- ours -> PyTorch state_dict
def load_ours(checkpoint: str | None) -> GPT:
    """Our GPT from a run or checkpoint directory, or a fresh tiny one."""
    if checkpoint is None:
        return GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64), seed=0)
    ckpt = ckpt_io.resolve(checkpoint)
    state = ckpt_io.read_state(ckpt)
    model = GPT(GPTConfig.from_dict(state["model_config"]))
    load_model(model, ckpt / ckpt_io.MODEL_FILE)
    return model


def to_torch_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our state_dict (name -> NumPy array) as torch tensors, plus nanoGPT's tied lm_head.weight."""
    sd = {name: torch.from_numpy(np.ascontiguousarray(arr)) for name, arr in model.state_dict().items()}
    sd.setdefault("lm_head.weight", sd["transformer.wte.weight"])  # the same tensor: tied
    return sd


# ---------------------------------------------------------------- a minimal nanoGPT in PyTorch
class LayerNorm(tnn.Module):
    """nanoGPT's LayerNorm with an optional bias."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = tnn.Parameter(torch.ones(ndim))
        self.bias = tnn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TF.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(tnn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = tnn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = tnn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(tnn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = tnn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = tnn.GELU(approximate="tanh")
        self.c_proj = tnn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(tnn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(tnn.Module):
    """nanoGPT's GPT (inference only: no dropout), with our sinusoidal option."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.pos_encoding == "rope" or cfg.norm != "layernorm":  # nanoGPT has neither
            raise ValueError(f"NanoGPT twin: pos_encoding {cfg.pos_encoding!r} with norm {cfg.norm!r} has no "
                             "nanoGPT counterpart; export a model with learned or sinusoidal positions and LayerNorm")
        self.cfg = cfg
        modules = dict(wte=tnn.Embedding(cfg.vocab_size, cfg.n_embd),
                       h=tnn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                       ln_f=LayerNorm(cfg.n_embd, cfg.bias))
        if cfg.pos_encoding == "learned":
            modules["wpe"] = tnn.Embedding(cfg.block_size, cfg.n_embd)
        self.transformer = tnn.ModuleDict(modules)
        self.lm_head = tnn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does
        if cfg.pos_encoding == "sinusoidal":  # a fixed table, not part of the state_dict
            pe = torch.from_numpy(sinusoidal_table(cfg.block_size, cfg.n_embd))
            self.register_buffer("pe", pe, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V) at every position."""
        T = idx.shape[1]
        tok = self.transformer.wte(idx)
        if self.cfg.pos_encoding == "learned":
            x = tok + self.transformer.wpe(torch.arange(T, device=idx.device))
        else:
            x = tok * math.sqrt(self.cfg.n_embd) + self.pe[:T]
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


# ---------------------------------------------------------------- check and main
def compare_logits(ours: GPT, theirs: NanoGPT, seed: int = 0, batch: int = 2) -> float:
    """Max |logits difference| on random token ids (both models in eval mode)."""
    cfg = ours.config
    idx = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, cfg.block_size))
    ours.eval()
    theirs.eval()
    a = ours(idx)[0].numpy()
    with torch.no_grad():
        b = theirs(torch.from_numpy(idx)).numpy()
    return float(np.abs(a - b).max())


def export(checkpoint: str | None, out: str) -> tuple[GPT, NanoGPT, float]:
    ours = load_ours(checkpoint)
    torch.save(to_torch_state_dict(ours), out)

    theirs = NanoGPT(ours.config)
    missing, unexpected = theirs.load_state_dict(torch.load(out, weights_only=True), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
    return ours, theirs, compare_logits(ours, theirs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a run directory (follows `latest`) or a checkpoint directory; "
                                        "default: a fresh tiny GPT")
    p.add_argument("--out", default="gpt_state_dict.pt", help="where to torch.save the state_dict")
    args = p.parse_args(argv)
    ours, _, diff = export(args.checkpoint, args.out)
    c = ours.config
    print(f"wrote {args.out}: {len(to_torch_state_dict(ours))} tensors, {ours.num_parameters():,} parameters "
          f"({c.n_layer} layers, width {c.n_embd}, vocab {c.vocab_size}, {c.pos_encoding} positions)")
    print(f"PyTorch NanoGPT loaded it with load_state_dict(strict=False); max |logit difference| = {diff:.2e}")
    if diff > 1e-3:
        print("error: the logits differ more than float32 round-off", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
