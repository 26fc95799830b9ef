"""What every CUDA fast path shares: whether a kernel applies to these arrays, CuPy itself,
uninitialised outputs, the C types of our dtypes and a launch size."""
from __future__ import annotations

from typing import Any

import numpy as np

from tensor import backend
from tensor.dispatch import fast_paths_enabled

FLOATS = ("float16", "bfloat16", "float32")  # float64 (gradcheck) takes the exact reference path
CTYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
ACC = {"float16": "float", "bfloat16": "float", "float32": "float", "float64": "double"}


def usable(*arrays: Any, contiguous: bool = True) -> bool:
    """True when every array is a (contiguous, unless told otherwise) CuPy float16/bfloat16/
    float32 array and fast paths are on (tensor/dispatch.py)."""
    for a in arrays:
        if a is None:
            continue
        if type(a) is np.ndarray or backend.array_module(a) is np:  # the CPU: never a CUDA kernel
            return False
        if backend.dtype_name(a.dtype) not in FLOATS or (contiguous and not a._c_contiguous):
            return False
    return fast_paths_enabled()


def cupy() -> Any:
    return backend.cupy_module()


def empty(shape: Any, dtype: Any) -> Any:
    """An uninitialised C-contiguous CuPy array (the ndarray constructor: cupy.empty's Python
    wrapper costs as much again on the host, and these run hundreds of times a step)."""
    return cupy().ndarray(shape, dtype)


GRID_THREADS = 256      # threads per block of a grid-stride elementwise kernel
GRID_MAX_BLOCKS = 132 * 16  # H200: 132 SMs x 16 blocks; more items than the grid loop in its stride


def grid_blocks(items: int) -> int:
    """Blocks of GRID_THREADS for a grid-stride loop over `items` (one per thread), at most GRID_MAX_BLOCKS."""
    return max(1, min(GRID_MAX_BLOCKS, -(-items // GRID_THREADS)))


def element_strides(a: Any) -> tuple:
    """An array's strides counted in elements instead of bytes."""
    return tuple(s // a.itemsize for s in a.strides)


def threads(n: int) -> int:
    """Threads per block for a row of n items: a power of two in [32, 256]."""
    return int(min(256, max(32, 1 << (max(n, 1) - 1).bit_length())))


def loaded_library(fragment: str) -> str | None:
    """The path of the shared library this process has loaded whose file name contains `fragment`
    (e.g. "/libcublas.so": the copy CuPy loaded, CUDA toolkit or pip wheel), from /proc/self/maps; or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            name = line.rsplit(None, 1)[-1]
            if fragment in name:
                return name
    return None


def views_fit(*arrays: Any) -> bool:
    """Whether a kernel of 16-byte row loads (flash attention, decode attention) addresses these (B, H, T, D)
    arrays as they lie: D contiguous, every row 16-byte aligned (the pointer and the batch, head and row
    strides multiples of 16 bytes, none negative), the row stride within int32."""
    for a in arrays:
        st, ptr = a.strides, a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr   # (NumPy: the CPU tests)
        if a.ndim != 4 or st[3] != a.itemsize or ptr % 16 or any(x < 0 or x % 16 for x in st[:3]):
            return False
        if st[2] // a.itemsize >= 2**31:
            return False
    return True
