"""Module, Parameter, ModuleList, Sequential: PyTorch-shaped containers of parameters.

A Module finds its parameters and sub-modules by looking at its attributes
(plain `vars(self)`, no metaclass): a `Parameter` attribute is a parameter, a
`Module` attribute is a child. Names are dotted paths, e.g. `h.0.attn.c_attn.weight`.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from tensor import backend
from tensor.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates (requires_grad=True)."""

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True, dtype: Any = None, device: str | None = None) -> None:
        super().__init__(data, requires_grad=requires_grad, dtype=dtype, device=device)

    def __repr__(self) -> str:
        return "Parameter" + super().__repr__()[len("Tensor"):]


class Module:
    """Base class of layers and models. Subclasses set attributes in __init__ and define forward()."""

    training: bool = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    # ------------------------------------------------------------ traversal
    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def children(self) -> Iterator["Module"]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter) pairs in attribute order, depth first. A parameter shared
        by two modules (weight tying) appears once, under the name met first."""
        seen: set[int] = set()
        stack: list[tuple[str, Any]] = [(prefix, self)]
        while stack:
            name, value = stack.pop()
            if isinstance(value, Parameter):
                if id(value) not in seen:
                    seen.add(id(value))
                    yield name, value
            else:  # a Module: visit its attributes in order
                items = [(f"{name}.{k}" if name else k, v) for k, v in vars(value).items()
                         if isinstance(v, (Parameter, Module))]
                stack.extend(reversed(items))

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    # ------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to(self, device: str) -> "Module":
        """Move every parameter (and buffer) to `device`, in place; returns self."""
        backend.check_device(device)
        for m in self.modules():
            for name, value in list(vars(m).items()):
                if isinstance(value, Tensor):
                    value.data = backend.to_device(value.data, device)
                    if value.grad is not None:
                        value.grad = backend.to_device(value.grad, device)
        return self

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, np.ndarray]:
        """name -> host NumPy array (a copy) for every parameter."""
        return {name: backend.to_numpy(p.data).copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> tuple[list[str], list[str]]:
        """Copy arrays into the parameters. With strict=True any missing, unexpected or
        mis-shaped key is an error that lists them all (nothing is changed then).
        Returns (missing, unexpected)."""
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        bad = [f"{k}: checkpoint {tuple(np.shape(state[k]))} vs model {params[k].shape}"
               for k in params if k in state and tuple(np.shape(state[k])) != params[k].shape]
        if bad or (strict and (missing or unexpected)):
            lines = [f"load_state_dict for {type(self).__name__} failed:"]
            if missing:
                lines.append(f"  missing keys: {missing}")
            if unexpected:
                lines.append(f"  unexpected keys: {unexpected}")
            if bad:
                lines.append("  shape mismatch: " + "; ".join(bad))
            raise KeyError("\n".join(lines))
        for k, p in params.items():
            if k in state:
                arr = backend.to_device(np.asarray(backend.to_numpy(state[k]), dtype=p.dtype), p.device)
                p.data = arr.copy() if arr is state[k] else arr
                p._version += 1
        return missing, unexpected

    # ------------------------------------------------------------ repr
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        children = list(self.named_children())
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not children:
            return head + ")"
        lines = [head]
        for name, child in children:
            sub = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        lines.append(f")  # {self.num_parameters():,} parameters")
        return "\n".join(lines)


class ModuleList(Module):
    """A list of modules whose parameters are named `0.`, `1.`, ..."""

    def __init__(self, modules: Any = ()) -> None:
        self._n = 0
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> None:
        setattr(self, str(self._n), module)
        self._n += 1

    def __getitem__(self, i: int) -> Module:
        return getattr(self, str(range(self._n)[i]))

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Module]:
        return (getattr(self, str(i)) for i in range(self._n))


class Sequential(ModuleList):
    """Modules applied one after another."""

    def __init__(self, *modules: Module) -> None:
        super().__init__(modules)

    def forward(self, x: Any) -> Any:
        for m in self:
            x = m(x)
        return x
