"""tensor.viz: the drawn graph (parsed back from its DOT text) is the true graph of the ops.

The true graph is walked here independently, from `Function.inputs`, holding every object
it meets; the picture must have one ellipse per op, one box per distinct tensor, as many
in-edges on each op as the op has inputs, no self-loops, and the same shape (compared as
a structural signature from the root down).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tensor import Tensor
from tensor.tensor import Function
from tensor.viz import draw, graph, graphviz_available, to_dot

ROOT = Path(__file__).resolve().parents[1]
NODE = re.compile(r'^\s*(\w+)\s*\[(.*)\];\s*$')
EDGE = re.compile(r'^\s*(\w+)\s*->\s*(\w+)\s*(\[.*\])?;\s*$')
LABEL = re.compile(r'label="((?:[^"\\]|\\.)*)"')
SHAPE = re.compile(r'shape=(\w+)')


class Dot:
    """What a DOT file written by to_dot says: nodes {id: (shape, label)} and edges [(src, dst)] in order."""

    def __init__(self, text: str) -> None:
        lines = text.strip().splitlines()
        assert lines[0].startswith("digraph") and lines[0].endswith("{") and lines[-1] == "}"
        self.nodes: dict[str, tuple[str, str]] = {}
        self.edges: list[tuple[str, str]] = []
        for line in lines[1:-1]:
            if m := EDGE.match(line):
                self.edges.append((m.group(1), m.group(2)))
            elif m := NODE.match(line):
                if m.group(1) in ("node", "edge", "graph"):
                    continue
                lab, shape = LABEL.search(m.group(2)), SHAPE.search(m.group(2))
                assert lab and shape, line
                assert m.group(1) not in self.nodes, f"node declared twice: {line!r}"
                self.nodes[m.group(1)] = (shape.group(1), lab.group(1).replace("\\n", "\n"))
            else:
                assert re.match(r"^\s*\w+=\w+;$", line), f"unparsed DOT line: {line!r}"
        for a, b in self.edges:  # every edge joins declared nodes
            assert a in self.nodes and b in self.nodes, (a, b)

    def of_shape(self, shape: str) -> list[str]:
        return [k for k, (s, _) in self.nodes.items() if s == shape]

    def into(self, node: str) -> list[str]:
        return [a for a, b in self.edges if b == node]

    def out_of(self, node: str) -> list[str]:
        return [b for a, b in self.edges if a == node]

    def label(self, node: str) -> str:
        return self.nodes[node][1]


def find(d: Dot, text: str) -> str:
    hits = [k for k, (_, v) in d.nodes.items() if text in v]
    assert len(hits) == 1, (text, d.nodes)
    return hits[0]


class TrueGraph:
    """The ops and distinct leaf tensors behind root, by object identity (all kept alive in lists)."""

    def __init__(self, root: Tensor) -> None:
        self.ops: list[Function] = []
        self.leaves: list[Tensor] = []
        seen: set[int] = set()
        stack = [root._ctx] if root._ctx is not None else []
        if root._ctx is None:
            self.leaves.append(root)
        while stack:
            fn = stack.pop()
            if id(fn) in seen:
                continue
            seen.add(id(fn))
            self.ops.append(fn)
            for i in fn.inputs:
                if isinstance(i, Function):
                    stack.append(i)
                elif isinstance(i, Tensor) and id(i) not in seen:
                    seen.add(id(i))
                    self.leaves.append(i)
        self.uses = Counter(id(i) for fn in self.ops for i in fn.inputs if isinstance(i, Function))


def true_signature(root: Tensor) -> int:
    """A structural hash from the root down: op name and its inputs' signatures, in order."""
    memo: dict[int, int] = {}
    keep: list = []

    def sig(x: object) -> int:
        if isinstance(x, Function):
            if id(x) not in memo:
                keep.append(x)
                memo[id(x)] = hash((x.name, tuple(sig(i) for i in x.inputs if i is not None)))
            return memo[id(x)]
        return hash(("leaf",)) if isinstance(x, Tensor) else hash(("const",))

    return sig(root._ctx) if root._ctx is not None else sig(root)


def dot_signature(d: Dot, root: str) -> int:
    memo: dict[str, int] = {}

    def sig(n: str) -> int:
        if n not in memo:
            shape, label = d.nodes[n]
            if shape == "plaintext":
                memo[n] = hash(("const",))
            elif shape == "ellipse":
                memo[n] = hash((label, tuple(sig(i) for i in d.into(n))))
            else:
                (maker,) = d.into(n) or [None]
                memo[n] = hash(("leaf",)) if maker is None else sig(maker)
        return memo[n]

    return sig(root)


def assert_true_picture(root: Tensor, d: Dot) -> None:
    t = TrueGraph(root)
    ops, boxes = d.of_shape("ellipse"), d.of_shape("box")
    assert not [e for e in d.edges if e[0] == e[1]], "self-loop"
    # every Function node appears once, with as many in-edges as it has inputs and one output box
    assert Counter(d.label(o) for o in ops) == Counter(fn.name for fn in t.ops)
    assert sorted((d.label(o), len(d.into(o))) for o in ops) == \
        sorted((fn.name, sum(i is not None for i in fn.inputs)) for fn in t.ops)
    for o in ops:
        (out,) = d.out_of(o)
        assert d.nodes[out][0] == "box" and d.into(out) == [o]
    # one box per distinct tensor: every op's output, plus the leaves
    assert len(boxes) == len(t.ops) + len(t.leaves)
    # an intermediate box feeds as many ops as use that value
    made = sorted(len(d.out_of(d.out_of(o)[0])) for o in ops)
    assert made == sorted(t.uses[id(fn)] for fn in t.ops)
    # and the whole shape agrees
    roots = [b for b in boxes if not d.out_of(b)]
    assert len(roots) == 1
    assert dot_signature(d, roots[0]) == true_signature(root)


def leaf(*shape: int, seed: int = 0) -> Tensor:
    return Tensor(np.random.default_rng(seed).standard_normal(shape), requires_grad=True)


def test_chain() -> None:
    a = leaf(3)
    y = a.exp().tanh().sum()
    d = Dot(to_dot(y))
    assert_true_picture(y, d)
    assert len(d.of_shape("ellipse")) == 3 and len(d.of_shape("box")) == 4


def test_diamond() -> None:
    a = leaf(4)
    h = a.tanh()
    y = (h.exp() * (h * 2.0)).sum()
    d = Dot(to_dot(y))
    assert_true_picture(y, d)
    tanh_out = d.out_of(find(d, "Tanh"))[0]
    assert len(d.out_of(tanh_out)) == 2  # h feeds two ops, drawn once


def test_shared_subexpression_used_twice_by_one_op() -> None:
    a = leaf(2, 3)
    s = a + 1.0
    y = (s * s).sum()
    d = Dot(to_dot(y))
    assert_true_picture(y, d)
    mul = find(d, "Mul")
    (s_box,) = set(d.into(mul))
    assert d.into(mul) == [s_box, s_box] and d.into(s_box) == [find(d, "Add")]


def test_three_temporaries_get_three_boxes() -> None:
    a = leaf(3)
    y = ((a * 3) + 1).tanh() * 2
    d = Dot(to_dot(y))
    assert_true_picture(y, d)
    assert len(d.of_shape("box")) == 5  # a, a*3, a*3+1, tanh(...), y
    assert Counter(d.label(o) for o in d.of_shape("ellipse")) == Counter({"Mul": 2, "Add": 1, "Tanh": 1})


def test_the_graph_function_is_what_is_drawn() -> None:
    a = leaf(3)
    y = ((a * 3) + 1).tanh() * 2
    g = graph(y)
    d = Dot(to_dot(y))
    assert [n.id for n in g.nodes] == list(d.nodes) and g.edges == d.edges
    assert Counter(n.kind for n in g.nodes) == Counter({"root": 1, "leaf": 1, "value": 3, "op": 4, "const": 3})


def neuron() -> tuple[Tensor, dict[str, Tensor]]:
    ps = {k: Tensor(np.float64(v), requires_grad=True)
          for k, v in dict(x1=2.0, x2=0.0, w1=-3.0, w2=1.0, b=6.8813735870195432).items()}
    return (ps["x1"] * ps["w1"] + ps["x2"] * ps["w2"] + ps["b"]).tanh(), ps


def test_neuron_example_graph(tmp_path: Path) -> None:
    out = tmp_path / "neuron.dot"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "01_neuron.py"), "--dot", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    d = Dot(out.read_text())
    o, ps = neuron()
    assert_true_picture(o, d)
    assert Counter(d.label(n) for n in d.of_shape("ellipse")) == Counter({"Mul": 2, "Add": 2, "Tanh": 1})
    assert len(d.of_shape("box")) == 10  # five leaves, five op results
    for name in ps:  # each named leaf drawn once, feeding one op
        assert len(d.out_of(find(d, f"{name}\n()"))) == 1
    add_outputs = [d.out_of(a)[0] for a in d.of_shape("ellipse") if d.label(a) == "Add"]
    for a in d.of_shape("ellipse"):  # no Add feeds itself
        assert d.out_of(a)[0] not in d.into(a)
    assert len(set(add_outputs)) == 2


def test_gpt_block_forward() -> None:
    import nn
    block = nn.Block(8, 2, rng=np.random.default_rng(0))
    x = Tensor(np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32))
    y = block(x).sum()
    names = dict(block.named_parameters())
    d = Dot(to_dot(y, names=names))
    assert_true_picture(y, d)
    for name in names:
        find(d, name + "\n")  # each parameter drawn once, under its name


def test_grad_norms_after_backward_and_names() -> None:
    a = Tensor(np.ones((2, 3)), requires_grad=True)
    b = Tensor(np.full(3, 2.0), requires_grad=True)
    loss = (a * b).sum()
    loss.backward()
    d = Dot(to_dot(loss, names={"a": a, "b": b}))
    assert_true_picture(loss, d)
    # |dL/da| = |2| * sqrt(6), |dL/db| = |1+1| * sqrt(3)
    assert f"|grad| = {np.sqrt(6) * 2:.4g}" in d.label(find(d, "a\n(2, 3) float64"))
    assert f"|grad| = {np.sqrt(3) * 2:.4g}" in d.label(find(d, "b\n(3,) float64"))


def test_no_grad_norm_before_backward_and_constants_shown() -> None:
    x = Tensor(np.ones(3), requires_grad=True)
    y = (x * 3.0).sum()
    d = Dot(to_dot(y))
    assert not any("grad" in v for _, v in d.nodes.values())
    const = next(k for k, (_, v) in d.nodes.items() if v == "3")
    assert d.out_of(const) == [find(d, "Mul")]


def test_max_depth_cuts_and_summarizes() -> None:
    x = Tensor(np.ones(4), requires_grad=True)
    y = x
    for _ in range(10):
        y = y.tanh()
    d = Dot(to_dot(y, max_depth=3))
    assert sum(v == "Tanh" for _, v in d.nodes.values()) == 3
    cut = find(d, "... 7 more ops")
    (target,) = d.out_of(cut)
    assert d.nodes[target][0] == "box" and d.into(target) == [cut]  # the box the hidden ops made
    (user,) = d.out_of(target)
    assert d.label(user) == "Tanh"
    full = Dot(to_dot(y))
    assert sum(v == "Tanh" for _, v in full.nodes.values()) == 10
    assert_true_picture(y, full)


def test_deep_graph_needs_no_recursion() -> None:
    x = Tensor(np.ones(2), requires_grad=True)
    y = x
    for _ in range(3000):
        y = y * 1.0
    d = Dot(to_dot(y))
    assert sum(v == "Mul" for _, v in d.nodes.values()) == 3000
    assert len(d.of_shape("box")) == 3001


def test_draw_without_graphviz_writes_only_the_dot_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert not graphviz_available()
    a = leaf(3)
    out = draw((a * 2.0).sum(), tmp_path / "graph.svg")
    assert out == tmp_path / "graph.dot" and out.read_text().startswith("digraph")
    assert not (tmp_path / "graph.svg").exists()
    err = capsys.readouterr().err
    assert "only" in err and "graph.dot" in err and "dot -Tsvg" in err and "Graphviz" in err


def test_draw_rejects_unknown_format_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"draw: unknown picture format '\.jpg'"):
        draw(leaf(2).sum(), tmp_path / "g.jpg")
    assert not (tmp_path / "g.dot").exists()


def test_draw_dot_suffix(tmp_path: Path) -> None:
    assert draw(leaf(2).sum(), tmp_path / "g.dot") == tmp_path / "g.dot"


@pytest.mark.skipif(not graphviz_available(), reason="Graphviz `dot` is not installed")
def test_svg_and_png(tmp_path: Path) -> None:
    loss = (leaf(2, 3) * 2.0).sum()
    assert draw(loss, tmp_path / "g.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert draw(loss, tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_leaf_alone_and_depth_zero() -> None:
    a = leaf(2)
    d = Dot(to_dot(a))
    assert len(d.nodes) == 1 and not d.edges
    y = (a * 2.0).tanh()
    d = Dot(to_dot(y, max_depth=0))
    cut = find(d, "... 2 more ops")
    assert d.edges == [(cut, d.of_shape("box")[0])] and not d.of_shape("ellipse")
