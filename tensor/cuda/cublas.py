"""Matrix products on the GPU straight through cuBLAS (gemmEx / gemmStridedBatchedEx).

Why not `cupy.matmul`: CuPy copies an operand whose batches are not laid out the way it
expects (a transposed batch of keys, a head sliced out of the fused qkv buffer), has no
batched bfloat16 product, and always returns the inputs' dtype. Here:

  * an operand is used in place whenever its last two axes are row-major or column-major
    (unit stride on one of them) and its batch axes collapse to one stride -- transposes
    become cuBLAS's op flags, not copies;
  * 16-bit inputs multiply on the tensor cores with float32 accumulation, and the result
    may be float32 (`out_dtype`), e.g. a weight gradient that goes straight to the
    float32 master weights, with no cast kernel;
  * `out=` (with beta) writes into a given buffer, e.g. a slice of a larger gradient.

cuBLAS is column-major; a row-major (m, n) matrix is its transpose there, so C = A B is
computed as C^T = B^T A^T: the operands swap places and the "transposed" flags follow
from each operand's layout. float32 runs as plain float32 (no TF32), like PyTorch's default;
with `tensor.backend.set_tf32(True)` (`--tf32`, as PyTorch's allow_tf32) a float32 product uses
the compute type CUBLAS_COMPUTE_32F_FAST_TF32: the tensor cores, inputs rounded to TF32.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from tensor import backend
from tensor.cuda.common import loaded_library

_OP_N, _OP_T = 0, 1          # cublasOperation_t
_COMPUTE_32F, _COMPUTE_64F, _COMPUTE_32F_FAST_TF32 = 68, 70, 77   # cublasComputeType_t
_ALGO_DEFAULT = -1


@functools.lru_cache(maxsize=None)
def _lib() -> tuple:
    """(cuBLAS's C entry points through ctypes, CUDA data-type codes).

    We call libcublas directly rather than through CuPy's wrappers because CuPy refuses any
    cuBLAS call while a stream is being captured into a CUDA graph (nn/cuda_graph.py); the
    library itself supports capture, given a workspace of our own (set once per handle)."""
    import ctypes
    cp = backend.cupy_module()  # the clear "install the cuda extra" error when CuPy is missing
    from cupy_backends.cuda.api import runtime
    cp.cuda.device.get_cublas_handle()  # makes CuPy load libcublas
    path = loaded_library("/libcublas.so")  # the copy CuPy loaded (CUDA toolkit or pip wheel)
    if path is None:
        raise RuntimeError("tensor.cublas: libcublas is not loaded in this process (is CuPy's CUDA set up?)")
    lib = ctypes.CDLL(path)
    P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.cublasGemmEx.argtypes = [P, I, I, I, I, I, P, P, I, I, P, I, I, P, P, I, I, I, I]
    lib.cublasGemmStridedBatchedEx.argtypes = [P, I, I, I, I, I, P, P, I, I, L, P, I, I, L, P, P, I, I, L, I, I, I]
    lib.cublasSetStream_v2.argtypes = [P, P]
    lib.cublasSetWorkspace_v2.argtypes = [P, P, ctypes.c_size_t]
    types = {"float16": runtime.CUDA_R_16F, "bfloat16": runtime.CUDA_R_16BF,
             "float32": runtime.CUDA_R_32F, "float64": runtime.CUDA_R_64F}
    return lib, types


_WORKSPACE_BYTES = 32 << 20   # as PyTorch gives cuBLAS on Hopper
_WORKSPACES: dict = {}        # handle -> our workspace array (kept alive while the handle lives)


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"tensor.cublas: {what} failed with cuBLAS status {status}")


def _handle(lib: Any, cp: Any) -> int:
    """CuPy's cuBLAS handle of the current device, bound to the current stream, with our workspace."""
    handle = cp.cuda.device.get_cublas_handle()
    if handle not in _WORKSPACES:
        ws = _WORKSPACES[handle] = cp.empty(_WORKSPACE_BYTES, dtype=np.uint8)
        _check(lib.cublasSetWorkspace_v2(handle, ws.data.ptr, _WORKSPACE_BYTES), "cublasSetWorkspace")
    _check(lib.cublasSetStream_v2(handle, cp.cuda.get_current_stream().ptr), "cublasSetStream")
    return handle


_SCALARS: dict = {}


def _scalar(value: float, double: bool) -> int:
    """Host pointer to alpha/beta (the array is kept alive in a small memo; cuBLAS reads the
    value at call time, with the default host pointer mode)."""
    key = (value, double)
    hit = _SCALARS.get(key)
    if hit is None:
        a = np.array(value, dtype=np.float64 if double else np.float32)
        hit = _SCALARS[key] = (a, a.ctypes.data)
    return hit[1]


def _layout(x: Any) -> tuple[bool, int] | None:
    """(row_major, leading dimension in elements) of the matrix in x's last two axes, or None
    when neither axis has unit stride (then the operand must be copied)."""
    m, n = x.shape[-2], x.shape[-1]
    isz = x.itemsize
    s0, s1 = x.strides[-2] // isz, x.strides[-1] // isz
    if s1 == 1 or n == 1:
        ld = s0 if m > 1 else n
        if ld >= max(n, 1):
            return True, ld
    if s0 == 1 or m == 1:
        ld = s1 if n > 1 else m
        if ld >= max(m, 1):
            return False, ld
    return None


def _batch_stride(x: Any, batch: tuple) -> int | None:
    """One stride (elements) that walks x's batch axes in row-major order (0 when x is the
    same matrix for every batch); None when they do not collapse or broadcast only partly
    (then the operand is copied)."""
    lead = x.shape[:-2]
    if all(n == 1 for n in lead):
        return 0
    if tuple(lead) != tuple(batch):
        return None
    base = step = None
    for n, s in zip(reversed(lead), reversed(x.strides[:-2])):
        if n == 1:
            continue
        s //= x.itemsize
        if step is None:
            base = s
        elif s != step:
            return None
        step = s * n
    return base


_GEMM_DTYPES = ("float16", "bfloat16", "float32", "float64")


def usable(*arrays: Any) -> bool:
    """True when every array is a CuPy float16/bfloat16/float32/float64 array (cuBLAS applies)."""
    for a in arrays:
        if type(a) is np.ndarray or backend.array_module(a) is np:
            return False
        if backend.dtype_name(a.dtype) not in _GEMM_DTYPES:
            return False
    return True


def _compute_type(dtype: str) -> int:
    """cuBLAS compute type for inputs of `dtype`: float64 in float64; float32 in float32, or TF32 when
    backend.tf32_enabled(); 16-bit inputs in float32 (the tensor cores, float32 accumulation)."""
    if dtype == "float64":
        return _COMPUTE_64F
    if dtype == "float32" and backend.tf32_enabled():
        return _COMPUTE_32F_FAST_TF32
    return _COMPUTE_32F


def matmul(a: Any, b: Any, out_dtype: Any = None, out: Any = None, alpha: float = 1.0, beta: float = 0.0) -> Any:
    """alpha * a @ b (+ beta * out) for CuPy arrays a (..., m, k), b (..., k, n) -> (..., m, n).

    a and b share one dtype; the result has out_dtype (default: the inputs' dtype; float32
    is allowed for 16-bit inputs). Batch axes broadcast. out: a (..., m, n) buffer with
    row-major matrices (its rows may be strided, e.g. a slice) to write into.
    """
    cublas, types = _lib()
    cp = backend.cupy_module()
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"cublas.matmul: expected a (..., m, k) and b (..., k, n), got {a.shape} and {b.shape}")
    if a.dtype != b.dtype:
        raise TypeError(f"cublas.matmul: operands must share a dtype, got {a.dtype} and {b.dtype}")
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    ba, bb = a.shape[:-2], b.shape[:-2]
    batch = ba if ba == bb or not bb else (bb if not ba else np.broadcast_shapes(ba, bb))
    count = math.prod(batch)
    out_dtype = np.dtype(out_dtype or (out.dtype if out is not None else a.dtype))
    if out is None:
        out = cp.ndarray(batch + (m, n), out_dtype)  # (the constructor: cupy.empty's wrapper costs as much again)
    elif out.shape != batch + (m, n) or out.dtype != out_dtype:
        raise ValueError(f"cublas.matmul: out must be {batch + (m, n)} {out_dtype}, got {out.shape} {out.dtype}")
    if m == 0 or n == 0 or count == 0:
        return out
    if k == 0:
        out[...] = 0 if beta == 0 else out * beta
        return out
    ops = []
    for x in (a, b):
        lay, stride = _layout(x), (_batch_stride(x, batch) if count > 1 else 0)
        if lay is None or stride is None:
            x = cp.ascontiguousarray(cp.broadcast_to(x, batch + x.shape[-2:]))
            lay, stride = _layout(x), _batch_stride(x, batch)
        ops.append((x, lay, stride))
    (a, (a_rm, lda), sa), (b, (b_rm, ldb), sb) = ops
    c_lay, sc = _layout(out), (_batch_stride(out, batch) if count > 1 else 0)
    if c_lay is None or not c_lay[0] or sc is None or (count > 1 and sc == 0):
        raise ValueError("cublas.matmul: out must hold row-major matrices with one batch stride")
    ldc = c_lay[1]
    double = a.dtype == np.float64
    compute = _compute_type(backend.dtype_name(a.dtype))
    handle = _handle(cublas, cp)
    # column-major view: C^T (n, m) = B^T (n, k) A^T (k, m); a row-major operand is already
    # its transpose there (op N), a column-major one needs op T
    opb, opa = (_OP_N if b_rm else _OP_T), (_OP_N if a_rm else _OP_T)
    al, be = _scalar(alpha, double), _scalar(beta, double)
    ta, tc = types[backend.dtype_name(a.dtype)], types[backend.dtype_name(out_dtype)]
    if count == 1:
        st = cublas.cublasGemmEx(handle, opb, opa, n, m, k, al, b.data.ptr, ta, ldb, a.data.ptr, ta, lda, be,
                                 out.data.ptr, tc, ldc, compute, _ALGO_DEFAULT)
    else:
        st = cublas.cublasGemmStridedBatchedEx(handle, opb, opa, n, m, k, al, b.data.ptr, ta, ldb, sb, a.data.ptr,
                                               ta, lda, sa, be, out.data.ptr, tc, ldc, sc, count, compute,
                                               _ALGO_DEFAULT)
    _check(st, f"GEMM of {a.shape} @ {b.shape} ({a.dtype} -> {out_dtype})")
    return out
