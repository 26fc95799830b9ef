"""Tensor parallelism (nn/distributed/tensor_parallel.py, tinygrad_lm/parallel_model.py).

In-process: how full arrays are split and put back together, the layout checks.
Under a real `mpiexec` (skipped only when no MPI launcher is installed): f, g and the column-,
row- and vocabulary-parallel pieces against the unsplit ops in float64 (to 1e-12), the
collectives of a GPT step counted, and training runs on tp 2, dp 2 x tp 2, tp 2 with ZeRO-1
and resumes of a tp 2 checkpoint on 1 process and on dp 2, each equal to one process with the
same global batch: losses and every weight to float32 round-off (rtol 2e-5, atol 2e-6, as the
data-parallel test; the sums are only reordered), but for attention's key biases (in c_attn.bias)
whose gradient is zero in exact arithmetic (softmax ignores a shift of each row's scores): Adam
turns their pure round-off gradients into steps of 1e-6 and they are compared with atol 1e-5.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from nn.distributed.tensor_parallel import padded, shard, unshard
from tests.test_mpi import corpus, run_mpi  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "mpi" / "tp_worker.py"
RTOL, ATOL = 2e-5, 2e-6


def assert_close(actual: np.ndarray, desired: np.ndarray, name: str) -> None:
    atol = 1e-5 if name.endswith("c_attn.bias") else ATOL  # key biases: see the module's docstring
    np.testing.assert_allclose(actual, desired, rtol=RTOL, atol=atol, err_msg=name)


@pytest.mark.parametrize("kind,shape", [("rows", (8, 3)), ("qkv", (12, 4)), ("cols", (3, 8)), ("vocab", (7, 4)),
                                        ("rep", (5,)), ("rows", (8,)), ("qkv", (12,))])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_then_unshard_is_the_identity(kind: str, shape: tuple, tp: int) -> None:
    full = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    parts = [shard(full, kind, t, tp) for t in range(tp)]
    assert len({p.shape for p in parts}) == 1  # every rank holds the same shape
    np.testing.assert_array_equal(unshard(parts, kind, rows=shape[0]), full)


def test_qkv_shard_keeps_whole_heads() -> None:
    C, tp = 4, 2  # rows: q0 q1 q2 q3 | k0 .. | v0 ..; rank 1 holds channels 2, 3 of each
    full = np.arange(3 * C)
    assert shard(full, "qkv", 1, tp).tolist() == [2, 3, 6, 7, 10, 11]
    assert shard(np.arange(7), "vocab", 1, 2).tolist() == [4, 5, 6, 0] and padded(7, 2) == 8


def test_layout_errors_name_the_flag() -> None:
    from tinygrad_lm.config import ConfigError, make_config
    from tinygrad_lm.errors import UserError
    from tinygrad_lm.trainer import check_layout
    with pytest.raises(ConfigError, match="--tp 3: n_head 4 is not divisible"):
        make_config(None, None, n_head=4, n_embd=16, tp=3)
    with pytest.raises(ConfigError, match="--pp 3: only 2 layers"):
        make_config(None, None, n_layer=2, pp=3)
    with pytest.raises(ConfigError, match="--cuda-graph is not supported with model parallelism"):
        make_config(None, None, cuda_graph=True, device="cuda", tp=2, n_head=4)
    with pytest.raises(ConfigError, match="--pp-schedule"):
        make_config(None, None, pp_schedule="zigzag")
    with pytest.raises(UserError, match="the job has 3 ranks but --dp 1 x --pp 1 x --tp 2 = 2"):
        check_layout(make_config(None, None, tp=2, n_head=4), 3)
    with pytest.raises(UserError, match="--dp 2 x --pp 1 x --tp 2 = 4"):
        check_layout(make_config(None, None, tp=2, dp=2, n_head=4), 2)
    assert check_layout(make_config(None, None, tp=2, n_head=4), 4) == 2


def test_memory_estimate_divides_what_tp_splits() -> None:
    from tinygrad_lm.memory import estimate
    from tinygrad_lm.model import GPTConfig
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)
    one, two = estimate(cfg, 4, tp=1), estimate(cfg, 4, tp=2)
    for k in ("parameters", "gradients", "optimizer", "logits"):
        assert two[k] == one[k] // 2, k
    assert two["other activations"] == one["other activations"]  # replicated ones dominate: kept whole


@pytest.mark.parametrize("n", [2, 4])
def test_pieces_equal_the_unsplit_ops_and_the_collectives_are_counted(tmp_path: Path, n: int) -> None:
    r = run_mpi(n, [str(WORKER), "pieces", str(tmp_path)], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "pieces.json").read_text())
    assert res["tp"] == n
    for name, err in res["errors"].items():
        assert err < 1e-12, (name, err)
    L = res["n_layer"]
    # forward: 2 all-reduces per block (the row-parallel g's), the embedding's g, the loss's sums; its row maxima
    assert res["forward"] == {"allreduce": 2 * L + 2, "all_gather": 1}
    # backward: 2 per block (the column-parallel f's) and the lm_head's f; nothing else
    assert res["backward"] == {"allreduce": 2 * L + 1}


def reference(corpus: str, out: Path, batch: int, steps: int, resume: str | None = None,
              device: str = "cpu", pad: int = 1) -> tuple[list, dict]:
    """One process: the losses of each step and the final weights."""
    import dataclasses
    sys.path.insert(0, str(WORKER.parent))
    from tp_worker import tp_config
    from tinygrad_lm.train import Trainer
    cfg = dataclasses.replace(tp_config(corpus, str(out), batch, steps, pad=pad), device=device)
    t = Trainer(cfg, log=lambda s: None, resume=resume)
    losses = []
    while t.step < steps:
        losses.append(float(t.train_step()))
    return losses, t.model.state_dict()


def check_equal(out: Path, ref: tuple[list, dict], n_ranks: int) -> None:
    res = json.loads((out / "result.json").read_text())
    np.testing.assert_allclose(res["losses"], ref[0], rtol=RTOL, atol=ATOL)
    weights = dict(np.load(out / "weights.npz"))
    assert set(weights) == set(ref[1])
    for k, v in ref[1].items():
        assert weights[k].shape == v.shape, k
        assert_close(weights[k], v, k)
    # replicated parameters stay bit-identical on every rank (no all-reduce keeps them together)
    reps = [json.loads((out / f"replicated.{r}.json").read_text()) for r in range(n_ranks)]
    assert all(rep == reps[0] for rep in reps)


STEPS, BATCH = 3, 4


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The one-process runs every layout is compared with (one corpus for the whole module)."""
    d = tmp_path_factory.mktemp("single")
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "speak", "hear", "me", "now", "and", "thou", "art", "not", "so"]
    path = d / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, size=12)) for _ in range(400)))
    return {"corpus": str(path), "ref": reference(str(path), d / "ref", BATCH, STEPS),
            "ref5": reference(str(path), d / "ref5", BATCH, 5)}


@pytest.mark.parametrize("n,tp,zero", [(2, 2, 0), (4, 2, 0), (2, 2, 1), (4, 2, 1)],
                         ids=["tp2", "dp2xtp2", "tp2-zero1", "dp2xtp2-zero1"])
def test_tensor_parallel_training_equals_one_process(tmp_path: Path, single: dict, n: int, tp: int,
                                                     zero: int) -> None:
    dp = n // tp
    r = run_mpi(n, [str(WORKER), "train", str(tmp_path), single["corpus"], str(STEPS), str(BATCH // dp), str(tp),
                    str(zero)], timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    check_equal(tmp_path, single["ref"], n)


def test_tensor_parallel_with_a_padded_vocabulary_equals_one_process(tmp_path: Path, single: dict) -> None:
    """pad_vocab_to 16: the tied table has padding rows of the model's own, split over tp 2 like the rest."""
    r = run_mpi(2, [str(WORKER), "train", str(tmp_path), single["corpus"], str(STEPS), str(BATCH), "2", "0", "pad=16"],
                timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    ref = reference(single["corpus"], tmp_path / "ref", BATCH, STEPS, pad=16)
    assert ref[1]["transformer.wte.weight"].shape[0] % 16 == 0
    check_equal(tmp_path, ref, 2)


def test_tp2_checkpoint_resumes_on_one_process_and_on_dp2(tmp_path: Path, single: dict) -> None:
    first = run_mpi(2, [str(WORKER), "train", str(tmp_path / "tp2"), single["corpus"], str(STEPS), str(BATCH), "2",
                        "0"], timeout=240)
    assert first.returncode == 0, first.stdout + first.stderr
    ckpt = tmp_path / "tp2" / "run" / f"step-{STEPS:06d}"
    # the checkpoint is the one-process layout: a plain GPT loads it
    from nn.serialization import load_safetensors
    saved, _ = load_safetensors(ckpt / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in single["ref"][1].items()}
    # one process, resumed to 5 steps == 5 steps straight
    losses, weights = reference(single["corpus"], tmp_path / "one", BATCH, 5, resume=str(ckpt))
    np.testing.assert_allclose(losses, single["ref5"][0][STEPS:], rtol=RTOL, atol=ATOL)
    for k, v in single["ref5"][1].items():
        assert_close(weights[k], v, k)
    # dp 2 (tp 1), resumed to 5 steps
    dp = run_mpi(2, [str(WORKER), "train", str(tmp_path / "dp2"), single["corpus"], "5", str(BATCH // 2), "1", "0",
                     f"resume={ckpt}"], timeout=240)
    assert dp.returncode == 0, dp.stdout + dp.stderr
    check_equal(tmp_path / "dp2", (single["ref5"][0][STEPS:], single["ref5"][1]), 2)


def test_tp2_zero1_checkpoint_resumes_resharded_on_dp2_x_tp2(tmp_path: Path, single: dict) -> None:
    """Weights and the ZeRO-1 moments saved unsharded by tp 2, loaded by dp 2 x tp 2 (both split again)."""
    first = run_mpi(2, [str(WORKER), "train", str(tmp_path / "a"), single["corpus"], str(STEPS), str(BATCH), "2",
                        "1"], timeout=240)
    assert first.returncode == 0, first.stdout + first.stderr
    ckpt = tmp_path / "a" / "run" / f"step-{STEPS:06d}"
    again = run_mpi(4, [str(WORKER), "train", str(tmp_path / "b"), single["corpus"], "5", str(BATCH // 2), "2", "1",
                        f"resume={ckpt}"], timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    check_equal(tmp_path / "b", (single["ref5"][0][STEPS:], single["ref5"][1]), 4)


def test_cli_tp2_trains_and_sample_loads_its_checkpoint_on_one_process(tmp_path: Path, corpus: str) -> None:
    common = ["-m", "tinygrad_lm", "train", "--data", corpus, "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
              "--block-size", "8", "--batch-size", "2", "--eval-iters", "1", "--progress", "false",
              "--max-iters", "2", "--eval-interval", "2", "--cache-dir", str(tmp_path / "cache")]
    r = run_mpi(2, common + ["--tp", "2", "--out", str(tmp_path / "run")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "layout: dp 1 x pp 1 x tp 2 = 2 ranks" in r.stdout
    import subprocess
    from tests.test_mpi import mpi_env
    s = subprocess.run([sys.executable, "-m", "tinygrad_lm", "sample", "--ckpt", str(tmp_path / "run"),
                        "--max-new-tokens", "5"], cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=60)
    assert s.returncode == 0, s.stderr


def test_tp2_and_pp2_ranks_never_build_the_whole_model(tmp_path: Path, corpus: str) -> None:
    """Each rank's parameters, and its traced peak while the Trainer builds them from the seed, are
    about half the whole model plus one full parameter (drawn whole, then sliced): never the whole
    model, which every rank built first before (the same weights: see the exactness tests)."""
    from tinygrad_lm.memory import param_shapes
    from tinygrad_lm.model import GPTConfig
    r = run_mpi(2, [str(WORKER), "memory", str(tmp_path), corpus], timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in range(2):
        rows = json.loads((tmp_path / f"memory.{rank}.json").read_text())
        for layout, row in rows.items():
            sizes = [4 * int(np.prod(s)) for s in param_shapes(GPTConfig(**row["model"])).values()]
            whole, largest = sum(sizes), max(sizes)
            assert whole > 12 * largest  # (so that the bounds below tell half the model from all of it)
            assert whole / 2 - largest <= row["param_bytes"] <= whole / 2 + largest, (layout, rank, row)
            # its own part, one full float32 parameter, a float64 chunk of draws, and what start-up imports
            assert row["construction_peak"] <= row["param_bytes"] + 2 * largest + (1 << 20), (layout, rank, row)
            assert row["construction_peak"] < 0.8 * whole, (layout, rank, row)


def test_a_rank_that_dies_mid_run_ends_the_tp_job(tmp_path: Path, single: dict) -> None:
    import time
    t0 = time.time()
    r = run_mpi(2, [str(WORKER), "train", str(tmp_path), single["corpus"], str(STEPS), str(BATCH), "2", "0",
                    "fail=1"], timeout=90)
    assert r.returncode != 0 and "injected failure on rank 1" in r.stdout + r.stderr
    assert time.time() - t0 < 60


@pytest.mark.parametrize("n,flags,message", [
    (2, ["--tp", "2", "--n-head", "3", "--n-embd", "12"], "--tp 2: n_head 3 is not divisible by tp"),
    (3, ["--tp", "2"], "the job has 3 ranks but --dp 1 x --pp 1 x --tp 2 = 2"),
    (2, ["--tp", "2", "--dp", "2"], "the job has 2 ranks but --dp 2 x --pp 1 x --tp 2 = 4"),
], ids=["n_head", "world", "dp"])
def test_bad_layouts_fail_on_every_rank_before_training(tmp_path: Path, corpus: str, n: int, flags: list,
                                                        message: str) -> None:
    args = ["-m", "tinygrad_lm", "train", "--data", corpus, "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
            "--block-size", "8", "--max-iters", "2", "--progress", "false", "--out", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache")]
    r = run_mpi(n, args + flags, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count(message) == n, r.stderr  # every rank says why
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("zero", [0, 1])
def test_gpu_tp2_on_cuda_equals_one_gpu_process(tmp_path: Path, single: dict, zero: int) -> None:
    """The same code with CuPy arrays: 2 ranks (sharing one GPU: host-staged; one GPU each: NCCL)
    against one process on the GPU."""
    from tensor import backend
    if not backend.cuda_available():
        pytest.skip("needs CuPy and an NVIDIA GPU")
    r = run_mpi(2, [str(WORKER), "train", str(tmp_path), single["corpus"], str(STEPS), str(BATCH), "2", str(zero),
                    "device=cuda"], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    check_equal(tmp_path, reference(single["corpus"], tmp_path / "ref", BATCH, STEPS, device="cuda"), 2)
