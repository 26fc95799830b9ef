"""A Linear's GEMM with its bias fused into the epilogue, through cuBLASLt (ctypes).

    matmul_bias(a, w_t, bias, out_dtype)   a (m, k) @ w_t (k, n) + bias (n,)   -> (m, n)   EPILOGUE_BIAS
    matmul_bias_gelu(a, w_t, bias, ...)    gelu(a @ w_t + bias)                 -> (m, n)   EPILOGUE_GELU_BIAS
    matmul_bgrad(a, b, out_dtype, db_dtype) a (m, k) @ b (k, n) -> ((m, n), a summed over k (m,))  BGRADB

The first is a Linear's forward (y = x W^T + b: the bias added to the float32 accumulator before
the one rounding to the output dtype, no second pass over y); the second its weight gradient
dW = g^T x with a = g^T, whose row sums are the bias gradient db = sum over rows of g, read by
the GEMM while it streams g anyway (no column-sum kernel). The GELU epilogue is cuBLASLt's tanh
form, the same formula as ours (tensor/ops/elementwise.py: Gelu); it keeps no pre-activation, so it
serves inference only (tensor/cuda/linear.py: LinearGeluCUDA).

Split-K: for a product of few rows (m <= NO_SPLIT_K_ROWS, a decode step's) the heuristic often picks
an algorithm that splits k over blocks and sums the parts in a second, reduction kernel. With
NO_SPLIT_K_ROWS > 0 the plan takes the first of the heuristic's algorithms (best first) whose
configuration has split-K 1 (reduction scheme NONE), and the heuristic's first when none has;
NO_SPLIT_K_ROWS = 0 takes the heuristic's first always. Which is faster only a GPU measurement
says (benchmarks/bench_decode_gpu.py --variants after-splitk,after-nosplitk); `plan_summary()`
lists what each case chose.

Layout as tensor/cuda/cublas.py (column-major library, row-major arrays): the row-major C (m, n)
is the column-major D (n, m) = B^T A^T, so cuBLASLt's "A" is our b and its "B" is our a. Its BIAS
epilogue adds a vector along D's rows (length n: one value per column of our C); BGRADB reduces
its B (our a) over the GEMM's k, one value per column of D (length m: one per row of our C).

Either returns None when fast paths are off (TINYGRAD_LM_FAST=0), cuBLASLt is missing or its heuristic offers no algorithm for this case
(shape, dtypes, alignment), and the caller takes the plain GEMM + a bias kernel instead
(tensor/cuda/linear.py). Per case (shapes, dtypes, epilogue, alignments) the descriptors and the
chosen algorithm are made once and kept; each call only sets the bias pointer and launches. The
handle and a 32 MiB workspace are made lazily, once per device. cublasLtMatmul is captured into
CUDA graphs like any kernel launch (the heuristic runs on the host, before or during capture).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np

from tensor import backend
from tensor.cuda import cublas
from tensor.cuda.common import loaded_library
from tensor.dispatch import fast_paths_enabled

# cublasLt.h (CUDA 12 and 13)
_DESC_POINTER_MODE, _DESC_TRANSA, _DESC_TRANSB = 2, 3, 4          # cublasLtMatmulDescAttributes_t
_DESC_EPILOGUE, _DESC_BIAS_POINTER, _DESC_BIAS_DATA_TYPE = 7, 8, 26
_EPILOGUE_BIAS, _EPILOGUE_GELU_BIAS, _EPILOGUE_BGRADB = 4, 36, 512  # cublasLtEpilogue_t (GELU_BIAS = GELU 32 | BIAS 4)
_CONFIG_SPLITK_NUM, _CONFIG_REDUCTION_SCHEME = 2, 3               # cublasLtMatmulAlgoConfigAttributes_t
_REDUCTION_NONE = 0                                               # cublasLtReductionScheme_t
_HEURISTICS = 16                                                  # algorithms asked of the heuristic per case
_PREF_MAX_WORKSPACE_BYTES = 1                                     # cublasLtMatmulPreferenceAttributes_t
_PREF_MIN_ALIGNMENT = {"a": 5, "b": 6, "c": 7, "d": 8}            # ..._MIN_ALIGNMENT_{A,B,C,D}_BYTES
_POINTER_MODE_HOST = 0
_OP_N, _OP_T = 0, 1
_WORKSPACE_BYTES = 32 << 20
_DTYPES = ("float16", "bfloat16", "float32")
NO_SPLIT_K_ROWS = 64   # products of at most this many rows avoid split-K algorithms (0: the heuristic's first)


class _Algo(ctypes.Structure):
    """cublasLtMatmulAlgo_t: uint64_t data[8]."""
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t: algo, size_t workspaceSize, cublasStatus_t state,
    float wavesCount, int reserved[4] (96 bytes)."""
    _fields_ = [("algo", _Algo), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


@functools.lru_cache(maxsize=None)
def _lib() -> Any:
    """libcublasLt through ctypes (the copy loaded with CuPy's libcublas, found as cublas.py finds
    libcublas), or None when it is not there."""
    try:
        cublas._lib()  # makes CuPy load libcublas, which loads libcublasLt
    except Exception:
        return None
    path = loaded_library("/libcublasLt.so")
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    P, I, U64, I64, S = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
    PP = ctypes.POINTER(ctypes.c_void_p)
    lib.cublasLtCreate.argtypes = [PP]
    lib.cublasLtMatmulDescCreate.argtypes = [PP, I, I]
    lib.cublasLtMatmulDescSetAttribute.argtypes = [P, I, P, S]
    lib.cublasLtMatrixLayoutCreate.argtypes = [PP, I, U64, U64, I64]
    lib.cublasLtMatmulPreferenceCreate.argtypes = [PP]
    lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [P, I, P, S]
    lib.cublasLtMatmulPreferenceDestroy.argtypes = [P]
    lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [P, P, P, P, P, P, P, I, ctypes.POINTER(_Heuristic),
                                                   ctypes.POINTER(ctypes.c_int)]
    lib.cublasLtMatmul.argtypes = [P, P, P, P, P, P, P, P, P, P, P, P, ctypes.POINTER(_Algo), P, S, P]
    lib.cublasLtMatmulAlgoConfigGetAttribute.argtypes = [ctypes.POINTER(_Algo), I, P, S, ctypes.POINTER(S)]
    for f in ("cublasLtCreate", "cublasLtMatmulDescCreate", "cublasLtMatmulDescSetAttribute",
              "cublasLtMatrixLayoutCreate", "cublasLtMatmulPreferenceCreate", "cublasLtMatmulPreferenceSetAttribute",
              "cublasLtMatmulPreferenceDestroy", "cublasLtMatmulAlgoGetHeuristic", "cublasLtMatmul",
              "cublasLtMatmulAlgoConfigGetAttribute"):
        getattr(lib, f).restype = I
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"tensor.cublaslt: {what} failed with cuBLAS status {status}")


_STATE: dict = {}   # device -> (handle, workspace array)


def _device_state(lib: Any, cp: Any) -> tuple[int, int, Any]:
    """(device, cuBLASLt handle, 32 MiB workspace) of the current device, made on first use."""
    dev = cp.cuda.runtime.getDevice()
    st = _STATE.get(dev)
    if st is None:
        h = ctypes.c_void_p()
        _check(lib.cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
        st = _STATE[dev] = (dev, h.value, cp.empty(_WORKSPACE_BYTES, dtype=np.uint8))
    return st


def _set(lib: Any, setter: str, obj: int, attr: int, value: Any) -> None:
    _check(getattr(lib, setter)(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"{setter}({attr})")


def _alignment(ptr: int) -> int:
    """The largest power of two (up to 256) dividing the address."""
    a = 256
    while a > 1 and ptr % a:
        a >>= 1
    return a


_PLANS: dict = {}   # case key -> (matmul desc, layouts A B D, algo, what was chosen) or None (no algorithm)


def choose_algorithm(configs: list[tuple[int, int]], avoid_split_k: bool) -> int:
    """Index of the algorithm to take among the heuristic's usable ones, best first, each given as
    (split-K number, reduction scheme), -1 where cuBLASLt did not say: the first, or with
    avoid_split_k the first that does not split k (split-K 0 or 1 and reduction scheme NONE), else
    the first."""
    if avoid_split_k:
        for i, (splits, scheme) in enumerate(configs):
            if 0 <= splits <= 1 and scheme == _REDUCTION_NONE:
                return i
    return 0


def _config(lib: Any, algo: Any, attr: int) -> int:
    """One uint32 configuration attribute of an algorithm, or -1 where cuBLASLt does not give it."""
    v, written = ctypes.c_uint32(0), ctypes.c_size_t(0)
    st = lib.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(v), ctypes.sizeof(v),
                                                  ctypes.byref(written))
    return int(v.value) if st == 0 else -1


def _plan(lib: Any, handle: int, key: tuple) -> Any:
    """Descriptors and the chosen algorithm (choose_algorithm over the heuristic's) for one case, or None."""
    (_, m, n, k, opa_lt, lda_lt, opb_lt, ldb_lt, t_in, t_out, t_bias, epilogue, aligns, compute, avoid) = key
    _, types = cublas._lib()
    desc = ctypes.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), compute, types["float32"]), "MatmulDescCreate")
    for attr, v in ((_DESC_POINTER_MODE, _POINTER_MODE_HOST), (_DESC_TRANSA, opa_lt), (_DESC_TRANSB, opb_lt)):
        _set(lib, "cublasLtMatmulDescSetAttribute", desc, attr, ctypes.c_int32(v))
    _set(lib, "cublasLtMatmulDescSetAttribute", desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
    _set(lib, "cublasLtMatmulDescSetAttribute", desc, _DESC_BIAS_DATA_TYPE, ctypes.c_int32(types[t_bias]))
    lay = []
    for (rows, cols, ld), t in zip(lt_layouts(m, n, k, opa_lt, lda_lt, opb_lt, ldb_lt), (t_in, t_in, t_out)):
        h = ctypes.c_void_p()
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(h), types[t], rows, cols, ld), "MatrixLayoutCreate")
        lay.append(h)
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
    _set(lib, "cublasLtMatmulPreferenceSetAttribute", pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(_WORKSPACE_BYTES))
    for name, al in zip("abcd", aligns):
        _set(lib, "cublasLtMatmulPreferenceSetAttribute", pref, _PREF_MIN_ALIGNMENT[name], ctypes.c_uint32(al))
    res, count = (_Heuristic * _HEURISTICS)(), ctypes.c_int(0)
    st = lib.cublasLtMatmulAlgoGetHeuristic(handle, desc, lay[0], lay[1], lay[2], lay[2], pref, _HEURISTICS,
                                            res, ctypes.byref(count))
    lib.cublasLtMatmulPreferenceDestroy(pref)
    found = res[:max(count.value, 0)] if st == 0 else []
    ok = [r for r in found if r.state == 0 and r.workspaceSize <= _WORKSPACE_BYTES]
    if not ok:
        return None  # (descriptors of a refused case are kept: a few bytes, once per case)
    configs = [(_config(lib, r.algo, _CONFIG_SPLITK_NUM), _config(lib, r.algo, _CONFIG_REDUCTION_SCHEME)) for r in ok]
    i = choose_algorithm(configs, avoid)
    info = {"m": m, "n": n, "k": k, "dtype": t_in, "epilogue": epilogue, "avoid_split_k": avoid,
            "first_split_k": configs[0][0], "chosen": i, "chosen_split_k": configs[i][0], "algorithms": len(ok)}
    return desc, lay, ok[i].algo, info


def plan_summary() -> list[dict]:
    """What each planned case (shape, dtype, epilogue) chose: the heuristic's first algorithm's split-K
    number, the index and split-K number of the one taken (for benchmarks and tuning)."""
    return [p[3] for p in _PLANS.values() if p is not None]


def lt_operands(a: Any, b: Any) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """For a (m, k) @ b (k, n) (any array with strides): ((op, ld) of cuBLASLt's A, (op, ld) of its
    B) in the column-major view, where Lt's A is our b and its B our a (a row-major operand is op N
    there, a column-major one op T, as in cublas.py); None when an operand needs a copy."""
    la, lb = cublas._layout(a), cublas._layout(b)
    if la is None or lb is None:
        return None
    return ((_OP_N if lb[0] else _OP_T), lb[1]), ((_OP_N if la[0] else _OP_T), la[1])


def lt_layouts(m: int, n: int, k: int, opa: int, lda: int, opb: int, ldb: int) -> list[tuple[int, int, int]]:
    """(rows, cols, ld) of the column-major layouts of Lt's A, B and D for our (m, k) @ (k, n): op(A)
    is (n, k), op(B) is (k, m), D is (n, m) (our row-major (m, n) result); a transposed operand is
    stored the other way round."""
    return [((k, n) if opa == _OP_T else (n, k)) + (lda,), ((m, k) if opb == _OP_T else (k, m)) + (ldb,), (n, m, n)]


def _supports(a: Any, b: Any, out_dtype: Any) -> bool:
    return (fast_paths_enabled() and cublas.usable(a, b) and a.dtype == b.dtype and a.ndim == 2 and b.ndim == 2
            and backend.dtype_name(a.dtype) in _DTYPES and backend.dtype_name(out_dtype) in _DTYPES
            and (np.dtype(out_dtype) == a.dtype or np.dtype(out_dtype) == np.float32))


def _run(a: Any, b: Any, out_dtype: Any, vec: Any, epilogue: int) -> Any:
    """The fused GEMM (see matmul_bias / matmul_bgrad; the caller checked _supports) or None when it
    does not apply."""
    if backend.dtype_name(vec.dtype) not in _DTYPES or vec.data.ptr % 16:
        return None  # (the epilogue's vector wants 16-byte alignment)
    lib = _lib()
    if lib is None:
        return None
    m, k, n = a.shape[0], a.shape[1], b.shape[1]
    if m == 0 or n == 0 or k == 0:
        return None
    ops = lt_operands(a, b)
    if ops is None:
        return None
    (opa_lt, lda_lt), (opb_lt, ldb_lt) = ops
    cp = backend.cupy_module()
    out = cp.ndarray((m, n), out_dtype)
    aligns = tuple(_alignment(x.data.ptr) for x in (b, a, out, out))
    dev, handle, ws = _device_state(lib, cp)
    key = (dev, m, n, k, opa_lt, lda_lt, opb_lt, ldb_lt, backend.dtype_name(a.dtype), backend.dtype_name(out.dtype),
           backend.dtype_name(vec.dtype), epilogue, aligns, cublas._compute_type(backend.dtype_name(a.dtype)),
           m <= NO_SPLIT_K_ROWS)
    if key not in _PLANS:
        _PLANS[key] = _plan(lib, handle, key)
    plan = _PLANS[key]
    if plan is None:
        return None
    desc, (la_h, lb_h, ld_h), algo, _ = plan
    _set(lib, "cublasLtMatmulDescSetAttribute", desc, _DESC_BIAS_POINTER, ctypes.c_void_p(vec.data.ptr))
    al, be = cublas._scalar(1.0, False), cublas._scalar(0.0, False)
    st = lib.cublasLtMatmul(handle, desc, al, b.data.ptr, la_h, a.data.ptr, lb_h, be, out.data.ptr, ld_h,
                            out.data.ptr, ld_h, ctypes.byref(algo), ws.data.ptr, _WORKSPACE_BYTES,
                            cp.cuda.get_current_stream().ptr)
    _check(st, f"cublasLtMatmul of {a.shape} @ {b.shape} ({a.dtype} -> {out.dtype}, epilogue {epilogue})")
    return out


def matmul_bias(a: Any, b: Any, bias: Any, out_dtype: Any = None, epilogue: int = _EPILOGUE_BIAS) -> Any:
    """a (m, k) @ b (k, n) + bias (n,) -> (m, n) in out_dtype (default a's dtype; float32 allowed for
    16-bit a, b), the bias added in float32 to the accumulator (it may be float32 or the out dtype);
    None when cuBLASLt does not take this case. (epilogue: BIAS, or GELU_BIAS for matmul_bias_gelu.)"""
    out_dtype = np.dtype(out_dtype or a.dtype)
    if (bias is None or not _supports(a, b, out_dtype) or not cublas.usable(bias) or bias.ndim != 1
            or bias.shape[0] != b.shape[1] or not bias._c_contiguous):
        return None
    y = _run(a, b, out_dtype, bias, epilogue)
    if y is None and bias.dtype != out_dtype:
        y = _run(a, b, out_dtype, bias.astype(out_dtype), epilogue)  # a bias in D's own dtype
    return y


def matmul_bias_gelu(a: Any, b: Any, bias: Any, out_dtype: Any = None) -> Any:
    """gelu(a (m, k) @ b (k, n) + bias (n,)) -> (m, n), GELU's tanh form applied to the float32
    accumulator plus bias before the one rounding to out_dtype; as matmul_bias otherwise (None when
    cuBLASLt does not take this case)."""
    return matmul_bias(a, b, bias, out_dtype, _EPILOGUE_GELU_BIAS)


def matmul_bgrad(a: Any, b: Any, out_dtype: Any = None, db_dtype: Any = np.float32) -> tuple[Any, Any] | None:
    """(a (m, k) @ b (k, n) -> (m, n) in out_dtype, a.sum(axis=1) (m,) in db_dtype) from one GEMM,
    or None when cuBLASLt does not take this case. For a Linear's backward, a = g^T (g (rows, out)),
    b = x (rows, in): dW and db together. db is written in db_dtype by the GEMM where cuBLASLt takes
    that; else in the inputs' dtype and cast (as PyTorch's autocast has a 16-bit bias gradient)."""
    out_dtype, db_dtype = np.dtype(out_dtype or a.dtype), np.dtype(db_dtype)
    if not _supports(a, b, out_dtype):
        return None
    cp = backend.cupy_module()
    for t in dict.fromkeys((db_dtype, a.dtype)):  # db in float32, else in the inputs' dtype and a cast
        if backend.dtype_name(t) not in _DTYPES:
            continue
        db = cp.ndarray((a.shape[0],), t)
        out = _run(a, b, out_dtype, db, _EPILOGUE_BGRADB)
        if out is not None:
            return out, (db if t == db_dtype else db.astype(db_dtype))
    return None
