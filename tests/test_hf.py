"""Hugging Face GPT-2 interop (tinygrad_lm/hf.py), with no network and no real weights.

A small random GPT-2 checkpoint is written in HF's exact layout (GPT2LMHeadModel names, Conv1D
weights stored (in, out), the attention-mask buffers, safetensors, config.json with GPT2Config's
field names) using NumPy only. Our logits are checked against an independent float64 NumPy
GPT-2 forward written below from the published architecture (Radford et al. 2019; HF's
modeling_gpt2.py): it imports nothing of the model code.
"""
import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("safetensors")
from safetensors.numpy import save_file  # noqa: E402

from tinygrad_lm.errors import UserError  # noqa: E402
from tinygrad_lm.hf import HFError, export_hf, load_hf  # noqa: E402
from tinygrad_lm.model import GPT, GPTConfig  # noqa: E402

V, T, L, H, C = 61, 16, 2, 4, 32


def hf_config(**over):
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": V, "n_positions": T,
           "n_ctx": T, "n_embd": C, "n_layer": L, "n_head": H, "n_inner": None, "activation_function": "gelu_new",
           "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "layer_norm_epsilon": 1e-05,
           "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True, "bos_token_id": V - 1,
           "eos_token_id": V - 1, "reorder_and_upcast_attn": False, "scale_attn_by_inverse_layer_idx": False}
    cfg.update(over)
    return cfg


def hf_weights(seed=0, prefix="transformer.", buffers=True, vocab=V, positions=T):
    """name -> float32 array exactly as GPT2LMHeadModel.save_pretrained writes them (tied lm_head left out)."""
    rng = np.random.default_rng(seed)
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    t = {"wte.weight": w(vocab, C), "wpe.weight": w(positions, C), "ln_f.weight": 1 + w(C), "ln_f.bias": w(C)}
    for i in range(L):
        h = f"h.{i}."
        t.update({h + "ln_1.weight": 1 + w(C), h + "ln_1.bias": w(C), h + "ln_2.weight": 1 + w(C),
                  h + "ln_2.bias": w(C),
                  h + "attn.c_attn.weight": w(C, 3 * C), h + "attn.c_attn.bias": w(3 * C),  # Conv1D: (in, out)
                  h + "attn.c_proj.weight": w(C, C), h + "attn.c_proj.bias": w(C),
                  h + "mlp.c_fc.weight": w(C, 4 * C), h + "mlp.c_fc.bias": w(4 * C),
                  h + "mlp.c_proj.weight": w(4 * C, C), h + "mlp.c_proj.bias": w(C)})
        if buffers:
            t[h + "attn.bias"] = np.tril(np.ones((positions, positions), np.float32))[None, None]
            t[h + "attn.masked_bias"] = np.array(-1e4, np.float32)
    return {prefix + k: v for k, v in t.items()}


def write_hf(d, weights=None, config=None):
    d.mkdir(parents=True, exist_ok=True)
    save_file(weights if weights is not None else hf_weights(), str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config if config is not None else hf_config()))
    return d


def reference_gpt2(t, idx):
    """GPT-2's forward in float64 from the published architecture; t holds HF names (bare)."""
    g = {k: v.astype(np.float64) for k, v in t.items()}

    def ln(x, p):  # LayerNorm, eps 1e-5, biased variance
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * g[p + ".weight"] + g[p + ".bias"]

    def conv1d(x, p):  # HF Conv1D: x @ W + b with W (in, out)
        return x @ g[p + ".weight"] + g[p + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    B, n = idx.shape
    x = g["wte.weight"][idx] + g["wpe.weight"][np.arange(n)]
    hs = C // H
    causal = np.tril(np.ones((n, n), bool))
    for i in range(L):
        p = f"h.{i}."
        q, k, v = np.split(conv1d(ln(x, p + "ln_1"), p + "attn.c_attn"), 3, axis=-1)
        q, k, v = (a.reshape(B, n, H, hs).transpose(0, 2, 1, 3) for a in (q, k, v))
        att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)
        att = np.where(causal, att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, n, C)
        x = x + conv1d(y, p + "attn.c_proj")
        x = x + conv1d(gelu_new(conv1d(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return ln(x, "ln_f") @ g["wte.weight"].T


IDX = np.random.default_rng(7).integers(0, V, size=(2, T))


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_logits_match_independent_reference(tmp_path, prefix):
    weights = hf_weights(prefix=prefix)
    model = GPT.from_pretrained(str(write_hf(tmp_path / "gpt2", weights)))
    assert model.config == GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C,
                                     pos_encoding="learned", bias=True)
    assert not model.training
    logits, _ = model(IDX)
    ref = reference_gpt2({k[len(prefix):]: v for k, v in weights.items()}, IDX)
    np.testing.assert_allclose(logits.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_untied_lm_head_equal_to_wte_is_accepted_and_different_is_refused(tmp_path):
    weights = hf_weights()
    weights["lm_head.weight"] = weights["transformer.wte.weight"].copy()
    load_hf(write_hf(tmp_path / "a", weights))
    weights["lm_head.weight"][0, 0] += 1
    with pytest.raises(HFError, match="lm_head.weight.*differs from wte"):
        load_hf(write_hf(tmp_path / "b", weights))


def test_export_round_trip(tmp_path):
    model = load_hf(write_hf(tmp_path / "in"))
    out = export_hf(model, tmp_path / "out")
    from safetensors.numpy import load_file
    written = load_file(str(out / "model.safetensors"))
    original = hf_weights(buffers=False)
    assert set(written) == set(original)  # HF's layout: transformer.*, Conv1D (in, out), no buffers or lm_head
    for k, v in original.items():
        np.testing.assert_array_equal(written[k], v, err_msg=k)
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")} == \
        {"vocab_size": V, "n_positions": T, "n_embd": C, "n_layer": L, "n_head": H}
    again = load_hf(out)
    np.testing.assert_array_equal(again(IDX)[0].numpy(), model(IDX)[0].numpy())


def test_export_without_biases_writes_zero_biases(tmp_path):
    m = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, pos_encoding="learned",
                      bias=False), seed=3).eval()
    again = load_hf(export_hf(m, tmp_path / "out"))
    np.testing.assert_allclose(again(IDX)[0].numpy(), m(IDX)[0].numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw, why", [({"pos_encoding": "sinusoidal"}, "sinusoidal"),
                                     ({"pos_encoding": "rope"}, "rotary"),
                                     ({"pos_encoding": "learned", "norm": "rmsnorm"}, "rmsnorm")])
def test_export_refuses_what_gpt2_cannot_represent(tmp_path, kw, why):
    m = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=H, n_embd=C, **kw))
    with pytest.raises(HFError, match=why):
        export_hf(m, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("field, value", [
    ("activation_function", "relu"), ("layer_norm_epsilon", 1e-6), ("n_inner", 3 * C),
    ("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True), ("tie_word_embeddings", False),
    ("scale_attn_weights", False), ("model_type", "llama"), ("n_head", 5), ("vocab_size", "61"),
])
def test_config_refusals_name_the_field(tmp_path, field, value):
    with pytest.raises(HFError, match=f"config.json.*{field}.*{value!r}" if field != "n_head" else "n_embd"):
        load_hf(write_hf(tmp_path / "m", config=hf_config(**{field: value})))


def test_accepted_config_variants(tmp_path):
    for i, over in enumerate([{"n_inner": 4 * C}, {"activation_function": "gelu_pytorch_tanh"}]):
        load_hf(write_hf(tmp_path / str(i), config=hf_config(**over)))


def test_tensor_refusals(tmp_path):
    w = hf_weights()
    del w["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(HFError, match=r"missing tensors \['transformer.h.1.mlp.c_fc.bias'\]"):
        load_hf(write_hf(tmp_path / "a", w))
    w = hf_weights()
    w["transformer.h.0.attn.q_proj.weight"] = np.zeros((C, C), np.float32)
    with pytest.raises(HFError, match="unexpected tensors.*q_proj"):
        load_hf(write_hf(tmp_path / "b", w))
    w = hf_weights()
    w["transformer.h.0.mlp.c_fc.weight"] = np.ascontiguousarray(w["transformer.h.0.mlp.c_fc.weight"].T)
    with pytest.raises(HFError, match=r"h.0.mlp.c_fc.weight: \(128, 32\), expected \(32, 128\)"):
        load_hf(write_hf(tmp_path / "c", w))
    w = hf_weights()
    w["h.0.ln_1.weight"] = w["transformer.h.0.ln_1.weight"]
    with pytest.raises(HFError, match="appears twice"):
        load_hf(write_hf(tmp_path / "d", w))


def test_directory_refusals(tmp_path):
    with pytest.raises(HFError, match="not a directory"):
        load_hf(tmp_path / "nope")
    (tmp_path / "e").mkdir()
    with pytest.raises(HFError, match="no config.json"):
        load_hf(tmp_path / "e")
    d = write_hf(tmp_path / "f")
    (d / "config.json").write_text("{not json")
    with pytest.raises(HFError, match="config.json: cannot read it as JSON"):
        load_hf(d)
    d = write_hf(tmp_path / "g")
    (d / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(UserError, match="model.safetensors"):
        load_hf(d)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_file_loads_as_float32(tmp_path, dtype):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    from nn.serialization import save_safetensors  # (writes BF16 natively, which safetensors.numpy cannot)
    w = {k: v.astype(dtype) for k, v in hf_weights().items()}
    (tmp_path / "h").mkdir()
    save_safetensors(tmp_path / "h" / "model.safetensors", w, {"format": "pt"})
    (tmp_path / "h" / "config.json").write_text(json.dumps(hf_config()))
    model = load_hf(tmp_path / "h")
    assert model.transformer.wte.weight.data.dtype == np.float32
    ref = reference_gpt2({k[len("transformer."):]: v.astype(np.float64) for k, v in w.items()}, IDX)
    np.testing.assert_allclose(model(IDX)[0].numpy(), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ the GPT-2 vocabulary (tiktoken ranks file)
def gpt2_byte_order():
    """GPT-2's rank order of the 256 bytes (its bytes_to_unicode: the printable bytes first)."""
    first = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    return first + [b for b in range(256) if b not in first]


TEXT = ("The quick brown fox jumps over the lazy dog. It's 2026 and we're testing GPT-2's BPE: "
        "naïve café, 東京, emoji 🙂🙂, tabs\tand  double  spaces,\n\nnew lines   \n") * 20


def gpt2_style_ranks(path):
    """A small tiktoken file laid out like gpt2.tiktoken: permuted single bytes, then merges in rank order
    (learned here by our trainer on TEXT with GPT-2's split pattern)."""
    import base64
    from tinygrad_lm.tokenizer import BPETokenizer
    learned = BPETokenizer.train(TEXT, vocab_size=256 + 100, pattern="gpt2")
    assert len(learned.merges) == 100
    tokens = [bytes([b]) for b in gpt2_byte_order()] + [learned.token_bytes(256 + i) for i in range(100)]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return tokens


def reference_bpe(text_piece: bytes, rank_of):
    """tiktoken's rule, written out independently: merge the adjacent pair whose bytes form the lowest rank."""
    parts = [text_piece[i:i + 1] for i in range(len(text_piece))]
    while True:
        ranks = [rank_of.get(a + b) for a, b in zip(parts, parts[1:])]
        cands = [(r, i) for i, r in enumerate(ranks) if r is not None]
        if not cands:
            return [rank_of[p] for p in parts]
        _, i = min(cands)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


SAMPLES = [TEXT[:300], "Hello world!", "  leading spaces", "trailing   ", "ÿ\x00\x7f bytes", "<|endoftext|> x",
           "x<|endoftext|>y", "1234567 numbers 3.14", "I'll we've they're DON'T"]


def test_gpt2_vocabulary_encodes_like_tiktoken_rule(tmp_path):
    import regex
    from tinygrad_lm.tokenizer import GPT2_PATTERN, load_tokenizer
    tokens = gpt2_style_ranks(tmp_path / "gpt2.tiktoken")
    tok = load_tokenizer(tmp_path / "gpt2.tiktoken")
    rank_of = {t: r for r, t in enumerate(tokens)}
    assert tok.vocab_size == len(tokens) + 1 and tok.special_tokens == {"<|endoftext|>": len(tokens)}
    assert tok.encode("!") == [0] and tok.encode("\x00") == [188]  # GPT-2's permuted byte ids
    for s in SAMPLES:
        want = [i for piece in regex.findall(GPT2_PATTERN, s) for i in reference_bpe(piece.encode(), rank_of)]
        assert tok.encode_ordinary(s) == want, s
        assert tok.decode(tok.encode(s, allowed_special="none")) == s
    assert tok.encode("a<|endoftext|>", allowed_special="all")[-1] == len(tokens)
    # files: the ranks file written back is the same file; the JSON form keeps the byte order
    tok.to_tiktoken(tmp_path / "again.tiktoken")
    assert (tmp_path / "again.tiktoken").read_text() == (tmp_path / "gpt2.tiktoken").read_text()
    tok.save(tmp_path / "gpt2.json")
    back = load_tokenizer(tmp_path / "gpt2.json")
    assert back.byte_order == gpt2_byte_order() and back.encode(TEXT) == tok.encode(TEXT)


def test_gpt2_vocabulary_equals_tiktoken(tmp_path, monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    from tinygrad_lm.tokenizer import GPT2_PATTERN, BPETokenizer
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    tokens = gpt2_style_ranks(tmp_path / "gpt2.tiktoken")
    enc = tiktoken.Encoding("gpt2-test", pat_str=GPT2_PATTERN, mergeable_ranks=load_tiktoken_bpe(
        str(tmp_path / "gpt2.tiktoken")), special_tokens={"<|endoftext|>": len(tokens)})
    tok = BPETokenizer.gpt2(tmp_path / "gpt2.tiktoken")
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghij XYZ'\n\t.,!?0123456789éü東🙂") + ["'s", "'ll", "  ", "<|endoftext|>"]
    randoms = ["".join(rng.choice(alphabet, size=rng.integers(1, 60))) for _ in range(300)]
    for s in SAMPLES + randoms:
        assert tok.encode(s, allowed_special="all") == enc.encode(s, allowed_special="all"), s
        assert tok.encode_ordinary(s) == enc.encode_ordinary(s), s


def test_bad_byte_order_in_json_is_refused(tmp_path):
    from tinygrad_lm.tokenizer import BPETokenizer, TokenizerFileError, load_tokenizer
    d = BPETokenizer([], pattern="gpt2", byte_order=gpt2_byte_order()).to_dict()
    d["byte_order"][0] = d["byte_order"][1]
    (tmp_path / "t.json").write_text(json.dumps(d))
    with pytest.raises(TokenizerFileError, match="field 'byte_order'.*permutation"):
        load_tokenizer(tmp_path / "t.json")


# ------------------------------------------------------------------ commands: sample --hf, train --init-from, export
from tinygrad_lm.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """A tiny random GPT-2 (64 positions) on a GPT-2-style tiktoken vocabulary, and a corpus."""
    d = tmp_path_factory.mktemp("gpt2")
    n = len(gpt2_style_ranks(d / "gpt2.tiktoken")) + 1
    write_hf(d / "hf", hf_weights(vocab=n, positions=64), hf_config(vocab_size=n, n_positions=64))
    write_hf(d / "small")  # vocab_size 61
    (d / "corpus.txt").write_text(TEXT * 4)
    return d


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def finetune_args(d, out, *extra):
    return ["train", "--preset", "gpt2-finetune", "--init-from", d / "hf", "--tokenizer", d / "gpt2.tiktoken",
            "--data", d / "corpus.txt", "--cache-dir", d / "cache", "--out", out, "--block-size", 32,
            "--max-iters", 2, "--eval-iters", 1, "--sample-tokens", 0, "--progress", "false", *extra]


def test_sample_hf_cli(gpt2_files, capsys):
    d = gpt2_files
    code, out, err = run_cli(["sample", "--hf", d / "hf", "--tokenizer", d / "gpt2.tiktoken", "--prompt", "The quick",
                              "--max-new-tokens", 8, "--temperature", 0], capsys)
    assert code == 0, err
    # greedy decoding equals the argmax of the independent reference, token by token
    from tinygrad_lm.tokenizer import load_tokenizer
    tok = load_tokenizer(d / "gpt2.tiktoken")
    w = {k[len("transformer."):]: v for k, v in hf_weights(vocab=tok.vocab_size, positions=64).items()}
    ids = tok.encode("The quick")
    for _ in range(8):
        ids.append(int(reference_gpt2(w, np.array([ids]))[0, -1].argmax()))
    assert out.startswith(tok.decode(ids)[:len("The quick")])
    assert out.split("\n" + "-" * 40)[0] == tok.decode(ids)


@pytest.mark.parametrize("argv, message", [
    (["sample", "--hf", "{d}/hf", "--prompt", "x"], "needs --tokenizer FILE.tiktoken"),
    (["sample", "--hf", "{d}/nope", "--tokenizer", "{d}/gpt2.tiktoken"], "not a directory"),
    (["sample", "--ckpt", "{d}", "--tokenizer", "{d}/gpt2.tiktoken"], "--tokenizer goes with --hf"),
    (["sample", "--hf", "{d}/hf", "--tokenizer", "{d}/corpus.txt"], "corpus.txt is not valid JSON"),
    (["export", "--ckpt", "{d}/nope", "--hf", "{d}/out"], "nope"),
    (["sample", "--hf", "{d}/small", "--tokenizer", "{d}/gpt2.tiktoken"], "357 tokens, but the model in"),
])
def test_cli_refusals(gpt2_files, capsys, argv, message):
    code, out, err = run_cli([a.format(d=gpt2_files) for a in argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_train_refusals(gpt2_files, tmp_path, capsys):
    d = gpt2_files
    for extra, message in [(["--n-layer", 3], "--n-layer: 3 conflicts with the --init-from checkpoint"),
                           (["--block-size", 65], "--block-size: 65 is longer than the --init-from checkpoint's "
                                                  "context of 64"),
                           (["--tokenizer", "char"], "48 tokens, but the --init-from model")]:
        code, _, err = run_cli(finetune_args(d, tmp_path / "r", *extra), capsys)
        assert code == 2 and message in err, err
    code, _, err = run_cli(["train", "--preset", "gpt2-finetune", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "--preset gpt2-finetune needs --init-from DIR" in err


def checkpoint_weights(run):
    from nn.serialization import load_safetensors
    from tinygrad_lm.checkpoint import resolve
    return load_safetensors(resolve(run) / "model.safetensors")[0]


def test_finetune_starts_from_the_hf_weights_then_resumes_and_exports(gpt2_files, tmp_path, capsys):
    d = gpt2_files
    # lr 0: the checkpoint holds the HF weights exactly (Conv1D transposed, wpe cropped to --block-size 32)
    code, _, err = run_cli(finetune_args(d, tmp_path / "frozen", "--lr", 0, "--min-lr", 0, "--max-iters", 1), capsys)
    assert code == 0, err
    got = checkpoint_weights(tmp_path / "frozen")
    from tinygrad_lm.tokenizer import load_tokenizer
    hf = hf_weights(vocab=load_tokenizer(d / "gpt2.tiktoken").vocab_size, positions=64, buffers=False)
    for k, v in hf.items():
        want = v.T if k.split(".", 3)[-1] in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                              "mlp.c_proj.weight") else v
        np.testing.assert_array_equal(got[k], want[:32] if k.endswith("wpe.weight") else want, err_msg=k)
    # a real run: the loss is finite, the weights move; resume continues it; export writes GPT-2 again
    run = tmp_path / "run"
    code, out, err = run_cli(finetune_args(d, run, "--grad-accum", 2), capsys)
    assert code == 0 and "step 2:" in out, err
    moved = checkpoint_weights(run)
    assert not np.array_equal(moved["transformer.wte.weight"], got["transformer.wte.weight"])
    code, out, err = run_cli(["train", "--resume", run, "--max-iters", 3, "--progress", "false"], capsys)
    assert code == 0 and "step 3:" in out, err
    code, out, err = run_cli(["export", "--ckpt", run, "--hf", tmp_path / "exported"], capsys)
    assert code == 0, err
    from tinygrad_lm.sample import load_checkpoint_model
    ours, _ = load_checkpoint_model(str(run))
    again = load_hf(tmp_path / "exported")
    ids = np.arange(20)[None] % 50
    np.testing.assert_array_equal(again(ids)[0].numpy(), ours(ids)[0].numpy())
    code, _, err = run_cli(["export", "--ckpt", run, "--hf", tmp_path / "exported"], capsys)
    assert code == 2 and "--overwrite" in err


def test_finetune_bf16(gpt2_files, tmp_path, capsys):
    code, out, err = run_cli(finetune_args(gpt2_files, tmp_path / "bf16", "--precision", "bf16", "--grad-accum", 2),
                             capsys)
    assert code == 0 and "step 2:" in out, err
    assert all(np.isfinite(v).all() for v in checkpoint_weights(tmp_path / "bf16").values())


def test_finetune_two_ranks_equal_one_process(gpt2_files, tmp_path, capsys):
    import subprocess
    import sys
    from test_mpi import ROOT, mpi_env, mpiexec
    if mpiexec() is None:
        pytest.skip("no mpiexec (pip install 'tinygrad-lm[mpi]')")
    pytest.importorskip("mpi4py")
    d = gpt2_files
    args = [str(a) for a in finetune_args(d, tmp_path / "mpi", "--batch-size", 1, "--grad-accum", 2)]
    r = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-m", "tinygrad_lm"] + args, cwd=ROOT, env=mpi_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    code, _, err = run_cli(finetune_args(d, tmp_path / "one", "--batch-size", 2, "--grad-accum", 2), capsys)
    assert code == 0, err
    a, b = checkpoint_weights(tmp_path / "mpi"), checkpoint_weights(tmp_path / "one")
    assert set(a) == set(b)
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.c_attn.bias"):  # the key bias: its true gradient is 0 (softmax ignores a constant
            # added to a query's scores), so Adam turns round-off noise into steps of up to lr (3e-5) either way
            np.testing.assert_allclose(x[C:2 * C], y[C:2 * C], atol=2 * 3e-5 * 2, err_msg=k)
            x, y = np.r_[x[:C], x[2 * C:]], np.r_[y[:C], y[2 * C:]]
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6, err_msg=k)


# ------------------------------------------------------------------ on the GPU (skipped without CuPy and a GPU)
from tensor import backend  # noqa: E402

needs_gpu = pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and an NVIDIA GPU")


@needs_gpu
def test_cuda_logits_match_independent_reference(tmp_path):
    weights = hf_weights()
    model = load_hf(write_hf(tmp_path / "gpt2", weights)).to("cuda")
    logits = backend.to_numpy(model(IDX)[0].data)
    ref = reference_gpt2({k[len("transformer."):]: v for k, v in weights.items()}, IDX)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_finetune_and_sample(gpt2_files, tmp_path, capsys, precision):
    d = gpt2_files
    code, out, err = run_cli(finetune_args(d, tmp_path / precision, "--device", "cuda", "--precision", precision,
                                           "--grad-accum", 2), capsys)
    assert code == 0 and "step 2:" in out, err
    assert all(np.isfinite(v).all() for v in checkpoint_weights(tmp_path / precision).values())
    code, out, err = run_cli(["sample", "--hf", d / "hf", "--tokenizer", d / "gpt2.tiktoken", "--prompt", "The",
                              "--max-new-tokens", 8, "--temperature", 0, "--device", "cuda"], capsys)
    cpu = run_cli(["sample", "--hf", d / "hf", "--tokenizer", d / "gpt2.tiktoken", "--prompt", "The",
                   "--max-new-tokens", 8, "--temperature", 0], capsys)
    assert code == 0 and out == cpu[1], err


# ------------------------------------------------------------------ the real gpt2.tiktoken, when a path is given
REAL_VOCAB = os.environ.get("TINYGRAD_LM_GPT2_TIKTOKEN", "")


@pytest.mark.skipif(not REAL_VOCAB, reason="set TINYGRAD_LM_GPT2_TIKTOKEN to a gpt2.tiktoken file (e.g. from "
                                           "`pip download --no-deps openai-whisper`: whisper/assets/gpt2.tiktoken)")
def test_real_gpt2_vocabulary_equals_tiktoken(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    from tinygrad_lm.tokenizer import GPT2_PATTERN, BPETokenizer
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    tok = BPETokenizer.gpt2(REAL_VOCAB)
    assert tok.vocab_size == 50257 and tok.special_tokens == {"<|endoftext|>": 50256}
    assert tok.encode("Hello world") == [15496, 995]
    enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=load_tiktoken_bpe(REAL_VOCAB),
                            special_tokens={"<|endoftext|>": 50256})
    for s in SAMPLES + [TEXT]:
        assert tok.encode(s, allowed_special="all") == enc.encode(s, allowed_special="all"), s
