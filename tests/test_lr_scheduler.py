"""Learning-rate schedules: values at chosen steps, settings round trip, apply_lr."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nn.lr_scheduler import Constant, StepDecay, WarmupCosine, apply_lr, schedule_from_state_dict
from nn.module import Parameter
from nn.optim import AdamW

MAX, MIN = 1e-3, 1e-4


def test_warmup_cosine_values():
    s = WarmupCosine(max_lr=MAX, min_lr=MIN, warmup_steps=10, decay_steps=110)
    assert s(0) == pytest.approx(MAX * 1 / 11)                   # nanoGPT: (step+1)/(warmup+1)
    assert s(9) == pytest.approx(MAX * 10 / 11)                  # last warmup step
    assert s(10) == pytest.approx(MAX)                           # end of warmup: the peak
    assert s(35) == pytest.approx(MIN + 0.5 * (1 + math.cos(math.pi / 4)) * (MAX - MIN))
    assert s(60) == pytest.approx((MAX + MIN) / 2)               # middle of the decay
    assert s(110) == pytest.approx(MIN)                          # end of the decay
    assert s(111) == MIN and s(10_000) == MIN                    # past the end
    values = [s(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))       # monotone decay


def test_warmup_cosine_edge_cases():
    s = WarmupCosine(max_lr=MAX, min_lr=MIN, warmup_steps=0, decay_steps=10)
    assert s(0) == pytest.approx(MAX)
    t = WarmupCosine(max_lr=MAX, min_lr=MIN, warmup_steps=5, decay_steps=5)
    assert t(4) == pytest.approx(MAX * 5 / 6) and t(5) == MIN
    with pytest.raises(ValueError, match="min_lr <= max_lr"):
        WarmupCosine(max_lr=MIN, min_lr=MAX, warmup_steps=1, decay_steps=2)
    with pytest.raises(ValueError, match="decay_steps"):
        WarmupCosine(max_lr=MAX, min_lr=MIN, warmup_steps=10, decay_steps=5)
    with pytest.raises(ValueError, match="step must be >= 0"):
        s(-1)


def test_step_decay_and_constant():
    s = StepDecay(lr=0.1, step_size=10, gamma=0.5)
    assert [s(0), s(9), s(10), s(25), s(30)] == pytest.approx([0.1, 0.1, 0.05, 0.025, 0.0125])
    assert Constant(3e-4)(0) == 3e-4 and Constant(3e-4)(10 ** 6) == 3e-4
    with pytest.raises(ValueError, match="step_size"):
        StepDecay(lr=0.1, step_size=0, gamma=0.5)
    with pytest.raises(ValueError, match="lr must be"):
        Constant(-1.0)


@pytest.mark.parametrize("sched", [
    Constant(1e-3),
    StepDecay(lr=0.1, step_size=7, gamma=0.3),
    WarmupCosine(max_lr=MAX, min_lr=MIN, warmup_steps=3, decay_steps=20),
])
def test_state_dict_round_trip(sched):
    state = json.loads(json.dumps(sched.state_dict()))
    assert state["name"] == type(sched).__name__
    rebuilt = schedule_from_state_dict(state)
    assert [rebuilt(t) for t in range(30)] == [sched(t) for t in range(30)]
    other = type(sched)(**{k: v * 2 for k, v in state.items() if k != "name"})
    other.load_state_dict(state)
    assert [other(t) for t in range(30)] == [sched(t) for t in range(30)]


def test_load_state_dict_wrong_class():
    with pytest.raises(ValueError, match="the saved schedule is a Constant"):
        StepDecay(0.1, 1, 0.5).load_state_dict(Constant(1.0).state_dict())
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_from_state_dict({"name": "Nope"})


def test_apply_lr_sets_every_group_with_its_scale():
    a, b = Parameter(np.ones(2)), Parameter(np.ones(3))
    opt = AdamW([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], lr=1.0)
    s = WarmupCosine(max_lr=MAX, min_lr=MIN, warmup_steps=2, decay_steps=10)
    apply_lr(opt, s(5))
    assert opt.param_groups[0]["lr"] == s(5)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * s(5))
