"""Optimizers: SGD (momentum, Nesterov), Adam and AdamW.

The shared machinery lives in `Optimizer`:

* `param_groups` is a list of dicts `{"params": [Parameter, ...], "lr": ..., "weight_decay": ..., ...}`.
  Hyper-parameters belong to a group, so "no weight decay on biases and LayerNorm gains" is two
  groups, and a schedule sets `group["lr"]` before each `step()` (see `nn.lr_scheduler.apply_lr`).
* Parameters are numbered 0, 1, 2, ... through the groups in order; `state[i]` is the state of
  parameter i: its step count `"step"` and its arrays (moments, momentum buffer), created on the
  first step that parameter has a gradient, with the parameter's shape, dtype and device.
* `step()` updates the raw arrays (`p.data`) in place, written once against `xp`, the array
  module of the data, so the same code runs on NumPy and CuPy; then bumps `p._version`, so a
  graph that saved the old value refuses to backpropagate through the new one.
  Parameters whose `.grad` is None are skipped (their step count does not advance).
* Each update rule is first written as its formula on whole arrays (SGD's `_update`,
  `adam_reference`): that is the definition. Adam's update also has fast paths beneath it,
  chosen by `adam_step` with the same switch as every op's (tensor/dispatch.py:
  TINYGRAD_LM_FAST=0 or `reference_only()` forces the reference): tensor/cpu/adam.py (NumPy in
  cache-sized blocks, equal bit for bit) and tensor/cuda/adam.py (one fused kernel per
  parameter, or one launch for all float32 ones); each is tested against the reference.
* `state_dict()` gives `{"meta": <JSON-able dict>, "arrays": {"state.<i>.<name>": ndarray}}`,
  ready for `nn.serialization.save_optimizer` (the arrays go into safetensors, the meta into its
  header). `load_state_dict()` checks everything before changing anything.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator

import numpy as np

from tensor import backend
from tensor.backend import array_module
from tensor.cpu import adam as cpu_adam
from tensor.dispatch import fast_paths_enabled
from tensor.tensor import Tensor

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "adam_reference", "adam_step"]

ParamsArg = Iterable[Tensor] | Iterable[dict[str, Any]]


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (int, float))


def _shape(x: Any) -> tuple:
    return tuple(int(s) for s in x.shape)


def decay_groups(items: Any, ndim: Any) -> tuple[list, list]:
    """The weight-decay rule of our GPT recipes (nanoGPT's): the 2-D weights (matmuls, embeddings)
    are decayed, biases and norm weights are not. items -> (decayed, not decayed), in order;
    ndim(item) gives an item's number of dimensions."""
    items = list(items)
    return [x for x in items if ndim(x) >= 2], [x for x in items if ndim(x) < 2]


class Optimizer:
    """Base class: parameter groups, per-parameter state, zero_grad, step, state_dict.

    A subclass gives `defaults` (its hyper-parameters), and writes
      `_init_state(p, group) -> dict`      the arrays of a parameter's state (zeros, like p),
      `_update(p, g, state, group)`        one in-place update of the array p with gradient g,
      `_validate(group, where)`            extra hyper-parameter checks (call super()).
    """

    def __init__(self, params: ParamsArg, defaults: dict[str, Any]) -> None:
        self.defaults = dict(defaults)
        self._validate(self.defaults, f"{type(self).__name__}")
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[int, dict[str, Any]] = {}
        if isinstance(params, Tensor):
            raise TypeError(f"{type(self).__name__}: params must be an iterable of Parameters or of "
                            "dicts, got a single Tensor (wrap it in a list)")
        groups = list(params)
        if not groups:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    # ------------------------------------------------------------ groups
    def add_param_group(self, group: dict[str, Any]) -> None:
        """Append a group {"params": [...], <hyper-parameter>: value, ...}; missing
        hyper-parameters take the optimizer's defaults."""
        name = type(self).__name__
        gi = len(self.param_groups)
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"{name}: param group {gi} must be a dict with a 'params' key, "
                            f"got {type(group).__name__}")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if not params:
            raise ValueError(f"{name}: param group {gi} has no parameters")
        owner = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        seen: set[int] = set()
        for j, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"{name}: param group {gi}, item {j} is a {type(p).__name__}, "
                                "not a Parameter/Tensor")
            if not p.requires_grad:
                raise ValueError(f"{name}: param group {gi}, item {j} (shape {_shape(p)}) does not "
                                 "require grad, so it can never be updated")
            if id(p) in seen:
                raise ValueError(f"{name}: param group {gi} lists the parameter of shape "
                                 f"{_shape(p)} (item {j}) twice")
            if id(p) in owner:
                raise ValueError(f"{name}: the parameter of shape {_shape(p)} (item {j} of group "
                                 f"{gi}) is already in param group {owner[id(p)]}; a parameter "
                                 "may appear in one group only")
            seen.add(id(p))
        new = {k: v for k, v in group.items() if k != "params"}
        for k, v in self.defaults.items():
            new.setdefault(k, v)
        self._validate(new, f"{name} param group {gi}")
        self.param_groups.append({"params": params, **new})

    def _validate(self, group: dict[str, Any], where: str) -> None:
        lr = group.get("lr")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
            raise ValueError(f"{where}: lr must be a number >= 0, got {lr!r}")
        wd = group.get("weight_decay", 0.0)
        if not isinstance(wd, (int, float)) or not wd >= 0:
            raise ValueError(f"{where}: weight_decay must be >= 0, got {wd!r}")

    def _indexed_params(self) -> Iterator[tuple[int, dict[str, Any], Tensor]]:
        """(global index, group, parameter) for every parameter, in order."""
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield i, group, p
                i += 1

    # ------------------------------------------------------------ the loop
    def zero_grad(self) -> None:
        """Forget every gradient (set `.grad` to None): the next backward starts afresh."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self) -> None:
        """Apply one update to every parameter that has a gradient. Every gradient is checked
        first: a mismatched one raises ValueError before any parameter changes."""
        todo = [(i, group, p) for i, group, p in self._indexed_params() if p.grad is not None]
        for i, _, p in todo:
            g = p.grad
            if type(g) is not type(p.data) or g.shape != p.data.shape:
                raise ValueError(f"{type(self).__name__}.step: parameter {i} is {_shape(p)} on "
                                 f"{p.device} but its grad is {_shape(g)} on {backend.device_of(g)}")
        for i, group, p in todo:
            g = p.grad
            state = self.state.get(i)
            if state is None:
                state = self.state[i] = {"step": 0, **self._init_state(p.data, group)}
            for k, v in state.items():  # follow the parameter if it moved (model.to("cuda"))
                if _is_array(v) and type(v) is not type(p.data):
                    state[k] = backend.to_device(v, p.device)
            state["step"] += 1
            self._update(p.data, g, state, group)
            p._version += 1
        self._finish_step()

    def _finish_step(self) -> None:
        """Called after every parameter's `_update`: an optimizer that batches its updates
        (AdamW on the GPU: one kernel for all parameters) applies them here."""

    def _init_state(self, p: Any, group: dict[str, Any]) -> dict[str, Any]:
        return {}

    def _state_array_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        """Names of the arrays `_init_state` creates for a parameter of this group."""
        return ()

    def _update(self, p: Any, g: Any, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """{"meta": JSON-able, "arrays": {"state.<i>.<name>": host NumPy copy, shape of param i}}.

        meta = {"type": class name,
                "param_groups": [{<hyper-parameters>, "params": [global indices]}, ...],
                "state": {"<i>": {"step": int}, ...}}   (only parameters that have state)
        """
        groups, arrays, state = [], {}, {}
        for i, group, p in self._indexed_params():
            if not groups or groups[-1]["_src"] is not group:
                groups.append({"_src": group, **{k: _to_json(v) for k, v in group.items() if k != "params"},
                               "params": []})
            groups[-1]["params"].append(i)
        for i, st in sorted(self.state.items()):
            state[str(i)] = {k: v for k, v in st.items() if not _is_array(v)}
            for k, v in st.items():
                if _is_array(v):
                    arrays[f"state.{i}.{k}"] = backend.to_numpy(v).copy()
        for g in groups:
            del g["_src"]
        return {"meta": {"type": type(self).__name__, "param_groups": groups, "state": state},
                "arrays": arrays}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyper-parameters, step counts and arrays saved by `state_dict()`.

        Checks first that the optimizer type, the number of groups, the number of parameters in
        each group and every array's name and shape match; on any mismatch raises ValueError
        listing all differences and changes nothing.
        """
        name = type(self).__name__
        meta, arrays = state_dict.get("meta"), state_dict.get("arrays", {})
        if not isinstance(meta, dict) or "param_groups" not in meta:
            raise ValueError(f"{name}.load_state_dict: expected {{'meta': ..., 'arrays': ...}} as made by "
                             "state_dict()")
        problems: list[str] = []
        if meta.get("type") != name:
            problems.append(f"saved by a {meta.get('type')} optimizer, loading into a {name}")
        saved_groups = meta["param_groups"]
        params = [p for _, _, p in self._indexed_params()]
        if len(saved_groups) != len(self.param_groups):
            problems.append(f"{len(saved_groups)} param groups saved, this optimizer has "
                            f"{len(self.param_groups)}")
        else:
            start = 0
            for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
                n = len(g["params"])
                if list(sg["params"]) != list(range(start, start + n)):
                    problems.append(f"param group {gi}: {len(sg['params'])} parameters saved, "
                                    f"this optimizer has {n}")
                start += n
        new_state: dict[int, dict[str, Any]] = {}
        used: set[str] = set()
        if not problems:
            group_of = [sg for sg in saved_groups for _ in sg["params"]]
            for key, scalars in meta.get("state", {}).items():
                i = int(key)
                if not 0 <= i < len(params):
                    problems.append(f"state for parameter {i}, but there are only {len(params)}")
                    continue
                st = dict(scalars)
                for k in self._state_array_names(_from_json(group_of[i])):
                    akey = f"state.{i}.{k}"
                    if akey not in arrays:
                        problems.append(f"missing array {akey}")
                        continue
                    used.add(akey)
                    if _shape(arrays[akey]) != _shape(params[i]):
                        problems.append(f"{akey}: saved shape {_shape(arrays[akey])}, parameter {i} "
                                        f"has shape {_shape(params[i])}")
                        continue
                    st[k] = arrays[akey]
                new_state[i] = st
            extra = sorted(set(arrays) - used)
            if extra:
                problems.append(f"unexpected arrays: {extra}")
        if problems:
            raise ValueError(f"{name}.load_state_dict: the saved state does not match this optimizer:\n  - "
                             + "\n  - ".join(problems))
        for sg, g in zip(saved_groups, self.param_groups):
            g.update(_from_json({k: v for k, v in sg.items() if k != "params"}))
        for i, st in new_state.items():
            p = params[i]
            for k, v in st.items():
                if _is_array(v):  # a fresh copy with the parameter's dtype, on its device
                    st[k] = backend.to_device(np.array(backend.to_numpy(v), dtype=p.dtype, copy=True), p.device)
                elif k == "step":
                    st[k] = int(v)
        self.state = new_state

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        for gi, g in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={v}" for k, v in g.items() if k != "params")
            lines.append(f"  group {gi}: {len(g['params'])} params, {hyper}")
        return "\n".join(lines) + "\n)"


def _to_json(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _from_json(group: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}


# ====================================================================== SGD
class SGD(Optimizer):
    """Stochastic gradient descent, PyTorch semantics (no dampening).

        g <- g + wd * p                  (coupled L2 weight decay, only if weight_decay > 0)
        b <- mu * b + g                  (momentum buffer, b starts at 0, so b_1 = g_1)
        g <- g + mu * b   if nesterov    (look ahead along the momentum)
        g <- b            otherwise
        p <- p - lr * g
    """

    def __init__(self, params: ParamsArg, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    def _validate(self, group: dict[str, Any], where: str) -> None:
        super()._validate(group, where)
        if not group["momentum"] >= 0:
            raise ValueError(f"{where}: momentum must be >= 0, got {group['momentum']!r}")
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError(f"{where}: nesterov=True needs momentum > 0")

    def _state_array_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _init_state(self, p: Any, group: dict[str, Any]) -> dict[str, Any]:
        xp = array_module(p)
        return {k: xp.zeros_like(p) for k in self._state_array_names(group)}

    def _update(self, p: Any, g: Any, state: dict[str, Any], group: dict[str, Any]) -> None:
        # g = g + wd p;  b = mu b + g;  p -= lr (g + mu b) with Nesterov, else p -= lr b  (the only path)
        lr, mu, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
        if wd != 0:
            g = g + wd * p                        # g + wd*p: a new array, p.grad stays as backward made it
        if mu != 0:
            b = state["momentum_buffer"]
            b *= mu
            b += g                                # b = mu*b + g
            g = g + mu * b if group["nesterov"] else b
        p -= lr * g                               # p = p - lr*g


# ====================================================================== Adam / AdamW
def adam_reference(p: Any, g: Any, m: Any, v: Any, lr: float, beta1: float, beta2: float, eps: float,
                   step: int, decay: float = 1.0) -> None:
    """The Adam update of p in place (Kingma & Ba, Algorithm 1), the formulas on whole arrays:

        m <- beta1 * m + (1 - beta1) * g              first moment, a running mean of g
        v <- beta2 * v + (1 - beta2) * g^2            second moment, a running mean of g^2
        m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)     bias correction (m, v start at 0)
        p <- p - lr * m_hat / (sqrt(v_hat) + eps)

    The last line is computed as p -= m / (sqrt(v) / sqrt(1 - beta2^t) + eps) * (lr / (1 - beta1^t)),
    PyTorch's order (no v_hat array), which the fast paths follow too. decay: AdamW's decoupled
    weight decay p <- p * decay (decay = 1 - lr*wd), applied first. p, g, m, v: one shape; t = step.
    """
    xp = array_module(p)
    # p = decay p;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr * m_hat / (sqrt(v_hat) + eps)
    if decay != 1.0:
        p *= decay
    m[...] = beta1 * m + (1.0 - beta1) * g
    v[...] = beta2 * v + (1.0 - beta2) * (g * g)
    p -= m / (xp.sqrt(v) / math.sqrt(1.0 - beta2 ** step) + eps) * (lr / (1.0 - beta1 ** step))


def adam_step(p: Any, g: Any, m: Any, v: Any, lr: float, beta1: float, beta2: float, eps: float,
              step: int, decay: float = 1.0) -> None:
    """One Adam update in place (arguments as `adam_reference`): the fast path beneath the reference
    when one takes these arrays -- tensor/cpu/adam.py (NumPy, in cache-sized blocks, equal bit for
    bit) or tensor/cuda/adam.py (one fused kernel, computed in double) -- else the reference itself.
    TINYGRAD_LM_FAST=0 or `tensor.dispatch.reference_only()` forces the reference."""
    fast = _adam_fast_path(p, g, m, v)
    (fast.adam_step if fast is not None else adam_reference)(p, g, m, v, lr, beta1, beta2, eps, step, decay)


def _adam_fast_path(p: Any, g: Any, m: Any, v: Any) -> Any:
    """The module tensor.cpu.adam or tensor.cuda.adam when its `supports(p, g, m, v)`, else None."""
    if not fast_paths_enabled():
        return None
    if type(p) is np.ndarray:
        fast = cpu_adam
    else:
        from tensor.cuda import adam as fast     # imported on the first GPU step, not with nn
    return fast if fast.supports(p, g, m, v) else None


class Adam(Optimizer):
    """Adam with coupled L2 weight decay (PyTorch's `Adam`):

        g <- g + wd * p        (only if weight_decay > 0; the decay then goes through the moments)
        then the Adam update (see `adam_reference`).

    On the GPU, float32 parameters are queued and updated together after the loop, in one
    multi-tensor kernel launch (tensor/cuda/adam.py: adam_multi, the same formulas as adam_step).
    """

    def __init__(self, params: ParamsArg, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self._pending: list = []  # GPU updates queued for one adam_multi launch in _finish_step
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _validate(self, group: dict[str, Any], where: str) -> None:
        super()._validate(group, where)
        betas = group["betas"]
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {betas!r}")
        group["betas"] = (float(betas[0]), float(betas[1]))
        if not group["eps"] >= 0:
            raise ValueError(f"{where}: eps must be >= 0, got {group['eps']!r}")

    def _state_array_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _init_state(self, p: Any, group: dict[str, Any]) -> dict[str, Any]:
        xp = array_module(p)
        return {"exp_avg": xp.zeros_like(p), "exp_avg_sq": xp.zeros_like(p)}

    def _decayed(self, p: Any, g: Any, lr: float, wd: float) -> tuple[Any, float]:
        """(the gradient the moments see, the factor p is multiplied by first)."""
        return (g + wd * p if wd != 0 else g), 1.0    # coupled L2: g + wd*p (a new array)

    def _update(self, p: Any, g: Any, state: dict[str, Any], group: dict[str, Any]) -> None:
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        beta1, beta2 = group["betas"]
        g, decay = self._decayed(p, g, lr, wd)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if type(p) is not np.ndarray:
            from tensor.cuda import adam as cuda_adam
            if cuda_adam.supports_multi(p, g, m, v):  # float32 on the GPU, fast paths on
                self._pending.append((p, g, m, v, lr, decay, float(beta1), float(beta2), eps, state["step"]))
                return
        adam_step(p, g, m, v, lr, float(beta1), float(beta2), eps, state["step"], decay)

    def _finish_step(self) -> None:
        if self._pending:
            from tensor.cuda import adam as cuda_adam
            pending, self._pending = self._pending, []
            cuda_adam.adam_multi(pending)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch's `AdamW`:

        p <- p - lr * wd * p   (= p * (1 - lr*wd); the decay never enters the moments)
        then the Adam update with the raw gradient (see `adam_reference`).

    Give 1-D parameters (biases, LayerNorm gains) a group with weight_decay=0, as nanoGPT does.
    """

    def __init__(self, params: ParamsArg, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _decayed(self, p: Any, g: Any, lr: float, wd: float) -> tuple[Any, float]:
        return g, 1.0 - lr * wd                       # p = p - lr*wd*p first, inside the update
