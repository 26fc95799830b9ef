"""Optimizers (SGD, Adam, AdamW) and clip_grad_norm_.

Expected values are computed here with plain NumPy formulas written out in full (closed forms
where one exists), never by calling the code under test. Parameters are float64 so the
comparisons can be tight.
"""
from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest

from nn.lr_scheduler import apply_lr
from nn.module import Module, Parameter
from nn.optim import SGD, Adam, AdamW
from nn.utils import clip_grad_norm_
from tensor import backend
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


def test_adam_bias_correction_closed_form():
    p0 = np.array([[0.5, -1.0], [2.0, 0.1]])
    gs = [g for (g,) in grad_sequence([(2, 2)], 6, seed=3)]
    p = Parameter(p0.copy())
    run(Adam([p], lr=0.01, betas=(0.8, 0.95), eps=1e-6), [p], [[g] for g in gs])
    np.testing.assert_allclose(p.data, adam_closed_form(p0, gs, 0.01, 0.8, 0.95, 1e-6), rtol=1e-11)


def test_adam_constant_gradient_moves_lr_per_step():
    # with a constant g, m_hat = g and v_hat = g^2 exactly: each step is lr * g / (|g| + eps)
    p0, g = np.array([1.0, 1.0, 1.0]), np.array([0.5, -2.0, 1e-3])
    p = Parameter(p0.copy())
    run(Adam([p], lr=0.1), [p], [[g]] * 5)
    np.testing.assert_allclose(p.data, p0 - 5 * 0.1 * g / (np.abs(g) + 1e-8), rtol=1e-9)


def test_adam_coupled_l2_goes_through_the_moments():
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


def test_adamw_groups_decay_only_where_asked_and_lr_schedule():
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
