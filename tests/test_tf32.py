"""--tf32 (float32 GEMMs on the GPU's TF32 tensor cores, as PyTorch's allow_tf32): the backend
setting, the cuBLAS compute type it selects, and the flag's way from the CLI into the run's
config. The GPU checks (TF32 products ~1e-3 off exact float32, a TF32 GPT step close to the
float32 one) skip without CuPy and a GPU."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tensor import backend
from tensor.cuda import cublas


@pytest.fixture(autouse=True)
def restore_tf32():
    yield
    backend.set_tf32(False)


def test_tf32_is_off_by_default_and_part_of_the_backend_state() -> None:
    assert backend.tf32_enabled() is False
    backend.set_tf32(True)
    assert backend.tf32_enabled() is True
    backend.set_default_device("cpu", tf32=False)
    assert backend.tf32_enabled() is False and backend.get_default_device() == "cpu"
    backend.set_default_device("cpu")  # tf32 not given: left as it is
    assert backend.tf32_enabled() is False
    with pytest.raises(TypeError, match="set_tf32"):
        backend.set_tf32("yes")


def test_only_float32_products_switch_to_the_tf32_compute_type() -> None:
    assert cublas._compute_type("float32") == cublas._COMPUTE_32F == 68
    backend.set_tf32(True)
    assert cublas._compute_type("float32") == cublas._COMPUTE_32F_FAST_TF32 == 77
    for dt in ("float16", "bfloat16"):  # already on the tensor cores, float32 accumulation either way
        assert cublas._compute_type(dt) == cublas._COMPUTE_32F
    assert cublas._compute_type("float64") == cublas._COMPUTE_64F


def test_tf32_is_harmless_on_the_cpu() -> None:
    a = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    from tensor import Tensor
    exact = (Tensor(a) @ Tensor(a.T)).numpy()
    backend.set_tf32(True)
    np.testing.assert_array_equal((Tensor(a) @ Tensor(a.T)).numpy(), exact)


def test_train_flag_sets_the_backend_and_is_recorded_in_the_run(tmp_path: Path) -> None:
    from tinygrad_lm.cli import main
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 50)
    argv = ["train", "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
            "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "2",
            "--max-iters", "1", "--eval-interval", "1000", "--eval-iters", "1", "--sample-tokens", "0",
            "--progress", "false", "--tf32"]  # a bare boolean flag means true
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert backend.tf32_enabled() is True
    state = json.loads(next((tmp_path / "run").glob("**/state.json")).read_text())
    assert state["train_config"]["tf32"] is True


def test_tf32_may_change_on_resume_and_parses_as_a_boolean() -> None:
    from tinygrad_lm.config import RESUMABLE, ConfigError, make_config
    assert "tf32" in RESUMABLE
    assert make_config(tf32="true").tf32 is True and make_config().tf32 is False
    with pytest.raises(ConfigError, match="--tf32"):
        make_config(tf32="sometimes")


def test_help_says_what_tf32_does(capsys) -> None:
    from tinygrad_lm.cli import build_parser
    parser = build_parser()
    for cmd in ("train", "sample"):
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        out = capsys.readouterr().out
        assert "--tf32" in out and "TF32" in out and "allow_tf32" in " ".join(out.split())


gpu = pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and an NVIDIA GPU")


@gpu
def test_tf32_gemm_is_about_1e3_off_exact_float32_and_off_means_exact() -> None:
    cp = backend.cupy_module()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((1024, 1024)), rng.standard_normal((1024, 768))  # tensor-core-sized
    want = a @ b  # float64
    scale = np.abs(want).max()
    da, db = cp.asarray(a, np.float32), cp.asarray(b, np.float32)
    exact = cp.asnumpy(cublas.matmul(da, db))
    backend.set_tf32(True)
    fast = cp.asnumpy(cublas.matmul(da, db))
    batched = cp.asnumpy(cublas.matmul(cp.stack([da, da]), db))
    backend.set_tf32(False)
    again = cp.asnumpy(cublas.matmul(da, db))
    err = {name: np.abs(x - want).max() / scale for name, x in
           (("float32", exact), ("tf32", fast), ("tf32 batched", batched[1]))}
    print("relative max error: " + ", ".join(f"{k} {v:.2e}" for k, v in err.items()))
    assert err["float32"] < 1e-5
    for k in ("tf32", "tf32 batched"):     # TF32 keeps 10 mantissa bits: ~2^-11 per input
        assert 1e-5 < err[k] < 5e-3, (k, err)
    np.testing.assert_array_equal(again, exact)  # off again: exact float32, bit for bit


@gpu
def test_tf32_gpt_step_is_close_to_the_float32_one() -> None:
    from tinygrad_lm.model import GPT, GPTConfig
    idx = np.random.default_rng(1).integers(0, 64, (4, 33))
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64, pos_encoding="learned")
    results = {}
    for tf32 in (False, True):
        backend.set_tf32(tf32)
        m = GPT(cfg, seed=0).to("cuda")
        _, loss = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results[tf32] = (loss.item(), [backend.to_numpy(p.grad) for p in m.parameters()])
    print(f"loss float32 {results[False][0]:.6f}, tf32 {results[True][0]:.6f}")
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-3)
    for g32, gtf in zip(results[False][1], results[True][1]):
        np.testing.assert_allclose(gtf, g32, rtol=5e-2, atol=1e-2 * np.abs(g32).max() + 1e-6)
