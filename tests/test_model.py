"""The GPT of docs/DESIGN.md: nanoGPT names and layouts, weight tying, the init rule, the
initial loss, sinusoidal positions, gradients (gradcheck in float64) and input errors.

Expected values are closed forms (log V, 0.02 / sqrt(2 n_layer), the Vaswani et al.
formula) or independent computations, never the code under test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from tensor import gradcheck
from tinygrad_lm.model import GPT, GPTConfig


def tiny(**kw) -> GPTConfig:
    d = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
    d.update(kw)
    return GPTConfig(**d)


def expected_names_and_shapes(V: int, block: int, L: int, C: int, bias: bool, learned: bool) -> list[tuple[str, tuple]]:
    """nanoGPT's `GPT.named_parameters()` order and shapes (lm_head is tied, so not listed)."""
    out = [("transformer.wte.weight", (V, C))]
    if learned:
        out.append(("transformer.wpe.weight", (block, C)))

    def ln(name: str) -> list:
        return [(f"{name}.weight", (C,))] + ([(f"{name}.bias", (C,))] if bias else [])

    def lin(name: str, n_out: int, n_in: int) -> list:
        return [(f"{name}.weight", (n_out, n_in))] + ([(f"{name}.bias", (n_out,))] if bias else [])

    for i in range(L):
        h = f"transformer.h.{i}"
        out += ln(f"{h}.ln_1")
        out += lin(f"{h}.attn.c_attn", 3 * C, C)
        out += lin(f"{h}.attn.c_proj", C, C)
        out += ln(f"{h}.ln_2")
        out += lin(f"{h}.mlp.c_fc", 4 * C, C)
        out += lin(f"{h}.mlp.c_proj", C, 4 * C)
    out += ln("transformer.ln_f")
    return out


# ------------------------------------------------------------------ names, shapes, tying
@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned"])
@pytest.mark.parametrize("bias", [True, False])
def test_parameter_names_and_shapes_are_nanogpts(pos_encoding, bias):
    V, block, L, C = 13, 8, 2, 16
    model = GPT(GPTConfig(vocab_size=V, block_size=block, n_layer=L, n_head=4, n_embd=C, bias=bias,
                          pos_encoding=pos_encoding))
    expected = expected_names_and_shapes(V, block, L, C, bias, pos_encoding == "learned")
    sd = model.state_dict()
    sd.pop("lm_head.weight", None)  # allowed only if equal to wte (checked below)
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == expected
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in sd.values())
    n_expected = sum(math.prod(s) for _, s in expected)
    assert model.num_parameters() == n_expected


def test_lm_head_is_tied_to_wte():
    model = GPT(tiny())
    assert model.lm_head.weight is model.transformer.wte.weight
    sd = model.state_dict()
    if "lm_head.weight" in sd:
        np.testing.assert_array_equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    # parameters() lists the shared array once
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))


def test_tied_logits_are_final_hidden_times_wte():
    """logits = ln_f(h) @ wte.T: changing wte changes the output projection too."""
    model = GPT(tiny(n_layer=1))
    idx = np.array([[1, 2, 3, 4]])
    logits1, _ = model(idx)
    w = model.transformer.wte.weight
    w.data = w.data.copy()
    w.data[7] += np.linspace(-1, 1, w.shape[1], dtype=np.float32)  # token 7 is not in idx: only its logit changes
    logits2, _ = model(idx)
    d = logits2.numpy() - logits1.numpy()
    assert np.abs(np.delete(d, 7, axis=-1)).max() < 1e-5
    assert np.abs(d[..., 7]).min() > 1e-3


def test_state_dict_round_trip():
    a, b = GPT(tiny(), seed=1), GPT(tiny(), seed=2)
    assert not np.array_equal(a.state_dict()["transformer.wte.weight"], b.state_dict()["transformer.wte.weight"])
    b.load_state_dict(a.state_dict())
    idx = np.array([[0, 5, 3], [2, 2, 9]])
    np.testing.assert_array_equal(a(idx)[0].numpy(), b(idx)[0].numpy())
    assert b.lm_head.weight is b.transformer.wte.weight


# ------------------------------------------------------------------ init
def test_init_rule_statistics():
    L, C, V = 4, 128, 512
    model = GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=L, n_head=4, n_embd=C, pos_encoding="learned"), seed=3)
    sd = model.state_dict()
    resid_std = 0.02 / math.sqrt(2 * L)
    seen = set()
    for name, w in sd.items():
        if name == "lm_head.weight":
            continue
        w = w.astype(np.float64)
        if name.endswith("c_proj.weight"):
            assert abs(w.std() / resid_std - 1) < 0.05, (name, w.std(), resid_std)
            assert abs(w.mean()) < 0.1 * resid_std
            seen.add("c_proj")
        elif name.startswith(("transformer.ln_", "transformer.h")) and (".ln_" in name or "ln_f" in name):
            np.testing.assert_array_equal(w, 1.0 if name.endswith("weight") else 0.0, err_msg=name)
            seen.add("ln")
        elif name.endswith(".bias"):
            np.testing.assert_array_equal(w, 0.0, err_msg=name)
            seen.add("bias")
        else:
            assert w.ndim == 2, name
            assert abs(w.std() / 0.02 - 1) < 0.05, (name, w.std())
            assert abs(w.mean()) < 0.002, name
            seen.add("weight")
    assert seen == {"c_proj", "ln", "bias", "weight"}


def test_init_is_reproducible_from_seed():
    a, b, c = GPT(tiny(), seed=5), GPT(tiny(), seed=5), GPT(tiny(), seed=6)
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k])
    assert not np.array_equal(a.state_dict()["transformer.h.0.attn.c_attn.weight"],
                              c.state_dict()["transformer.h.0.attn.c_attn.weight"])


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned"])
def test_initial_loss_is_log_vocab(pos_encoding):
    V = 65
    model = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32, pos_encoding=pos_encoding))
    rng = np.random.default_rng(0)
    idx = rng.integers(0, V, size=(8, 16))
    tgt = rng.integers(0, V, size=(8, 16))
    logits, loss = model(idx, tgt)
    assert logits.shape == (8, 16, V)
    assert loss.shape == ()
    assert abs(loss.item() - math.log(V)) < 0.05


def test_loss_is_mean_cross_entropy_of_logits():
    """loss == mean over (B, T) of logsumexp(logits) - logits[target], computed in NumPy."""
    model = GPT(tiny())
    rng = np.random.default_rng(1)
    idx, tgt = rng.integers(0, 11, size=(3, 8)), rng.integers(0, 11, size=(3, 8))
    logits, loss = model(idx, tgt)
    z = logits.numpy().astype(np.float64)
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
    ref = (lse - np.take_along_axis(z, tgt[..., None], -1)[..., 0]).mean()
    assert abs(loss.item() - ref) < 1e-5
    logits_only, none = model(idx)
    assert none is None
    np.testing.assert_array_equal(logits_only.numpy(), logits.numpy())


# ------------------------------------------------------------------ positions
def pe_formula(pos: int, j: int, C: int) -> float:
    i = j // 2
    angle = pos / 10000 ** (2 * i / C)
    return math.sin(angle) if j % 2 == 0 else math.cos(angle)


def test_sinusoidal_table_matches_formula():
    from nn.layers import sinusoidal_table
    C, L = 16, 40
    pe = sinusoidal_table(L, C)
    assert pe.shape == (L, C)
    for pos, j in [(0, 0), (0, 1), (1, 0), (1, 1), (3, 4), (7, 5), (39, 14), (39, 15), (25, 9)]:
        assert abs(pe[pos, j] - pe_formula(pos, j, C)) < 1e-6, (pos, j)
    assert pe[0, 0] == 0.0 and pe[0, 1] == 1.0


def reference_forward(sd: dict, cfg: GPTConfig, idx: np.ndarray) -> np.ndarray:
    """An independent float64 NumPy forward pass of the docs/DESIGN.md GPT from a state_dict."""
    B, T = idx.shape
    C, H = cfg.n_embd, cfg.n_head
    g = lambda k: sd[k].astype(np.float64) if k in sd else 0.0  # noqa: E731 (bias=False -> 0)
    wte = g("transformer.wte.weight")
    if cfg.pos_encoding == "sinusoidal":
        pe = np.array([[pe_formula(t, j, C) for j in range(C)] for t in range(T)])
        x = wte[idx] * math.sqrt(C) + pe
    elif cfg.pos_encoding == "rope":
        x = wte[idx]
    else:
        x = wte[idx] + g("transformer.wpe.weight")[:T]

    def rope(a):  # a (B, H, T, D): channel i pairs with i + D/2, rotated by t * 10000^(-2i/D) at position t
        D = a.shape[-1]
        out = a.copy()
        for t in range(T):
            for i in range(D // 2):
                th = t * 10000.0 ** (-2 * i / D)
                x1, x2 = a[:, :, t, i], a[:, :, t, i + D // 2]
                out[:, :, t, i] = x1 * math.cos(th) - x2 * math.sin(th)
                out[:, :, t, i + D // 2] = x2 * math.cos(th) + x1 * math.sin(th)
        return out

    def ln(x, name):
        if cfg.norm == "rmsnorm":
            return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * g(name + ".weight")
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * g(name + ".weight") + g(name + ".bias")

    def lin(x, name):
        return x @ g(name + ".weight").T + g(name + ".bias")

    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}"
        q, k, v = np.split(lin(ln(x, h + ".ln_1"), h + ".attn.c_attn"), 3, axis=-1)
        q, k, v = (a.reshape(B, T, H, C // H).transpose(0, 2, 1, 3) for a in (q, k, v))
        if cfg.pos_encoding == "rope":
            q, k = rope(q), rope(k)
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(C // H)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        y = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + lin(y, h + ".attn.c_proj")
        u = lin(ln(x, h + ".ln_2"), h + ".mlp.c_fc")
        u = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        x = x + lin(u, h + ".mlp.c_proj")
    return ln(x, "transformer.ln_f") @ wte.T


@pytest.mark.parametrize("pos_encoding,norm", [("sinusoidal", "layernorm"), ("learned", "layernorm"),
                                               ("rope", "layernorm"), ("rope", "rmsnorm"), ("learned", "rmsnorm")])
@pytest.mark.parametrize("bias", [True, False])
def test_logits_match_independent_numpy_forward(pos_encoding, norm, bias):
    """Embedding (x sqrt(C) + sinusoid, + wpe, or rotary q/k), pre-norm blocks (LayerNorm or RMSNorm),
    causal attention, GELU(tanh), ln_f and the tied head, against a NumPy re-implementation
    (random, non-init weights)."""
    cfg = GPTConfig(vocab_size=17, block_size=12, n_layer=2, n_head=4, n_embd=16, bias=bias, pos_encoding=pos_encoding,
                    norm=norm)
    model = GPT(cfg, seed=4)
    rng = np.random.default_rng(0)
    sd = {k: (v + 0.2 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    idx = rng.integers(0, 17, size=(3, 10))
    ref = reference_forward(sd, cfg, idx)
    out = model(idx)[0].numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_sinusoidal_positions_matter():
    """The same token at different positions gets different logits (positions are added)."""
    model = GPT(tiny(n_layer=1), seed=0)
    logits = model(np.full((1, 6), 3))[0].numpy()
    assert np.abs(logits[0, 1:] - logits[0, :1]).max(axis=-1).min() > 1e-3


def test_causality_future_tokens_do_not_change_past_logits():
    model = GPT(tiny(), seed=2)
    a = np.array([[1, 2, 3, 4, 5, 6]])
    b = a.copy()
    b[0, 4:] = [9, 10]
    la, lb = model(a)[0].numpy(), model(b)[0].numpy()
    np.testing.assert_array_equal(la[:, :4], lb[:, :4])
    assert np.abs(la[:, 4:] - lb[:, 4:]).max() > 1e-4


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("pos_encoding,norm", [("sinusoidal", "layernorm"), ("learned", "layernorm"),
                                               ("rope", "rmsnorm")])
def test_gradcheck_gpt_loss_float64(pos_encoding, norm):
    V = 7
    model = GPT(GPTConfig(vocab_size=V, block_size=5, n_layer=1, n_head=2, n_embd=8, pos_encoding=pos_encoding,
                          norm=norm), seed=0)
    rng = np.random.default_rng(0)
    for p in model.parameters():  # float64, and larger than 0.02 so every path carries real gradient
        p.data = (p.data.astype(np.float64) + 0.3 * rng.standard_normal(p.shape))
    idx = rng.integers(0, V, size=(2, 5))
    tgt = rng.integers(0, V, size=(2, 5))
    assert model(idx, tgt)[1].dtype == np.float64
    names = dict(model.named_parameters())
    checked = ["transformer.wte.weight",               # tied: embedding and output projection
               "transformer.h.0.attn.c_attn.weight",
               "transformer.h.0.ln_1.weight",
               "transformer.h.0.mlp.c_fc.bias"]
    if pos_encoding == "learned":
        checked.append("transformer.wpe.weight")
    params = [names[n] for n in checked]

    def loss_fn(*_):
        return model(idx, tgt)[1]
    assert gradcheck(loss_fn, params, eps=1e-6, atol=1e-7, rtol=1e-4)


# ------------------------------------------------------------------ errors
def test_sequence_longer_than_block_size_is_an_error():
    model = GPT(tiny(block_size=4))
    model(np.zeros((1, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="block_size"):
        model(np.zeros((1, 5), dtype=np.int64))


@pytest.mark.parametrize("shape", [(4,), (1, 2, 3), ()])
def test_idx_must_be_2d(shape):
    model = GPT(tiny())
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(np.zeros(shape, dtype=np.int64))


@pytest.mark.parametrize("kw, match", [
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(pos_encoding="alibi"), "pos_encoding"),
    (dict(norm="batchnorm"), "norm"),
    (dict(pos_encoding="rope", n_embd=12, n_head=4), "even head size"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_embd=15, n_head=3), "even"),
])
def test_bad_config_is_an_error(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = tiny(dropout=0.1, pos_encoding="learned")
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="n_embed"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_embed": 3})
    cfg = tiny(pos_encoding="rope", norm="rmsnorm")
    assert cfg.to_dict()["norm"] == "rmsnorm" and GPTConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in tiny().to_dict().items() if k != "norm"}  # a checkpoint from before `norm`
    assert GPTConfig.from_dict(old).norm == "layernorm"


def test_rmsnorm_state_dict_names_have_no_bias():
    names = set(GPT(tiny(norm="rmsnorm", pos_encoding="rope")).state_dict())
    assert {"transformer.h.0.ln_1.weight", "transformer.h.0.ln_2.weight", "transformer.ln_f.weight"} <= names
    assert not any(n.endswith(("ln_1.bias", "ln_2.bias", "ln_f.bias")) for n in names)
    assert not any("wpe" in n for n in names)  # rope: no position parameters


# ------------------------------------------------------------------ PyTorch export (optional)
def load_export_example():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "export_to_pytorch.py"
    spec = importlib.util.spec_from_file_location("export_to_pytorch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned"])
@pytest.mark.parametrize("bias", [True, False])
def test_export_to_pytorch_loads_into_nanogpt_and_logits_match(tmp_path, pos_encoding, bias):
    torch = pytest.importorskip("torch")
    ex = load_export_example()
    cfg = GPTConfig(vocab_size=23, block_size=10, n_layer=2, n_head=2, n_embd=16, bias=bias, pos_encoding=pos_encoding)
    ours = GPT(cfg, seed=1)
    rng = np.random.default_rng(2)
    ours.load_state_dict({k: (v + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)
                          for k, v in ours.state_dict().items()})
    sd = ex.to_torch_state_dict(ours)
    names = [n for n, _ in expected_names_and_shapes(23, 10, 2, 16, bias, pos_encoding == "learned")]
    assert sorted(sd) == sorted(names + ["lm_head.weight"])
    assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    path = tmp_path / "gpt.pt"
    torch.save(sd, path)
    theirs = ex.NanoGPT(cfg)
    missing, unexpected = theirs.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert missing == [] and unexpected == []
    assert theirs.lm_head.weight is theirs.transformer.wte.weight
    idx = rng.integers(0, 23, size=(3, 10))
    a = ours(idx)[0].numpy()
    with torch.no_grad():
        b = theirs(torch.from_numpy(idx)).numpy()
    assert np.abs(a).max() > 1.0   # non-trivial logits, so agreement means something
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
