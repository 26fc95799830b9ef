"""Pictures of the computation graph behind a tensor.

    from tensor.viz import to_dot, draw
    loss.backward()
    print(to_dot(loss))                       # Graphviz DOT text, always available
    draw(loss, "graph.svg", max_depth=6)      # writes graph.dot, and graph.svg if `dot` is installed

Two kinds of node: tensors (boxes: name, shape, dtype, and the gradient norm once
backward has filled `.grad`; an intermediate result shows the shape and dtype its op
recorded, since the graph keeps the op, not the tensor) and ops (ellipses: the
Function's class name). Edges run
the way data flows: input tensor -> op -> output tensor. Leaves that require grad
(parameters) are green, constants grey. Graphs are walked without recursion.
"""
from __future__ import annotations

import itertools
import shutil
import subprocess
from collections import deque
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tensor import backend
from tensor.tensor import Function, Tensor


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _shape(shape: tuple) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"


def _tensor_label(t: Tensor, name: str | None) -> str:
    lines = [name] if name else []
    lines.append(f"{_shape(t.shape)} {t.dtype}")
    if t.grad is not None:
        g = backend.to_numpy(t.grad).astype(np.float64)
        lines.append(f"|grad| = {float(np.sqrt((g * g).sum())):.4g}")
    return "\n".join(lines)


def _const_label(x: Any) -> str:
    if hasattr(x, "shape") and getattr(x, "ndim", 0) > 0:
        return f"const {_shape(x.shape)}"
    return f"{x!r}" if not isinstance(x, float) else f"{x:.4g}"


def to_dot(root: Tensor, max_depth: int | None = None, names: Mapping[str, Tensor] | None = None,
           rankdir: str = "LR") -> str:
    """The graph that produced `root` as Graphviz DOT text.

    max_depth: show ops at most this many steps back from root (None: all); the inputs
    cut off are summarized by one "... N more ops" node each.
    names: {"w": w, ...} labels for tensors (e.g. dict(model.named_parameters())).
    """
    label_of = {id(t): n for n, t in (names or {}).items()}
    ids: dict[int, str] = {}
    lines = ["digraph tensor_graph {", f"  rankdir={rankdir};",
             '  node [fontname="Helvetica", fontsize=10];']

    counter = itertools.count()

    def node_id(obj: Any, prefix: str) -> tuple[str, bool]:
        """A stable name per tensor/op (numbered in the order met), and whether it is new."""
        if id(obj) in ids:
            return ids[id(obj)], False
        ids[id(obj)] = f"{prefix}{next(counter)}"
        return ids[id(obj)], True

    def add_tensor(t: Tensor, is_root: bool = False) -> str:
        nid, new = node_id(t, "t")
        if new:
            if is_root:
                style = 'style=filled, fillcolor="#fde2c8"'
            elif t._ctx is None and t.requires_grad:
                style = 'style=filled, fillcolor="#d4edda"'
            elif t._ctx is None:
                style = 'style=filled, fillcolor="#eeeeee"'
            else:
                style = ""
            attrs = f'shape=box, label="{_esc(_tensor_label(t, label_of.get(id(t))))}"'
            lines.append(f"  {nid} [{attrs}{', ' + style if style else ''}];")
        return nid

    def add_value(fn: Function) -> str:
        """The box of an intermediate result, known to the graph only through the op that made it."""
        nid, new = node_id(("value", id(fn)), "t")
        if new:
            label = f"{_shape(fn.out_shape)} {fn.out_dtype}"
            lines.append(f'  {nid} [shape=box, label="{_esc(label)}"];')
        return nid

    root_id = add_tensor(root, is_root=True)
    queue: deque[tuple[Function | None, str, int]] = deque([(root._ctx, root_id, 0)])
    done: set[int] = set()
    while queue:
        fn, tid, depth = queue.popleft()
        if fn is None or id(fn) in done:
            continue
        done.add(id(fn))
        if max_depth is not None and depth >= max_depth:
            hidden = _count_ops(fn)
            cut = f"cut{next(counter)}"
            lines.append(f'  {cut} [shape=plaintext, label="... {hidden} more op{"s" if hidden != 1 else ""}"];')
            lines.append(f"  {cut} -> {tid} [style=dashed];")
            continue
        op_id, _ = node_id(fn, "op")
        lines.append(f'  {op_id} [shape=ellipse, style=filled, fillcolor="#cfe2ff", label="{_esc(fn.name)}"];')
        lines.append(f"  {op_id} -> {tid};")
        for inp in fn.inputs:
            if isinstance(inp, Function):  # an intermediate tensor: its box, then the op that made it
                iid = add_value(inp)
                lines.append(f"  {iid} -> {op_id};")
                queue.append((inp, iid, depth + 1))
            elif isinstance(inp, Tensor):
                iid = add_tensor(inp)
                lines.append(f"  {iid} -> {op_id};")
            elif inp is not None:
                cid = f"c{next(counter)}"
                lines.append(f'  {cid} [shape=plaintext, label="{_esc(_const_label(inp))}"];')
                lines.append(f"  {cid} -> {op_id};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _count_ops(fn: Function) -> int:
    """How many distinct ops lead to (and include) fn (iteratively)."""
    seen: set[int] = set()
    stack = [fn]
    while stack:
        f = stack.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        stack.extend(i for i in f.inputs if isinstance(i, Function))
    return len(seen)


def graphviz_available() -> bool:
    """True when the Graphviz `dot` program is on PATH."""
    return shutil.which("dot") is not None


def draw(root: Tensor, path: str | Path, max_depth: int | None = None,
         names: Mapping[str, Tensor] | None = None) -> Path:
    """Write the graph to `path`: .dot always (next to it); .svg/.png rendered when `dot` is installed.

    Returns the file written last (the picture, or the .dot when Graphviz is missing).
    """
    path = Path(path)
    dot_path = path.with_suffix(".dot")
    dot_path.write_text(to_dot(root, max_depth=max_depth, names=names))
    fmt = path.suffix.lstrip(".").lower()
    if fmt in ("", "dot") or not graphviz_available():
        return dot_path
    if fmt not in ("svg", "png", "pdf"):
        raise ValueError(f"draw: unknown picture format {fmt!r} (use .dot, .svg, .png or .pdf)")
    subprocess.run(["dot", f"-T{fmt}", str(dot_path), "-o", str(path)], check=True)
    return path
