"""int8 weight-only quantization (issue 19): the closed-form error bound, the int8 ops against
the dequantized float formula (float64, written out here), the fast paths against the
reference, a quantized GPT against the float one, the export / load round trip, the CLI and
its refusals. GPU tests skip without CuPy."""
from __future__ import annotations

import numpy as np
import pytest

from tensor import Tensor, backend
from tensor.dispatch import reference_only
from tensor.quant import dequantize_int8, embedding_int8, linear_int8, quantize_int8
from tensor.tensor import no_grad

gpu = pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and an NVIDIA GPU")


def weights(out: int, inp: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out, inp)) * rng.uniform(0.01, 2.0, (out, 1))).astype(np.float32)
    w[0] = 0.0                   # a row of zeros
    w[1, 3] = 50.0               # an outlier sets its row's scale
    return w


def float_linear(x, q, s, b=None) -> np.ndarray:
    """x @ (q * s[:, None]).T + b in float64: the textbook formula, independently of tensor/quant.py."""
    w = q.astype(np.float64) * s.astype(np.float64)[:, None]
    y = x.astype(np.float64).reshape(-1, x.shape[-1]) @ w.T
    if b is not None:
        y = y + b
    return y.reshape(x.shape[:-1] + (q.shape[0],))


# ------------------------------------------------------------------ quantize / dequantize
@pytest.mark.parametrize("shape", [(7, 5), (64, 33), (3, 1)])
def test_quantize_error_is_at_most_half_a_step(shape):
    w = weights(*shape) if shape[0] > 1 and shape[1] > 3 else np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    q, s = quantize_int8(w)
    assert q.dtype == np.int8 and q.shape == w.shape and s.dtype == np.float32 and s.shape == (shape[0],)
    assert int(np.abs(q.astype(np.int32)).max()) <= 127
    absmax = np.abs(w.astype(np.float64)).max(axis=1)
    nz = absmax > 0
    np.testing.assert_allclose(s[nz], absmax[nz] / 127, rtol=1e-6)       # s = absmax / 127
    err = np.abs(w.astype(np.float64) - q.astype(np.float64) * s[:, None])
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all(), float((err / s[:, None]).max())
    # each row's largest weight lands on +-127 exactly
    rows = np.arange(shape[0])[nz]
    top = np.abs(w).argmax(axis=1)[nz]
    assert (np.abs(q[rows, top]) == 127).all()
    np.testing.assert_allclose(dequantize_int8(q, s), q.astype(np.float64) * s[:, None], rtol=1e-6)


def test_zero_row_quantizes_to_zero():
    w = weights(4, 8)
    q, s = quantize_int8(w)
    assert (q[0] == 0).all() and np.isfinite(s).all() and (s > 0).all()
    with pytest.raises(ValueError, match="quantize_int8.*2-D float"):
        quantize_int8(np.ones(3, dtype=np.float32))


# ------------------------------------------------------------------ the int8 ops
@pytest.mark.parametrize("rows", [1, 3, 32, 40])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_int8_equals_the_dequantized_float_linear(rows, dtype, bias):
    rng = np.random.default_rng(rows)
    q, s = quantize_int8(weights(24, 20, seed=rows))
    b = rng.standard_normal(24).astype(dtype) if bias else None
    x = rng.standard_normal((rows, 20)).astype(dtype)
    want = float_linear(x, q, s, b)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for ctx in (reference_only, lambda: _nothing()):   # the reference, then the CPU fast path
        with ctx():
            y = linear_int8(Tensor(x), Tensor(q), Tensor(s), None if b is None else Tensor(b))
        assert y.dtype == dtype and y.shape == (rows, 24)
        np.testing.assert_allclose(y.data, want, rtol=tol, atol=tol * np.abs(want).max())


def test_linear_int8_keeps_leading_axes():
    q, s = quantize_int8(weights(6, 4))
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    y = linear_int8(Tensor(x), Tensor(q), Tensor(s))
    assert y.shape == (2, 3, 6)
    np.testing.assert_allclose(y.data, float_linear(x, q, s), rtol=1e-5, atol=1e-5)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_linear_int8_refuses_a_gradient_and_bad_shapes():
    q, s = quantize_int8(weights(5, 4))
    x = Tensor(np.ones((2, 4), dtype=np.float32), requires_grad=True)
    y = linear_int8(x, Tensor(q), Tensor(s))
    with pytest.raises(RuntimeError, match="linear_int8.*inference"):
        y.sum().backward()
    with pytest.raises(ValueError, match="linear_int8.*3 features.*expects 4"):
        linear_int8(Tensor(np.ones((2, 3), dtype=np.float32)), Tensor(q), Tensor(s))
    with pytest.raises(TypeError, match="linear_int8.*int8"):
        linear_int8(Tensor(np.ones((2, 4), dtype=np.float32)), Tensor(q.astype(np.int16)), Tensor(s))
    with pytest.raises(ValueError, match="linear_int8: scale"):
        linear_int8(Tensor(np.ones((2, 4), dtype=np.float32)), Tensor(q), Tensor(s[:3]))


def test_embedding_int8_rows():
    q, s = quantize_int8(weights(9, 6))
    ids = np.array([[0, 1, 8], [3, 3, 2]])
    e = embedding_int8(ids, Tensor(q), Tensor(s))
    np.testing.assert_allclose(e.data, q[ids].astype(np.float64) * s[ids][..., None], rtol=1e-6)
    with pytest.raises(IndexError, match="embedding_int8"):
        embedding_int8(np.array([9]), Tensor(q), Tensor(s))


# ------------------------------------------------------------------ a quantized GPT
def tiny_gpt(seed: int = 0, bias: bool = True):
    from tinygrad_lm.model import GPT, GPTConfig
    cfg = GPTConfig(vocab_size=40, block_size=24, n_layer=2, n_head=2, n_embd=32, pos_encoding="learned", bias=bias)
    model = GPT(cfg, seed=seed).eval()
    rng = np.random.default_rng(seed)   # weights larger than the 0.02 init, so the logits spread
    for p in model.parameters():
        if p.data.ndim == 2:
            p.data = (p.data * 10 + rng.standard_normal(p.shape).astype(np.float32) * 0.05).astype(np.float32)
    return model


def test_quantize_model_structure_and_bytes():
    from nn.quant import QuantizedEmbedding, QuantizedLinear, quantize_, weight_bytes
    model = tiny_gpt()
    before = weight_bytes(model)
    assert before == 4 * sum(p.data.size for p in model.parameters())
    two_d = sum(p.data.size for p in model.parameters() if p.data.ndim == 2 and p is not model.transformer.wpe.weight)
    rows = sum(p.shape[0] for p in model.parameters() if p.data.ndim == 2 and p is not model.transformer.wpe.weight)
    quantize_(model)
    assert isinstance(model.transformer.wte, QuantizedEmbedding) and isinstance(model.lm_head, QuantizedLinear)
    assert model.lm_head.weight is model.transformer.wte.weight            # the tied table, one int8 copy
    for blk in model.transformer.h:
        for lin in (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj):
            assert isinstance(lin, QuantizedLinear) and lin.weight.dtype == np.int8
    assert all(p.data.dtype == np.float32 for p in model.parameters())     # no int8 Parameter
    # every quantized float32 weight now costs 1 byte per element + a float32 scale per row
    assert weight_bytes(model) == before - 3 * two_d + 4 * rows


def _greedy_logits(model, prompt, n):
    """Greedy decoding by full forwards (no cache): the tokens and the logits of each step."""
    seq, logits = list(prompt), []
    with no_grad():
        for _ in range(n):
            out, _ = model(np.asarray([seq]))
            logits.append(np.asarray(out.data[0, -1], dtype=np.float64))
            seq.append(int(np.argmax(logits[-1])))
    return seq, np.stack(logits)


def test_quantized_gpt_logits_close_and_greedy_tokens_equal_where_the_margin_is_large():
    from nn.quant import quantize_
    from tinygrad_lm.sample import generate
    fmodel, qmodel = tiny_gpt(seed=3), quantize_(tiny_gpt(seed=3))
    prompt = [1, 5, 7]
    seq, flog = _greedy_logits(fmodel, prompt, 16)
    # the quantized model's logits along the float model's own greedy path
    with no_grad():
        qlog = np.asarray(qmodel(np.asarray([seq[:-1]]))[0].data[0, len(prompt) - 1:], dtype=np.float64)
    spread = flog.max() - flog.min()
    err = np.abs(qlog - flog).max()
    assert err <= 0.02 * spread, (err, spread)     # int8 weights: logits within 2% of their range
    top2 = np.sort(flog, axis=1)[:, -2:]
    sure = top2[:, 1] - top2[:, 0] > 2 * err       # no perturbation of size err can swap the top two
    assert sure.sum() >= 8
    assert (qlog.argmax(axis=1)[sure] == flog.argmax(axis=1)[sure]).all()
    # the KV-cached sampler on the quantized model follows the same tokens until the first unsure step
    first_unsure = int(np.argmin(sure)) if not sure.all() else len(sure)
    got = generate(qmodel, np.asarray([prompt]), 16, temperature=0)[0].tolist()
    assert got[:len(prompt) + first_unsure] == seq[:len(prompt) + first_unsure]


# ------------------------------------------------------------------ export / load / CLI
def test_export_int8_round_trip_and_size(tmp_path):
    from test_sample import make_ckpt, ref_greedy
    from nn.quant import quantize_, weight_bytes
    from tinygrad_lm import checkpoint as C
    from tinygrad_lm.export import export, stored_quantization
    from tinygrad_lm.sample import load_checkpoint_model
    d, model = make_ckpt(tmp_path)
    out = export(str(d), str(tmp_path / "int8"), "int8")
    assert stored_quantization(out) == "int8" and C.verify(out)["files"].keys() == {
        C.MODEL_FILE, C.STATE_FILE, C.TOKENIZER_FILE}
    f32 = export(str(d), str(tmp_path / "f32"), "none")

    def data_bytes(path):  # the file minus its 8-byte length and JSON header
        raw = (path / C.MODEL_FILE).read_bytes()
        return len(raw) - 8 - int.from_bytes(raw[:8], "little")
    n_float = sum(p.data.size for p in model.parameters())
    assert data_bytes(f32) == 4 * n_float
    wte = model.transformer.wte.weight.data.copy()
    want = quantize_(model)   # (in place)
    assert data_bytes(out) == weight_bytes(want) < 4 * n_float / 2   # 1 byte per quantized weight + scales
    loaded, _ = load_checkpoint_model(str(out))
    for a, b in ((loaded.lm_head, want.lm_head), (loaded.transformer.h[1].mlp.c_fc, want.transformer.h[1].mlp.c_fc)):
        assert np.array_equal(a.weight.data, b.weight.data) and np.array_equal(a.weight_scale.data, b.weight_scale.data)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert ref_greedy(loaded, [1, 2, 3], 10) == ref_greedy(want, [1, 2, 3], 10)
    # the float export loads as the original float model
    floaded, _ = load_checkpoint_model(str(f32))
    assert np.array_equal(floaded.transformer.wte.weight.data, wte)
    # a flipped byte in the int8 file is refused by the manifest
    raw = bytearray((out / C.MODEL_FILE).read_bytes())
    raw[-1] ^= 1
    (out / C.MODEL_FILE).write_bytes(bytes(raw))
    with pytest.raises(C.CheckpointError, match="SHA-256"):
        load_checkpoint_model(str(out))


def test_int8_header_must_match_the_config(tmp_path):
    from test_sample import make_ckpt
    from nn.serialization import load_safetensors, save_safetensors
    from tinygrad_lm import checkpoint as C
    from tinygrad_lm.export import export
    d, _ = make_ckpt(tmp_path)
    out = export(str(d), str(tmp_path / "int8"), "int8")
    arrays, meta = load_safetensors(out / C.MODEL_FILE)
    del arrays["transformer.h.0.attn.c_attn.weight_scale"]
    save_safetensors(out / C.MODEL_FILE, arrays, meta)
    C.write_manifest(out)
    with pytest.raises(C.CheckpointError, match="weight_scale"):
        C.read_state(out)
    meta["quantization"] = "int4"
    save_safetensors(out / C.MODEL_FILE, arrays, meta)
    C.write_manifest(out)
    with pytest.raises(C.CheckpointError, match="quantization"):
        C.read_state(out)


def test_cli_quantize_int8_end_to_end(tmp_path):
    from test_sample import CHARS, make_ckpt, ref_greedy, run_cli, run_main
    from nn.quant import quantize_
    d, model = make_ckpt(tmp_path)
    prompt = "ab cd"
    want = ref_greedy(quantize_(model), [CHARS.index(c) for c in prompt], 12)
    text = "".join(CHARS[t] for t in want) + "\n" + "-" * 40 + "\n"
    r = run_cli("--ckpt", str(d), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0",
                "--quantize", "int8")
    assert r.returncode == 0 and r.stdout == text, r.stderr
    code, err = run_main("export", "--ckpt", str(d), "--out", str(tmp_path / "q"), "--quantize", "int8")
    assert code == 0, err
    r = run_cli("--ckpt", str(tmp_path / "q"), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0")
    assert r.returncode == 0 and r.stdout == text, r.stderr


def test_cli_refuses_bad_quantize_flags(tmp_path):
    from test_sample import make_ckpt, run_main
    d, _ = make_ckpt(tmp_path)
    code, _ = run_main("sample", "--ckpt", str(d), "--quantize", "int4")
    assert code == 2
    code, _ = run_main("export", "--ckpt", str(d), "--out", str(tmp_path / "q"), "--quantize", "fp8")
    assert code == 2
    code, err = run_main("export", "--ckpt", str(d), "--out", str(tmp_path / "q"), "--quantize", "int8")
    assert code == 0, err
    code, err = run_main("export", "--ckpt", str(d), "--out", str(tmp_path / "q"), "--quantize", "int8")
    assert code == 2 and err.startswith("error: --out") and "--overwrite" in err, err
    code, err = run_main("sample", "--ckpt", str(tmp_path / "q"), "--quantize", "none")
    assert code == 2 and err.startswith("error: --quantize none") and err.count("\n") == 1, err
    code, err = run_main("export", "--ckpt", str(d), "--out", str(d / "inside"))
    assert code == 2 and "inside the source checkpoint" in err, err


def test_quantized_model_refuses_training():
    from nn.quant import quantize_
    model = quantize_(tiny_gpt()).train()
    _, loss = model(np.array([[1, 2, 3]]), np.array([[2, 3, 4]]))
    with pytest.raises(RuntimeError, match="inference"):
        loss.backward()


# ------------------------------------------------------------------ GPU (the lead runs these)
def _width(K: int) -> int:
    """The int8 weights per load gemv_int8 takes for fresh (aligned) arrays of row length K."""
    return 16 if K % 16 == 0 else 4 if K % 4 == 0 else 1


# (N, K): odd N (a warp's 4 channels run past N); K taking 16-wide loads (384, 1536), 4-wide
# (200) and single bytes (390: even but not a multiple of 4, 33: odd, shorter than a warp's lanes)
GPU_SHAPES = [(72, 200), (65, 384), (1155, 1536), (65, 390), (1155, 33)]


@gpu
@pytest.mark.parametrize("rows", [1, 5, 7, 8, 9, 31, 32, 33, 100])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_linear_int8_kernels_equal_the_reference(rows, shape, dtype, bias):
    from tensor.cuda.quant import GEMV_ROWS, LinearInt8CUDA, vector_width
    from tensor.dispatch import pick
    from tensor.quant import LinearInt8
    from test_gpu import _dtype
    cp = backend.cupy_module()
    dt = _dtype(dtype)
    N, K = shape
    rng = np.random.default_rng(rows)
    q, s = quantize_int8(weights(N, K, seed=rows))
    x = rng.standard_normal((rows, K)).astype(dt)          # exactly representable in dt: the
    b = rng.standard_normal(N).astype(dt) if bias else None  # reference sees the same inputs
    args = (cp.asarray(x), cp.asarray(q), cp.asarray(s), None if b is None else cp.asarray(b))
    assert pick(LinearInt8, *args) is LinearInt8CUDA
    assert vector_width(args[0], args[1]) == _width(K)
    y = linear_int8(*(None if a is None else Tensor(a) for a in args))
    assert y.dtype == dt and y.shape == (rows, N)
    want = float_linear(x.astype(np.float64), q, s, None if b is None else b.astype(np.float64))
    got = backend.to_numpy(y.data).astype(np.float64)
    tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
    assert GEMV_ROWS == 32  # rows 1..32 ran the fused GEMV, 33 and 100 dequantize + cuBLAS


@gpu
@pytest.mark.parametrize("rows", [1, 8, 31, 32, 40])
@pytest.mark.parametrize("K", [200, 384, 33])
def test_gpu_linear_int8_takes_strided_rows(rows, K):
    """A strided x (a decoding step's merged heads) stays on the CUDA path, which copies it to rows
    (the reference would call CuPy's cuBLAS, which a CUDA-graph capture refuses)."""
    from tensor.cuda.quant import LinearInt8CUDA
    from tensor.dispatch import pick
    from tensor.quant import LinearInt8
    cp = backend.cupy_module()
    q, s = quantize_int8(weights(73, K, seed=rows))
    wide_x = np.random.default_rng(rows).standard_normal((rows, 2 * K)).astype(np.float32)
    x = wide_x[:, ::2]  # (rows, K), every other column: strided for any rows (a transposed (K, 1) would not be)
    args = (cp.asarray(wide_x)[:, ::2], cp.asarray(q), cp.asarray(s), None)
    assert not args[0].flags.c_contiguous and pick(LinearInt8, *args) is LinearInt8CUDA
    got = backend.to_numpy(linear_int8(*(None if a is None else Tensor(a) for a in args)).data)
    want = float_linear(x.astype(np.float64), q, s, None)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@gpu
@pytest.mark.parametrize("rows", [7, 32])
@pytest.mark.parametrize("dtype, x_offset, q_offset, width", [
    ("float32", 0, 0, 16), ("float32", 4, 0, 16), ("float32", 1, 0, 1), ("float32", 0, 4, 4), ("float32", 0, 1, 1),
    ("float16", 0, 0, 16), ("float16", 4, 0, 4), ("float16", 1, 0, 1), ("float16", 0, 4, 4), ("bfloat16", 4, 0, 4),
    ("bfloat16", 2, 8, 1)])
def test_gpu_linear_int8_takes_misaligned_views(rows, dtype, x_offset, q_offset, width):
    """Contiguous x and q views starting x_offset elements / q_offset bytes into a buffer: the GEMV
    reads them with the widest loads their alignment allows (x: 16 bytes for 16 weights, 4 elements
    for 4; q: the weights' bytes), down to one element, and gets the same values."""
    from tensor.cuda.quant import vector_width
    from test_gpu import _dtype
    cp = backend.cupy_module()
    dt = _dtype(dtype)
    N, K = 67, 96
    q, s = quantize_int8(weights(N, K, seed=rows))
    x = np.random.default_rng(rows).standard_normal((rows, K)).astype(dt)
    x_buf = cp.zeros(x_offset + x.size, dt)
    x_buf[x_offset:] = cp.asarray(x.ravel())
    q_buf = cp.zeros(q_offset + q.size, np.int8)
    q_buf[q_offset:] = cp.asarray(q.ravel())
    xv, qv = x_buf[x_offset:].reshape(rows, K), q_buf[q_offset:].reshape(N, K)
    assert xv.flags.c_contiguous and qv.flags.c_contiguous and vector_width(xv, qv) == width
    got = backend.to_numpy(linear_int8(Tensor.wrap(xv), Tensor.wrap(qv), Tensor(cp.asarray(s))).data).astype(np.float64)
    want = float_linear(x.astype(np.float64), q, s, None)
    tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@gpu
def test_gpu_quantized_gpt_matches_the_cpu():
    from nn.quant import quantize_
    from tinygrad_lm.sample import generate
    cpu = quantize_(tiny_gpt(seed=5))
    gpu_model = quantize_(tiny_gpt(seed=5)).to("cuda")
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    with no_grad():
        lc = cpu(prompt)[0].data
        lg = backend.to_numpy(gpu_model(prompt)[0].data)
    np.testing.assert_allclose(lg, lc, rtol=1e-4, atol=1e-4 * np.abs(lc).max())
    a = generate(cpu, prompt, 12, temperature=0)
    b = generate(gpu_model, prompt, 12, temperature=0)
    assert np.array_equal(a, b)


@gpu
def test_gpu_cli_sample_int8_equals_the_cpu(tmp_path):
    """`sample --device cuda --quantize int8` end to end: the same greedy text as on the CPU."""
    from test_sample import make_ckpt, run_cli
    d, _ = make_ckpt(tmp_path)
    args = ("--ckpt", str(d), "--prompt", "ab cd", "--max-new-tokens", "12", "--temperature", "0", "--quantize", "int8")
    cpu, gpu_run = run_cli(*args), run_cli(*args, "--device", "cuda")
    assert cpu.returncode == 0 and gpu_run.returncode == 0, gpu_run.stderr
    assert gpu_run.stdout == cpu.stdout
