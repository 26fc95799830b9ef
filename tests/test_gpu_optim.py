"""The GPU fast paths of the optimizer, gradient clipping and the loss scaler against their
references: tensor/cuda/adam.py (adam_step, adam_multi) and tensor/cuda/clip.py
(sum_of_squares_multi, clip_multi, unscale_multi). Skipped cleanly without CuPy and a GPU.

The kernels compute in double and round once, so one step from given moments is the float64
formula (evaluated here on the host) rounded to the storage dtype: within half a unit in the
last place. Many steps are compared with the reference chain of array calls on the GPU
(TINYGRAD_LM_FAST=0), which rounds after every call.
"""
from __future__ import annotations

import math

import numpy as np

from tensor import dispatch
import pytest

from tensor import backend

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and an NVIDIA GPU")]

ULP = {"float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}  # spacing at 1.0
TINY = {"float32": 2.0 ** -126, "float16": 2.0 ** -14, "bfloat16": 2.0 ** -126}  # smallest normal


def _dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _f64(a) -> np.ndarray:
    return backend.to_numpy(a).astype(np.float64)


def _state(rng, n: int, dt):
    """p, g, m, v on the host in dtype dt (v > 0, as after some steps)."""
    p = rng.standard_normal(n).astype(dt)
    g = (rng.standard_normal(n) * 0.1).astype(dt)
    m = (rng.standard_normal(n) * 0.05).astype(dt)
    v = (rng.random(n) * 0.01 + 1e-4).astype(dt)
    return p, g, m, v


def _within_half_ulp(got: np.ndarray, want: np.ndarray, dtype: str, what: str) -> None:
    """|got - want| <= one spacing of the dtype at |want| (half an ulp from rounding, slack for
    want itself being near a power of two); subnormals have the spacing of the smallest normal."""
    spacing = ULP[dtype] * np.maximum(np.abs(want), TINY[dtype])
    worst = np.max(np.abs(got - want) / spacing)
    assert worst <= 1.0, f"{what} ({dtype}): off by {worst:.2f} ulp"


# ====================================================================== adam_step (one parameter)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("decay", [1.0, 1.0 - 1e-2 * 0.1])
def test_adam_kernel_one_step_is_the_float64_formula_rounded_once(dtype: str, decay: float) -> None:
    from nn.optim import adam_reference
    from tensor.cuda import adam as cuda_adam
    rng = np.random.default_rng(0)
    host = _state(rng, 3 * 4096 + 7, _dtype(dtype))
    dev = [backend.to_device(a.copy(), "cuda") for a in host]
    assert cuda_adam.supports(*dev)
    lr, b1, b2, eps, t = 1e-2, 0.9, 0.95, 1e-8, 7
    cuda_adam.adam_step(dev[0], dev[1], dev[2], dev[3], lr, b1, b2, eps, t, decay)
    want = [a.astype(np.float64) for a in host]
    adam_reference(want[0], want[1], want[2], want[3], lr, b1, b2, eps, t, decay)
    for name, i in (("p", 0), ("m", 2), ("v", 3)):
        _within_half_ulp(_f64(dev[i]), want[i], dtype, name)
    np.testing.assert_array_equal(backend.to_numpy(dev[1]), host[1])   # g untouched


def test_adam_kernel_many_steps_close_to_the_reference_chain(monkeypatch) -> None:
    """float32, 20 steps: the fused kernel and the reference's array calls on the GPU (each
    rounding to float32) stay within float32 round-off of each other."""
    from nn.optim import adam_reference
    from tensor.cuda import adam as cuda_adam
    rng = np.random.default_rng(1)
    n = 50000
    p0 = rng.standard_normal(n).astype(np.float32)
    runs = []
    for step in (cuda_adam.adam_step, adam_reference):
        p, m, v = (backend.to_device(a, "cuda") for a in (p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)))
        grads = np.random.default_rng(2)
        for t in range(1, 21):
            g = backend.to_device(grads.standard_normal(n).astype(np.float32), "cuda")
            step(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, t, 1.0 - 1e-3 * 0.1)
        runs.append([_f64(a) for a in (p, m, v)])
    for name, a, b in zip("pmv", *runs):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7, err_msg=name)


# ====================================================================== adam_multi (many parameters)
def test_adam_multi_equals_adam_step_per_tensor() -> None:
    from tensor.cuda import adam as cuda_adam
    rng = np.random.default_rng(3)
    sizes = [3 * cuda_adam.CHUNK + 5, 1, 0, 1000, cuda_adam.CHUNK]     # several chunks, tiny, empty, exact
    hyper = [(1e-3, 0.99, 0.9, 0.999, 1e-8, 3), (0.1, 1.0, 0.8, 0.95, 1e-6, 1), (1e-2, 0.9, 0.9, 0.99, 1e-8, 2),
             (3e-4, 1.0, 0.0, 0.999, 1e-8, 10), (1e-3, 0.999, 0.9, 0.999, 1e-3, 100)]
    host = [_state(rng, n, np.float32) for n in sizes]
    multi = [[backend.to_device(a.copy(), "cuda") for a in h] for h in host]
    single = [[backend.to_device(a.copy(), "cuda") for a in h] for h in host]
    assert all(cuda_adam.supports_multi(*arrays) for arrays in multi)
    cuda_adam.adam_multi([(*arrays, *hp) for arrays, hp in zip(multi, hyper)])
    for (p, g, m, v), (lr, decay, b1, b2, eps, t) in zip(single, hyper):
        cuda_adam.adam_step(p, g, m, v, lr, b1, b2, eps, t, decay)
    for i, (a, b) in enumerate(zip(multi, single)):
        for name, j in (("p", 0), ("m", 2), ("v", 3)):
            np.testing.assert_allclose(_f64(a[j]), _f64(b[j]), rtol=2.4e-7, atol=0, err_msg=f"tensor {i} {name}")
    cuda_adam.adam_multi([])                                           # nothing to do: no launch


def test_adam_multi_misaligned_arrays_take_the_scalar_loop() -> None:
    """Arrays 4 bytes off a 16-byte boundary (slices [1:]) cannot take the 16-byte loads: same result."""
    from tensor.cuda import adam as cuda_adam
    host = _state(np.random.default_rng(4), cuda_adam.CHUNK + 7, np.float32)
    multi = [backend.to_device(a.copy(), "cuda")[1:] for a in host]
    single = [backend.to_device(a.copy(), "cuda")[1:] for a in host]
    assert multi[0].data.ptr % 16 == 4 and cuda_adam.supports_multi(*multi)
    cuda_adam.adam_multi([(*multi, 1e-3, 0.99, 0.9, 0.999, 1e-8, 3)])
    cuda_adam.adam_step(*single, 1e-3, 0.9, 0.999, 1e-8, 3, 0.99)
    for name, j in (("p", 0), ("m", 2), ("v", 3)):
        np.testing.assert_allclose(_f64(multi[j]), _f64(single[j]), rtol=2.4e-7, atol=0, err_msg=name)


@pytest.mark.parametrize("cls, wd", [("AdamW", 0.1), ("Adam", 0.1), ("Adam", 0.0)])
def test_optimizer_on_the_gpu_equals_the_cpu_and_the_reference(cls: str, wd: float, monkeypatch) -> None:
    """float32 parameters on the GPU go through adam_multi (one launch), 16-bit ones through
    adam_step; both against the CPU's float32 result (its fast path equals the reference) and
    against the reference chain on the GPU (TINYGRAD_LM_FAST=0)."""
    import nn.optim
    from nn.module import Parameter
    shapes = [(300, 257), (257,), (5, 3)]

    def run(device: str, dtype=np.float32) -> list:
        rng = np.random.default_rng(4)
        ps = [Parameter(rng.standard_normal(s).astype(dtype), device=device) for s in shapes]
        opt = getattr(nn.optim, cls)(ps, lr=1e-2, weight_decay=wd)
        for _ in range(5):
            for p in ps:
                p.grad = backend.to_device(rng.standard_normal(p.shape).astype(dtype), device)
            opt.step()
        assert not getattr(opt, "_pending", [])
        return [_f64(p.data) for p in ps]

    cpu, gpu = run("cpu"), run("cuda")
    monkeypatch.setattr(dispatch, "_env_fast", False)
    ref = run("cuda")
    monkeypatch.setattr(dispatch, "_env_fast", True)
    for a, b, c in zip(cpu, gpu, ref):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-6)
    if cls == "AdamW":  # 16-bit parameters on the GPU (adam_step, decay included); Adam's g + wd*p
        import ml_dtypes  # would be CuPy arithmetic on bfloat16, which mixed precision never needs
        low = run("cuda", ml_dtypes.bfloat16)
        high = run("cpu", np.float64)
        for a, b in zip(low, high):
            np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05)


def test_adamw_decay_reaches_16_bit_gpu_parameters() -> None:
    """AdamW on bfloat16 GPU parameters (adam_step, not the float32 multi-tensor launch) applies
    p *= 1 - lr*wd: one step with a strong decay against the float64 formula."""
    import ml_dtypes
    from nn.module import Parameter
    from nn.optim import AdamW
    rng = np.random.default_rng(8)
    p0 = rng.standard_normal(1000).astype(ml_dtypes.bfloat16)
    g = rng.standard_normal(1000).astype(ml_dtypes.bfloat16)
    p = Parameter(p0.copy(), device="cuda")
    p.grad = backend.to_device(g, "cuda")
    AdamW([p], lr=0.1, weight_decay=2.0).step()                          # decay 0.8
    g64 = g.astype(np.float64)
    want = p0.astype(np.float64) * 0.8 - 0.1 * g64 / (np.abs(g64) + 1e-8)
    _within_half_ulp(_f64(p.data), want, "bfloat16", "p")


# ====================================================================== clipping
def test_sum_of_squares_and_clip_multi_against_the_formula() -> None:
    from tensor.cuda import clip
    rng = np.random.default_rng(5)
    sizes = [2 * 65536 + 3, 0, 7, 65536]
    host = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    dev = [backend.to_device(h.copy(), "cuda") for h in host]
    assert clip.supports(*dev)
    total, tables = clip.sum_of_squares_multi(dev)
    want = sum(float(np.sum(h.astype(np.float64) ** 2)) for h in host)
    assert abs(float(total) - want) <= 1e-5 * want
    clip.clip_multi(tables, total, 1.0)
    coef = 1.0 / (math.sqrt(float(total)) + 1e-6)
    for d, h in zip(dev, host):
        np.testing.assert_allclose(_f64(d), h * coef, rtol=1e-6, atol=1e-12)
    clip.clip_multi(tables, clip.sum_of_squares_multi(dev)[0], 10.0)   # already below: untouched
    for d, h in zip(dev, host):
        np.testing.assert_allclose(_f64(d), h * coef, rtol=1e-6, atol=1e-12)
    empty, _ = clip.sum_of_squares_multi([backend.to_device(np.zeros(0, np.float32), "cuda")])
    assert float(empty) == 0.0


@pytest.mark.parametrize("sync", [True, False])
def test_clip_grad_norm_fast_and_reference_paths_agree(sync: bool, monkeypatch) -> None:
    from nn.module import Parameter
    from nn.utils import clip_grad_norm_
    rng = np.random.default_rng(6)
    shapes = [(400, 300), (300,), (1,)]
    host = [rng.standard_normal(s).astype(np.float32) * 3 for s in shapes]
    out = []
    for fast in ("1", "0"):
        monkeypatch.setattr(dispatch, "_env_fast", fast != "0")
        ps = [Parameter(np.zeros(s, np.float32), device="cuda") for s in shapes]
        for p, h in zip(ps, host):
            p.grad = backend.to_device(h.copy(), "cuda")
        norm = float(backend.to_numpy(clip_grad_norm_(ps, 2.0, sync=sync)))
        out.append((norm, [_f64(p.grad) for p in ps]))
    want = math.sqrt(sum(float(np.sum(h.astype(np.float64) ** 2)) for h in host))
    for norm, grads in out:
        assert abs(norm - want) <= 1e-5 * want
        for g, h in zip(grads, host):
            np.testing.assert_allclose(g, h * (2.0 / (want + 1e-6)), rtol=1e-5, atol=1e-9)


# ====================================================================== unscale
@pytest.mark.parametrize("bad", [None, np.inf, -np.inf, np.nan, "overflow"])
def test_unscale_multi_against_the_reference(bad, monkeypatch) -> None:
    """LossScaler.unscale_ through the one-launch kernel and through the reference loop: the same
    gradients (g * (1/scale) in float32) and the same inf/nan verdict."""
    from nn.amp import LossScaler
    from nn.module import Parameter
    from tensor.cuda import clip
    rng = np.random.default_rng(7)
    shapes = [(300, 700), (3,), (0,), (65536,)]
    host = [rng.standard_normal(s).astype(np.float32) * 100 for s in shapes]
    if bad == "overflow":
        host[3][4321] = 3e38                                  # finite, but not once divided by 0.25
    elif bad is not None:
        host[0][123, 456] = bad                               # deep inside a large gradient
    scale = 0.25 if bad == "overflow" else 3.0
    verdicts, grads = [], []
    for fast in ("1", "0"):
        monkeypatch.setattr(dispatch, "_env_fast", fast != "0")
        ps = [Parameter(np.zeros(s, np.float32), device="cuda") for s in shapes]
        for p, h in zip(ps, host):
            p.grad = backend.to_device(h.copy(), "cuda")
        assert clip.supports(*[p.grad for p in ps]) == (fast == "1")
        s = LossScaler(init_scale=scale)
        verdicts.append(s.unscale_(ps))
        grads.append([backend.to_numpy(p.grad) for p in ps])
    assert verdicts[0] == verdicts[1] == (bad is None)
    inv = np.float32(1.0 / scale)
    for a, b, h in zip(grads[0], grads[1], host):
        np.testing.assert_array_equal(a, b)
        with np.errstate(over="ignore", invalid="ignore"):
            np.testing.assert_array_equal(a, h * inv)
