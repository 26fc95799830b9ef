"""Every op in `tensor.all_ops()` has a property test: differentiable ops a hypothesis gradient property
(GRAD_CASES of some tests/test_tensor_<family>.py), non-differentiable ones value tests (VALUE_TESTED).
A new op without a test fails here."""
from __future__ import annotations

import importlib

import tensor
from tensor import Function

FAMILIES = ["test_tensor_elementwise", "test_tensor_reduce", "test_tensor_matmul", "test_tensor_movement",
            "test_tensor_indexing", "test_tensor_functional"]


def _registry() -> tuple[dict, dict]:
    grad, value = {}, {}
    for name in FAMILIES:
        mod = importlib.import_module(name)
        for op in mod.GRAD_CASES:
            assert op not in grad, f"{op} is registered in both {grad.get(op)} and {name}"
            grad[op] = name
        for op in mod.VALUE_TESTED:
            value[op] = name
        assert hasattr(mod, "test_gradients"), f"{name} registers cases but has no test_gradients"
    return grad, value


def test_all_ops_is_complete_and_well_formed():
    ops = tensor.all_ops()
    assert len(ops) >= 40
    for name, cls in ops.items():
        assert issubclass(cls, Function) and cls.__name__ == name
        assert "forward" in vars(cls), f"{name} has no forward of its own"
        if cls.differentiable:
            assert "backward" in vars(cls), f"{name} is differentiable but has no backward"


def test_every_op_has_a_property_test():
    grad, value = _registry()
    ops = tensor.all_ops()
    differentiable = {n for n, c in ops.items() if c.differentiable}
    missing = sorted(differentiable - set(grad))
    assert not missing, f"differentiable ops without a hypothesis gradient property: {missing}"
    missing_values = sorted(set(ops) - differentiable - set(value))
    assert not missing_values, f"non-differentiable ops without value tests: {missing_values}"


def test_registry_names_only_real_ops():
    grad, value = _registry()
    ops = tensor.all_ops()
    stale = sorted((set(grad) | set(value)) - set(ops))
    assert not stale, f"registered tests for ops that do not exist: {stale}"
    wrong_kind = sorted(n for n in grad if not ops[n].differentiable) + sorted(n for n in value if ops[n].differentiable)
    assert not wrong_kind, f"registered under the wrong kind: {wrong_kind}"
