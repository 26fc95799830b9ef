"""Learning-rate schedules: small objects mapping a step number to a learning rate.

A schedule does not touch the optimizer; the training loop asks it for the rate and applies it:

    schedule = WarmupCosine(max_lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=5000)
    for step in range(max_steps):
        apply_lr(optimizer, schedule(step))   # every group's "lr" (times its optional "lr_scale")
        ...; loss.backward(); optimizer.step(); optimizer.zero_grad()

Steps count from 0. Each schedule has `state_dict()` (its settings, JSON-able, with its class name)
and `load_state_dict()`, and `schedule_from_state_dict(d)` rebuilds one, so a checkpoint can carry
the schedule next to the optimizer (`nn.serialization.save_optimizer(..., schedule=...)`).
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["Schedule", "Constant", "WarmupCosine", "StepDecay", "apply_lr", "schedule_from_state_dict"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


class Schedule:
    """Base class: `__call__(step) -> lr`; settings are the attributes named in `_fields`."""

    _fields: tuple[str, ...] = ()

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def _check_step(self, step: int) -> int:
        _check(step >= 0, f"{type(self).__name__}: step must be >= 0, got {step}")
        return step

    def state_dict(self) -> dict[str, Any]:
        """{"name": class name, <setting>: value, ...} (JSON-able)."""
        return {"name": type(self).__name__, **{f: getattr(self, f) for f in self._fields}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the settings of a saved schedule of the same class."""
        name = type(self).__name__
        _check(state.get("name") == name, f"{name}.load_state_dict: the saved schedule is a {state.get('name')}")
        missing = [f for f in self._fields if f not in state]
        _check(not missing, f"{name}.load_state_dict: missing settings {missing}")
        fresh = type(self)(**{f: state[f] for f in self._fields})  # validates the settings
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields) + ")"


class Constant(Schedule):
    """lr(step) = lr for every step."""

    _fields = ("lr",)

    def __init__(self, lr: float) -> None:
        _check(lr >= 0, f"Constant: lr must be >= 0, got {lr}")
        self.lr = float(lr)

    def __call__(self, step: int) -> float:
        self._check_step(step)
        return self.lr


class WarmupCosine(Schedule):
    """Linear warmup then cosine decay, nanoGPT's `get_lr`:

        step <  warmup_steps:           lr = max_lr * (step + 1) / (warmup_steps + 1)
        warmup_steps <= step <= decay:  r = (step - warmup_steps) / (decay_steps - warmup_steps)
                                        lr = min_lr + 0.5 * (1 + cos(pi * r)) * (max_lr - min_lr)
        step >  decay_steps:            lr = min_lr

    so lr = max_lr at step warmup_steps and min_lr at step decay_steps (an absolute step number).
    With decay_steps == warmup_steps there is no decay phase: min_lr from warmup_steps on.
    """

    _fields = ("max_lr", "min_lr", "warmup_steps", "decay_steps")

    def __init__(self, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> None:
        _check(0 <= min_lr <= max_lr, f"WarmupCosine: need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
        _check(int(warmup_steps) == warmup_steps and warmup_steps >= 0,
               f"WarmupCosine: warmup_steps must be an int >= 0, got {warmup_steps}")
        _check(int(decay_steps) == decay_steps and decay_steps >= warmup_steps,
               f"WarmupCosine: decay_steps must be an int >= warmup_steps ({warmup_steps}), got {decay_steps}")
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.warmup_steps, self.decay_steps = int(warmup_steps), int(decay_steps)

    def __call__(self, step: int) -> float:
        self._check_step(step)
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / (self.warmup_steps + 1)
        if step > self.decay_steps or self.decay_steps == self.warmup_steps:
            return self.min_lr
        ratio = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))    # 1 -> 0 as ratio goes 0 -> 1
        return self.min_lr + coeff * (self.max_lr - self.min_lr)


class StepDecay(Schedule):
    """lr(step) = lr * gamma ** (step // step_size): multiply by gamma every step_size steps."""

    _fields = ("lr", "step_size", "gamma")

    def __init__(self, lr: float, step_size: int, gamma: float) -> None:
        _check(lr >= 0, f"StepDecay: lr must be >= 0, got {lr}")
        _check(int(step_size) == step_size and step_size >= 1, f"StepDecay: step_size must be an int >= 1, got {step_size}")
        _check(gamma >= 0, f"StepDecay: gamma must be >= 0, got {gamma}")
        self.lr, self.step_size, self.gamma = float(lr), int(step_size), float(gamma)

    def __call__(self, step: int) -> float:
        self._check_step(step)
        return self.lr * self.gamma ** (step // self.step_size)


_SCHEDULES = {cls.__name__: cls for cls in (Constant, WarmupCosine, StepDecay)}


def schedule_from_state_dict(state: dict[str, Any]) -> Schedule:
    """Rebuild the schedule that `state_dict()` described."""
    cls = _SCHEDULES.get(state.get("name"))
    _check(cls is not None, f"unknown schedule {state.get('name')!r}; known: {sorted(_SCHEDULES)}")
    return cls(**{f: state[f] for f in cls._fields})


def apply_lr(optimizer: Any, lr: float) -> float:
    """Set every param group's "lr" to `lr * group.get("lr_scale", 1.0)`; returns lr.

    A group that should run at a fixed multiple of the schedule (e.g. a smaller rate for
    embeddings) carries an "lr_scale" entry.
    """
    _check(lr >= 0, f"apply_lr: lr must be >= 0, got {lr}")
    for group in optimizer.param_groups:
        group["lr"] = float(lr) * float(group.get("lr_scale", 1.0))
    return lr
