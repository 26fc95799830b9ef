"""int8 weight-only quantization of a model for inference (the ops: tensor/quant.py).

    quantize_(model)                  every Linear -> QuantizedLinear, and every Embedding whose
                                      table a Linear shares (a tied lm_head/wte) -> QuantizedEmbedding,
                                      both reading ONE int8 copy of the shared table
    quantized_state_dict(model)       name -> array: int8 `NAME.weight` + float32 `NAME.weight_scale`
                                      for the quantized layers, float arrays for the rest
    load_quantized_state_dict(model, state)   the inverse, into a quantize_()d model
    weight_bytes(model)               bytes of every distinct weight array (shared ones once)

A quantized layer keeps `weight` (int8 (out, in)) and `weight_scale` (float32 (out,)) as plain
Tensors, not Parameters: no optimizer sees them, and `model.to(device)` moves them. Biases,
norms and position tables stay float Parameters.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from nn.layers import Embedding, Linear
from nn.module import Module, Parameter
from tensor import backend
from tensor.quant import embedding_int8, linear_int8, quantize_int8
from tensor.tensor import Tensor, shape_str


class QuantizedLinear(Module):
    """y = x @ (q * s[:, None]).T + b. x (..., in) -> (..., out); weight q (out, in) int8,
    weight_scale s (out,) float32, bias (out,) float or None. Inference only."""

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Parameter | None = None) -> None:
        self.weight, self.weight_scale, self.bias = weight, weight_scale, bias
        self.out_features, self.in_features = weight.shape

    def forward(self, x: Tensor) -> Tensor:
        return linear_int8(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, int8"


class QuantizedEmbedding(Module):
    """Rows of an int8 (num, dim) table times their scales: ids (...) -> (..., dim) float32. Inference only."""

    def __init__(self, weight: Tensor, weight_scale: Tensor) -> None:
        self.weight, self.weight_scale = weight, weight_scale
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: Any) -> Tensor:
        return embedding_int8(ids, self.weight, self.weight_scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


QUANTIZED = (QuantizedLinear, QuantizedEmbedding)


def _replace(model: Module, fn: Any) -> None:
    """Set every child module c of every module to fn(c) when that is not None."""
    for m in list(model.modules()):
        for name, child in list(vars(m).items()):
            if isinstance(child, Module):
                new = fn(child)
                if new is not None:
                    setattr(m, name, new)


def quantize_(model: Module) -> Module:
    """Quantize `model` in place (module docstring); returns it. A weight shared by several layers
    is quantized once and the layers share the int8 copy."""
    done: dict[int, tuple[Tensor, Tensor]] = {}   # id(float weight Parameter) -> (q, s) Tensors

    def qs(w: Parameter) -> tuple[Tensor, Tensor]:
        if id(w) not in done:
            q, s = quantize_int8(w.data)
            done[id(w)] = (Tensor.wrap(q), Tensor.wrap(s))
        return done[id(w)]

    def linear(m: Module) -> Module | None:
        return QuantizedLinear(*qs(m.weight), m.bias) if type(m) is Linear else None

    def embedding(m: Module) -> Module | None:  # only tables a Linear shares (a tied lm_head)
        return QuantizedEmbedding(*done[id(m.weight)]) if type(m) is Embedding and id(m.weight) in done else None

    _replace(model, linear)
    _replace(model, embedding)
    return model


def is_quantized(model: Module) -> bool:
    return any(isinstance(m, QUANTIZED) for m in model.modules())


def _quantized_named(model: Module) -> dict[str, Module]:
    """Dotted name -> quantized layer, the first name of a shared int8 table only."""
    out: dict[str, Module] = {}
    seen: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, QUANTIZED) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out[name] = m
    return out


def quantized_state_dict(model: Module) -> dict[str, np.ndarray]:
    """Host arrays: every float Parameter under its name, and for each quantized layer NAME.weight
    (int8) and NAME.weight_scale (float32); a shared table once, under its first name."""
    state = {name: backend.to_numpy(p.data).copy() for name, p in model.named_parameters()}
    for name, m in _quantized_named(model).items():
        state[f"{name}.weight"] = backend.to_numpy(m.weight.data).copy()
        state[f"{name}.weight_scale"] = backend.to_numpy(m.weight_scale.data).copy()
    return state


def load_quantized_state_dict(model: Module, state: dict[str, Any]) -> None:
    """Copy quantized_state_dict's arrays into a quantize_()d model of the same shape (strict: every
    name must be there with its shape and the int8/float32 dtypes; KeyError/TypeError otherwise)."""
    layers = _quantized_named(model)
    wanted = {name: p for name, p in model.named_parameters()}
    qnames = {f"{n}.{a}" for n in layers for a in ("weight", "weight_scale")}
    missing = sorted((set(wanted) | qnames) - set(state))
    unexpected = sorted(set(state) - set(wanted) - qnames)
    if missing or unexpected:
        raise KeyError(f"quantized weights: missing {missing}, unexpected {unexpected}")
    for name, m in layers.items():
        for attr, dtype in (("weight", np.int8), ("weight_scale", np.float32)):
            arr, t = state[f"{name}.{attr}"], getattr(m, attr)
            if arr.dtype != dtype or tuple(arr.shape) != t.shape:
                raise TypeError(f"quantized weights: {name}.{attr} is {arr.dtype} {shape_str(arr)}, expected "
                                f"{np.dtype(dtype)} {t.shape}")
            t.data = backend.to_device(np.ascontiguousarray(arr), backend.device_of(t.data))
    model.load_state_dict({k: state[k] for k in wanted}, strict=True)


def weight_bytes(model: Module) -> int:
    """Bytes of every distinct weight array the model holds (Parameters and quantized tables; a
    shared array once; not constant buffers like a sinusoidal table)."""
    seen: dict[int, int] = {id(p.data): p.data.nbytes for p in model.parameters()}
    for m in model.modules():
        if isinstance(m, QUANTIZED):
            for t in (m.weight, m.weight_scale):
                seen[id(t.data)] = t.data.nbytes
    return sum(seen.values())
