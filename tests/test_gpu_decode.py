"""GPU checks of fast decoding (issue 19): the decode-attention kernel against the reference attention,
the device KV-cache write, the device sampler (greedy = argmax, its RNG = the NumPy formula, the
filtered distributions by chi-square, exact support sets, stop tokens), and the CUDA-graph decoder
against the eager KV-cached sampler, the uncached forward and the CPU model. Skipped cleanly without
CuPy or a GPU."""
from __future__ import annotations

import numpy as np
import pytest

from tensor import Tensor, backend

pytestmark = pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and an NVIDIA GPU")

TOL = {"float32": dict(rtol=1e-4, atol=1e-5), "float16": dict(rtol=2e-2, atol=2e-2),
       "bfloat16": dict(rtol=6e-2, atol=6e-2)}
DTYPES = ["float32", "float16", "bfloat16"]


def _dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(name)


def _gpu(a: np.ndarray, dtype) -> object:
    return Tensor(np.ascontiguousarray(a).astype(dtype), device="cuda").data


def _host(a) -> np.ndarray:
    return backend.to_numpy(a).astype(np.float64)


# ------------------------------------------------------------------ decode attention
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Tk,D", [(1, 1, 1, 64), (2, 3, 37, 64), (2, 2, 1000, 16), (3, 2, 257, 96),
                                      (1, 4, 5, 128), (2, 1, 70, 8)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("splits", [None, 1, 7])
@pytest.mark.parametrize("kernel", [None, "scalar"])
def test_decode_attention_equals_reference(dtype, B, H, Tk, D, masked, splits, kernel):
    """Odd lengths, head sizes not a multiple of 32, one split or many, strided views of a larger
    cache, padding masks (one row fully masked -> zeros, as the reference); the default kernel (the
    16-byte-load one at D 64 and 128) and the scalar one."""
    import cupy as cp
    from tensor.attention import ScaledDotProductAttention
    from tensor.cuda.decode_attention import decode_attention, fits
    rng = np.random.default_rng(B * 1000 + Tk)
    dt = _dtype(dtype)
    cap = Tk + 9  # the cache is bigger than what is read: k, v are strided views
    q = _gpu(rng.standard_normal((B, H, 1, D)), dt)
    kc = _gpu(rng.standard_normal((B, H, cap, D)), dt)
    vc = _gpu(rng.standard_normal((B, H, cap, D)), dt)
    k, v = kc[:, :, :Tk], vc[:, :, :Tk]
    mask = None
    if masked:
        m = rng.random((B, cap)) > 0.3
        if B > 1:
            m[0, :] = False                      # a fully masked row
        mask = cp.asarray(m)[:, :Tk]
    assert fits(q, k, v, mask)
    got = decode_attention(q, k, v, mask, splits=splits, kernel=kernel)
    want = ScaledDotProductAttention().forward(q, k, v, mask=mask, causal=True)
    assert got.shape == want.shape == (B, H, 1, D) and got.dtype == q.dtype
    np.testing.assert_allclose(_host(got), _host(want), **TOL[dtype])


def test_decode_attention_is_the_dispatched_path_at_inference():
    from nn.attention import scaled_dot_product_attention
    from tensor.attention import ScaledDotProductAttention
    from tensor.cuda.attention import CudaScaledDotProductAttention
    from tensor.dispatch import pick, reference_only
    from tensor.tensor import no_grad
    import cupy as cp
    rng = np.random.default_rng(5)
    q, k, v = (_gpu(rng.standard_normal(s), np.float32) for s in ((2, 3, 1, 16), (2, 3, 20, 16), (2, 3, 20, 16)))
    mask = cp.asarray(rng.random((2, 20)) > 0.2)
    with no_grad():
        assert pick(ScaledDotProductAttention, q, k, v, mask=mask, causal=True, dropout_p=0.0) \
            is CudaScaledDotProductAttention
        fast = scaled_dot_product_attention(Tensor.wrap(q), Tensor.wrap(k), Tensor.wrap(v), mask=mask)
        with reference_only():
            ref = scaled_dot_product_attention(Tensor.wrap(q), Tensor.wrap(k), Tensor.wrap(v), mask=mask)
    np.testing.assert_allclose(_host(fast.data), _host(ref.data), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_cache_write_at_the_device_column(dtype):
    import cupy as cp
    from tensor.cuda.decode_attention import kv_cache_write
    rng = np.random.default_rng(1)
    dt = _dtype(dtype)
    ck, cv = _gpu(np.zeros((2, 3, 10, 8)), dt), _gpu(np.zeros((2, 3, 10, 8)), dt)
    qkv = _gpu(rng.standard_normal((2, 1, 3 * 3 * 8)), dt)   # k, v as split_heads' views of a fused qkv
    heads = qkv.reshape(2, 1, 3, 3, 8).transpose(2, 0, 3, 1, 4)
    kv_cache_write(ck, cv, heads[1], heads[2], cp.asarray(np.array([6], dtype=np.int32)))
    want_k, want_v = np.zeros((2, 3, 10, 8)), np.zeros((2, 3, 10, 8))
    want_k[:, :, 6] = _host(heads[1])[:, :, 0]
    want_v[:, :, 6] = _host(heads[2])[:, :, 0]
    assert np.array_equal(_host(ck), want_k) and np.array_equal(_host(cv), want_v)


# ------------------------------------------------------------------ the device sampler
def _sampler(B, temperature=1.0, top_k=None, top_p=None, seed=0, stops=()):
    from tensor.cuda.sampling import DeviceSampler
    return DeviceSampler(B, temperature, top_k, top_p, seed, stops)


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_is_numpy_argmax_first_index_on_ties(dtype):
    rng = np.random.default_rng(2)
    dt = _dtype(dtype)
    lg = rng.standard_normal((6, 1000)).astype(dt)
    lg[1, [17, 500, 999]] = 9.0                       # ties: the first index wins
    lg[2, :] = 0.0
    got = backend.to_numpy(_sampler(6, temperature=0.0)(_gpu(lg, dt)))
    assert got.tolist() == lg.astype(np.float32).argmax(axis=-1).tolist()


def test_rng_is_the_numpy_formula():
    """Equal logits, temperature 1: the Gumbel-max draw is the argmax of the uniforms themselves."""
    import cupy as cp
    from tensor.cuda.sampling import uniforms
    V, B = 50, 4
    s = _sampler(B, seed=123)
    for counter in (0, 1, 7):
        s.counter[...] = counter
        got = backend.to_numpy(s(cp.zeros((B, V), dtype=np.float32)))
        assert got.tolist() == [int(np.argmax(uniforms(123, counter, r, V))) for r in range(B)]


def test_sampling_distribution_chi_square_and_exact_supports():
    from test_sample import LOGITS_A, LOGITS_B, SETTINGS, chi2_ok, expected_dist
    draws = 20000  # one row per draw, all in one launch (each row its own RNG stream)
    for temperature, top_k, top_p in SETTINGS:
        for lg in (LOGITS_A, LOGITS_B):
            lg32 = lg.astype(np.float32)
            s = _sampler(draws, temperature, top_k, top_p, seed=99)
            toks = backend.to_numpy(s(_gpu(np.tile(lg32, (draws, 1)), np.float32)))
            probs = expected_dist(lg32, temperature, top_k, top_p)
            counts = np.bincount(toks, minlength=len(lg))
            assert set(np.flatnonzero(counts)) == set(np.flatnonzero(probs)), (temperature, top_k, top_p, counts)
            ok, stat = chi2_ok(counts, probs)
            assert ok, f"{(temperature, top_k, top_p)}: chi-square {stat:.2f}: {counts} vs {probs * draws}"


@pytest.mark.parametrize("logits,top_k,top_p", [
    ([1.0, 1.0, 1.0, 0.0, -1.0], 2, None),     # ties at the k-th: all kept (as np.partition + z < kth)
    ([2.0, 2.0, 0.0, 0.0, 0.0], None, 0.3),    # tied top-2: only the first by index (mass above 0.5 >= 0.3)
    ([2.0, 2.0, 0.0, 0.0, 0.0], None, 0.6),    # both kept
    ([0.0, 3.0, 0.0, 3.0, 3.0], 4, 0.5),       # the 4th largest is tied: top-k keeps all; top-p two 3.0s
])
def test_support_sets_with_ties_equal_the_cpu_filters(logits, top_k, top_p):
    from tinygrad_lm.sample import filtered_probs
    lg = np.asarray(logits, dtype=np.float32)
    want = set(np.flatnonzero(filtered_probs(lg[None], 1.0, top_k, top_p)[0] > 0).tolist())
    draws = 4000
    toks = backend.to_numpy(_sampler(draws, 1.0, top_k, top_p, seed=5)(_gpu(np.tile(lg, (draws, 1)), np.float32)))
    assert set(toks.tolist()) == want


def test_stop_tokens_mark_rows_done_and_repeat():
    lg = np.full((3, 8), -5.0, dtype=np.float32)
    lg[0, 2], lg[1, 4], lg[2, 6] = 5.0, 5.0, 5.0
    s = _sampler(3, temperature=0.0, stops=(2, 6))
    assert backend.to_numpy(s(_gpu(lg, np.float32))).tolist() == [2, 4, 6]
    assert backend.to_numpy(s.done).tolist() == [1, 0, 1]
    lg2 = np.zeros((3, 8), dtype=np.float32)
    lg2[:, 1] = 5.0
    assert backend.to_numpy(s(_gpu(lg2, np.float32))).tolist() == [2, 1, 6]   # stopped rows repeat


# ------------------------------------------------------------------ the graph decoder
def tiny_gpt(pe="sinusoidal", seed=0, block=64, vocab=65):
    """A small GPT on the GPU with its logits spread wide (ln_f's weight x 20), so that float
    round-off between implementations cannot flip a greedy choice."""
    from tinygrad_lm.model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab, block, n_layer=2, n_head=2, n_embd=64, pos_encoding=pe), seed=seed).eval()
    model.transformer.ln_f.weight.data = model.transformer.ln_f.weight.data * 20.0
    return model


def _ref_logits(model, ids) -> np.ndarray:
    from tensor.tensor import no_grad
    with no_grad():
        logits, _ = model(np.asarray(ids, dtype=np.int64)[None, :])
    return _host(logits.data[0, -1])


@pytest.mark.parametrize("pe", ["sinusoidal", "learned", "rope"])
def test_graph_greedy_equals_eager_cache_uncached_and_cpu(pe):
    from tinygrad_lm.sample import generate
    cpu = tiny_gpt(pe, seed=3)
    want = generate(cpu, np.array([[5, 9, 1], [7, 7, 2]]), 40, temperature=0, use_cache=False)
    model = tiny_gpt(pe, seed=3).to("cuda")
    prompt = np.array([[5, 9, 1], [7, 7, 2]])
    graph = generate(model, prompt, 40, temperature=0, cuda_graph=True)
    eager = generate(model, prompt, 40, temperature=0, cuda_graph=False)
    nocache = generate(model, prompt, 40, temperature=0, use_cache=False)
    assert graph.tolist() == eager.tolist() == nocache.tolist() == want.tolist()


@pytest.mark.parametrize("graph", [True, False])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_decoder_step_logits_equal_the_full_forward(graph, precision):
    """Each step's logits (recorded where the sampler reads them) against a full forward over the
    sequence so far; lookahead 0 so that a replayed graph's logits buffer holds the current step."""
    from nn.amp import autocast_
    from tensor.tensor import no_grad
    from tinygrad_lm.decode_cuda import GPUDecoder
    model = tiny_gpt("learned", seed=4).to("cuda")
    if precision == "bf16":
        autocast_(model, "bf16")
    prompt = np.array([[3, 1, 4, 1, 5]])
    dec = GPUDecoder(model, prompt, np.array([0]), 24, temperature=0, cuda_graph=graph, lookahead=0)
    seen = []
    dec.sampler = _Recorder(dec.sampler, seen)
    seq = prompt[0].tolist()
    tol = dict(rtol=1e-4, atol=1e-3) if precision == "fp32" else dict(rtol=5e-2, atol=0.25)
    with no_grad():
        for step, toks in enumerate(dec):
            got = _host(seen[min(step, len(seen) - 1)][0])
            np.testing.assert_allclose(got, _ref_logits(model, seq), err_msg=f"step {step}", **tol)
            seq.append(int(toks[0]))
    assert len(seq) == 5 + 24 and len(seen) == (3 if graph else 24)


@pytest.mark.parametrize("no_split_k_rows", [0, 64])
def test_fused_bf16_decode_step_equals_the_reference_path(no_split_k_rows, monkeypatch):
    """The decoder as benchmarks/bench_decode_gpu.py runs it in bf16 (autocast, the blocks' weights and
    biases stored in bfloat16): residual adds as one kernel, c_fc's GELU in its GEMM's epilogue, with
    the heuristic's first cuBLASLt algorithms (0) or those without split-K (64). Every captured step's
    logits against a full forward with every fast path off."""
    from nn.amp import autocast_, low_dtype
    from nn.layers import Linear
    from tensor import dispatch
    from tensor.cuda import cublaslt
    from tensor.tensor import no_grad
    from tinygrad_lm.decode_cuda import GPUDecoder
    monkeypatch.setattr(cublaslt, "NO_SPLIT_K_ROWS", no_split_k_rows)
    model = autocast_(tiny_gpt("learned", seed=6).to("cuda"), "bf16")
    for m in model.transformer.h.modules():
        if isinstance(m, Linear):
            m.weight.data = m.weight.data.astype(low_dtype("bf16"))
            m.bias.data = m.bias.data.astype(low_dtype("bf16"))
    prompt = np.array([[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]])
    dec = GPUDecoder(model, prompt, np.array([0, 0]), 16, temperature=0, cuda_graph=True, lookahead=0)
    seen = []
    dec.sampler = _Recorder(dec.sampler, seen)
    seqs = [r.tolist() for r in prompt]
    tol = dict(rtol=5e-2, atol=0.25)
    with no_grad():
        for step, toks in enumerate(dec):
            got = _host(seen[min(step, len(seen) - 1)])
            with dispatch.reference_only():
                for b, seq in enumerate(seqs):
                    np.testing.assert_allclose(got[b], _ref_logits(model, seq), err_msg=f"step {step} row {b}", **tol)
            for b, seq in enumerate(seqs):
                seq.append(int(toks[b]))
    assert len(seen) == 3  # prefill, the eager step, the captured one (replayed)
    assert any(p["epilogue"] == cublaslt._EPILOGUE_GELU_BIAS for p in cublaslt.plan_summary())


class _Recorder:
    """Stands in for the DeviceSampler: records the logits arrays it is handed, then samples."""

    def __init__(self, sampler, seen: list) -> None:
        self.sampler, self.seen = sampler, seen
        self.tokens, self.counter = sampler.tokens, sampler.counter

    def __call__(self, logits):
        self.seen.append(logits)
        return self.sampler(logits)


@pytest.mark.parametrize("graph", [True, False])
def test_batched_ragged_prompts_equal_each_alone(graph):
    from tinygrad_lm.sample import generate
    model = tiny_gpt("sinusoidal", seed=5).to("cuda")
    prompts = [[4], [9, 8, 7, 6, 5, 4, 3], [1, 2, 3]]
    together = generate(model, prompts, 30, temperature=0, cuda_graph=graph)
    for p, row in zip(prompts, together):
        alone = generate(model, [p], 30, temperature=0, cuda_graph=graph)[0]
        assert row.tolist() == alone.tolist()
        assert row.tolist() == generate(model, [p], 30, temperature=0, cuda_graph=False, use_cache=False)[0].tolist()


def test_stop_tokens_per_row_equal_the_eager_sampler():
    from tinygrad_lm.sample import generate, stream
    model = tiny_gpt("learned", seed=6).to("cuda")
    prompts = [[1, 2], [3], [4, 5, 6]]
    free = generate(model, prompts, 30, temperature=0, cuda_graph=True)
    stops = [int(free[0][2 + 3]), int(free[2][3 + 10])]   # row 0 stops by step 4, row 2 by step 11
    graph = generate(model, prompts, 30, temperature=0, stop_tokens=stops, cuda_graph=True)
    eager = generate(model, prompts, 30, temperature=0, stop_tokens=stops, use_cache=False)
    assert [r.tolist() for r in graph] == [r.tolist() for r in eager]
    steps = list(stream(model, [[1, 2]], 30, temperature=0, stop_tokens=stops[:1], cuda_graph=True))
    assert int(steps[-1][0]) == stops[0] and len(steps) <= 4   # the stream ends when every row stopped


def test_seeded_sampling_reproduces_and_differs_by_seed():
    from tinygrad_lm.sample import generate
    model = tiny_gpt("sinusoidal", seed=7, vocab=40).to("cuda")
    model.transformer.ln_f.weight.data = model.transformer.ln_f.weight.data / 20.0  # a flat distribution
    kw = dict(temperature=0.9, top_k=30, top_p=0.95, cuda_graph=True)
    a = generate(model, np.array([[1], [2]]), 40, seed=11, **kw)
    b = generate(model, np.array([[1], [2]]), 40, seed=11, **kw)
    c = generate(model, np.array([[1], [2]]), 40, seed=12, **kw)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert len(set(a[0, 1:].tolist())) > 5   # new numbers every replay, not one draw repeated


def test_graph_refused_past_block_size_and_default_falls_back():
    from tinygrad_lm.sample import generate
    model = tiny_gpt("learned", seed=8, block=16).to("cuda")
    with pytest.raises(ValueError, match="block_size 16"):
        generate(model, np.array([[1, 2, 3]]), 20, temperature=0, cuda_graph=True)
    auto = generate(model, np.array([[1, 2, 3]]), 20, temperature=0)       # slides the window: eager
    assert auto.tolist() == generate(model, np.array([[1, 2, 3]]), 20, temperature=0, use_cache=False).tolist()
    exact = generate(model, np.array([[1, 2, 3]]), 14, temperature=0, cuda_graph=True)  # 3 + 14 - 1 = 16: fits
    assert exact.tolist() == generate(model, np.array([[1, 2, 3]]), 14, temperature=0, use_cache=False).tolist()


def test_cli_cuda_graph_on_the_gpu(tmp_path):
    from test_sample import make_ckpt, run_main
    d, _ = make_ckpt(tmp_path)
    code, err = run_main("sample", "--ckpt", str(d), "--prompt", "ab", "--max-new-tokens", "10",
                         "--temperature", "0", "--device", "cuda", "--cuda-graph")
    assert code == 0, err
    code, err = run_main("sample", "--ckpt", str(d), "--prompt", "ab", "--max-new-tokens", "100",
                         "--device", "cuda", "--cuda-graph")
    assert code == 2 and "block_size" in err and err.startswith("error: --cuda-graph"), err


def test_a_failed_capture_falls_back_by_default_and_raises_when_insisted(monkeypatch):
    from tinygrad_lm import decode_cuda
    from tinygrad_lm.sample import generate
    model = tiny_gpt("learned", seed=9).to("cuda")
    want = generate(model, np.array([[2, 3]]), 12, temperature=0, use_cache=False)

    def broken(self):
        raise RuntimeError("capture refused")
    monkeypatch.setattr(decode_cuda.GPUDecoder, "_capture", broken)
    with pytest.warns(RuntimeWarning, match="capture refused"):
        got = generate(model, np.array([[2, 3]]), 12, temperature=0)
    assert got.tolist() == want.tolist()
    with pytest.raises(RuntimeError, match="capture refused"):
        generate(model, np.array([[2, 3]]), 12, temperature=0, cuda_graph=True)
