"""Backends: NumPy on the CPU, CuPy on an NVIDIA GPU.

The backend rule (docs/DESIGN.md): op code is written once against the *array module*
of its inputs, `xp = array_module(x)`, so the same forward/backward runs on
`numpy.ndarray` and `cupy.ndarray`. This file is the only place that knows
about CuPy; the only global state is the default device and, with it, the precision of float32
GEMMs on the GPU (`set_tf32`, as PyTorch's `torch.backends.cuda.matmul.allow_tf32`).
"""
from __future__ import annotations

import functools
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


BLAS_WAIT_LOG2 = 16  # tune_blas_wait's default: idle OpenBLAS workers sleep after 2^16 cycles (~25 µs)


@functools.lru_cache(maxsize=None)
def _openblas() -> Any:
    """The OpenBLAS library NumPy loaded into this process (found in /proc/self/maps, Linux), or None
    (another BLAS, another OS, or an OpenBLAS without the thread-server entry points). Looked up once."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if all(hasattr(lib, s) for s in ("openblas_read_env", "blas_thread_shutdown_", "blas_thread_init")):
            return lib
    return None


class BlasThreads:
    """OpenBLAS's thread count for the calls that follow (process-wide; ~0.5 µs a change).

    `BlasThreads.find()` is None where NumPy's BLAS is not OpenBLAS. The CPU decoder
    (tinygrad_lm/decode_cpu.py) runs its small BLAS calls (a head's scores and output, a
    LayerNorm's means) on one thread and its weight products on all: OpenBLAS splits a product
    over its threads from ~9,000 multiply-adds on, and for a 64 x 256 score row the hand-off to
    a worker costs more than the product."""

    _PREFIXES = ("openblas_", "scipy_openblas_")
    _SUFFIXES = ("64_", "_64_", "")

    def __init__(self, get: Any, set_: Any) -> None:
        self._get, self._set = get, set_

    @classmethod
    def find(cls) -> "BlasThreads | None":
        import ctypes
        lib = _openblas()
        if lib is None:
            return None
        for pre in cls._PREFIXES:
            for suf in cls._SUFFIXES:
                get, set_ = (getattr(lib, f"{pre}{op}_num_threads{suf}", None) for op in ("get", "set"))
                if get is not None and set_ is not None:
                    get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                    return cls(get, set_)
        return None

    def get(self) -> int:
        return int(self._get())

    def set(self, n: int) -> None:
        self._set(int(n))


def tune_blas_wait(log2_cycles: int | None = None) -> bool:
    """Let OpenBLAS's idle worker threads sleep after 2^log2_cycles cycles without work (4..30).

    After each threaded product, OpenBLAS keeps its workers spinning for 2^28 cycles (~0.1 s) in
    case another product follows. The CPU decoder (tinygrad_lm/decode_cpu.py) runs half of a
    large batch's attention on a thread of its own between the products; a worker spinning on the
    core that thread needs slows the attention and the step (benchmarks/RESULTS.md:
    bench_decode_cpu_threads.py). A short wait frees the core; a product then wakes its worker.

    OpenBLAS reads the setting (the OPENBLAS_THREAD_TIMEOUT environment variable) when it starts
    its threads: this sets the variable and restarts them. Call it once, before other threads use
    BLAS (the sample CLI does; importing `tensor` does not: no side effects at import). None: the
    default BLAS_WAIT_LOG2, unless OPENBLAS_THREAD_TIMEOUT is already set (the user's choice stands);
    a no-op with TINYGRAD_LM_BLAS_WAIT=0 or without OpenBLAS. Returns whether the setting was applied.
    """
    import os
    if os.environ.get("TINYGRAD_LM_BLAS_WAIT", "1") == "0":
        return False
    if log2_cycles is None:
        if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
            return False
        log2_cycles = BLAS_WAIT_LOG2
    if not 4 <= int(log2_cycles) <= 30:
        raise ValueError(f"tune_blas_wait: log2_cycles must be in 4..30 (OpenBLAS's range), got {log2_cycles}")
    lib = _openblas()
    if lib is None:
        return False
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(int(log2_cycles))
    lib.openblas_read_env()
    lib.blas_thread_shutdown_()
    lib.blas_thread_init()
    return True


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
