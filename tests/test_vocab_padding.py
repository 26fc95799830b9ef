"""pad_vocab_to (GPTConfig): the tied wte / lm_head table padded past the vocabulary (GPT-2's 50257 ->
50304) -- the shapes, the samplers never picking a padding id, the Hugging Face export cropping it, a
checkpoint round trip, and the gpt2-124m preset building and training from the CLI at a tiny size.
The GPU checks (the device sampler, two bf16 CUDA-graph steps of the real preset) skip without a GPU."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tensor import backend
from tinygrad_lm.model import GPT, GPTConfig


def padded_gpt(seed: int = 0, device: str = "cpu", pad: int = 16, vocab: int = 21) -> GPT:
    """A tiny GPT whose padding rows would win every pick: ln_f outputs its bias (ones) at every position,
    and the padding rows of the tied table are 10s (logit 160) where the real rows are ~N(0, 0.02)."""
    m = GPT(GPTConfig(vocab_size=vocab, block_size=16, n_layer=1, n_head=2, n_embd=16, pad_vocab_to=pad,
                      pos_encoding="learned"), seed=seed)
    m.transformer.ln_f.weight.data[:] = 0
    m.transformer.ln_f.bias.data[:] = 1
    m.transformer.wte.weight.data[vocab:] = 10.0
    return m.to(device) if device != "cpu" else m


def test_padded_table_shapes_and_config() -> None:
    cfg = GPTConfig(vocab_size=50257, block_size=8, n_layer=1, n_head=1, n_embd=8, pad_vocab_to=64)
    assert cfg.padded_vocab_size == 50304 and cfg.padded_vocab_size % 64 == 0
    assert GPTConfig(vocab_size=64, block_size=8, pad_vocab_to=64).padded_vocab_size == 64
    assert GPTConfig(vocab_size=65, block_size=8).padded_vocab_size == 65  # default 1: no padding
    assert "pad_vocab_to" not in {k for k, v in GPTConfig(vocab_size=5, block_size=8).to_dict().items() if v != 1}
    old = GPTConfig(vocab_size=5, block_size=8).to_dict()
    del old["pad_vocab_to"]  # a checkpoint from before the field loads unpadded
    assert GPTConfig.from_dict(old).padded_vocab_size == 5
    with pytest.raises(ValueError, match="pad_vocab_to"):
        GPTConfig(vocab_size=5, block_size=8, pad_vocab_to=0)
    m = padded_gpt()
    assert m.transformer.wte.weight.shape == (32, 16) and m.lm_head.weight is m.transformer.wte.weight
    logits, loss = m(np.zeros((2, 4), dtype=np.int64), np.ones((2, 4), dtype=np.int64))
    assert logits.shape == (2, 4, 32) and np.isfinite(loss.item())
    with pytest.raises(ValueError, match=r"\[0, 21\)"):  # a padding id is not a token
        m(np.full((1, 2), 25))
    from tinygrad_lm.memory import num_parameters, param_shapes
    assert num_parameters(m.config) == m.num_parameters()
    assert param_shapes(m.config)["transformer.wte.weight"] == (32, 16)


def test_the_padding_would_win_without_the_mask_and_the_sampler_never_picks_it() -> None:
    from tinygrad_lm.sample import generate
    m = padded_gpt()
    logits, _ = m(np.arange(8)[None, :] % 21)
    assert (logits.numpy()[0].argmax(-1) >= 21).all()  # the trap is armed
    for kw in (dict(temperature=0), dict(temperature=1.0), dict(temperature=2.0, top_k=5), dict(top_p=0.9)):
        for cache in (True, False):
            out = generate(m, np.array([[1, 2, 3], [4, 5, 6]]), 12, seed=0, use_cache=cache, **kw)
            assert out.max() < 21, (kw, cache, out)


def test_hf_export_crops_the_padding_and_loads_back(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from nn.serialization import read_safetensors_header
    from tinygrad_lm.hf import export_hf, load_hf
    m = padded_gpt()
    export_hf(m, tmp_path / "hf")
    header = read_safetensors_header(tmp_path / "hf" / "model.safetensors")
    assert tuple(header["transformer.wte.weight"]["shape"]) == (21, 16)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 21
    back = load_hf(tmp_path / "hf")
    idx = np.array([[1, 2, 3, 4]])
    np.testing.assert_allclose(back(idx)[0].numpy(), m.eval()(idx)[0].numpy()[..., :21], rtol=1e-5, atol=1e-5)


def test_gpt2_124m_preset_is_gpt2_small_padded_to_64() -> None:
    from tinygrad_lm.config import make_config
    cfg = make_config("gpt2-124m")
    m = cfg.model_config(50257)
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.pos_encoding, m.bias, m.dropout) == \
        (12, 12, 768, 1024, "learned", True, 0.0)
    assert m.padded_vocab_size == 50304 and cfg.tokenizer == "bpe:50257"
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay, cfg.beta2, cfg.grad_clip, cfg.grad_accum) == \
        (6e-4, 6e-5, 0.1, 0.95, 1.0, 1)
    from tinygrad_lm.memory import num_parameters
    assert 124e6 < num_parameters(m) < 125e6  # GPT-2 small: 124.4 M with the padded table
    graph = make_config("gpt2-124m", device="cuda", precision="bf16", cuda_graph="true")  # the GPU recipe validates
    assert graph.cuda_graph and graph.precision == "bf16"


def test_gpt2_124m_preset_trains_on_the_cpu_at_a_tiny_size_and_samples(tmp_path: Path, capsys) -> None:
    """The preset with a tiny override through the CLI: its bpe tokenizer (learned and cached), the padded
    table in the checkpoint, and `sample` loading it and producing real tokens only."""
    from tinygrad_lm import checkpoint as ckpt_io
    from tinygrad_lm.cli import main
    from tinygrad_lm.sample import generate, load_checkpoint_model
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, size=8)) for _ in range(200)) + "\n")
    argv = ["train", "--preset", "gpt2-124m", "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "run"), "--n-layer", "1", "--n-head", "2", "--n-embd", "64", "--block-size", "32",
            "--batch-size", "2", "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--sample-tokens", "0",
            "--progress", "false", "--tokenizer", "bpe:300"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0, capsys.readouterr()
    assert list((tmp_path / "cache").glob("bpe-300-*.json"))  # learned once, cached
    state = ckpt_io.read_state(ckpt_io.resolve(str(tmp_path / "run")))
    assert state["model_config"]["pad_vocab_to"] == 64 and state["model_config"]["n_embd"] == 64
    model, tok = load_checkpoint_model(str(tmp_path / "run"))
    assert model.transformer.wte.weight.shape[0] % 64 == 0 and tok.vocab_size == model.config.vocab_size
    assert model.transformer.wte.weight.shape[0] > tok.vocab_size
    out = generate(model, np.array([[1, 2]]), 20, temperature=1.5, seed=0)
    assert out.max() < tok.vocab_size


gpu = pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and an NVIDIA GPU")


@gpu
@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0), dict(temperature=1.0, top_k=4),
                                dict(temperature=1.0, top_p=0.9)])
def test_gpu_decoder_never_picks_a_padding_id(kw: dict) -> None:
    from tinygrad_lm.sample import generate
    m = padded_gpt(device="cuda")
    logits, _ = m(np.arange(8)[None, :] % 21)
    assert (backend.to_numpy(logits.data)[0].argmax(-1) >= 21).all()  # the trap is armed on the GPU too
    out = generate(m, np.array([[1, 2, 3], [4, 5, 6]]), 12, seed=0, cuda_graph=True, **kw)
    assert out.max() < 21, out
    cpu = generate(padded_gpt(), np.array([[1, 2, 3], [4, 5, 6]]), 12, temperature=0)
    if kw.get("temperature") == 0:
        np.testing.assert_array_equal(out, cpu)


@gpu
def test_gpt2_124m_preset_takes_two_bf16_cuda_graph_steps(tmp_path: Path) -> None:
    """The real preset (12 x 768, T 1024, a 50304-row table) at batch 2: two steps under --cuda-graph."""
    from tinygrad_lm.train import Trainer, make_config
    rng = np.random.default_rng(0)
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join("".join(chr(97 + c) for c in rng.integers(0, 26, 6)) for _ in range(60000)))
    cfg = make_config("gpt2-124m", data=str(corpus), cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"),
                      device="cuda", precision="bf16", cuda_graph="true", batch_size=2, max_iters=2,
                      tokenizer="bpe:4096", sample_tokens=0, progress=False)
    tr = Trainer(cfg, log=print)
    assert tr.model.transformer.wte.weight.shape == (tr.model.config.padded_vocab_size, 768)
    assert tr.model.config.padded_vocab_size % 64 == 0
    losses = [float(backend.to_numpy(tr.train_step())) for _ in range(2)]
    print("gpt2-124m bf16 cuda-graph losses", losses)
    assert all(np.isfinite(losses)) and tr.captured is not None
    assert abs(losses[0] - np.log(tr.model.config.vocab_size)) < 1.5  # ~ln(V) at initialisation


@gpu
def test_bf16_cross_entropy_over_a_gpt2_vocabulary_never_makes_float32_logits() -> None:
    """Issue 18: at vocab 50304 the bf16 logits are read by the fused kernels (tensor/cuda/cross_entropy.py)
    in place, the statistics kept in float32 registers; the only (N, V) array the loss adds is the bf16
    gradient. A float32 copy of the logits would add twice their bytes."""
    import tensor.functional as F
    from nn.amp import low_dtype
    from tensor import Tensor
    cp = backend.cupy_module()
    N, V = 2048, 50304
    bf16 = low_dtype("bf16")
    rng = np.random.default_rng(0)
    logits = Tensor(cp.asarray(rng.standard_normal((N, V), dtype=np.float32)).astype(bf16), requires_grad=True)
    targets = cp.asarray(rng.integers(0, 50257, N))
    cp.cuda.Device().synchronize()
    pool = cp.cuda.MemoryPool()  # a pool of its own: what earlier tests left in (or did to) the default one cannot count
    with cp.cuda.using_allocator(pool.malloc):
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        cp.cuda.Device().synchronize()
    grown = pool.total_bytes()
    nbytes = N * V * 2
    print(f"bf16 logits {nbytes / 2**20:.0f} MiB; the loss's forward+backward grew the pool by {grown / 2**20:.0f} MiB")
    assert logits.grad.dtype == bf16 and loss.dtype == np.float32
    assert grown < 1.5 * nbytes
    ref = F.cross_entropy(Tensor(logits.data.astype(np.float32)), targets)  # the float32 reference
    np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-4)
