"""tensor.viz: the DOT text of a small known graph holds the expected nodes and edges."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tensor import Tensor
from tensor.viz import draw, graphviz_available, to_dot

NODE = re.compile(r'^\s*(\w+)\s*\[(.*)\];\s*$')
EDGE = re.compile(r'^\s*(\w+)\s*->\s*(\w+)\s*(\[.*\])?;\s*$')
LABEL = re.compile(r'label="((?:[^"\\]|\\.)*)"')


def parse_dot(text: str) -> tuple[dict[str, str], set[tuple[str, str]]]:
    """A tiny DOT reader for what to_dot writes: {node id: label}, {(src, dst)}; fails on anything else."""
    lines = text.strip().splitlines()
    assert lines[0].startswith("digraph") and lines[0].endswith("{") and lines[-1] == "}"
    nodes: dict[str, str] = {}
    edges: set[tuple[str, str]] = set()
    for line in lines[1:-1]:
        if m := EDGE.match(line):
            edges.add((m.group(1), m.group(2)))
        elif m := NODE.match(line):
            if m.group(1) in ("node", "edge", "graph"):
                continue
            lab = LABEL.search(m.group(2))
            assert lab, line
            nodes[m.group(1)] = lab.group(1).replace("\\n", "\n")
        else:
            assert re.match(r"^\s*\w+=\w+;$", line), f"unparsed DOT line: {line!r}"
    for a, b in edges:  # every edge joins declared nodes
        assert a in nodes and b in nodes, (a, b)
    return nodes, edges


def small_graph() -> tuple[Tensor, Tensor, Tensor]:
    a = Tensor(np.ones((2, 3)), requires_grad=True)
    b = Tensor(np.full(3, 2.0), requires_grad=True)
    loss = (a * b).sum()
    return a, b, loss


def find(nodes: dict[str, str], text: str) -> str:
    hits = [k for k, v in nodes.items() if text in v]
    assert len(hits) == 1, (text, nodes)
    return hits[0]


def test_small_graph_nodes_and_edges() -> None:
    a, b, loss = small_graph()
    loss.backward()
    nodes, edges = parse_dot(to_dot(loss, names={"a": a, "b": b}))
    na, nb = find(nodes, "a\n(2, 3) float64"), find(nodes, "b\n(3,) float64")
    mul, sm = find(nodes, "Mul"), find(nodes, "Sum")
    tensors = {k: v for k, v in nodes.items() if k.startswith("t")}
    assert len(tensors) == 4 and len(nodes) == 6  # a, b, a*b, loss + two ops
    prod = next(k for k, v in tensors.items() if v == "(2, 3) float64")
    out = next(k for k, v in tensors.items() if v == "() float64")
    assert edges == {(na, mul), (nb, mul), (mul, prod), (prod, sm), (sm, out)}
    # gradient norms after backward: |dL/da| = |2| * sqrt(6), |dL/db| = |2| * sqrt(3)
    assert f"|grad| = {np.sqrt(6) * 2:.4g}" in nodes[na]
    assert f"|grad| = {np.sqrt(3) * 2:.4g}" in nodes[nb]


def test_no_grad_norm_before_backward_and_constants_shown() -> None:
    x = Tensor(np.ones(3), requires_grad=True)
    y = (x * 3.0).sum()
    nodes, edges = parse_dot(to_dot(y))
    assert not any("grad" in v for v in nodes.values())
    const = next(k for k, v in nodes.items() if v == "3")
    assert (const, find(nodes, "Mul")) in edges


def test_max_depth_cuts_and_summarizes() -> None:
    x = Tensor(np.ones(4), requires_grad=True)
    y = x
    for _ in range(10):
        y = y.tanh()
    nodes, edges = parse_dot(to_dot(y, max_depth=3))
    assert sum(v == "Tanh" for v in nodes.values()) == 3
    cut = find(nodes, "... 7 more ops")
    assert any(src == cut for src, _ in edges)
    full, _ = parse_dot(to_dot(y))
    assert sum(v == "Tanh" for v in full.values()) == 10


def test_deep_graph_needs_no_recursion() -> None:
    x = Tensor(np.ones(2), requires_grad=True)
    y = x
    for _ in range(3000):
        y = y * 1.0
    nodes, _ = parse_dot(to_dot(y))
    assert sum(v == "Mul" for v in nodes.values()) == 3000


def test_draw_writes_dot_and_renders_when_graphviz_is_installed(tmp_path: Path) -> None:
    _, _, loss = small_graph()
    out = draw(loss, tmp_path / "g.svg")
    assert (tmp_path / "g.dot").read_text().startswith("digraph")
    if graphviz_available():
        assert out == tmp_path / "g.svg" and out.read_text().lstrip().startswith(("<?xml", "<svg"))
    else:
        assert out == tmp_path / "g.dot"


@pytest.mark.skipif(not graphviz_available(), reason="Graphviz `dot` is not installed")
def test_png(tmp_path: Path) -> None:
    _, _, loss = small_graph()
    assert draw(loss, tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
