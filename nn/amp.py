"""Mixed precision: compute matmuls and attention in float16 or bfloat16, keep float32
master weights, accumulate softmax / LayerNorm statistics / losses in float32.

How it works here (autocast by module, no global switch):
  * `autocast_(model, "bf16")` sets `compute_dtype` on every Linear. The Linear op then casts
    its input and weight to that dtype inside the op, runs the GEMM in it (on the GPU through
    cuBLAS on the tensor cores, float32 accumulation, tensor/cuda/cublas.py) and adds the bias to
    the 16-bit result. The
    parameters themselves stay float32: they ARE the master weights; the op hands back
    float32 gradients for them (on the GPU straight out of the GEMM, no cast kernel), and
    the optimizer's moments are float32 too.
  * It also sets `out_dtype` on every LayerNorm: the norm reads the float32 residual stream,
    keeps its statistics in float32 and writes its output straight in the compute dtype, as the
    product it feeds (a block's c_attn / c_fc, the lm_head) would cast it anyway; one pass instead
    of a norm and a cast (on the GPU, tensor/cuda/layernorm.py). Its gradient comes back from that
    product in the compute dtype, as PyTorch's autocast has it.
  * Attention runs in the dtype of its qkv input: on the GPU its batched GEMMs run in 16 bits
    with float32 scores, the softmax is computed in float32 and P is kept in 16 bits.
  * Softmax, LayerNorm statistics and cross-entropy upcast half inputs to float32
    (tensor/functional.py), the residual stream stays float32.
  * float16 has a narrow range (smallest normal 6e-5): small gradients underflow. The
    `LossScaler` multiplies the loss by a large factor before backward, divides the
    gradients by it afterwards, skips the step (and halves the factor) when a gradient
    overflowed to inf/nan, and doubles the factor after `growth_interval` clean steps.
    bfloat16 has float32's range, so it needs no scaling (the scaler is disabled).

On the CPU, bfloat16 comes from `ml_dtypes`: NumPy has no bfloat16 GEMM, so a bf16
matmul is done by ml_dtypes' loop (it returns float32) and is much SLOWER than float32.
Mixed precision on the CPU is therefore for correctness (the same numerics as on the
GPU, e.g. to test a model before a GPU run), not for speed.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from nn.module import Module
from tensor import backend

PRECISIONS = ("fp32", "fp16", "bf16")


def low_dtype(precision: str) -> Any:
    """'fp32' -> None, 'fp16' -> float16, 'bf16' -> bfloat16 (ml_dtypes)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16":
        return np.dtype(np.float16)
    if precision == "bf16":
        return np.dtype(backend.optional_module("ml_dtypes", "bf16", "--precision bf16 on the CPU").bfloat16)
    return None


def autocast_(model: Module, precision: str) -> Module:
    """Make every Linear of `model` compute in the precision's dtype, and every LayerNorm write its
    output in it (in place; returns model)."""
    from nn.layers import LayerNorm, Linear
    dtype = low_dtype(precision)
    for m in model.modules():
        if isinstance(m, Linear):
            m.compute_dtype = dtype
        elif isinstance(m, LayerNorm):
            m.out_dtype = dtype
    return model


class LossScaler:
    """Dynamic loss scaling for float16 training.

        loss_to_backprop = scaler.scale(loss)
        ...backward...
        if scaler.unscale_(params):   # grads /= scale; True when all are finite
            optimizer.step()
        scaler.update()               # backs off after an overflow, grows after clean steps

    enabled=False (bfloat16, float32) makes every method a no-op.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 1000, enabled: bool = True) -> None:
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError("LossScaler: need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, "
                             "growth_interval >= 1")
        self.scale_value, self.growth_factor, self.backoff_factor = float(init_scale), growth_factor, backoff_factor
        self.growth_interval, self.enabled = growth_interval, enabled
        self.clean_steps = 0
        self.skipped_steps = 0
        self._found_inf: bool | None = None

    def scale(self, loss: Any) -> Any:
        return loss * self.scale_value if self.enabled else loss

    def unscale_(self, params: Iterable[Any]) -> bool:
        """Divide every grad by the scale in place; return True when all are finite.
        One device->host synchronisation (as in PyTorch's GradScaler).

            g <- g * (1 / scale);   found_inf = any(not isfinite(g))      (every grad g)

        On the GPU, float32 grads take one multi-tensor launch for all of it (tensor/cuda/clip.py:
        unscale_multi) instead of three per parameter; TINYGRAD_LM_FAST=0 forces the loop below."""
        if not self.enabled:
            return True
        inv = 1.0 / self.scale_value
        grads = [p.grad for p in params if p.grad is not None]
        fast = None
        if grads and type(grads[0]) is not np.ndarray:
            from tensor.cuda import clip               # imported on the first GPU call, not with nn
            fast = clip if clip.supports(*grads) else None
        if fast is not None:
            bad = fast.unscale_multi(grads, inv)
        else:
            bad = None
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is what we look for
                for g in grads:
                    g *= inv
                    b = ~backend.array_module(g).isfinite(g).all()
                    bad = b if bad is None else (bad | b)
        self._found_inf = bool(backend.to_numpy(bad).any()) if bad is not None else False
        return not self._found_inf

    def agree(self, comm: Any) -> bool:
        """After unscale_: when the gradients are split over comm's ranks (model parallelism), an
        overflow on any rank is an overflow on all of them (one small all-reduce); returns True when
        every rank's gradients are finite, so every rank steps or skips together."""
        if not self.enabled or self._found_inf is None:
            return True
        self._found_inf = comm.any(self._found_inf)
        return not self._found_inf

    def update(self) -> None:
        """After an overflow: scale *= backoff and the step counts as skipped; after
        growth_interval clean steps in a row: scale *= growth."""
        if not self.enabled or self._found_inf is None:
            return
        if self._found_inf:
            self.scale_value *= self.backoff_factor
            self.clean_steps = 0
            self.skipped_steps += 1
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.growth_interval:
                self.scale_value *= self.growth_factor
                self.clean_steps = 0
        self._found_inf = None

    def state_dict(self) -> dict:
        return {"scale": self.scale_value, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "enabled": self.enabled, "clean_steps": self.clean_steps,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, d: dict) -> None:
        self.scale_value, self.growth_factor = float(d["scale"]), float(d["growth_factor"])
        self.backoff_factor, self.growth_interval = float(d["backoff_factor"]), int(d["growth_interval"])
        self.enabled, self.clean_steps, self.skipped_steps = bool(d["enabled"]), int(d["clean_steps"]), int(d["skipped_steps"])
