"""Every fast path (tensor/dispatch.py: FAST_PATHS) against the reference Function it subclasses.

For each registered op, Hypothesis draws shapes (0-d and one-row edge cases, sizes just below, at
and above the CPU block boundaries of tensor/cpu/blocks.py), a dtype (float32, float64, float16,
bfloat16) and which inputs want gradients; the fast class and the reference class run on the same
inputs and upstream gradient, and their outputs and gradients must agree to the dtype's round-off.
The array helpers with fast paths (sum_rows, sum_last, gemm, scatter_add_rows) are compared with
`reference_only()`. The references themselves are gradchecked in float64.

The case builders (CASES) serve tests/test_gpu.py as well, for the CUDA entries.
"""
from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from tensor import backend, dispatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tensor
import tensor.functional as F
from tensor import Tensor, backend, gradcheck
from tensor.cpu.blocks import BLOCK
from tensor.dispatch import FAST_PATHS, fast_class, pick, reference_only
from tensor.ops.indexing import scatter_add_rows

DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
TOL = {"float64": 1e-9, "float32": 2e-4, "float16": 2e-2, "bfloat16": 8e-2}  # relative to the largest |value|
FEW = settings(max_examples=20, deadline=None)


# ------------------------------------------------------------------ cases: (arrays, requires_grad, kwargs)
def _edge_sizes(block: int) -> list:
    """Counts around a block boundary: 1, just below, at and just above one and two blocks."""
    return sorted({1, max(1, block - 1), block, block + 1, 2 * block + 1})


def gelu_case(draw: Callable, rng: np.random.Generator, dtype: Any) -> tuple:
    shape = draw(st.sampled_from([(), (1,), (3, 5), (BLOCK - 1,), (BLOCK,), (BLOCK + 1,), (2, BLOCK + 3)]))
    return [np.asarray(rng.standard_normal(shape) * 3).astype(dtype)], [True], {}


def layer_norm_case(draw: Callable, rng: np.random.Generator, dtype: Any) -> tuple:
    C = draw(st.sampled_from([1, 2, 3, 16, 1000, 1024]))
    rows = draw(st.sampled_from(_edge_sizes(max(1, BLOCK // C)) + [31, 32, 33]))
    lead = draw(st.sampled_from([(rows,), (1, rows)] + ([()] if rows == 1 else [])))
    x = (rng.standard_normal(lead + (C,)) * 2 + 1).astype(dtype)
    has_w, has_b = draw(st.booleans()), draw(st.booleans())
    w = rng.standard_normal(C).astype(dtype) if has_w else None
    b = rng.standard_normal(C).astype(dtype) if has_b else None
    rg = [True, draw(st.booleans()) if has_w else False, draw(st.booleans()) if has_b else False]
    kwargs = {"eps": draw(st.sampled_from([1e-5, 1e-3]))}
    if dtype == np.float32:  # mixed precision: the output (and so its gradient) in the compute dtype
        kwargs["out_dtype"] = draw(st.sampled_from([None, np.float16, ml_dtypes.bfloat16]))
    return [x, w, b], rg, kwargs


def cross_entropy_case(draw: Callable, rng: np.random.Generator, dtype: Any) -> tuple:
    C = draw(st.sampled_from([1, 2, 5, 33, 1000]))
    lead = draw(st.sampled_from([(), (1,), (7,), (2, 3), (300,)]))
    ignore = draw(st.sampled_from([-100, -1, 0]))
    t = rng.integers(0, C, size=lead)
    if draw(st.booleans()):
        t = np.where(rng.random(lead) < 0.3, ignore, t)
    return [(rng.standard_normal(lead + (C,)) * 3).astype(dtype), t.astype(np.int64)], [True, False], \
        {"ignore_index": ignore}


def linear_case(draw: Callable, rng: np.random.Generator, dtype: Any) -> tuple:
    n_in, n_out = draw(st.sampled_from([1, 3, 16, 33])), draw(st.sampled_from([1, 4, 32]))
    lead = draw(st.sampled_from([(), (1,), (5,), (2, 7), (40,)]))
    x, w = rng.standard_normal(lead + (n_in,)).astype(dtype), rng.standard_normal((n_out, n_in)).astype(dtype)
    b = rng.standard_normal(n_out).astype(dtype) if draw(st.booleans()) else None
    rg = [draw(st.booleans()), True, b is not None and draw(st.booleans())]
    compute = draw(st.sampled_from([None, np.float16, ml_dtypes.bfloat16])) if dtype == np.float32 else None
    return [x, w, b], rg, {"compute_dtype": compute}


def linear_int8_case(draw: Callable, rng: np.random.Generator, dtype: Any) -> tuple:
    """x in dtype, an int8 weight with float32 per-row scales; inference only (no gradients)."""
    n_in, n_out = draw(st.sampled_from([1, 3, 16, 33])), draw(st.sampled_from([1, 4, 32]))
    lead = draw(st.sampled_from([(), (1,), (5,), (2, 7), (40,)]))
    q = rng.integers(-127, 128, (n_out, n_in)).astype(np.int8)
    s = rng.uniform(1e-3, 0.1, n_out).astype(np.float32)
    b = rng.standard_normal(n_out).astype(dtype) if draw(st.booleans()) else None
    return [rng.standard_normal(lead + (n_in,)).astype(dtype), q, s, b], [False, False, False, False], {}


def sdpa_case(draw: Callable, rng: np.random.Generator, dtype: Any) -> tuple:
    """Causal, no mask, no dropout (what the CUDA path takes too); Tq < Tk is the KV-cache case."""
    B, H, D = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 8, 32]))
    Tk = draw(st.sampled_from([1, 5, 64, 65]))
    Tq = draw(st.sampled_from(sorted({1, max(1, Tk - 3), Tk})))
    q, k, v = (rng.standard_normal((B, H, T, D)).astype(dtype) for T in (Tq, Tk, Tk))
    return [q, k, v], [True, True, True], {"causal": True}


def attention_qkv_case(draw: Callable, rng: np.random.Generator, dtype: Any) -> tuple:
    B, T = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 7, 64, 65]))
    H, D = draw(st.sampled_from([1, 4])), draw(st.sampled_from([2, 16]))
    return [rng.standard_normal((B, T, 3 * H * D)).astype(dtype)], [True], {"n_head": H}


def split_heads_case(draw: Callable, rng: np.random.Generator, dtype: Any) -> tuple:
    B, T, H, D = (draw(st.sampled_from(c)) for c in ([1, 3], [1, 7], [1, 4], [1, 16]))
    parts = draw(st.sampled_from([1, 3]))
    return [rng.standard_normal((B, T, parts * H * D)).astype(dtype)], [True], {"n_head": H, "parts": parts}


def merge_heads_case(draw: Callable, rng: np.random.Generator, dtype: Any) -> tuple:
    B, T, H, D = (draw(st.sampled_from(c)) for c in ([1, 3], [1, 7], [1, 4], [1, 16]))
    return [rng.standard_normal((B, H, T, D)).astype(dtype)], [True], {}


def add_case(draw: Callable, rng: np.random.Generator, dtype: Any) -> tuple:
    """A float32 array plus a 16-bit one of the same shape (a residual add), either order; the 16-bit
    side in dtype when that is 16-bit, else bfloat16. Sizes around the kernel's 4-wide vectors."""
    shape = draw(st.sampled_from([(1,), (3,), (4,), (2, 5), (3, 64), (2, 1, 1027)]))
    low = dtype if np.dtype(dtype).itemsize == 2 else ml_dtypes.bfloat16
    a, b = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(low)
    swap = draw(st.booleans())
    return ([b, a] if swap else [a, b]), [draw(st.booleans()), draw(st.booleans())], {}


CASES: dict[str, Callable] = {"Add": add_case, "LinearGelu": linear_case, "Gelu": gelu_case, "LayerNorm": layer_norm_case, "CrossEntropy": cross_entropy_case,
                              "Linear": linear_case, "LinearInt8": linear_int8_case, "ScaledDotProductAttention": sdpa_case,
                              "CausalAttentionQKV": attention_qkv_case, "SplitHeads": split_heads_case,
                              "MergeHeads": merge_heads_case}


# ------------------------------------------------------------------ running one class
def on(device: str, arrays: list) -> list:
    """The case's arrays on `device` (None stays None)."""
    return [None if a is None else backend.to_device(a, device) for a in arrays]


def run(cls: type, arrays: list, rg: list, kwargs: dict, g: Any, device: str = "cpu") -> list:
    """cls.apply on fresh Tensors of the float `arrays` (integer ones passed as arrays), backward
    with upstream g -> [output, grad of each input that wants one] as float64 NumPy arrays."""
    ts = [a if a is None or a.dtype.kind in "iu" else Tensor(a, requires_grad=r) for a, r in zip(on(device, arrays), rg)]
    out = cls.apply(*ts, **kwargs)
    res = [out.data]
    if any(rg):
        out.backward(Tensor(backend.to_device(g, device)))
        for t, r in zip(ts, rg):
            if r:
                assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, cls.__name__
                res.append(t.grad)
    return [backend.to_numpy(r).astype(np.float64) for r in res]


def compare(op: str, data: Any, dtype_name: str, device: str = "cpu") -> None:
    """The fast class registered for `op` on `device` against the reference, on one drawn case."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    arrays, rg, kwargs = CASES[op](data.draw, rng, DTYPES[dtype_name])
    compare_on(op, arrays, rg, kwargs, dtype_name, device, rng)


def compare_on(op: str, arrays: list, rg: list, kwargs: dict, dtype_name: str, device: str,
               rng: np.random.Generator) -> None:
    """The fast class for `op` on `device` against the reference on these inputs."""
    ref = reference_of(op)
    fast = fast_class(ref, device)
    assert fast.supports(*on(device, arrays), **kwargs), f"{fast.__name__} does not support this case"
    out = ref.apply(*[a if a is None or a.dtype.kind in "iu" else Tensor(a) for a in on(device, arrays)], **kwargs)
    g = rng.standard_normal(out.shape).astype(out.dtype)  # one upstream gradient for both
    what = (f"{fast.__name__} vs {op}, {dtype_name}, shapes {[None if a is None else a.shape for a in arrays]}, "
            f"requires_grad {rg}, {kwargs}")
    low = kwargs.get("compute_dtype", kwargs.get("out_dtype"))  # 16-bit results: both round, differently
    tol_name = backend.dtype_name(np.dtype(low)) if low is not None else dtype_name
    assert_same(run(fast, arrays, rg, kwargs, g, device), run(ref, arrays, rg, kwargs, g, device), tol_name, what)


def assert_same(fast: list, ref: list, dtype_name: str, what: str) -> None:
    assert len(fast) == len(ref), what
    tol = TOL[dtype_name]
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert a.shape == b.shape, f"{what}: result {i} has shape {a.shape}, expected {b.shape}"
        scale = max(1.0, float(np.abs(b).max())) if b.size else 1.0
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=f"{what}: result {i}")


def first(strategy: Any) -> Any:
    """The first choice of a sampled_from/booleans strategy: a fixed case without Hypothesis."""
    return strategy.elements[0] if hasattr(strategy, "elements") else False


# ------------------------------------------------------------------ the registry
def registered_class(name: str, device: str) -> type:
    """The class FAST_PATHS registers for `name` on `device` (importing a tensor/cuda/ module loads no CuPy)."""
    module, cls_name = FAST_PATHS[name][device].split(":")
    return getattr(importlib.import_module(module), cls_name)


def reference_of(name: str) -> type:
    """The reference Function that the fast paths registered under `name` subclass."""
    cls = registered_class(name, next(iter(FAST_PATHS[name])))
    refs = [b for b in cls.__mro__[1:] if b.__name__ == name]
    assert refs, f"{FAST_PATHS[name]} does not subclass a Function named {name}"
    return refs[0]


def test_every_fast_path_imports_subclasses_its_reference_and_is_tested() -> None:
    for name, by_device in FAST_PATHS.items():
        ref = reference_of(name)
        assert not ref.__module__.startswith(("tensor.cpu.", "tensor.cuda.")), f"{name}: the reference lives in {ref.__module__}"
        assert name in CASES, f"the fast paths of {name} have no case builder in CASES (tests/test_tensor_fastpaths.py)"
        for device, spec in by_device.items():
            assert device in ("cpu", "cuda"), spec
            assert spec.split(":")[0].startswith(f"tensor.{device}."), f"{spec} should live in tensor/{device}/"
            cls = registered_class(name, device)
            if device == "cpu":  # the CUDA ones run in tests/test_gpu.py
                assert fast_class(ref, device) is cls
                assert name in CPU_TESTED, f"{spec} is not exercised by test_cpu_fast_path_equals_the_reference"
            assert issubclass(cls, ref) and cls is not ref, spec
            assert callable(getattr(cls, "supports", None)), f"{spec} has no supports()"
            assert "forward" in vars(cls) and "backward" in vars(cls), f"{spec} must override forward and backward"


CPU_TESTED = sorted(name for name, d in FAST_PATHS.items() if "cpu" in d)


@pytest.mark.parametrize("op", CPU_TESTED)
@pytest.mark.parametrize("dtype", list(DTYPES))
@FEW
@given(data=st.data())
def test_cpu_fast_path_equals_the_reference(op: str, dtype: str, data: Any) -> None:
    compare(op, data, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("C", [1, 3, 16, 1000])
def test_cpu_layer_norm_over_several_pieces_with_every_gradient(C: int, dtype: str) -> None:
    """Rows in several pieces and a ragged last one (tensor/cpu/layernorm.py), every input wanting
    its gradient: the per-piece weight and bias sums must add up to the reference's."""
    rng = np.random.default_rng(C)
    rows = 2 * max(1, BLOCK // C) + 1
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((rows, C), (C,), (C,)))
    compare_on("LayerNorm", [x, w, b], [True, True, True], {"eps": 1e-5}, dtype, "cpu", rng)
    compare_on("LayerNorm", [x, None, b], [True, False, True], {"eps": 1e-5}, dtype, "cpu", rng)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("Tk", [1, 7, 256])
def test_cpu_decode_attention_one_query_against_the_cache(Tk: int, dtype: str) -> None:
    """Tq = 1 without a mask (a KV-cached decoding step) takes tensor/cpu/attention.py's
    decode_attention; forward and backward must still equal the reference."""
    rng = np.random.default_rng(Tk)
    q = rng.standard_normal((3, 2, 1, 16)).astype(dtype)
    k, v = (rng.standard_normal((3, 2, Tk, 16)).astype(dtype) for _ in range(2))
    compare_on("ScaledDotProductAttention", [q, k, v], [True, True, True], {"causal": True}, dtype, "cpu", rng)


@pytest.mark.parametrize("op", CPU_TESTED)
def test_pick_chooses_the_fast_path_unless_told_not_to(op: str, monkeypatch) -> None:
    ref = reference_of(op)
    arrays, _, kwargs = CASES[op](first, np.random.default_rng(0), np.float32)
    assert pick(ref, *arrays, **kwargs) is fast_class(ref, "cpu")
    with reference_only():
        assert pick(ref, *arrays, **kwargs) is ref
    monkeypatch.setattr(dispatch, "_env_fast", False)
    assert pick(ref, *arrays, **kwargs) is ref


def test_fast_paths_keep_the_reference_name() -> None:
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    y = F.layer_norm(x.gelu())
    assert y._ctx.name == "LayerNorm" and type(y._ctx).__name__ == "LayerNormCPU"
    assert "grad_fn=LayerNorm" in repr(y)


# ------------------------------------------------------------------ the references, gradchecked in float64
@pytest.mark.parametrize("op", ["CrossEntropy", "Gelu", "LayerNorm", "Linear", "LinearGelu"])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_reference_gradcheck_float64(op: str, data: Any) -> None:
    ref = reference_of(op)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    small = {"Gelu": [(), (3,), (2, 3)], "LayerNorm": [(4,), (2, 5)], "CrossEntropy": [(3, 4), (4,)],
             "Linear": [(2, 3), (3,)], "LinearGelu": [(2, 3), (3,)]}[op]
    shape = data.draw(st.sampled_from(small))
    if op == "Gelu":
        arrays, rg, kw = [rng.standard_normal(shape) * 2], [True], {}
    elif op == "LayerNorm":
        C = shape[-1]
        arrays, rg, kw = [rng.standard_normal(shape) * 2, rng.standard_normal(C), rng.standard_normal(C)], [True] * 3, {}
    elif op == "CrossEntropy":
        t = rng.integers(0, shape[-1], size=shape[:-1])
        t = np.where(rng.random(shape[:-1]) < 0.3, -100, t)
        arrays, rg, kw = [rng.standard_normal(shape), t], [True, False], {}
    else:
        arrays, rg, kw = [rng.standard_normal(shape), rng.standard_normal((4, shape[-1])), rng.standard_normal(4)], \
            [True] * 3, {}
    with reference_only():
        ts = [Tensor(a, requires_grad=r) if r else a for a, r in zip(arrays, rg)]
        grad_inputs = [t for t in ts if isinstance(t, Tensor)]

        def fn(*xs: Tensor) -> Tensor:
            it = iter(xs)
            return ref.apply(*[next(it) if isinstance(t, Tensor) else t for t in ts], **kw)
        assert gradcheck(fn, grad_inputs)


# ------------------------------------------------------------------ array helpers with fast paths
@FEW
@given(rows=st.sampled_from([1, 2, 31, 32, 33, 300]), C=st.sampled_from([1, 7, 128]),
       dtype=st.sampled_from(list(DTYPES)), out=st.sampled_from([None, "float32", "float64"]), seed=st.integers(0, 99))
def test_sum_rows_and_sum_last_equal_the_reference(rows: int, C: int, dtype: str, out: Any, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((rows, C)).astype(DTYPES[dtype])
    fast = [F.sum_rows(x, out), F.sum_rows(x.reshape(1, rows, C), out)]
    if dtype in ("float32", "float64"):
        fast.append(F.sum_last(x))
    with reference_only():
        ref = [F.sum_rows(x, out), F.sum_rows(x.reshape(1, rows, C), out)]
        if dtype in ("float32", "float64"):
            ref.append(F.sum_last(x))
    for a, b in zip(fast, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
    assert_same([a.astype(np.float64) for a in fast], [b.astype(np.float64) for b in ref], dtype, "sum_rows/sum_last")


@FEW
@given(n=st.sampled_from([1, 2, 17, 32, 33]), k=st.sampled_from([1, 8, 64]), m=st.sampled_from([1, 16, 65]),
       dtype=st.sampled_from(list(DTYPES)), transposed=st.booleans(), seed=st.integers(0, 99))
def test_gemm_equals_the_reference(n: int, k: int, m: int, dtype: str, transposed: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, k)).astype(DTYPES[dtype])
    b = rng.standard_normal((m, k)).astype(DTYPES[dtype]).T if transposed else \
        rng.standard_normal((k, m)).astype(DTYPES[dtype])
    fast = F.gemm(a, b)
    with reference_only():
        ref = F.gemm(a, b)
    assert fast.dtype == ref.dtype == a.dtype and fast.flags.c_contiguous
    assert_same([fast.astype(np.float64)], [ref.astype(np.float64)], dtype, "gemm")


@FEW
@given(n=st.sampled_from([0, 1, 5, 40, 400]), V=st.sampled_from([1, 3, 50]), C=st.sampled_from([1, 4]),
       dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 99))
def test_scatter_add_rows_equals_the_reference(n: int, V: int, C: int, dtype: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.zipf(1.5, size=n) % V  # some ids repeat more than HEAVY_COUNT times, others once
    src = rng.standard_normal((n, C)).astype(dtype)
    fast = scatter_add_rows(ids, src, V)
    with reference_only():
        ref = scatter_add_rows(ids, src, V)
    assert fast.dtype == ref.dtype and fast.shape == ref.shape == (V, C)
    assert_same([fast.astype(np.float64)], [ref.astype(np.float64)], dtype, "scatter_add_rows")


def test_importing_tensor_loads_no_cuda_code_and_leaves_the_allocator_alone() -> None:
    """No side effects at import: no tensor/cuda/ module, no CuPy, and no allocator tuning
    (backend.tune_host_allocator is an explicit call)."""
    code = ("import sys, tensor, tensor.functional, tensor.ops.indexing; from tensor import backend; "
            "mods = [m for m in sys.modules if m.startswith('tensor.cuda.') or m == 'cupy']; "
            "print(mods)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.stdout.strip() == "[]", out.stdout
    assert "tune_host_allocator" not in inspect.getsource(tensor)


def test_environment_switch_forces_the_reference_in_a_new_process() -> None:
    """TINYGRAD_LM_FAST=0 (read once, at the first op) turns every fast path off for the process."""
    import subprocess
    import sys
    code = ("import numpy as np; from tensor.dispatch import pick; from tensor.ops.elementwise import Gelu; "
            "print(pick(Gelu, np.ones(3, np.float32)).__name__)")
    root = __file__.rsplit("/tests/", 1)[0]
    for flag, want in (("0", "Gelu"), ("1", "GeluCPU")):
        out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "TINYGRAD_LM_FAST": flag})
        assert out.stdout.strip() == want, (flag, out.stdout, out.stderr)


_SPIN = r"""
import json, os, sys, time
import numpy as np
from tensor import backend
a = np.random.default_rng(0).random((1500, 1500), dtype=np.float32)
def idle_cpu():   # CPU seconds this process spends while its only thread sleeps after a threaded product
    a @ a
    t0 = time.process_time(); time.sleep(0.1); return time.process_time() - t0
before = idle_cpu()
want = a @ a
applied = backend.tune_blas_wait(int(sys.argv[1]) if len(sys.argv) > 1 else None)
print(json.dumps({"applied": applied, "before": before, "after": min(idle_cpu(), idle_cpu()),
                  "same": bool(np.array_equal(a @ a, want)), "env": os.environ.get("OPENBLAS_THREAD_TIMEOUT")}))
"""


def _spin(*args: str, **env: str) -> dict:
    import json
    root = Path(__file__).resolve().parents[1]
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "TINYGRAD_LM_BLAS_WAIT")}
    out = subprocess.run([sys.executable, "-c", _SPIN, *args], capture_output=True, text=True, timeout=120,
                         cwd=str(root), env={**base, "OPENBLAS_NUM_THREADS": "2", **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_tune_blas_wait_lets_idle_openblas_workers_sleep() -> None:
    """OpenBLAS's workers spin ~0.1 s after a product by default (CPU time while the caller sleeps);
    after tune_blas_wait they sleep at once, and products give the same results."""
    r = _spin("4")
    if not r["applied"]:
        pytest.skip("NumPy's BLAS is not a threaded OpenBLAS with its thread-server entry points")
    assert r["same"] and r["env"] == "4"
    if r["before"] < 0.03:
        pytest.skip(f"no spinning worker to begin with (idle CPU {r['before']:.3f} s: one core, or one thread)")
    assert r["after"] < 0.3 * r["before"], r


def test_tune_blas_wait_leaves_a_set_environment_and_the_switch_alone() -> None:
    assert _spin(OPENBLAS_THREAD_TIMEOUT="28")["applied"] is False          # the user's setting stands
    assert _spin("4", TINYGRAD_LM_BLAS_WAIT="0")["applied"] is False
    r = _spin()
    assert r["env"] in (None, str(backend.BLAS_WAIT_LOG2)) and r["applied"] == (r["env"] is not None)
    with pytest.raises(ValueError, match="tune_blas_wait: log2_cycles must be in 4..30"):
        backend.tune_blas_wait(2)
