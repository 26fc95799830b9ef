"""nn/ uses only the public entry points of tensor/: no `tensor.kernels`, no `tensor.ops` internals,
no name with a leading underscore (imported, or reached as an attribute of an imported name).

The public surface nn/ may use: tensor (Tensor, no_grad, ...), tensor.backend, tensor.functional,
tensor.dispatch, tensor.tensor's public names, and the documented functions of tensor.cpu.* and
tensor.cuda.* modules. Checked by reading each file's syntax tree, not by importing it.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NN = os.path.join(ROOT, "nn")
NN_FILES = sorted(os.path.relpath(os.path.join(d, f), NN).replace(os.sep, "/")  # sub-packages too
                  for d, _, files in os.walk(NN) for f in files if f.endswith(".py"))

# Files still being moved to the public surface in parallel work; the xfail flips to a pass
# (strict=False) once they are clean, and goes away then.
NOT_YET_CLEAN: set[str] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _bad_module(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "tensor":
        return None
    if parts[1:2] == ["kernels"]:
        return "tensor.kernels"
    if parts[1:2] == ["ops"]:
        return "tensor.ops internals"
    if any(_private(p) for p in parts):
        return "a private module"
    return None


def offences(path: str) -> list[str]:
    """'file:line: what' for every use of a non-public part of tensor/ in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    name = os.path.relpath(path, ROOT)
    found: list[str] = []
    bound: set[str] = set()  # local names bound to tensor modules or their members
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                why = _bad_module(alias.name)
                if why:
                    found.append(f"{name}:{node.lineno}: import {alias.name} ({why})")
                if alias.name.split(".")[0] == "tensor":
                    bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "tensor":
                continue
            why = _bad_module(node.module)
            if why:
                found.append(f"{name}:{node.lineno}: from {node.module} import ... ({why})")
            for alias in node.names:
                sub = _bad_module(f"{node.module}.{alias.name}") if node.module == "tensor" else None
                if sub:
                    found.append(f"{name}:{node.lineno}: from tensor import {alias.name} ({sub})")
                elif _private(alias.name):
                    found.append(f"{name}:{node.lineno}: from {node.module} import {alias.name} (a private name)")
                bound.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            if node.attr in ("kernels", "ops") and node.value.id == "tensor":
                found.append(f"{name}:{node.lineno}: tensor.{node.attr} (not a public entry point)")
            elif _private(node.attr):
                found.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr} (a private name of tensor/)")
    return sorted(set(found), key=lambda s: int(s.split(":")[1]))


@pytest.mark.parametrize("filename", [
    pytest.param(f, marks=pytest.mark.xfail(strict=False, reason="being moved to public tensor/ entry points"))
    if f in NOT_YET_CLEAN else f for f in NN_FILES])
def test_nn_imports_only_public_tensor_entry_points(filename: str) -> None:
    bad = offences(os.path.join(NN, filename))
    assert not bad, "nn/ must use only public tensor/ entry points:\n  " + "\n  ".join(bad)


def test_the_checker_finds_each_kind_of_offence(tmp_path) -> None:
    src = tmp_path / "sample.py"
    src.write_text("from tensor import kernels, backend\n"
                   "import tensor.ops.elementwise as E\n"
                   "from tensor.functional import _f32, linear\n"
                   "from tensor.tensor import Tensor\n"
                   "def f(x):\n"
                   "    from tensor.ops import all_ops\n"
                   "    return Tensor._make(x, False), backend.device_of(x), linear, x._version\n")
    got = [line.split(": ", 1)[1] for line in offences(str(src))]
    assert got == ["from tensor import kernels (tensor.kernels)",
                   "import tensor.ops.elementwise (tensor.ops internals)",
                   "from tensor.functional import _f32 (a private name)",
                   "from tensor.ops import ... (tensor.ops internals)",
                   "Tensor._make (a private name of tensor/)"]


def test_optimizer_clip_and_amp_load_their_cuda_paths_only_on_the_gpu() -> None:
    """nn.optim, nn.utils and nn.amp import tensor/cuda/adam.py and clip.py (and so CuPy) the
    first time a GPU array reaches them, not at import and not on a CPU step."""
    import subprocess
    import sys
    code = ("import sys, numpy as np\n"
            "import nn.optim, nn.utils, nn.amp\n"
            "from nn.module import Parameter\n"
            "p = Parameter(np.ones(3)); p.grad = np.ones(3)\n"
            "nn.utils.clip_grad_norm_([p], 1.0); nn.amp.LossScaler().unscale_([p]); nn.optim.AdamW([p]).step()\n"
            "print(sorted(m for m in sys.modules if m in ('tensor.cuda.adam', 'tensor.cuda.clip', 'cupy')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
