"""The GPT: token embedding (x sqrt(C)) + sinusoidal positions, n_layer pre-LayerNorm
blocks, a final LayerNorm and an lm_head tied to the token embedding (docs/DESIGN.md).

Options: pos_encoding "learned" (a wpe table added to the unscaled wte, nanoGPT) or "rope"
(rotary positions on q and k inside attention, nn/rotary.py; the unscaled wte, no position
parameters); norm "rmsnorm" (nn.layers.RMSNorm, weight only) for ln_1, ln_2 and ln_f.

Parameter names and layouts are nanoGPT's, so `model.state_dict()` loads into a
PyTorch nanoGPT-style model (see examples/export_to_pytorch.py).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

import tensor.functional as F
from nn import Block, Dropout, Embedding, Linear, Module, ModuleList, RotaryEmbedding, SinusoidalPositionalEncoding
from nn.init import gpt_init_
from nn.layers import NORMS, make_norm
from tensor import backend
from tensor.tensor import Tensor

POS_ENCODINGS = ("sinusoidal", "learned", "rope")


@dataclass
class GPTConfig:
    """The model's shape and options (docs/DESIGN.md): pos_encoding "sinusoidal" | "learned" | "rope",
    norm "layernorm" | "rmsnorm" (ln_1, ln_2 and ln_f); pad_vocab_to: wte / lm_head get padded_vocab_size
    rows (vocab_size rounded up to a multiple of it; 1: no padding)."""
    vocab_size: int
    block_size: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    pos_encoding: str = "sinusoidal"
    norm: str = "layernorm"
    pad_vocab_to: int = 1

    @property
    def padded_vocab_size(self) -> int:
        """Rows of wte / lm_head: vocab_size rounded up to a multiple of pad_vocab_to (GPT-2's 50257 -> 50304
        with 64: GEMM-friendly shapes). The extra rows are never a token: no input or target holds them, the
        loss's softmax pushes their logits down, the samplers never pick them, exports crop them."""
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pad_vocab_to"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"GPTConfig: {name} must be an integer, got {v!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real):
            raise ValueError(f"GPTConfig: dropout must be a number, got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig: bias must be true or false, got {self.bias!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pad_vocab_to"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"GPTConfig: {name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"GPTConfig: pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"GPTConfig: sinusoidal positions need an even n_embd, got {self.n_embd}")
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig: rope needs an even head size n_embd / n_head, got "
                             f"{self.n_embd} / {self.n_head} = {self.n_embd // self.n_head}")
        if self.norm not in NORMS:
            raise ValueError(f"GPTConfig: norm must be one of {NORMS}, got {self.norm!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """The inverse of to_dict; keys added since (norm) take their defaults when absent."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"GPTConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


class Transformer(Module):
    """The body: wte, (wpe), drop, h.0 .. h.{n_layer-1}, ln_f."""

    def __init__(self, cfg: GPTConfig, rng: np.random.Generator) -> None:
        self.wte = Embedding(cfg.padded_vocab_size, cfg.n_embd, rng=rng)
        if cfg.pos_encoding == "learned":
            self.wpe = Embedding(cfg.block_size, cfg.n_embd, rng=rng)
        self.drop = Dropout(cfg.dropout)
        head = cfg.n_embd // cfg.n_head
        self.h = ModuleList(Block(cfg.n_embd, cfg.n_head, cfg.dropout, cfg.bias, rng, norm=cfg.norm,
                                  rotary=RotaryEmbedding(head, cfg.block_size) if cfg.pos_encoding == "rope" else None)
                            for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg.norm, cfg.n_embd, cfg.bias)


class GPT(Module):
    """model(idx (B, T) ints, targets (B, T) ints or None) -> (logits (B, T, V), loss or None); V is
    config.padded_vocab_size (columns from config.vocab_size on are padding: never sample them)."""

    def __init__(self, config: GPTConfig, seed: int = 0, rng: Any = None) -> None:
        """rng: what draws the initial weights (default np.random.default_rng(seed)); tinygrad_lm/hf.py
        passes one that skips the drawing, as it overwrites every weight next."""
        self.config = config
        rng = np.random.default_rng(seed) if rng is None else rng
        self.transformer = Transformer(config, rng)
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size, bias=False, rng=rng)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        if config.pos_encoding == "sinusoidal":
            self.pos = SinusoidalPositionalEncoding(config.block_size, config.n_embd)
        gpt_init_(self, config.n_layer, rng)

    @classmethod
    def from_pretrained(cls, path: str, dropout: float = 0.0) -> "GPT":
        """A local Hugging Face GPT-2 directory (config.json + model.safetensors) -> GPT in eval mode
        (tinygrad_lm/hf.py: the name mapping and the Conv1D transposes)."""
        from tinygrad_lm.hf import load_hf
        return load_hf(path, dropout=dropout)

    def embed(self, idx: Any, positions: Any) -> Tensor:
        """Token + position embeddings: idx (B, T), positions (T,) or (B, T) ints -> (B, T, C)."""
        cfg = self.config
        tok = self.transformer.wte(idx)
        if cfg.pos_encoding == "sinusoidal":
            x = tok * math.sqrt(cfg.n_embd) + self.pos(positions)
        elif cfg.pos_encoding == "rope":  # positions enter inside attention (nn/rotary.py)
            x = tok
        else:
            x = tok + self.transformer.wpe(positions)
        return self.transformer.drop(x)

    def forward(self, idx: Any, targets: Any = None, mask: Any = None, positions: Any = None,
                caches: list | None = None) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) ints -> logits (B, T, V) and the mean cross-entropy against targets (B, T).

        mask (B, T_keys) bool: False marks padding keys (batched prompts of different lengths).
        positions (T,) or (B, T): each token's position (default 0..T-1).
        caches: one nn.attention.KVCache per layer for incremental decoding (inference only).
        """
        idx = idx.data if isinstance(idx, Tensor) else idx
        if not hasattr(idx, "ndim"):
            idx = np.asarray(idx)
        if idx.ndim != 2:
            raise ValueError(f"GPT: idx must be (B, T) integers, got shape {idx.shape}")
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"GPT: sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}")
        xp = backend.array_module(self.transformer.wte.weight.data)
        V = self.config.vocab_size
        for name, ids in (("idx", idx), ("targets", targets)):
            if ids is not None and backend.array_module(ids) is np and ids.size and (ids.min() < 0 or ids.max() >= V):
                if name == "targets" and ids.min() == -100 and ids.max() < V:
                    continue  # ignore_index
                raise ValueError(f"GPT: {name} must lie in [0, {V}), got values in [{ids.min()}, {ids.max()}]")
        if xp is not np:  # host ids to the GPU without waiting for it (pinned-memory staging)
            if getattr(self, "_upload", None) is None:
                self._upload = backend.HostToDevice()
            if isinstance(idx, np.ndarray):
                idx = self._upload(idx)
            if isinstance(targets, np.ndarray):
                targets = self._upload(targets)
        if positions is None:
            start = caches[0].length if caches else 0
            positions = xp.arange(start, start + idx.shape[1])
        else:
            if backend.array_module(positions) is np:
                positions = np.asarray(positions)
                if positions.size and (positions.min() < 0 or positions.max() >= self.config.block_size):
                    raise ValueError(f"GPT: positions must lie in [0, {self.config.block_size}), got values in "
                                     f"[{positions.min()}, {positions.max()}]")
            if backend.array_module(positions) is not xp:
                positions = xp.asarray(positions)
        x = self.embed(idx, positions)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask=mask, cache=caches[i] if caches else None, positions=positions)
        return self.head(self.transformer.ln_f(x), targets)

    def head(self, x: Tensor, targets: Any = None) -> tuple[Tensor, Tensor | None]:
        """The final hidden states x (B, T, C) -> logits (B, T, V) and the mean cross-entropy (or None)."""
        logits = self.lm_head(x)
        return logits, (F.cross_entropy(logits, targets) if targets is not None else None)

    def new_caches(self, batch: int, max_len: int | None = None) -> list:
        """Empty KV caches (one per layer) for `batch` sequences of up to max_len (default block_size) tokens."""
        from nn.attention import KVCache
        cfg = self.config
        like = self.transformer.wte.weight.data
        if like.dtype == np.int8:  # an int8 table (nn/quant.py): the caches hold float activations
            like = self.transformer.ln_f.weight.data
        low = getattr(self.transformer.h[0].attn.c_attn, "compute_dtype", None) if cfg.n_layer else None
        if low is not None:  # mixed precision (nn.amp.autocast_): keys and values are computed in it
            like = like[:0].astype(low)
        return [KVCache(batch, cfg.n_head, max_len or cfg.block_size, cfg.n_embd // cfg.n_head, like)
                for _ in range(cfg.n_layer)]

    def extra_repr(self) -> str:
        c = self.config
        pad = f" (padded to {c.padded_vocab_size})" if c.padded_vocab_size != c.vocab_size else ""
        return (f"n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, vocab={c.vocab_size}{pad}, "
                f"block={c.block_size}")
