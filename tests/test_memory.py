"""tinygrad_lm.memory: parameter shapes and counts against the real model, the estimate's
terms against their closed forms, and check_fits against given budgets."""
from __future__ import annotations

import pytest

from tinygrad_lm.errors import UserError
from tinygrad_lm.memory import check_fits, estimate, num_parameters, param_shapes
from tinygrad_lm.model import GPT, GPTConfig

CONFIGS = [
    GPTConfig(11, 16, n_layer=2, n_head=2, n_embd=16, pos_encoding="learned"),
    GPTConfig(11, 16, n_layer=1, n_head=4, n_embd=8, bias=False),
    GPTConfig(65, 64, n_layer=4, n_head=4, n_embd=128, bias=False, pos_encoding="learned"),
    GPTConfig(300, 32, n_layer=3, n_head=3, n_embd=24),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_param_shapes_and_count_match_the_model(cfg):
    model = GPT(cfg)
    assert param_shapes(cfg) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert num_parameters(cfg) == model.num_parameters() == sum(p.size for p in model.parameters())


def test_estimate_terms_closed_form():
    cfg = GPTConfig(100, 32, n_layer=3, n_head=4, n_embd=16)
    P = num_parameters(cfg)
    B, T, C, H, L, V = 5, 32, 16, 4, 3, 100
    tr = estimate(cfg, B, "fp32", training=True)
    assert tr["parameters"] == 4 * P and tr["gradients"] == 4 * P and tr["optimizer"] == 8 * P
    assert tr["attention scores+probabilities"] == L * 2 * B * H * T * T * 4
    assert tr["other activations"] == L * 16 * B * T * C * 4
    assert tr["logits"] == 3 * B * T * V * 4 and tr["kv_cache"] == 0
    assert tr["total"] == sum(v for k, v in tr.items() if k != "total")
    inf = estimate(cfg, B, "fp32", training=False)
    assert inf["gradients"] == inf["optimizer"] == 0
    assert inf["attention scores+probabilities"] == 2 * B * H * T * T * 4      # one layer at a time
    assert inf["kv_cache"] == 2 * L * B * T * C * 4 and inf["logits"] == B * T * V * 4
    assert estimate(cfg, B, "bf16", True)["parameters"] == 6 * P


def test_huge_block_size_is_refused_naming_the_biggest_term():
    cfg = GPTConfig(65, 100_000, n_layer=4, n_head=4, n_embd=128)
    with pytest.raises(UserError, match=r"(?s)--block-size 100000.*16.0 GB available.*attention"):
        check_fits(cfg, 12, "fp32", "cpu", training=True, budget=16 * 10 ** 9)


def test_reasonable_configs_fit():
    gb = 10 ** 9
    shakespeare = GPTConfig(65, 64, n_layer=4, n_head=4, n_embd=128, bias=False, pos_encoding="learned")
    check_fits(shakespeare, 12, "fp32", "cpu", training=True, budget=1 * gb)
    medium = GPTConfig(50304, 1024, n_layer=24, n_head=16, n_embd=1024)   # GPT-2 medium, 350M parameters
    check_fits(medium, 1, "fp32", "cuda", training=True, budget=24 * gb)
    check_fits(medium, 2, "bf16", "cuda", training=True, budget=24 * gb)
    check_fits(medium, 8, "fp32", "cpu", training=False, budget=24 * gb)
    with pytest.raises(UserError, match="batch 16"):
        check_fits(medium, 16, "fp32", "cuda", training=True, budget=24 * gb)


def test_the_real_machine_is_asked():
    cfg = GPTConfig(65, 10 ** 6, n_layer=1, n_head=1, n_embd=8)     # 8 TB of scores: no machine has that
    with pytest.raises(UserError, match="available"):
        check_fits(cfg, 1, "fp32", "cpu", training=False)
    check_fits(GPTConfig(65, 8, n_layer=1, n_head=1, n_embd=8), 1, "fp32", "cpu", training=True)
