"""Optimizers (SGD, Adam, AdamW), clip_grad_norm_ and the loss scaler's unscale.

Expected values are computed here with plain NumPy formulas written out in full (closed forms
where one exists), never by calling the code under test. Parameters are float64 so the
comparisons can be tight. The CPU fast path of Adam (tensor/cpu/adam.py) is checked against the
reference update (nn.optim.adam_reference), which the closed-form tests check under both paths.
"""
from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np

from tensor import dispatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nn.amp import LossScaler
from nn.lr_scheduler import apply_lr
from nn.module import Module, Parameter
from nn.optim import SGD, Adam, AdamW, adam_reference, adam_step
from nn.utils import clip_grad_norm_
from tensor import backend
from tensor.cpu import adam as cpu_adam
from tensor.cpu.blocks import BLOCK
from tensor.dispatch import reference_only
from tensor.tensor import Tensor

RTOL, ATOL = 1e-12, 1e-15


class Tiny(Module):
    """A weight matrix (decayed) and a bias vector (not decayed), plus a child module."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.weight = Parameter(rng.standard_normal((3, 4)))
        self.bias = Parameter(rng.standard_normal(4))
        self.head = Head(rng)


class Head(Module):
    def __init__(self, rng: np.random.Generator) -> None:
        self.weight = Parameter(rng.standard_normal((4, 2)))


def grad_sequence(shapes: list[tuple], steps: int, seed: int = 1) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s) for s in shapes] for _ in range(steps)]


def run(opt, params, grads) -> None:
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.copy()
        opt.step()


# ====================================================================== SGD
def test_sgd_plain_and_weight_decay():
    p0 = np.array([1.0, -2.0, 0.5])
    gs = grad_sequence([(3,)], 4)
    lr, wd = 0.1, 0.01
    p = Parameter(p0.copy())
    run(SGD([p], lr=lr, weight_decay=wd), [p], gs)
    expected = p0.copy()
    for (g,) in gs:
        expected = expected - lr * (g + wd * expected)           # p <- p - lr (g + wd p)
    np.testing.assert_allclose(p.data, expected, rtol=RTOL, atol=ATOL)


def test_sgd_no_weight_decay_closed_form():
    p0 = np.array([1.0, 2.0])
    gs = grad_sequence([(2,)], 5)
    p = Parameter(p0.copy())
    run(SGD([p], lr=0.3), [p], gs)
    np.testing.assert_allclose(p.data, p0 - 0.3 * sum(g for (g,) in gs), rtol=RTOL)  # p_T = p_0 - lr sum g_t


def test_sgd_momentum_closed_form():
    # b_t = sum_{k<=t} mu^(t-k) g_k,   p_T = p_0 - lr sum_t b_t
    p0 = np.array([0.3, -0.7, 1.1])
    gs = [g for (g,) in grad_sequence([(3,)], 5)]
    lr, mu = 0.05, 0.9
    p = Parameter(p0.copy())
    run(SGD([p], lr=lr, momentum=mu), [p], [[g] for g in gs])
    bufs = [sum(mu ** (t - k) * gs[k] for k in range(t + 1)) for t in range(len(gs))]
    np.testing.assert_allclose(p.data, p0 - lr * sum(bufs), rtol=RTOL)


def test_sgd_nesterov_with_weight_decay():
    p0 = np.array([0.3, -0.7, 1.1])
    gs = [g for (g,) in grad_sequence([(3,)], 5, seed=7)]
    lr, mu, wd = 0.05, 0.8, 0.1
    p = Parameter(p0.copy())
    run(SGD([p], lr=lr, momentum=mu, nesterov=True, weight_decay=wd), [p], [[g] for g in gs])
    e, b = p0.copy(), np.zeros(3)
    for g in gs:
        d = g + wd * e            # coupled weight decay
        b = mu * b + d            # momentum buffer
        e = e - lr * (d + mu * b)  # Nesterov look-ahead
    np.testing.assert_allclose(p.data, e, rtol=RTOL, atol=ATOL)


def test_sgd_with_real_backward():
    # loss = sum p^2, grad 2p:  p <- p - lr 2p = (1 - 2 lr) p
    p = Parameter(np.array([1.0, -3.0]))
    opt = SGD([p], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (p * p).sum().backward()
        opt.step()
    np.testing.assert_allclose(p.data, np.array([1.0, -3.0]) * 0.8 ** 3, rtol=RTOL)


# ====================================================================== Adam
def adam_closed_form(p0, gs, lr, b1, b2, eps):
    """p after len(gs) Adam steps, the moments written as their closed-form weighted sums:
    m_t = (1-b1) sum_k b1^(t-k) g_k,  v_t = (1-b2) sum_k b2^(t-k) g_k^2."""
    p = p0.copy()
    for t in range(1, len(gs) + 1):
        m = (1 - b1) * sum(b1 ** (t - k) * gs[k - 1] for k in range(1, t + 1))
        v = (1 - b2) * sum(b2 ** (t - k) * gs[k - 1] ** 2 for k in range(1, t + 1))
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("fast", ["1", "0"])  # fast path (tensor/cpu/adam.py), reference
def test_adam_bias_correction_closed_form(fast, monkeypatch):
    monkeypatch.setattr(dispatch, "_env_fast", fast != "0")
    p0 = np.array([[0.5, -1.0], [2.0, 0.1]])
    gs = [g for (g,) in grad_sequence([(2, 2)], 6, seed=3)]
    p = Parameter(p0.copy())
    run(Adam([p], lr=0.01, betas=(0.8, 0.95), eps=1e-6), [p], [[g] for g in gs])
    np.testing.assert_allclose(p.data, adam_closed_form(p0, gs, 0.01, 0.8, 0.95, 1e-6), rtol=1e-11)


@pytest.mark.parametrize("fast", ["1", "0"])  # fast path (tensor/cpu/adam.py), reference
def test_adam_constant_gradient_moves_lr_per_step(fast, monkeypatch):
    monkeypatch.setattr(dispatch, "_env_fast", fast != "0")
    # with a constant g, m_hat = g and v_hat = g^2 exactly: each step is lr * g / (|g| + eps)
    p0, g = np.array([1.0, 1.0, 1.0]), np.array([0.5, -2.0, 1e-3])
    p = Parameter(p0.copy())
    run(Adam([p], lr=0.1), [p], [[g]] * 5)
    np.testing.assert_allclose(p.data, p0 - 5 * 0.1 * g / (np.abs(g) + 1e-8), rtol=1e-9)


@pytest.mark.parametrize("fast", ["1", "0"])  # fast path (tensor/cpu/adam.py), reference
def test_adam_coupled_l2_goes_through_the_moments(fast, monkeypatch):
    monkeypatch.setattr(dispatch, "_env_fast", fast != "0")
    p0 = np.array([1.0, -0.5])
    gs = [g for (g,) in grad_sequence([(2,)], 4, seed=5)]
    lr, b1, b2, eps, wd = 0.02, 0.9, 0.999, 1e-8, 0.1
    p = Parameter(p0.copy())
    run(Adam([p], lr=lr, weight_decay=wd), [p], [[g] for g in gs])
    e, m, v = p0.copy(), np.zeros(2), np.zeros(2)
    for t, g in enumerate(gs, start=1):
        d = g + wd * e                                           # g + wd p enters the moments
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        e = e - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(p.data, e, rtol=1e-11)


@pytest.mark.parametrize("fast", ["1", "0"])  # fast path (tensor/cpu/adam.py), reference
def test_adamw_groups_decay_only_where_asked_and_lr_schedule(fast, monkeypatch):
    monkeypatch.setattr(dispatch, "_env_fast", fast != "0")
    model = Tiny()
    params = dict(model.named_parameters())
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    assert [p.ndim for p in no_decay] == [1]
    opt = AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                lr=1.0, betas=(0.9, 0.99), eps=1e-8)
    init = {n: p.data.copy() for n, p in params.items()}
    names = list(params)
    gs = grad_sequence([params[n].shape for n in names], 5, seed=11)
    lrs = [1e-2, 2e-2, 3e-2, 1.5e-2, 5e-3]                        # a schedule, set each step
    for lr, step_grads in zip(lrs, gs):
        apply_lr(opt, lr)
        for n, g in zip(names, step_grads):
            params[n].grad = g.copy()
        opt.step()
    b1, b2, eps = 0.9, 0.99, 1e-8
    for j, n in enumerate(names):
        wd = 0.1 if params[n].ndim >= 2 else 0.0
        e, m, v = init[n].copy(), 0.0, 0.0
        for t, (lr, step_grads) in enumerate(zip(lrs, gs), start=1):
            g = step_grads[j]
            e = e - lr * wd * e                                  # decoupled decay first
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            e = e - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        np.testing.assert_allclose(params[n].data, e, rtol=1e-11, err_msg=n)
    # the bias had weight_decay 0, the matrices 0.1: the groups kept their own settings
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_params_without_grad_are_skipped_and_keep_their_own_step_count():
    a, b = Parameter(np.array([1.0])), Parameter(np.array([2.0]))
    opt = Adam([a, b], lr=0.1)
    a.grad = np.array([0.5])
    opt.step()                                                   # b has no grad: untouched
    assert b.data[0] == 2.0 and b._version == 0 and a._version == 1
    a.grad, b.grad = np.array([0.5]), np.array([-0.25])
    opt.step()
    assert opt.state[0]["step"] == 2 and opt.state[1]["step"] == 1
    # b's first step is a fresh Adam step: m_hat = g, v_hat = g^2 -> lr * g / (|g| + eps)
    np.testing.assert_allclose(b.data, [2.0 + 0.1 * 0.25 / (0.25 + 1e-8)], rtol=1e-12)


def test_step_bumps_version_and_zero_grad_clears():
    p = Parameter(np.ones(2))
    opt = SGD([p], lr=0.1)
    p.grad = np.ones(2)
    opt.step()
    opt.step()
    assert p._version == 2
    opt.zero_grad()
    assert p.grad is None


def test_in_place_on_the_same_array_and_dtypes_kept():
    p = Parameter(np.ones((2, 3), np.float32))
    data = p.data
    opt = AdamW([p], lr=0.1)
    p.grad = np.full((2, 3), 0.3, np.float32)
    opt.step()
    assert p.data is data and p.data.dtype == np.float32
    assert opt.state[0]["exp_avg"].dtype == np.float32
    np.testing.assert_allclose(p.data, (1 - 0.1 * 0.01) - 0.1 * 0.3 / (0.3 + 1e-8), rtol=1e-6)


def test_bfloat16_parameters_step():
    p = Parameter(np.ones(4, ml_dtypes.bfloat16))
    opt = Adam([p], lr=0.125)
    p.grad = np.full(4, 2.0, ml_dtypes.bfloat16)
    opt.step()
    assert p.data.dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(p.data.astype(np.float32), 0.875, rtol=1e-2)


def test_grad_is_not_modified_by_weight_decay():
    p = Parameter(np.array([1.0, 2.0]))
    g = np.array([0.1, 0.2])
    p.grad = g
    SGD([p], lr=0.1, momentum=0.9, weight_decay=0.5).step()
    np.testing.assert_array_equal(g, [0.1, 0.2])


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("make, match", [
    (lambda p: SGD([p, np.ones(2)], lr=0.1), "item 1 is a ndarray"),
    (lambda p: SGD([Tensor(np.ones(2))], lr=0.1), "does not require grad"),
    (lambda p: SGD([p], lr=-1.0), "lr must be"),
    (lambda p: Adam([p], betas=(1.0, 0.9)), "betas"),
    (lambda p: Adam([p], betas=(0.9, -0.1)), "betas"),
    (lambda p: Adam([p], eps=-1.0), "eps"),
    (lambda p: AdamW([p], weight_decay=-0.1), "weight_decay"),
    (lambda p: SGD([p], lr=0.1, nesterov=True), "nesterov"),
    (lambda p: SGD([p, p], lr=0.1), "twice"),
    (lambda p: AdamW([{"params": [p]}, {"params": [p], "weight_decay": 0.0}]), "already in param group 0"),
    (lambda p: SGD([], lr=0.1), "empty"),
    (lambda p: SGD(p, lr=0.1), "single Tensor"),
])
def test_clear_errors(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make(Parameter(np.ones(2)))


def test_grad_shape_mismatch_is_an_error():
    p = Parameter(np.ones(2))
    p.grad = np.ones(3)
    with pytest.raises(ValueError, match="grad is"):
        SGD([p], lr=0.1).step()


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9), lambda ps: AdamW(ps, lr=0.1)])
def test_a_bad_grad_changes_no_parameter(make):
    a, b = Parameter(np.ones(2)), Parameter(np.ones(2))
    opt = make([a, b])
    a.grad, b.grad = np.ones(2), np.ones(3)                      # the second one is wrong
    with pytest.raises(ValueError, match=r"parameter 1 is \(2,\) on cpu but its grad is \(3,\)"):
        opt.step()
    np.testing.assert_array_equal(a.data, [1.0, 1.0])            # checked before anything moved
    assert a._version == 0 and opt.state == {}


# ====================================================================== state_dict
def _groups(model: Tiny) -> list[dict]:
    ps = dict(model.named_parameters())
    return [{"params": [p for p in ps.values() if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in ps.values() if p.ndim < 2], "weight_decay": 0.0}]


@pytest.mark.parametrize("make", [
    lambda groups: SGD(groups, lr=0.1, momentum=0.9, nesterov=True),
    lambda groups: Adam(groups, lr=1e-2),
    lambda groups: AdamW(groups, lr=1e-2, betas=(0.8, 0.9)),
])
def test_state_dict_round_trip_continues_bitwise(make):
    shapes = [p.shape for p in Tiny().parameters()]
    gs = grad_sequence(shapes, 6, seed=2)
    lrs = [0.01, 0.02, 0.03, 0.02, 0.01, 0.005]

    def steps(model, opt, rng):
        for i in rng:
            apply_lr(opt, lrs[i])
            for p, g in zip(model.parameters(), gs[i]):
                p.grad = g.copy()
            opt.step()

    ref = Tiny()
    ref_opt = make(_groups(ref))
    steps(ref, ref_opt, range(6))                                # uninterrupted

    first = Tiny()
    first_opt = make(_groups(first))
    steps(first, first_opt, range(3))
    sd = first_opt.state_dict()
    meta = json.loads(json.dumps(sd["meta"]))                    # the metadata is JSON-able
    arrays = {k: v.copy() for k, v in sd["arrays"].items()}

    resumed = Tiny(seed=99)                                      # different init, overwritten below
    resumed.load_state_dict(first.state_dict())
    opt = make(_groups(resumed))
    opt.param_groups[0]["lr"] = 123.0                            # overwritten by the load
    opt.load_state_dict({"meta": meta, "arrays": arrays})
    assert opt.param_groups[0]["lr"] == 0.03
    steps(resumed, opt, range(3, 6))
    for (n, a), b in zip(ref.named_parameters(), resumed.parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=n)
    for i, st in ref_opt.state.items():
        assert st["step"] == opt.state[i]["step"]
        for k, v in st.items():
            if k != "step":
                np.testing.assert_array_equal(v, opt.state[i][k])


def test_state_dict_arrays_are_a_snapshot():
    p = Parameter(np.ones(2))
    opt = Adam([p])
    p.grad = np.ones(2)
    opt.step()
    sd = opt.state_dict()
    before = sd["arrays"]["state.0.exp_avg"].copy()
    opt.step()
    np.testing.assert_array_equal(sd["arrays"]["state.0.exp_avg"], before)
    assert set(sd["arrays"]) == {"state.0.exp_avg", "state.0.exp_avg_sq"}
    assert sd["meta"]["state"] == {"0": {"step": 1}}


def _trained_adamw(model: Tiny) -> AdamW:
    opt = AdamW(_groups(model), lr=1e-2)
    for p in model.parameters():
        p.grad = np.ones(p.shape)
    opt.step()
    return opt


def test_load_state_dict_mismatches_are_listed_and_change_nothing():
    sd = _trained_adamw(Tiny()).state_dict()
    model = Tiny()
    # one group instead of two
    opt = AdamW(model.parameters(), lr=5e-3)
    with pytest.raises(ValueError, match="2 param groups saved, this optimizer has 1"):
        opt.load_state_dict(sd)
    assert opt.state == {} and opt.param_groups[0]["lr"] == 5e-3
    # same groups, wrong parameter count
    ps = model.parameters()
    opt = AdamW([{"params": ps[:1]}, {"params": ps[1:]}])
    with pytest.raises(ValueError, match="param group 0: 2 parameters saved, this optimizer has 1"):
        opt.load_state_dict(sd)
    # different optimizer type
    with pytest.raises(ValueError, match="saved by a AdamW optimizer, loading into a SGD"):
        SGD(_groups(model), lr=0.1, momentum=0.9).load_state_dict(sd)


def test_load_state_dict_shape_and_missing_arrays():
    sd = _trained_adamw(Tiny()).state_dict()
    arrays = dict(sd["arrays"])
    arrays["state.0.exp_avg"] = np.zeros((5, 5))
    del arrays["state.1.exp_avg_sq"]
    arrays["state.9.junk"] = np.zeros(1)
    opt = AdamW(_groups(Tiny()))
    with pytest.raises(ValueError) as info:
        opt.load_state_dict({"meta": sd["meta"], "arrays": arrays})
    msg = str(info.value)
    assert "state.0.exp_avg: saved shape (5, 5), parameter 0 has shape (3, 4)" in msg
    assert "missing array state.1.exp_avg_sq" in msg
    assert "unexpected arrays: ['state.9.junk']" in msg
    assert opt.state == {}


# ====================================================================== clip_grad_norm_
def test_clip_grad_norm_value_and_scaling():
    a, b, c = Parameter(np.zeros(2)), Parameter(np.zeros(1)), Parameter(np.zeros(3))
    a.grad, b.grad = np.array([3.0, 4.0]), np.array([12.0])     # norm sqrt(9 + 16 + 144) = 13
    assert clip_grad_norm_([a, b, c], max_norm=26.0) == pytest.approx(13.0, rel=1e-12)
    np.testing.assert_array_equal(a.grad, [3.0, 4.0])            # below max_norm: untouched
    a_grad = a.grad
    assert clip_grad_norm_([a, b, c], max_norm=6.5) == pytest.approx(13.0, rel=1e-12)
    assert a.grad is a_grad                                       # scaled in place
    coef = 6.5 / (13.0 + 1e-6)
    np.testing.assert_allclose(a.grad, [3.0 * coef, 4.0 * coef], rtol=1e-12)
    np.testing.assert_allclose(b.grad, [12.0 * coef], rtol=1e-12)
    assert math.sqrt(np.sum(a.grad ** 2) + np.sum(b.grad ** 2)) == pytest.approx(6.5, rel=1e-6)


def test_clip_grad_norm_low_precision_accumulates_in_float32():
    p = Parameter(np.zeros(4, np.float16))
    p.grad = np.full(4, 300.0, np.float16)                       # 300^2 overflows float16
    assert clip_grad_norm_([p], max_norm=1e9) == pytest.approx(600.0, rel=1e-6)
    q = Parameter(np.zeros(4, ml_dtypes.bfloat16))
    q.grad = np.full(4, 3.0, ml_dtypes.bfloat16)
    assert clip_grad_norm_([q], max_norm=3.0) == pytest.approx(6.0, rel=1e-6)
    assert q.grad.dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(q.grad.astype(np.float32), 1.5, rtol=1e-2)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_clip_grad_norm_nonfinite(bad):
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(2))
    a.grad, b.grad = np.array([1.0, 1.0]), np.array([bad, 1.0])
    with pytest.raises(FloatingPointError, match=r"non-finite.*index 1, shape \(2,\)"):
        clip_grad_norm_([a, b], max_norm=1.0)
    np.testing.assert_array_equal(a.grad, [1.0, 1.0])
    norm = clip_grad_norm_([a, b], max_norm=1.0, error_if_nonfinite=False)
    assert not math.isfinite(norm)
    np.testing.assert_array_equal(a.grad, [1.0, 1.0])            # left untouched


def test_clip_grad_norm_no_grads():
    assert clip_grad_norm_([Parameter(np.zeros(2))], 1.0) == 0.0
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([Parameter(np.zeros(2))], -1.0)


# ====================================================================== Adam: fast path vs reference
SIZES = [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 3 * BLOCK + 5]   # around the block boundary


@settings(max_examples=25, deadline=None)
@given(n=st.sampled_from(SIZES), dtype=st.sampled_from(["float32", "float64"]),
       decay=st.sampled_from([1.0, 1.0 - 3e-4, 0.9]), steps=st.integers(1, 8),
       lr=st.floats(1e-4, 0.5), beta1=st.sampled_from([0.0, 0.8, 0.9]), beta2=st.sampled_from([0.95, 0.999]),
       eps=st.sampled_from([1e-8, 1e-3]), seed=st.integers(0, 2 ** 16))
def test_cpu_adam_fast_path_equals_the_reference_bit_for_bit(n, dtype, decay, steps, lr, beta1, beta2, eps, seed):
    """tensor/cpu/adam.py (blocked, one scratch array) does the reference's passes in the same
    order on the same values: p, m and v agree exactly after many steps, on every side of a block."""
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n).astype(dtype)
    grads = [(rng.standard_normal(n) * 10.0 ** rng.integers(-3, 2)).astype(dtype) for _ in range(steps)]
    fast, ref = [p0.copy(), np.zeros_like(p0), np.zeros_like(p0)], [p0.copy(), np.zeros_like(p0), np.zeros_like(p0)]
    for t, g in enumerate(grads, start=1):
        assert cpu_adam.supports(fast[0], g, fast[1], fast[2])
        cpu_adam.adam_step(fast[0], g, fast[1], fast[2], lr, beta1, beta2, eps, t, decay)
        adam_reference(ref[0], g, ref[1], ref[2], lr, beta1, beta2, eps, t, decay)
    for name, a, b in zip(("p", "m", "v"), fast, ref):
        assert a.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_cpu_adam_fast_path_low_precision_and_the_formula(dtype):
    """The reference itself against the formula in float64 (one step from zero moments:
    p - lr * g / (|g| + eps), after the decay), and the fast path equal to the reference."""
    rng = np.random.default_rng(3)
    n = BLOCK + 3
    p0, g = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    runs = []
    for step in (cpu_adam.adam_step, adam_reference):
        p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
        step(p, g, m, v, 0.01, 0.9, 0.999, 1e-8, 1, 0.99)
        runs.append((p, m, v))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    g64 = g.astype(np.float64)
    want = p0.astype(np.float64) * 0.99 - 0.01 * g64 / (np.abs(g64) + 1e-8)
    tol = 1e-6 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(runs[0][0].astype(np.float64), want, rtol=tol, atol=tol)


def test_adam_step_chooses_the_fast_path_unless_switched_off(monkeypatch):
    calls = []
    real = cpu_adam.adam_step
    monkeypatch.setattr(cpu_adam, "adam_step", lambda *a: (calls.append(a[0].size), real(*a)))
    arrays = [np.ones(5), np.full(5, 0.5), np.zeros(5), np.zeros(5)]
    adam_step(*arrays, 0.1, 0.9, 0.999, 1e-8, 1)
    assert calls == [5]
    with reference_only():
        adam_step(*arrays, 0.1, 0.9, 0.999, 1e-8, 2)
    monkeypatch.setattr(dispatch, "_env_fast", False)
    adam_step(*arrays, 0.1, 0.9, 0.999, 1e-8, 3)
    assert calls == [5]
    monkeypatch.setattr(dispatch, "_env_fast", True)
    strided = [np.ones((BLOCK + 1, 2))[:, 0], np.full(BLOCK + 1, 0.5), np.zeros(BLOCK + 1), np.zeros(BLOCK + 1)]
    assert not cpu_adam.supports(*strided)                       # a big strided view: the reference
    adam_step(*strided, 0.1, 0.9, 0.999, 1e-8, 1)
    assert calls == [5]
    np.testing.assert_allclose(strided[0], 1.0 - 0.1 * 0.5 / (0.5 + 1e-8), rtol=1e-12)


def test_adamw_on_a_transposed_gradient_equals_the_contiguous_one():
    rng = np.random.default_rng(8)
    p0, g = rng.standard_normal((300, 400)), rng.standard_normal((400, 300))
    out = []
    for grad in (g.T, np.ascontiguousarray(g.T)):               # 120000 elements > BLOCK
        p = Parameter(p0.copy())
        opt = AdamW([p], lr=0.01, weight_decay=0.1)
        for _ in range(3):
            p.grad = grad
            opt.step()
        out.append(p.data)
    np.testing.assert_array_equal(out[0], out[1])


# ====================================================================== clip: closed form
@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5), scale=st.floats(1e-3, 1e3),
       max_norm=st.floats(0.0, 50.0), sync=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_clip_grad_norm_equals_the_closed_form(sizes, scale, max_norm, sync, seed):
    """norm = sqrt(sum of every g^2); every g *= min(1, max_norm / (norm + 1e-6))."""
    rng = np.random.default_rng(seed)
    ps = [Parameter(np.zeros(n)) for n in sizes]
    host = [rng.standard_normal(n) * scale for n in sizes]
    for p, h in zip(ps, host):
        p.grad = h.copy()
    norm = clip_grad_norm_(ps, max_norm, sync=sync)
    want = math.sqrt(sum(float(np.sum(h * h)) for h in host))
    assert float(norm) == pytest.approx(want, rel=1e-12, abs=1e-300)
    coef = min(1.0, max_norm / (want + 1e-6))
    for p, h in zip(ps, host):
        np.testing.assert_allclose(p.grad, h * coef, rtol=1e-12, atol=1e-300)


def test_clip_grad_norm_no_sync_on_cpu_leaves_nonfinite_grads_alone():
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(2))
    a.grad, b.grad = np.array([3.0, 4.0]), np.array([np.nan, 1.0])
    norm = clip_grad_norm_([a, b], 1.0, sync=False)
    assert np.isnan(norm)
    np.testing.assert_array_equal(a.grad, [3.0, 4.0])


# ====================================================================== LossScaler
def test_loss_scaler_unscales_and_counts():
    s = LossScaler(init_scale=8.0, growth_interval=2)
    ps = [Parameter(np.zeros(3, np.float32)), Parameter(np.zeros(2, np.float32)), Parameter(np.zeros(1, np.float32))]
    ps[0].grad, ps[1].grad = np.array([8.0, -16.0, 4.0], np.float32), np.array([1.0, 2.0], np.float32)
    assert s.scale(3.0) == 24.0
    assert s.unscale_(ps)                                        # grads / 8, all finite
    np.testing.assert_array_equal(ps[0].grad, [1.0, -2.0, 0.5])
    np.testing.assert_array_equal(ps[1].grad, [0.125, 0.25])
    s.update()
    assert s.unscale_(ps)
    s.update()
    assert s.scale_value == 16.0 and s.clean_steps == 0           # two clean steps: grown


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_loss_scaler_detects_inf_and_nan_and_backs_off(bad):
    s = LossScaler(init_scale=1024.0)
    a, b = Parameter(np.zeros((50, 40), np.float32)), Parameter(np.zeros(2, np.float32))
    a.grad, b.grad = np.ones((50, 40), np.float32), np.ones(2, np.float32)
    a.grad[17, 33] = bad                                          # one bad element deep inside
    assert not s.unscale_([a, b])
    s.update()
    assert s.scale_value == 512.0 and s.skipped_steps == 1
    big = Parameter(np.zeros(2, np.float32))
    big.grad = np.array([3e38, 1.0], np.float32)                  # finite, but overflows when divided
    s2 = LossScaler(init_scale=0.5)
    assert not s2.unscale_([big])


def test_loss_scaler_disabled_and_state_round_trip():
    s = LossScaler(enabled=False)
    p = Parameter(np.zeros(1))
    p.grad = np.array([np.inf])
    assert s.scale(2.0) == 2.0 and s.unscale_([p])
    s.update()
    on = LossScaler(init_scale=4.0, growth_interval=3)
    on.clean_steps, on.skipped_steps = 2, 5
    back = LossScaler()
    back.load_state_dict(json.loads(json.dumps(on.state_dict())))
    assert back.state_dict() == on.state_dict()
    with pytest.raises(ValueError, match="LossScaler"):
        LossScaler(backoff_factor=1.5)


# ====================================================================== GPU
@pytest.mark.gpu
@pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and an NVIDIA GPU")
def test_adamw_and_clip_on_cupy_match_numpy():
    import cupy as cp

    def go(device):
        model = Tiny().to(device)
        opt = AdamW(_groups(model), lr=1e-2)
        for gs in grad_sequence([p.shape for p in model.parameters()], 3, seed=4):
            for p, g in zip(model.parameters(), gs):
                p.grad = backend.to_device(g, device)
            clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return [backend.to_numpy(p.data) for p in model.parameters()], opt

    cpu, _ = go("cpu")
    gpu, opt = go("cuda")
    assert isinstance(opt.state[0]["exp_avg"], cp.ndarray)
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_decay_groups_decays_exactly_the_2d_weights():
    from nn.optim import decay_groups
    shapes = {"wte": (65, 8), "ln.weight": (8,), "c_attn.weight": (24, 8), "c_attn.bias": (24,), "scalar": ()}
    decay, rest = decay_groups(shapes, lambda n: len(shapes[n]))
    assert decay == ["wte", "c_attn.weight"] and rest == ["ln.weight", "c_attn.bias", "scalar"]
