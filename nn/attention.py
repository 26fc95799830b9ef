"""Attention as composable pieces (the ops themselves: tensor/attention.py):

    q, k, v = split_heads(qkv, n_head)                 (B, T, 3C) -> 3 x (B, H, T, D)
    q, k = rotary(q, k, positions)                     a position hook, if any (nn/rotary.py)
    k, v = cache.append(k, v)                          all keys so far, when decoding (KVCache)
    y = scaled_dot_product_attention(q, k, v, causal=True, mask=mask)
    y = merge_heads(y)                                 (B, H, T, D) -> (B, T, C)

Each piece runs its reference Function or a fast path beneath it, chosen by tensor/dispatch.py.
`causal_attention_qkv` is the composition with nothing between split and sdpa; the dispatch may
run it as one fused node (CausalAttentionQKV), which saves the layout copies of the pieces.
"""
from __future__ import annotations

from typing import Any

from tensor.attention import CausalAttentionQKV, MergeHeads, ScaledDotProductAttention, SplitHeads, split_forward
from tensor.backend import array_module
from tensor.dispatch import pick
from tensor.tensor import Tensor, is_grad_enabled

__all__ = ["split_heads", "merge_heads", "scaled_dot_product_attention", "causal_attention_qkv", "KVCache",
           "CausalAttentionQKV", "ScaledDotProductAttention"]


def _mask_array(mask: Any, like: Tensor) -> Any:
    if mask is None:
        return None
    m = mask.data if isinstance(mask, Tensor) else mask
    m = array_module(like.data).asarray(m)
    if m.dtype != bool:
        raise TypeError(f"attention mask must be boolean (True = attend), got dtype {m.dtype}")
    return m


def split_heads(x: Tensor, n_head: int, parts: int = 3) -> tuple[Tensor, ...]:
    """x (B, T, parts*C) -> `parts` tensors (B, H, T, D), D = C / n_head: channel j*C + h*D + d of
    token t is element (h, t, d) of part j (nanoGPT's c_attn layout: q heads | k heads | v heads)."""
    if not (x.requires_grad and is_grad_enabled()):  # no graph to record (decoding): the reference's views,
        return tuple(Tensor.wrap(h) for h in split_forward(x.data, n_head, parts))  # no copy, no op
    heads = pick(SplitHeads, x.data).apply(x, n_head=n_head, parts=parts)  # (parts, B, H, T, D)
    return tuple(heads[i] for i in range(parts))


def merge_heads(x: Tensor) -> Tensor:
    """x (B, H, T, D) -> (B, T, H*D), the inverse of split_heads for one part."""
    return pick(MergeHeads, x.data).apply(x)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, mask: Any = None,
                                 dropout_p: float = 0.0, generator: Any = None) -> Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for q (B, H, Tq, D), k, v (B, H, Tk, D) -> (B, H, Tq, D).

    causal: query i (at absolute position i + Tk - Tq) sees keys <= its position.
    mask: bool, True = attend; (B, Tk) key padding, or broadcastable to (B, H, Tq, Tk).
    dropout_p, generator: dropout on the attention weights, masks drawn from `generator`.
    Memory kept for backward: P, B*H*Tq*Tk elements (+ a bool mask with dropout); tensor/attention.py.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must be in [0, 1), got {dropout_p}")
    m = _mask_array(mask, q)
    cls = pick(ScaledDotProductAttention, q.data, k.data, v.data, mask=m, causal=causal, dropout_p=dropout_p)
    return cls.apply(q, k, v, mask=m, causal=causal, dropout_p=dropout_p, generator=generator)


def causal_attention_qkv(qkv: Tensor, n_head: int, mask: Any = None, dropout_p: float = 0.0,
                         generator: Any = None) -> Tensor:
    """merge_heads(scaled_dot_product_attention(*split_heads(qkv, n_head), causal=True, ...)):
    qkv (B, T, 3C) -> (B, T, C), as one node (CausalAttentionQKV or its fast path)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"causal_attention_qkv: dropout_p must be in [0, 1), got {dropout_p}")
    m = _mask_array(mask, qkv)
    cls = pick(CausalAttentionQKV, qkv.data, mask=m, n_head=n_head, dropout_p=dropout_p)
    return cls.apply(qkv, n_head=n_head, mask=m, dropout_p=dropout_p, generator=generator)


class KVCache:
    """Keys and values of one attention layer for incremental decoding (inference only).

    k, v: (B, H, max_len, D) preallocated; `length` positions are filled. `append(k, v)` stores
    the new tokens' keys and values (after any position hook) and returns every key and value
    cached so far, which the new queries attend over (causally: query i of t new tokens sits at
    position length - t + i).
    """

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, like: Any) -> None:
        xp = array_module(like)
        # k and v are the two halves of one buffer, so that a decoding step can write a token's key
        # and value (adjacent in the fused q|k|v projection) with one copy (tinygrad_lm/decode_cpu.py)
        self.kv = xp.zeros((2, batch, n_head, max_len, head_dim), dtype=like.dtype)
        self.k, self.v = self.kv[0], self.kv[1]
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, H, t, D) of the new tokens -> all keys and values (B, H, length + t, D) (views)."""
        if is_grad_enabled():
            raise RuntimeError("KVCache.append: the KV cache is for inference; run under `with no_grad():`")
        t = k.shape[2]
        L = self.length + t
        if L > self.k.shape[2]:
            raise ValueError(f"KVCache: {L} positions exceed the cache size {self.k.shape[2]}")
        if k.shape[:2] + k.shape[3:] != self.k.shape[:2] + self.k.shape[3:]:
            raise ValueError(f"KVCache: keys of shape {k.shape} do not fit the cache {self.k.shape}")
        self.k[:, :, self.length:L] = k.data
        self.v[:, :, self.length:L] = v.data
        self.length = L
        return Tensor.wrap(self.k[:, :, :L]), Tensor.wrap(self.v[:, :, :L])
