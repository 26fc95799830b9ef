"""Interop with the real `transformers.GPT2LMHeadModel` (tinygrad_lm/hf.py).

Skipped unless both `transformers` and `torch` import (neither is a dependency): a random
GPT2LMHeadModel saved with save_pretrained(safe_serialization=True) is loaded with ours and the
logits compared (fp32, 1e-4) on the CPU and, with CuPy and a GPU, on CUDA; then ours is exported
and loaded back with transformers, logits compared again.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tensor import backend  # noqa: E402
from tinygrad_lm.hf import export_hf, load_hf  # noqa: E402
from tinygrad_lm.model import GPT, GPTConfig  # noqa: E402

V, T, L, H, C = 97, 32, 2, 4, 64


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random GPT2LMHeadModel (non-trivial biases and LayerNorms) saved in HF's own format."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # biases and LayerNorm weights away from 0 and 1
    d = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(d, safe_serialization=True)
    return d, model


IDX = np.random.default_rng(1).integers(0, V, size=(3, T))


def hf_logits(model, idx):
    with torch.no_grad():
        return model(torch.from_numpy(idx)).logits.float().numpy()


def test_load_transformers_checkpoint_cpu(hf_dir):
    d, model = hf_dir
    ours = GPT.from_pretrained(str(d))
    np.testing.assert_allclose(ours(IDX)[0].numpy(), hf_logits(model, IDX), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and an NVIDIA GPU")
def test_load_transformers_checkpoint_cuda(hf_dir):
    d, model = hf_dir
    ours = load_hf(d).to("cuda")
    logits = backend.to_numpy(ours(IDX)[0].data)
    np.testing.assert_allclose(logits, hf_logits(model, IDX), rtol=1e-4, atol=1e-4)


def test_export_loads_in_transformers(tmp_path):
    ours = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, pos_encoding="learned"),
               seed=3).eval()
    for _, p in ours.named_parameters():  # non-trivial biases and LayerNorms
        p.data = p.data + np.random.default_rng(p.size).normal(0, 0.05, p.shape).astype(np.float32)
    export_hf(ours, tmp_path / "out")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(hf_logits(theirs, IDX), ours(IDX)[0].numpy(), rtol=1e-4, atol=1e-4)
    # a model without biases exports as zero biases: the same function in transformers
    nob = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=H, n_embd=C, pos_encoding="learned",
                        bias=False), seed=4).eval()
    export_hf(nob, tmp_path / "nobias")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "nobias").eval()
    np.testing.assert_allclose(hf_logits(theirs, IDX), nob(IDX)[0].numpy(), rtol=1e-4, atol=1e-4)
