"""What happens between `loss.backward()` and the next forward: the optimizer, its schedule,
and `GradientStep`, the one policy for turning this rank's gradients into an update.

    grad_step = GradientStep(optimizer, world, scaler, cfg)
    loss.backward(); grad_step(params, step_number)   # average, unscale, clip, update, zero grads
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from nn.distributed import World, ZeRO1
from nn.lr_scheduler import WarmupCosine
from nn.optim import AdamW, decay_groups
from nn.utils import clip_grad_norm_
from tensor import backend


class NonFiniteLoss(FloatingPointError):
    """The loss, the gradient norm or the weights became inf/nan; that step was not saved."""


def make_optimizer(model: Any, cfg: Any, world: World | None = None, model_parallel: Any = None) -> Any:
    """AdamW with weight decay on 2-D weights only (matmuls, embeddings); none on biases and LayerNorm.
    With cfg.zero == 1 the AdamW state is sharded over the ranks of `world` (nn.distributed.ZeRO1);
    model_parallel (see GradientStep) makes its gradient norm the whole model's."""
    decay, no_decay = decay_groups(model.parameters(), lambda p: p.ndim)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.zero:
        return ZeRO1(world or World(), groups, lambda gs: AdamW(gs, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)),
                     model_parallel=model_parallel)
    return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def apply_hyperparameters(optimizer: Any, cfg: Any) -> None:
    """Set betas and weight decay from cfg (after loading a checkpoint, whose groups carry the old ones).
    Group 0 holds the decayed 2-D weights, group 1 the rest (make_optimizer)."""
    for i, group in enumerate(optimizer.param_groups):
        group["betas"] = (cfg.beta1, cfg.beta2)
        group["weight_decay"] = cfg.weight_decay if i == 0 else 0.0


def make_schedule(cfg: Any) -> WarmupCosine:
    return WarmupCosine(cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters)


def all_finite(arrays: Sequence[Any]) -> bool:
    """True when every element of every array is finite: one fused reduction and one sync per device."""
    by_module: dict[Any, list] = {}
    for a in arrays:
        by_module.setdefault(backend.array_module(a), []).append(a)
    for xp, group in by_module.items():
        if not bool(xp.stack([xp.isfinite(a).all() for a in group]).all()):
            return False
    return True


class GradientStep:
    """The gradient-step policy, one call per optimizer step:

    1. average the gradients over the ranks (all-reduce), or with ZeRO-1 let the sharded optimizer
       reduce-scatter, clip and update (it returns the global norm);
    2. fp16: unscale, and skip the update when a gradient overflowed (the loss scaler shrinks);
    3. clip to cfg.grad_clip: on the CPU the norm is checked at once (NonFiniteLoss, nothing applied);
       on the GPU it stays on the device and the first bad step is remembered, raised by
       `raise_if_nonfinite()` at the next sync (no device wait per step);
    4. optimizer.step(), scaler.update(), zero the gradients.

    world: the data-parallel group (gradients are averaged over it). model_parallel: None, or
    with the model split over ranks (tensor and/or pipeline parallel) a
    nn.distributed.model_parallel.ModelParallel: before_step() / after_step() (the pipeline's tied
    embedding), the norm over all parts with each parameter counted once (weight, sum_of_squares)
    and the ranks that agree on one fp16 overflow verdict (world).
    """

    def __init__(self, optimizer: Any, world: World, scaler: Any, cfg: Any, model_parallel: Any = None) -> None:
        self.optimizer, self.world, self.scaler, self.model_parallel = optimizer, world, scaler, model_parallel
        self.grad_clip, self.zero, self.device = cfg.grad_clip, bool(cfg.zero), cfg.device
        self.first_bad_step: Any = None  # GPU: a device scalar, the first step with a non-finite norm (-1: none)

    def __call__(self, params: Sequence[Any], step: int) -> None:
        mp = self.model_parallel
        if mp is not None:
            mp.before_step()
        if self.zero:  # reduce-scatter, clip, update this rank's shard, all-gather
            norm = self.optimizer.step(self.grad_clip)
            if not math.isfinite(norm):
                raise NonFiniteLoss(f"gradient norm is {norm} at step {step}")
        else:
            self.world.allreduce_grads(params)  # average over ranks (no-op for one process)
            finite = self.scaler.unscale_(params)  # fp16: False when a gradient overflowed -> skip the step
            if mp is not None:
                finite = self.scaler.agree(mp.world)  # an overflow on one model-parallel rank skips all
            if finite:
                self._clip(params, step)
                self.optimizer.step()
        if mp is not None:
            mp.after_step()
        self.scaler.update()
        self.optimizer.zero_grad()

    def _clip(self, params: Sequence[Any], step: int) -> None:
        if self.grad_clip <= 0:
            return
        on_host = self.device == "cpu"
        mp = self.model_parallel
        norm = clip_grad_norm_(params, self.grad_clip, error_if_nonfinite=False, sync=on_host,
                               reduce=mp.sum_of_squares if mp is not None else None,
                               weight=mp.weight if mp is not None and mp.weighted else None)
        if on_host:
            if not math.isfinite(norm):  # never apply a non-finite update
                raise NonFiniteLoss(f"gradient norm is {norm} at step {step}")
            return
        xp = backend.array_module(norm)
        if self.first_bad_step is None:
            self.first_bad_step = xp.asarray(-1)
        bad = ~xp.isfinite(norm)
        self.first_bad_step = xp.where((self.first_bad_step < 0) & bad, step, self.first_bad_step)

    def raise_if_nonfinite(self) -> None:
        """GPU: one sync; NonFiniteLoss naming the first step since the start whose gradient norm was not finite."""
        if self.first_bad_step is not None:
            bad = int(backend.to_numpy(self.first_bad_step))
            if bad >= 0:
                raise NonFiniteLoss(f"gradient norm became non-finite at step {bad}")
