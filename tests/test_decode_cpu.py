"""The CPU decoding step (tinygrad_lm/decode_cpu.py) against the reference: the model's own forward
with KV caches (logits to float32 round-off), and generate/stream with the fast paths off (tokens)."""
import warnings

import numpy as np
import pytest

from nn.quant import quantize_
from tensor.dispatch import reference_only
from tensor.ops.elementwise import GELU_K
from tensor.tensor import no_grad
from tinygrad_lm.decode_cpu import cpu_decoder, refusal
from tinygrad_lm.model import GPT, GPTConfig
from tinygrad_lm.sample import _prompts, _window_inputs, generate, stream

VOCAB = 37


def small(pos: str = "learned", norm: str = "layernorm", bias: bool = True, seed: int = 0,
          block_size: int = 24) -> GPT:
    cfg = GPTConfig(vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=4, n_embd=32, pos_encoding=pos,
                    norm=norm, bias=bias)
    return GPT(cfg, seed=seed).eval()


def prompts(B: int, ragged: bool, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 6, B) if ragged else [3] * B
    return [rng.integers(0, VOCAB, int(n)) for n in lengths]


def step_vs_forward(model: GPT, rows: list, steps: int = 6) -> None:
    """Prefill two copies of the caches, then feed the same tokens to the fast step and to the
    model's forward: equal logits at every step, and equal caches at the end."""
    seq, pads, _ = _prompts(rows, VOCAB)
    B, T = seq.shape
    padded = bool(pads.any())
    with no_grad():
        ref_caches, fast_caches = model.new_caches(B), model.new_caches(B)
        _, positions, real = _window_inputs(seq, pads, model.config.block_size)
        for caches in (ref_caches, fast_caches):
            model(seq, mask=real if padded else None, positions=positions, caches=caches)
        dec = cpu_decoder(model, fast_caches, pads)
        assert dec is not None
        rng = np.random.default_rng(1)
        for _ in range(steps):
            seq = np.concatenate([seq, rng.integers(0, VOCAB, (B, 1))], axis=1)
            _, positions, real = _window_inputs(seq, pads, model.config.block_size)
            want, _ = model(seq[:, -1:], mask=real if padded else None, positions=positions[:, -1:], caches=ref_caches)
            got = dec.step(seq[:, -1], positions[:, -1])
            np.testing.assert_allclose(got, want.data[:, -1], rtol=1e-4, atol=1e-5)
        for a, b in zip(ref_caches, fast_caches):
            assert a.length == b.length
            np.testing.assert_allclose(b.kv[:, :, :, :b.length], a.kv[:, :, :, :a.length], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("B,ragged", [(1, False), (8, False), (8, True), (32, True)])
def test_step_equals_forward(pos, norm, B, ragged):
    step_vs_forward(small(pos, norm), prompts(B, ragged))


@pytest.mark.parametrize("B,ragged", [(3, True), (32, True)])
def test_step_equals_forward_over_a_long_cache(B, ragged):
    """Up to 100 cached positions (the scores buffer read over the filled part only, padded rows)."""
    step_vs_forward(small(seed=7, block_size=104), prompts(B, ragged, seed=7), steps=95)


@pytest.mark.parametrize("B,ragged", [(2, False), (9, True)])
def test_step_with_the_attention_split_over_two_threads_equals_forward(monkeypatch, B, ragged):
    """The batch's second half on the worker thread (forced at any size): the same logits and caches."""
    import tinygrad_lm.decode_cpu as DC
    monkeypatch.setattr(DC, "SPLIT_ROWS_X_LENGTH", 1)
    monkeypatch.setattr(DC, "_two_cores", lambda: True)
    calls = []
    real = DC.decode_attention
    monkeypatch.setattr(DC, "decode_attention", lambda q, *a, **k: (calls.append(q.shape[0]), real(q, *a, **k))[1])
    step_vs_forward(small(), prompts(B, ragged))
    assert sorted(set(calls)) == sorted({B // 2, B - B // 2})   # only halves: every step was split


class _CountingBlas:
    """A stand-in for tensor.backend.BlasThreads: its count, and a log the test's wrappers fill."""

    def __init__(self, n: int) -> None:
        self.n, self.log = n, []

    def get(self) -> int:
        return self.n

    def set(self, n: int) -> None:
        self.n = n


@pytest.mark.parametrize("threads", [1, 2])
def test_products_on_every_blas_thread_and_the_small_calls_on_one(monkeypatch, threads):
    """During a step the weight products run with the caller's BLAS thread count, the attention's small
    products with one; the count is restored after each step (and nothing changes when it is one)."""
    import tinygrad_lm.decode_cpu as DC
    blas = _CountingBlas(threads)
    monkeypatch.setattr(DC.BlasThreads, "find", classmethod(lambda cls: blas))
    real_product, real_attention = DC.product, DC.decode_attention
    monkeypatch.setattr(DC, "product", lambda *a: (blas.log.append(("product", blas.n)), real_product(*a))[1])
    monkeypatch.setattr(DC, "decode_attention",
                        lambda *a, **k: (blas.log.append(("attention", blas.n)), real_attention(*a, **k))[1])
    step_vs_forward(small(), prompts(4, True), steps=3)
    assert {n for op, n in blas.log if op == "product"} == {threads}
    assert {n for op, n in blas.log if op == "attention"} == {1}
    assert blas.n == threads


def test_gelu_equals_the_tanh_form_without_warnings():
    """The step's GELU, a / (1 + exp(-2u)), equals 0.5 a (1 + tanh(u)) over the whole range,
    where exp overflows (a < ~-10) included, in float32 and float64."""
    for dtype in (np.float32, np.float64):
        model = small(seed=8)
        for p in model.parameters():
            p.data = p.data.astype(dtype)
        dec = cpu_decoder(model, model.new_caches(2), np.zeros(2, dtype=np.int64))
        a = np.linspace(-60, 60, 2 * dec.fc.shape[1]).astype(dtype).reshape(2, -1)
        a[0, :5] = [0.0, -0.0, 1e-30, -30.0, -1000.0]
        want = 0.5 * a * (1 + np.tanh(GELU_K * (a + 0.044715 * a ** 3)))
        got = a.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dec.gelu(got)
        # atol: in the negative tail 1 + tanh(u) cancels (the tanh form is the less exact one there)
        eps = np.finfo(dtype).eps
        np.testing.assert_allclose(got, want, rtol=8 * eps, atol=8 * eps)


def test_step_equals_forward_without_biases():
    step_vs_forward(small(bias=False), prompts(8, True))


def test_step_equals_forward_int8():
    model = small(seed=3)
    quantize_(model)
    step_vs_forward(model, prompts(8, True))


def test_step_equals_forward_float64():
    model = small(seed=4)
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    step_vs_forward(model, prompts(4, True))


@pytest.mark.parametrize("B,ragged", [(1, False), (8, False), (8, True), (32, True)])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_generate_greedy_tokens_equal_reference(B, ragged, pos):
    model = small(pos, seed=B)
    rows = prompts(B, ragged, seed=B)
    ids = rows if ragged else np.stack(rows)
    fast = generate(model, ids, 12, temperature=0)
    with reference_only():
        ref = generate(model, ids, 12, temperature=0)
    for a, b in zip(fast, ref):
        np.testing.assert_array_equal(a, b)


def test_stream_sampled_with_stops_equals_reference():
    model = small(seed=5)
    rows = prompts(8, True, seed=5)
    kw = dict(temperature=0.9, top_k=10, top_p=0.9, seed=0, stop_tokens=[3, 7])
    fast = list(stream(model, rows, 15, **kw))
    with reference_only():
        ref = list(stream(model, rows, 15, **kw))
    assert len(fast) == len(ref)
    for a, b in zip(fast, ref):
        np.testing.assert_array_equal(a, b)


def test_past_block_size_falls_back_to_the_window():
    model = small(seed=6)  # block_size 24: the last steps recompute the cropped window
    ids = np.stack(prompts(2, False, seed=6))
    fast = generate(model, ids, 30, temperature=0)
    with reference_only():
        ref = generate(model, ids, 30, temperature=0)
    np.testing.assert_array_equal(fast, ref)


def test_refusals():
    model = small()
    assert refusal(model) is None
    with reference_only():
        assert "fast paths are off" in refusal(model)
        assert cpu_decoder(model, model.new_caches(1), np.zeros(1, dtype=np.int64)) is None
    model.transformer.h[0].attn.c_attn.compute_dtype = np.float16
    assert "compute_dtype" in refusal(model)
