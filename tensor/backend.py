"""Backends: NumPy on the CPU, CuPy on an NVIDIA GPU.

The backend rule (docs/DESIGN.md): op code is written once against the *array module*
of its inputs, `xp = array_module(x)`, so the same forward/backward runs on
`numpy.ndarray` and `cupy.ndarray`. This file is the only place that knows
about CuPy; the only global state is the default device and, with it, the precision of float32
GEMMs on the GPU (`set_tf32`, as PyTorch's `torch.backends.cuda.matmul.allow_tf32`).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

DEVICES = ("cpu", "cuda")
_default_device = "cpu"
_tf32 = False  # float32 GEMMs on the GPU's TF32 tensor cores (read by tensor/cuda/cublas.py)
_cupy: ModuleType | None = None


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the pyproject extra that brings it."""


def optional_module(name: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or raise MissingExtra naming the extra to install
    (`pip install 'tinygrad-lm[EXTRA]'`). The only dependency every path needs is NumPy."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingExtra(f"{purpose} needs the '{name}' package: pip install 'tinygrad-lm[{extra}]'") from e


def cupy_module() -> ModuleType:
    """Import CuPy, or fail with a message that names the extra to install."""
    global _cupy
    if _cupy is None:
        try:
            import cupy  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise RuntimeError(
                "device 'cuda' needs CuPy: pip install 'tinygrad-lm[cuda13]' "
                "(or [cuda12] for a CUDA 12 driver)") from e
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # pragma: no cover
            raise RuntimeError(f"device 'cuda': CuPy is installed but no NVIDIA GPU is usable ({e})") from e
        if n == 0:  # pragma: no cover
            raise RuntimeError("device 'cuda': CuPy is installed but no NVIDIA GPU was found")
        _cupy = cupy
    return _cupy


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    try:
        cupy_module()
        return True
    except RuntimeError:
        return False


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
    return device


def set_default_device(device: str, tf32: bool | None = None) -> None:
    """Set the device new tensors are created on when none is given ('cpu' or 'cuda');
    tf32 (when given) as set_tf32."""
    global _default_device
    check_device(device)
    if device == "cuda":
        cupy_module()
    _default_device = device
    if tf32 is not None:
        set_tf32(tf32)


def get_default_device() -> str:
    return _default_device


def set_tf32(enabled: bool) -> None:
    """float32 GEMMs on the GPU (cuBLAS) run on the TF32 tensor cores: inputs rounded to a 10-bit
    mantissa, float32 accumulation, ~1e-3 relative error; as PyTorch's allow_tf32. Off by default
    (exact float32). No effect on the CPU, nor on float16/bfloat16/float64 GEMMs."""
    global _tf32
    if not isinstance(enabled, bool):
        raise TypeError(f"set_tf32: expected True or False, got {enabled!r}")
    _tf32 = enabled


def tf32_enabled() -> bool:
    """Whether float32 GEMMs on the GPU run in TF32 (set_tf32)."""
    return _tf32


def array_module(x: Any) -> ModuleType:
    """numpy for NumPy arrays (and anything else), cupy for CuPy arrays."""
    if type(x) is np.ndarray:
        return np
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy
    if type(x).__module__.startswith("cupy"):  # a CuPy array made before we imported CuPy
        return cupy_module()
    return np


_DTYPE_NAMES: dict = {}


def dtype_name(dtype: Any) -> str:
    """np.dtype(...).name, memoised: the `.name` property builds a string on every call
    (~2 us), and the GPU hot paths ask it hundreds of times a step."""
    n = _DTYPE_NAMES.get(dtype)
    if n is None:
        n = _DTYPE_NAMES[dtype] = np.dtype(dtype).name
    return n


def device_of(x: Any) -> str:
    return "cuda" if array_module(x) is not np else "cpu"


def to_device(x: Any, device: str) -> Any:
    """Move an array to `device`; returns it unchanged when already there."""
    check_device(device)
    if device == "cpu":
        if array_module(x) is not np:
            return device_to_host(x)
        return x
    cp = cupy_module()
    return x if isinstance(x, cp.ndarray) else cp.asarray(x)


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy copy (or view, for CPU arrays) of any backend's array."""
    return to_device(x, "cpu")


# Every device->host copy goes through this one function, so tests can count them
# (a training step on the GPU should synchronise only when it logs the loss).
def device_to_host(x: Any) -> np.ndarray:
    """Copy a CuPy array to the host (this waits for the GPU)."""
    return cupy_module().asnumpy(x)


def as_array(data: Any, dtype: Any, device: str | None) -> Any:
    """Arrays keep their device unless `device` is given; other data goes to the default device."""
    is_array = isinstance(data, np.ndarray) or device_of(data) == "cuda"
    if is_array:
        arr = data
    else:
        arr = np.asarray(data)
        if dtype is None and arr.dtype == np.float64 and not isinstance(data, np.generic):
            arr = arr.astype(np.float32)  # Python floats and lists default to float32
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    target = device or (device_of(arr) if is_array else get_default_device())
    return to_device(arr, target)


def tune_host_allocator() -> bool:
    """Keep freed large arrays in the process heap instead of returning them to the OS.

    glibc's malloc serves big blocks (NumPy temporaries of a training step) with mmap and
    gives them back on free, so the next step's temporaries page-fault their memory in
    again: a training step spent ~30% of its time there (benchmarks/RESULTS.md). Raising
    M_MMAP_THRESHOLD and M_TRIM_THRESHOLD makes malloc reuse them, as a caching allocator
    would. Linux/glibc only; a no-op elsewhere or with TINYGRAD_LM_MALLOPT=0. An explicit call,
    once per process (the trainer and the CLI make it; importing `tensor` does not: no side
    effects at import). Returns whether the setting was applied.
    """
    import os
    import sys
    if os.environ.get("TINYGRAD_LM_MALLOPT", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False


class HostToDevice:
    """Asynchronous host -> GPU copies, staged through pinned (page-locked) memory.

    A copy from ordinary (pageable) host memory makes the GPU finish everything queued
    before it starts, so a training step that uploads its batch (or the optimizer's small
    tables) would wait for the previous step's kernels. From pinned memory the copy is
    queued like a kernel. Each pinned buffer is kept until its copy has completed (an
    event), so it is never reused while the GPU still reads it. One instance per owner.
    """

    def __init__(self) -> None:
        self._inflight: list = []

    def __call__(self, x: np.ndarray) -> Any:
        cp = cupy_module()
        import cupyx
        self._inflight = [(done, buf) for done, buf in self._inflight if not done.done]
        x = np.ascontiguousarray(x)
        pinned = cupyx.empty_pinned(x.shape, x.dtype)
        pinned[...] = x
        out = cp.empty(x.shape, x.dtype)
        stream = cp.cuda.get_current_stream()
        out.set(pinned, stream=stream)
        self._inflight.append((stream.record(), pinned))
        return out
