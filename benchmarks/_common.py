"""Shared helpers for the benchmarks: thread limits, machine info, timing, JSON output.

Every benchmark prints one JSON object on stdout. Run them from the repository root
with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset (they can force a slower OpenBLAS
kernel), e.g.  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_mlp.py
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

# make `import tensor` work when run as `python benchmarks/bench_x.py`
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

_limiter = None


def set_threads(n: int) -> None:
    """Use `n` threads in NumPy's BLAS (threadpoolctl, when installed: it is not a dependency of
    ours) and, if imported, in PyTorch."""
    global _limiter
    try:
        from threadpoolctl import threadpool_limits
        _limiter = threadpool_limits(limits=n)  # kept alive: the limit holds for the whole run
    except ImportError:
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict:
    """CPU, core count, NumPy + its BLAS (which kernel runs), torch, thread count."""
    import numpy as np
    try:
        from threadpoolctl import threadpool_info
        blas: Any = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "threading_layer")}
                     for d in threadpool_info() if d.get("user_api") == "blas"]
    except ImportError:
        blas = "unknown (threadpoolctl not installed)"
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_blas": blas,
        "threads": threads,
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),  # other processes on the same cores?
        "env_OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "env_OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def bench(fn: Callable[[], Any], min_time: float = 0.2, repeats: int = 7, warmup: int = 3) -> dict:
    """Time `fn()`: calibrate a loop count so one repeat lasts ~min_time/repeats... then
    report per-call seconds as min and median over `repeats` repeats."""
    for _ in range(warmup):
        fn()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time / repeats or n >= 1 << 20:
            break
        n *= 2 if dt == 0 else max(2, min(10, int(min_time / repeats / dt) + 1))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return {"min_s": min(times), "median_s": statistics.median(times), "loops": n, "repeats": repeats}


def settle(f: Callable[[], Any], seconds: float = 0.02, calls: int = 2) -> None:
    """Run f untimed for a moment. After switching between NumPy (OpenBLAS pthreads) and
    PyTorch (OpenMP), the other library's worker threads still spin-wait for a few ms and,
    on 2 cores, make the first calls up to 100x slower (measured: 33 us -> 2.6 ms)."""
    t0 = time.perf_counter()
    i = 0
    while i < calls or time.perf_counter() - t0 < seconds:
        f()
        i += 1


def interleaved(fns: dict, min_time: float = 0.3, repeats: int = 9, warmup: int = 3) -> dict:
    """Time several callables with their repeats interleaved (A B C A B C ...), so slow
    drift of the machine (other processes, frequency) hits all of them alike. Each timed
    block is preceded by an untimed `settle` (see there)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    loops = {}
    for k, f in fns.items():
        settle(f)
        loops[k] = bench(f, min_time=min_time / 3, repeats=1, warmup=0)["loops"]
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            n = loops[k]
            settle(f)
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            times[k].append((time.perf_counter() - t0) / n)
    return {k: {"min_s": min(v), "median_s": statistics.median(v), "loops": loops[k], "repeats": repeats}
            for k, v in times.items()}


def event_timer(sync: Callable[[], Any], event: Callable[[], Any], elapsed: Callable[[Any, Any], float],
                rounds: int = 3, warmup: int = 3, median: bool = False) -> Callable[..., float]:
    """time_ms(fn, reps=20): a GPU call's milliseconds, the best (median=True: the median) of `rounds`
    rounds of `reps` calls between two recorded events (after `warmup` calls). sync / event / elapsed: the
    library's device synchronise, event factory and elapsed-ms, so CuPy and PyTorch are timed alike:
        event_timer(cp.cuda.Device().synchronize, cp.cuda.Event, cp.cuda.get_elapsed_time)
        event_timer(torch.cuda.synchronize, lambda: torch.cuda.Event(enable_timing=True), lambda a, b: a.elapsed_time(b))"""
    def time_ms(fn: Callable[[], Any], reps: int = 20) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rounds):
            sync()
            a, b = event(), event()
            a.record()
            for _ in range(reps):
                fn()
            b.record()
            b.synchronize()
            times.append(elapsed(a, b) / reps)
        return statistics.median(times) if median else min(times)
    return time_ms


def us(seconds: float) -> float:
    return round(seconds * 1e6, 2)


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def emit(obj: dict, path: str | None = None) -> None:
    """Print the result as JSON (and also write it to `path` when given)."""
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
    json.dump(obj, sys.stdout, indent=1)
    sys.stdout.write("\n")


def git_rev() -> str:
    """The commit the numbers belong to (+ "-dirty" when the working tree has changes)."""
    import subprocess
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"
