"""Sampler tests (issue 6): KV-cache exactness, filters, batching, stop tokens, seeds,
sampling frequencies, input errors, checkpoint loading and the CLI.

Every expected value is computed here independently of tinygrad_lm/sample.py: logits come
from a plain full forward over the (cropped) prefix with default positions and no mask,
greedy references from a hand-written argmax loop, and sampling distributions from the
sort / cut / renormalise written out below.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tensor.tensor import no_grad
from tinygrad_lm import sample as S
from tinygrad_lm.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
PES = ("sinusoidal", "learned")
V, BLOCK = 11, 12


def tiny(pe: str, seed: int = 0, vocab: int = V, block: int = BLOCK) -> GPT:
    return GPT(GPTConfig(vocab, block, n_layer=2, n_head=2, n_embd=16, pos_encoding=pe), seed=seed).eval()


# ------------------------------------------------------------------ independent references
def ref_logits(model: GPT, ids) -> np.ndarray:
    """Next-token logits after `ids` (1-D): one full forward over the last block_size tokens."""
    window = np.asarray(ids, dtype=np.int64)[-model.config.block_size:]
    with no_grad():
        logits, _ = model(window[None, :])
    return np.asarray(logits.data[0, -1], dtype=np.float64)


def ref_greedy(model: GPT, prompt, n: int) -> list[int]:
    seq = [int(t) for t in prompt]
    for _ in range(n):
        seq.append(int(np.argmax(ref_logits(model, seq))))
    return seq


@pytest.fixture
def recorded(monkeypatch):
    """Every logits array (B, V) the sampler hands to `pick`, in order."""
    seen: list[np.ndarray] = []
    real_pick = S.pick

    def spy(logits, *args, **kwargs):
        seen.append(np.array(logits, dtype=np.float64, copy=True))
        return real_pick(logits, *args, **kwargs)

    monkeypatch.setattr(S, "pick", spy)
    return seen


def close(a, b) -> bool:
    return np.allclose(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ cache exactness
@pytest.mark.parametrize("pe", PES)
@pytest.mark.parametrize("use_cache", [True, False])
def test_step_logits_equal_full_forward(pe, use_cache, recorded):
    model = tiny(pe, seed=1)
    prompt = [3, 1, 4, 1, 5]
    n = 2 * BLOCK  # well past block_size: the window slides
    out = S.generate(model, np.array([prompt]), n, temperature=1.0, seed=0, use_cache=use_cache)[0]
    assert len(recorded) == n and len(out) == len(prompt) + n
    assert len(set(out[len(prompt):].tolist())) > 3  # a varied continuation, not a constant
    for s, got in enumerate(recorded):
        want = ref_logits(model, out[:len(prompt) + s])
        assert close(got[0], want), f"step {s}: max diff {np.abs(got[0] - want).max()}"


def test_kv_cache_holds_the_autocast_dtype(recorded):
    """Under mixed precision the keys and values are computed in the low dtype, so the cache holds
    that dtype (half the memory; one dtype for the attention's fast paths), and cached decoding
    still gives each step's logits of a full forward within bf16 rounding."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from nn.amp import autocast_
    model = tiny("learned", seed=1)
    autocast_(model, "bf16")
    assert model.new_caches(2)[0].k.dtype == np.dtype(ml_dtypes.bfloat16)
    prompt = [3, 1, 4]
    out = S.generate(model, np.array([prompt]), 5, temperature=1.0, seed=0, use_cache=True)[0]
    for s, got in enumerate(recorded):
        want = ref_logits(model, out[:len(prompt) + s])
        assert np.allclose(np.asarray(got[0], np.float32), want, atol=3e-2), f"step {s}"


@pytest.mark.parametrize("pe", PES)
def test_greedy_cached_equals_uncached_past_block_size(pe):
    model = tiny(pe, seed=2)
    prompt = [7, 2, 9]
    n = 2 * BLOCK + 3
    want = ref_greedy(model, prompt, n)
    cached = S.generate(model, np.array([prompt]), n, temperature=0)
    uncached = S.generate(model, np.array([prompt]), n, temperature=0, use_cache=False)
    assert cached[0].tolist() == want
    assert uncached[0].tolist() == want


@pytest.mark.parametrize("pe", PES)
def test_prompt_longer_than_block_size(pe):
    model = tiny(pe, seed=3)
    prompt = (np.arange(BLOCK + 5) * 7) % V
    out = S.generate(model, prompt, 6, temperature=0)
    assert out[0].tolist() == ref_greedy(model, prompt, 6)


@pytest.mark.parametrize("pe", PES)
def test_top_k_1_and_tiny_top_p_are_greedy(pe):
    model = tiny(pe, seed=4)
    prompt = np.array([[1, 2, 3]])
    n = BLOCK + 4
    want = ref_greedy(model, prompt[0], n)
    for kw in (dict(top_k=1), dict(top_p=1e-9), dict(top_k=1, top_p=0.5)):
        for temperature, seed in ((1.0, 0), (0.5, 1), (3.0, 2)):
            got = S.generate(model, prompt, n, temperature=temperature, seed=seed, **kw)
            assert got[0].tolist() == want, (kw, temperature)


@pytest.mark.parametrize("pe", PES)
def test_batched_ragged_greedy_equals_one_by_one(pe):
    model = tiny(pe, seed=5)
    prompts = [[4], [1, 2, 3, 4, 5, 6, 7], [9, 9, 0, 2]]
    n = BLOCK + 2  # the longest row slides past block_size, the shortest does not
    out = S.generate(model, prompts, n, temperature=0)
    assert isinstance(out, list) and len(out) == len(prompts)
    for p, row in zip(prompts, out):
        assert row.tolist() == ref_greedy(model, p, n)
    # equal-length prompts as one (B, T) array: rows independent too
    arr = np.array([[1, 2, 3], [3, 2, 1], [0, 10, 5]])
    out2 = S.generate(model, arr, n, temperature=0)
    assert out2.shape == (3, 3 + n)
    for p, row in zip(arr, out2):
        assert row.tolist() == ref_greedy(model, p, n)


@pytest.mark.parametrize("pe", PES)
def test_batched_sampling_logits_per_row(pe, recorded):
    model = tiny(pe, seed=6)
    prompts = [[2, 5, 8, 1, 0, 3], [7], [4, 4, 10]]
    n = BLOCK + 3
    out = S.generate(model, prompts, n, temperature=1.0, top_k=6, top_p=0.9, seed=11)
    assert len(recorded) == n
    for i, (p, row) in enumerate(zip(prompts, out)):
        assert row[:len(p)].tolist() == p and len(row) == len(p) + n
        for s in range(n):
            want = ref_logits(model, row[:len(p) + s])
            assert close(recorded[s][i], want), f"row {i} step {s}"


@pytest.mark.parametrize("pe", PES)
def test_each_row_stops_on_its_own_stop_token(pe):
    model = tiny(pe, seed=7)
    prompts = [[1, 2], [5, 6, 7], [10], [3, 3, 3, 8]]
    n = 10
    refs = [ref_greedy(model, p, n)[len(p):] for p in prompts]

    def cut(r, stops):  # tokens kept: up to and including the first stop token
        return next((j + 1 for j, t in enumerate(r) if t in stops), n)

    # the stop token that makes the rows stop at the most different steps (n = never stops)
    stop = max(range(V), key=lambda t: (len({cut(r, {t}) for r in refs}), t))
    cuts = [cut(r, {stop}) for r in refs]
    assert len(set(cuts)) >= 3, f"test setup: rows should stop at different steps, got {cuts}"
    out = S.generate(model, prompts, n, temperature=0, stop_tokens=[stop])
    for p, r, c, row in zip(prompts, refs, cuts, out):
        assert row.tolist() == list(p) + r[:c]
    # (B, T) input: a stopped row repeats its stop token; the stream ends once every row stopped
    i = int(np.argmin(cuts))
    out2 = S.generate(model, np.array([prompts[i]]), n, temperature=0, stop_tokens=[stop])
    assert out2[0].tolist() == prompts[i] + refs[i][:cuts[i]]
    stopping = [j for j in range(len(prompts)) if cuts[j] < n]
    steps = list(S.stream(model, [prompts[j] for j in stopping], n, temperature=0, stop_tokens=[stop]))
    assert len(steps) == max(cuts[j] for j in stopping)
    for k, j in enumerate(stopping):
        assert [int(s[k]) for s in steps] == refs[j][:cuts[j]] + [stop] * (len(steps) - cuts[j])


@pytest.mark.parametrize("pe", PES)
def test_fixed_seed_reproduces(pe):
    model = tiny(pe, seed=8)
    kw = dict(temperature=1.2, top_k=8, top_p=0.95)
    a = S.generate(model, [[1, 2], [3]], 20, seed=123, **kw)
    b = S.generate(model, [[1, 2], [3]], 20, seed=123, **kw)
    assert all(x.tolist() == y.tolist() for x, y in zip(a, b))
    others = [S.generate(model, [[1, 2], [3]], 20, seed=s, **kw) for s in (124, 125, 126)]
    assert any(x[0].tolist() != a[0].tolist() for x in others)


# ------------------------------------------------------------------ sampling frequencies
# upper 0.001 quantiles of chi-square, dof 1..10 (standard tables), used when scipy is absent
CHI2_CRIT_001 = [10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588]


def expected_dist(logits, temperature, top_k, top_p) -> np.ndarray:
    """Temperature, keep the top_k, keep the smallest head reaching top_p, renormalise; by hand."""
    logits = [float(x) for x in logits]
    order = sorted(range(len(logits)), key=lambda i: -logits[i])   # token ids, most likely first
    if top_k:
        order = order[:top_k]
    z = [logits[i] / temperature for i in order]
    m = max(z)
    w = [math.exp(x - m) for x in z]
    total = sum(w)
    p = [x / total for x in w]
    if top_p is not None:
        acc, keep = 0.0, 0
        while keep < len(p):
            acc += p[keep]
            keep += 1
            if acc >= top_p:
                break
        order, p = order[:keep], p[:keep]
        total = sum(p)
        p = [x / total for x in p]
    out = np.zeros(len(logits))
    for i, x in zip(order, p):
        out[i] = x
    return out


def chi2_ok(counts: np.ndarray, probs: np.ndarray) -> tuple[bool, float]:
    support = probs > 0
    n = counts.sum()
    exp = n * probs[support]
    stat = float(((counts[support] - exp) ** 2 / exp).sum())
    dof = int(support.sum()) - 1
    if dof == 0:
        return True, stat
    try:
        from scipy.stats import chi2
        return chi2.sf(stat, dof) > 1e-3, stat
    except ImportError:  # pragma: no cover
        return stat < CHI2_CRIT_001[dof - 1], stat


LOGITS_A = np.array([1.3, -0.2, 0.7, 2.1, -1.5, 0.1, 0.9, -0.6])
LOGITS_B = np.array([0.0, 0.5, -2.0, 1.0, 1.7, -0.3, 0.2, 2.4])
SETTINGS = [
    (1.0, None, None),
    (0.7, None, None),
    (1.5, 5, None),
    (1.0, None, 0.8),
    (0.8, 6, 0.7),
    (2.0, 3, 0.95),
    (1.0, 0, 1.0),
]


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filtered_probs_match_hand_computation(temperature, top_k, top_p):
    got = S.filtered_probs(np.stack([LOGITS_A, LOGITS_B]).astype(np.float32), temperature, top_k, top_p)
    for row, lg in zip(got, (LOGITS_A, LOGITS_B)):
        want = expected_dist(lg.astype(np.float32), temperature, top_k, top_p)
        assert np.allclose(row, want, atol=1e-6), (row, want)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_pick_frequencies_chi_square(temperature, top_k, top_p):
    draws = 20000
    logits = np.where(np.arange(draws)[:, None] % 2 == 0, LOGITS_A, LOGITS_B).astype(np.float32)
    rng = np.random.default_rng(2024)
    toks = S.pick(logits, temperature, top_k, top_p, rng)
    assert toks.shape == (draws,)
    for parity, lg in ((0, LOGITS_A), (1, LOGITS_B)):
        probs = expected_dist(lg.astype(np.float32), temperature, top_k, top_p)
        counts = np.bincount(toks[parity::2], minlength=len(lg))
        assert counts[probs == 0].sum() == 0, "drew a filtered-out token"
        ok, stat = chi2_ok(counts, probs)
        assert ok, f"chi-square {stat:.2f}: counts {counts} vs expected {probs * counts.sum()}"


class FixedDraws:
    """Stands in for np.random.Generator: every uniform draw is `u`."""

    def __init__(self, u: float) -> None:
        self.u = u

    def random(self, shape):
        return np.full(shape, self.u)


@pytest.mark.parametrize("u", [0.0, 1e-300, 0.5, 0.95, 1.0 - 2.0 ** -53])
def test_pick_never_draws_a_filtered_token_at_the_ends(u):
    logits = np.array([[0.0, 5.0, -50.0, 3.0]])      # top-2 keeps tokens 1 and 3
    p1 = math.exp(5.0) / (math.exp(5.0) + math.exp(3.0))
    got = S.pick(logits, 1.0, 2, None, FixedDraws(u))
    assert got.tolist() == [1 if u < p1 else 3]


def test_pick_temperature_zero_is_argmax():
    logits = np.stack([LOGITS_A, LOGITS_B])
    assert S.pick(logits, 0.0, None, None, np.random.default_rng(0)).tolist() == [3, 7]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.2), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_sampling_args(kw, match):
    model = tiny("sinusoidal")
    args = dict(max_new_tokens=3, temperature=1.0)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        S.generate(model, np.array([[1, 2]]), **args)
    with pytest.raises(ValueError, match=match):
        next(S.stream(model, np.array([[1, 2]]), **args))


@pytest.mark.parametrize("prompt,match", [
    (np.zeros((1, 0), dtype=np.int64), "empty"),
    ([[1, 2], []], "empty"),
    ([], "empty"),
    (np.array([[1, V]]), "vocab|lie in"),
    (np.array([[-1, 2]]), "vocab|lie in"),
    ([[1], [2, 99]], "vocab|lie in"),
])
def test_bad_prompts(prompt, match):
    model = tiny("learned")
    with pytest.raises(ValueError, match=match):
        S.generate(model, prompt, 3)


def test_zero_new_tokens_returns_prompt():
    model = tiny("sinusoidal")
    assert S.generate(model, np.array([[1, 2, 3]]), 0).tolist() == [[1, 2, 3]]


# ------------------------------------------------------------------ checkpoints and CLI
CHARS = "\n abcdefgh."   # 11 characters = V


def valid_state(cfg: GPTConfig, step: int = 0) -> dict:
    """A complete state.json for a checkpoint that was never trained (what read_state requires)."""
    from nn.amp import LossScaler
    from nn.lr_scheduler import WarmupCosine
    return {"format": 1, "step": step, "tokens_seen": 0, "best_val": math.inf, "model_config": cfg.to_dict(),
            "train_config": {}, "schedule": WarmupCosine(1e-3, 1e-4, 10, 100).state_dict(),
            "loss_scaler": LossScaler(enabled=False).state_dict(),
            "dropout_rng": np.random.default_rng(0).bit_generator.state,
            "data_position": {"seed": 0, "next_step": step}, "tokenizer": "tokenizer.json",
            "world_size": 1, "global_batch_size": 1}


def make_ckpt(tmp_path: Path, with_tokenizer: bool = True, seed: int = 9, chars: str = CHARS) -> tuple[Path, GPT]:
    """A sealed checkpoint (tinygrad_lm.checkpoint.save) of a fresh model over `CHARS`."""
    from nn.serialization import save_model
    from tinygrad_lm import checkpoint as C
    from tinygrad_lm.tokenizer import CharTokenizer
    cfg = GPTConfig(len(CHARS), 16, n_layer=2, n_head=2, n_embd=16, pos_encoding="learned")
    model = GPT(cfg, seed=seed).eval()

    def write(d: Path) -> None:
        save_model(model, d / C.MODEL_FILE)
        C.atomic_write(d / C.STATE_FILE, json.dumps(valid_state(cfg)))
        if with_tokenizer:
            CharTokenizer(chars).save(d / C.TOKENIZER_FILE)
    d = C.save(tmp_path / "run", 0, write)
    return d, model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "tinygrad_lm", "sample", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_checkpoint_without_tokenizer(tmp_path):
    from tinygrad_lm.checkpoint import CheckpointError
    d, _ = make_ckpt(tmp_path, with_tokenizer=False)
    with pytest.raises(CheckpointError, match="tokenizer"):
        S.load_checkpoint_model(str(d))
    r = run_cli("--ckpt", str(d), "--prompt", "ab", "--max-new-tokens", "5")
    assert r.returncode != 0
    assert "tokenizer" in r.stderr and "Traceback" not in r.stderr


def test_checkpoint_loads_the_saved_weights(tmp_path):
    d, model = make_ckpt(tmp_path)
    loaded, tok = S.load_checkpoint_model(str(d))
    ids = tok.encode("abc de")
    assert ids == [CHARS.index(c) for c in "abc de"]
    assert np.array_equal(ref_logits(loaded, ids), ref_logits(model, ids))


def test_cli_smoke_and_seed(tmp_path):
    d, model = make_ckpt(tmp_path)
    prompt = "ab cd"
    args = ("--ckpt", str(d), "--prompt", prompt, "--max-new-tokens", "20", "--temperature", "0.8",
            "--top-k", "5", "--top-p", "0.95", "--num-samples", "2", "--seed", "0")
    r1, r2 = run_cli(*args), run_cli(*args)
    assert r1.returncode == 0, r1.stderr
    assert r1.stdout == r2.stdout, "same seed, different text"
    sep = "\n" + "-" * 40 + "\n"
    samples = r1.stdout.split(sep)
    assert samples[-1] == "" and len(samples) == 3, r1.stdout
    for s in samples[:2]:
        assert s.startswith(prompt)
        new = s[len(prompt):]
        assert len(new) == 20 and set(new) <= set(CHARS)
    # greedy through the CLI equals the hand-written greedy loop on the original model
    r = run_cli("--ckpt", str(d), "--prompt", prompt, "--max-new-tokens", "20", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    want = ref_greedy(model, [CHARS.index(c) for c in prompt], 20)
    assert r.stdout == "".join(CHARS[t] for t in want) + sep


@pytest.mark.parametrize("extra,match", [
    (("--temperature", "-1"), "--temperature"),
    (("--temperature", "nan"), "--temperature"),
    (("--temperature", "inf"), "--temperature"),
    (("--top-p", "0"), "--top-p"),
    (("--top-p", "nan"), "--top-p"),
    (("--top-p", "1.5"), "--top-p"),
    (("--top-k", "-2"), "--top-k"),
    (("--top-k", "0"), "--top-k"),
    (("--max-new-tokens", "-1"), "--max-new-tokens"),
    (("--max-new-tokens", "10000000000"), "--max-new-tokens"),
    (("--num-samples", "0"), "--num-samples"),
    (("--seed", "-1"), "--seed"),
    (("--prompt", ""), "--prompt.*empty"),
    (("--prompt", "xyz"), "--prompt.*x.*y.*z"),
])
def test_cli_bad_input(tmp_path, extra, match):
    d, _ = make_ckpt(tmp_path)
    code, err = run_main("sample", "--ckpt", str(d), "--prompt", "ab", *extra)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and re_search(match, err), err


def run_main(*argv: str) -> tuple[int, str]:
    """`tinygrad_lm.cli.main(argv)` in this process -> (exit status, stderr). Any exception other
    than SystemExit escapes: a traceback is a failure."""
    import contextlib
    import io
    from tinygrad_lm.cli import main
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(list(argv))
        except SystemExit as e:  # cli.main ends every run with sys.exit (bad input: status 2)
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


def re_search(pattern: str, text: str) -> bool:
    import re
    return re.search(pattern, text) is not None


# ------------------------------------------------------------------ hardened CLI: files and devices
def test_cli_device_cuda_without_cupy(tmp_path):
    pytest.importorskip("numpy")
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed")
    except Exception:
        pass
    d, _ = make_ckpt(tmp_path)
    code, err = run_main("sample", "--ckpt", str(d), "--device", "cuda")
    assert code == 2 and err.startswith("error: --device cuda") and "needs CuPy" in err and err.count("\n") == 1, err
    assert "cuda12" in err


@pytest.mark.parametrize("how", ["missing", "file", "latest-junk", "latest-escape", "latest-huge", "latest-loop"])
def test_cli_checkpoint_path_problems(tmp_path, how):
    d, _ = make_ckpt(tmp_path)
    run = d.parent
    target = run
    if how == "missing":
        target = tmp_path / "nowhere"
    elif how == "file":
        target = d / "state.json"
    elif how == "latest-junk":
        (run / "latest").write_bytes(b"\xff\xfe junk")
    elif how == "latest-escape":
        (run / "latest").write_text("../../etc\n")
    elif how == "latest-huge":
        (run / "latest").write_text("step-" + "0" * 100_000)
    elif how == "latest-loop":
        (run / "latest").unlink()
        os.symlink(run / "latest", run / "latest")
    code, err = run_main("sample", "--ckpt", str(target), "--max-new-tokens", "2")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert (str(target) if how in ("missing", "file") else "latest") in err


def test_replaced_tokenizer_is_refused(tmp_path):
    """A permuted vocabulary of the same size, or one with 8 more characters, is not the model's."""
    from tinygrad_lm import checkpoint as C
    from tinygrad_lm.tokenizer import CharTokenizer
    d, _ = make_ckpt(tmp_path)
    CharTokenizer(CHARS[::-1]).save(d / C.TOKENIZER_FILE)
    code, err = run_main("sample", "--ckpt", str(d), "--max-new-tokens", "2")
    assert code == 2 and "tokenizer.json" in err and "SHA-256" in err, err
    # resealed (the manifest rewritten to match): the vocabulary size still disagrees with the model
    CharTokenizer(CHARS + "ijklmnop").save(d / C.TOKENIZER_FILE)
    C.write_manifest(d)
    code, err = run_main("sample", "--ckpt", str(d), "--max-new-tokens", "2")
    assert code == 2 and "tokenizer.json" in err and "19 tokens" in err and "vocab_size is 11" in err, err


def test_model_too_big_for_memory_is_refused_before_loading(tmp_path):
    """block_size 100000 needs (1, H, T, T) scores of 80 GB: refused at once, nothing allocated."""
    from nn.serialization import save_model
    from tinygrad_lm import checkpoint as C
    from tinygrad_lm.tokenizer import CharTokenizer
    cfg = GPTConfig(len(CHARS), 100_000, n_layer=1, n_head=2, n_embd=16)   # sinusoidal: no (T, C) table

    def write(d):
        save_model(GPT(cfg), d / C.MODEL_FILE)
        C.atomic_write(d / C.STATE_FILE, json.dumps(valid_state(cfg)))
        CharTokenizer(CHARS).save(d / C.TOKENIZER_FILE)
    d = C.save(tmp_path / "run", 0, write)
    code, err = run_main("sample", "--ckpt", str(d), "--max-new-tokens", "2")
    assert code == 2 and "--block-size 100000" in err and "attention" in err, err


def test_cli_tunes_the_host_allocator_and_the_blas_wait(tmp_path, monkeypatch):
    from tensor import backend
    calls = []
    monkeypatch.setattr(backend, "tune_host_allocator", lambda: calls.append("malloc") or True)
    monkeypatch.setattr(backend, "tune_blas_wait", lambda: calls.append("blas") or True)
    d, _ = make_ckpt(tmp_path)
    code, err = run_main("sample", "--ckpt", str(d), "--max-new-tokens", "2")
    assert code == 0, err
    assert calls == ["malloc", "blas"]
