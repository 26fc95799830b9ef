"""The CUDA-graph decoder's parts that run without a GPU (issue 19): when the graph decoder is
chosen or refused (tinygrad_lm/decode_cuda.py, sample.stream's cuda_graph, sample --cuda-graph),
and the device sampler's RNG math (tensor/cuda/sampling.py: uniforms, the hash the kernel uses)
drawing through the Gumbel-max trick from the same distribution as the CPU filters (checked
against the hand-computed distribution of tests/test_sample.py). GPU checks: tests/test_gpu_decode.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from tensor.cuda.sampling import uniforms
from test_sample import LOGITS_A, LOGITS_B, SETTINGS, chi2_ok, expected_dist, make_ckpt, re_search, run_main
from tinygrad_lm import sample as S
from tinygrad_lm.decode_cuda import refusal
from tinygrad_lm.model import GPT, GPTConfig


def tiny() -> GPT:
    return GPT(GPTConfig(11, 12, n_layer=1, n_head=2, n_embd=16), seed=0).eval()


# ------------------------------------------------------------------ when the graph decoder runs
def test_refusal_names_block_size_then_device():
    model = tiny()
    why = refusal(model, 5, 9)          # 5 + 9 - 1 = 13 positions > 12
    assert "13 positions" in why and "block_size 12" in why
    assert "CPU" in refusal(model, 5, 8)  # fits in the block, but the model is on the CPU


def test_stream_cuda_graph_true_on_the_cpu_is_an_error():
    with pytest.raises(ValueError, match="cuda_graph.*CPU"):
        S.generate(tiny(), np.array([[1, 2]]), 3, temperature=0, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph.*use_cache=False"):
        S.generate(tiny(), np.array([[1, 2]]), 3, temperature=0, cuda_graph=True, use_cache=False)


@pytest.mark.parametrize("cuda_graph", [None, False])
def test_stream_on_the_cpu_ignores_the_default(cuda_graph):
    model = tiny()
    a = S.generate(model, np.array([[1, 2]]), 6, temperature=0, cuda_graph=cuda_graph)
    b = S.generate(model, np.array([[1, 2]]), 6, temperature=0, use_cache=False)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("extra,match", [
    (("--cuda-graph",), "--cuda-graph needs --device cuda"),
    (("--cuda-graph", "--no-cache", "--device", "cpu"), "--cuda-graph needs --device cuda"),
])
def test_cli_cuda_graph_errors(tmp_path, extra, match):
    d, _ = make_ckpt(tmp_path)
    code, err = run_main("sample", "--ckpt", str(d), "--prompt", "ab", *extra)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and re_search(match, err), err


def test_cli_no_cuda_graph_on_the_cpu_runs(tmp_path):
    d, _ = make_ckpt(tmp_path)
    code, err = run_main("sample", "--ckpt", str(d), "--prompt", "ab", "--max-new-tokens", "3", "--no-cuda-graph")
    assert code == 0, err


# ------------------------------------------------------------------ the device RNG's math
def test_uniforms_in_the_open_interval_and_distinct_streams():
    u = uniforms(7, 0, 0, 100_000)
    assert u.min() > 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    streams = [uniforms(7, c, r, 64) for c, r in ((0, 0), (1, 0), (0, 1), (1, 1))] + [uniforms(8, 0, 0, 64)]
    assert len({s.tobytes() for s in streams}) == len(streams)
    assert np.array_equal(uniforms(7, 3, 2, 10), uniforms(7, 3, 2, 10))
    assert np.array_equal(uniforms(7, np.array([3, 4]), 2, 10), np.stack([uniforms(7, 3, 2, 10), uniforms(7, 4, 2, 10)]))


def gumbel_picks(logits: np.ndarray, temperature: float, top_k, top_p, seed: int, counters: np.ndarray,
                 row: int) -> np.ndarray:
    """The kernel's draw in NumPy, one per counter: argmax over the kept tokens of z / T + Gumbel
    noise from `uniforms`."""
    keep = S.filtered_probs(logits[None, :], temperature, top_k, top_p)[0] > 0
    g = -np.log(-np.log(uniforms(seed, counters, row, len(logits))))   # (draws, V)
    return np.argmax(np.where(keep, logits / temperature + g, -np.inf), axis=-1)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_hash_rng_gumbel_max_draws_the_filtered_distribution(temperature, top_k, top_p):
    draws = 20000  # one draw per (counter, row), as the decoder makes them: counters 0.., two rows
    for row, lg in enumerate((LOGITS_A, LOGITS_B)):
        lg32 = lg.astype(np.float32).astype(np.float64)
        toks = gumbel_picks(lg32, temperature, top_k, top_p, 11, np.arange(draws), row)
        probs = expected_dist(lg32, temperature, top_k, top_p)
        counts = np.bincount(toks, minlength=len(lg))
        assert counts[probs == 0].sum() == 0, "drew a filtered-out token"
        ok, stat = chi2_ok(counts, probs)
        assert ok, f"chi-square {stat:.2f}: counts {counts} vs expected {probs * draws}"
