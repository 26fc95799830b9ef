"""The one rule that chooses how an op runs: its reference Function, or a fast path beneath it.

Every op is a `Function` whose `forward`/`backward` is the textbook formula written once against
`xp` (the reference): what a learner reads, what `gradcheck` checks, and the oracle every fast
path is tested against. A fast path is a *subclass* of the reference Function that overrides
`forward`/`backward` with CPU NumPy tricks (`tensor/cpu/`) or CUDA kernels (`tensor/cuda/`), and a
`supports(*arrays, **kwargs)` static method that says whether it handles these inputs (dtype,
layout, size). It keeps the reference's name, arguments and saved-state contract for its own
backward only; nothing outside the class depends on how it saves.

    y = pick(GELU, x.data).apply(x)        # GELU, or its CPU/CUDA fast path when one applies

`FAST_PATHS` maps the reference class name and the device to "module:Class"; modules are imported
the first time they are chosen, so importing `tensor` loads no CUDA code. One switch forces the
reference everywhere: the environment variable `TINYGRAD_LM_FAST=0` (read once, at the first op: a
lookup in os.environ costs microseconds, and the CPU decoder asks ~100 times a token), or, in code,
`with reference_only(): ...`.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any, Iterator

from tensor.backend import device_of

# reference Function name -> device -> "module:FastClass" (a subclass of the reference)
FAST_PATHS: dict[str, dict[str, str]] = {
    "Add": {"cuda": "tensor.cuda.residual:AddCUDA"},   # asked only for adds of two dtypes (Tensor.__add__)
    "Gelu": {"cpu": "tensor.cpu.gelu:GeluCPU", "cuda": "tensor.cuda.gelu:GeluCUDA"},
    "LayerNorm": {"cpu": "tensor.cpu.layernorm:LayerNormCPU", "cuda": "tensor.cuda.layernorm:LayerNormCUDA"},
    "CrossEntropy": {"cuda": "tensor.cuda.cross_entropy:CrossEntropyCUDA"},
    "Linear": {"cuda": "tensor.cuda.linear:LinearCUDA"},
    "LinearGelu": {"cuda": "tensor.cuda.linear:LinearGeluCUDA"},   # an MLP's c_fc + GELU (F.linear_gelu)
    "LinearInt8": {"cpu": "tensor.cpu.quant:LinearInt8CPU", "cuda": "tensor.cuda.quant:LinearInt8CUDA"},
    # attention (tensor/attention.py): beneath its reference pieces and their fused composition
    "ScaledDotProductAttention": {"cpu": "tensor.cpu.attention:CpuScaledDotProductAttention",
                                  "cuda": "tensor.cuda.attention:CudaScaledDotProductAttention"},
    "CausalAttentionQKV": {"cpu": "tensor.cpu.attention:CpuCausalAttentionQKV",
                           "cuda": "tensor.cuda.attention:CudaCausalAttentionQKV"},
    "SplitHeads": {"cuda": "tensor.cuda.attention:CudaSplitHeads"},
    "MergeHeads": {"cuda": "tensor.cuda.attention:CudaMergeHeads"},
}

_forced_reference = False  # set only by `reference_only()`; the env var is the other half of the switch
_env_fast: bool | None = None  # TINYGRAD_LM_FAST != "0", read at the first call
_loaded: dict[str, type] = {}  # "module:Class" -> the imported class
_chosen: dict[tuple, type | None] = {}  # (reference, array type) -> its fast class or None


def fast_paths_enabled() -> bool:
    """False inside `reference_only()` or when TINYGRAD_LM_FAST=0 was set when the first op ran."""
    global _env_fast
    if _forced_reference:
        return False
    if _env_fast is None:
        _env_fast = os.environ.get("TINYGRAD_LM_FAST", "1") != "0"
    return _env_fast


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Run every op through its reference Function (to compare against, or to read in a debugger)."""
    global _forced_reference
    prev, _forced_reference = _forced_reference, True
    try:
        yield
    finally:
        _forced_reference = prev


def fast_class(ref: type, device: str) -> type | None:
    """The fast-path class registered for `ref` on `device` (imported on first use), or None."""
    spec = FAST_PATHS.get(ref.__name__, {}).get(device)
    if spec is None:
        return None
    cls = _loaded.get(spec)
    if cls is None:
        module, name = spec.split(":")
        cls = getattr(importlib.import_module(module), name)
        if not issubclass(cls, ref):
            raise TypeError(f"fast path {spec} must subclass the reference {ref.__name__}")
        _loaded[spec] = cls
    return cls


def pick(ref: type, *arrays: Any, **kwargs: Any) -> type:
    """`ref`, or the fast path registered for the device of `arrays[0]` when fast paths are on and
    its `supports(*arrays, **kwargs)` is true."""
    if not fast_paths_enabled():
        return ref
    key = (ref, type(arrays[0]))  # the array type says the device; pick runs for every op, so remember
    cls = _chosen.get(key, ref)
    if cls is ref:
        cls = _chosen[key] = fast_class(ref, device_of(arrays[0]))
    if cls is not None and cls.supports(*arrays, **kwargs):
        return cls
    return ref
