"""Pictures of the computation graph behind a tensor.

    from tensor.viz import graph, to_dot, draw
    loss.backward()
    g = graph(loss)                           # the nodes and edges, as plain lists
    print(to_dot(loss))                       # Graphviz DOT text, always available
    draw(loss, "graph.svg", max_depth=6)      # writes graph.dot, and graph.svg if `dot` is installed

Node kinds: tensors (boxes: name, shape, dtype, and the gradient norm once backward has
filled `.grad`): "leaf" for a tensor no op made (parameters green, constants grey),
"value" for a result of an op (the graph keeps the op, not the tensor, so its box shows
the shape and dtype the op recorded), "root" for the tensor asked about; "op"
(ellipses: the Function's class name); "const" (a number or array given to an op); "cut"
(the "... N more ops" summary past max_depth). Edges run the way data flows:
input -> op -> output. One op has exactly one output box, and one box per tensor.

Identity: nodes are keyed by `id()` of the object they stand for, and the walk keeps a
reference to every such object until it ends, so no id can be freed and reused by
another object meanwhile (keys built from temporaries would merge different tensors).
Graphs are walked without recursion.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tensor import backend
from tensor.tensor import Function, Tensor

PICTURE_FORMATS = ("svg", "png", "pdf")


@dataclass
class Node:
    """One node of the picture: `id` is its DOT name, `kind` one of
    "root", "leaf", "value", "op", "const", "cut" (see the module docstring)."""
    id: str
    kind: str
    label: str
    requires_grad: bool = False


@dataclass
class Graph:
    """The nodes (in the order met, root first) and edges (src id, dst id) of a picture."""
    nodes: list[Node] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)


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
    return f"{x:.4g}" if isinstance(x, float) else f"{x!r}"


class _Builder:
    """Numbers nodes in the order met; keys are (kind, id(obj)) and `keep` holds every obj alive."""

    def __init__(self) -> None:
        self.g = Graph()
        self.ids: dict[tuple[str, int], str] = {}
        self.keep: list[Any] = []

    def node(self, key_kind: str, obj: Any, make: Any) -> str:
        """The node standing for obj, made by make(node_id) -> Node the first time obj is met."""
        key = (key_kind, id(obj))
        if key not in self.ids:
            self.keep.append(obj)  # obj now outlives the walk: its id cannot be reused
            self.ids[key] = f"n{len(self.g.nodes)}"
            self.g.nodes.append(make(self.ids[key]))
        return self.ids[key]

    def fresh(self, kind: str, label: str) -> str:
        """A node of its own (a constant, a cut summary), never shared."""
        nid = f"n{len(self.g.nodes)}"
        self.g.nodes.append(Node(nid, kind, label))
        return nid


def graph(root: Tensor, max_depth: int | None = None, names: Mapping[str, Tensor] | None = None) -> Graph:
    """The nodes and edges of the graph that produced `root` (what `to_dot` and `draw` draw).

    max_depth: show ops at most this many steps back from root (None: all); the inputs
    cut off are summarized by one "... N more ops" node each.
    names: {"w": w, ...} labels for tensors (e.g. dict(model.named_parameters())).
    """
    label_of = {id(t): n for n, t in (names or {}).items()}
    b = _Builder()
    b.keep.append(names)  # the named tensors stay alive, so label_of's ids stay theirs

    def tensor_node(t: Tensor, kind: str) -> str:
        return b.node("tensor", t, lambda nid: Node(nid, kind, _tensor_label(t, label_of.get(id(t))),
                                                    bool(t.requires_grad)))

    def value_node(fn: Function) -> str:  # the output box of op fn
        return b.node("value", fn, lambda nid: Node(nid, "value", f"{_shape(fn.out_shape)} {fn.out_dtype}", True))

    root_id = tensor_node(root, "root")
    if root._ctx is not None:  # the root *is* the output of its op: its box stands for that op's value
        b.ids[("value", id(root._ctx))] = root_id
        b.keep.append(root._ctx)
    queue: deque[tuple[Function, int]] = deque([(root._ctx, 0)] if root._ctx is not None else [])
    done: set[int] = set()  # ids of ops already expanded (each is kept alive by b.keep)
    while queue:
        fn, depth = queue.popleft()
        if id(fn) in done:
            continue
        done.add(id(fn))
        out_id = value_node(fn)
        if max_depth is not None and depth >= max_depth:
            hidden = _count_ops(fn)
            cut = b.fresh("cut", f"... {hidden} more op{'s' if hidden != 1 else ''}")
            b.g.edges.append((cut, out_id))
            continue
        op_id = b.node("op", fn, lambda nid: Node(nid, "op", fn.name))
        b.g.edges.append((op_id, out_id))
        for inp in fn.inputs:
            if isinstance(inp, Function):  # an intermediate tensor: its box, then the op that made it
                src = value_node(inp)
                queue.append((inp, depth + 1))
            elif isinstance(inp, Tensor):
                src = tensor_node(inp, "leaf")
            elif inp is not None:
                src = b.fresh("const", _const_label(inp))
            else:
                continue
            b.g.edges.append((src, op_id))
    return b.g


def _count_ops(fn: Function) -> int:
    """How many distinct ops lead to (and include) fn (iteratively; fn keeps them all alive)."""
    seen: set[int] = set()
    stack = [fn]
    while stack:
        f = stack.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        stack.extend(i for i in f.inputs if isinstance(i, Function))
    return len(seen)


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_STYLE = {"root": 'shape=box, style=filled, fillcolor="#fde2c8"', "value": "shape=box",
          "op": 'shape=ellipse, style=filled, fillcolor="#cfe2ff"', "const": "shape=plaintext",
          "cut": "shape=plaintext"}


def to_dot(root: Tensor, max_depth: int | None = None, names: Mapping[str, Tensor] | None = None,
           rankdir: str = "LR") -> str:
    """The graph that produced `root` as Graphviz DOT text (arguments as in `graph`)."""
    g = graph(root, max_depth=max_depth, names=names)
    lines = ["digraph tensor_graph {", f"  rankdir={rankdir};", '  node [fontname="Helvetica", fontsize=10];']
    kind = {}
    for n in g.nodes:
        kind[n.id] = n.kind
        style = _STYLE.get(n.kind) or ('shape=box, style=filled, fillcolor="#d4edda"' if n.requires_grad
                                       else 'shape=box, style=filled, fillcolor="#eeeeee"')
        lines.append(f'  {n.id} [{style}, label="{_esc(n.label)}"];')
    for src, dst in g.edges:
        lines.append(f"  {src} -> {dst}{' [style=dashed]' if kind[src] == 'cut' else ''};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def graphviz_available() -> bool:
    """True when the Graphviz `dot` program is on PATH."""
    return shutil.which("dot") is not None


def draw(root: Tensor, path: str | Path, max_depth: int | None = None,
         names: Mapping[str, Tensor] | None = None) -> Path:
    """Write the graph to `path`: .dot always (next to it); .svg/.png/.pdf rendered when `dot` is installed.

    Returns the file written last: the picture, or the .dot when Graphviz is missing (then
    a line on stderr says that only the .dot was written and how to render it).
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in ("", "dot") + PICTURE_FORMATS:
        raise ValueError(f"draw: unknown picture format {path.suffix!r} in {str(path)!r} "
                         f"(use .dot, .svg, .png or .pdf)")
    dot_path = path.with_suffix(".dot")
    dot_path.write_text(to_dot(root, max_depth=max_depth, names=names))
    if fmt in ("", "dot"):
        return dot_path
    if not graphviz_available():
        print(f"draw: Graphviz `dot` is not on PATH, so only {dot_path} was written (not {path}); "
              f"install Graphviz and run: dot -T{fmt} {dot_path} -o {path}", file=sys.stderr)
        return dot_path
    r = subprocess.run(["dot", f"-T{fmt}", str(dot_path), "-o", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"draw: `dot -T{fmt} {dot_path}` failed with status {r.returncode}: {r.stderr.strip()}")
    return path
