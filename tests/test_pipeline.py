"""Pipeline parallelism (nn/distributed/pipeline.py): the schedules against the published
orders, the bubble against (p-1)/(m+p-1), and training under a real `mpiexec` equal to one
process with the same global batch (skipped only when no MPI launcher is installed), also
composed with tensor parallelism (tp 2 x pp 2; a tp 2 checkpoint resumed as pp 2; dp 2 x tp 2
x pp 2 with ZeRO-1 in bf16).

Tolerance of the exactness checks: rtol 2e-5, atol 2e-6 on the weights and 1e-5 on the losses
(float32 round-off: the stages add the micro-batches' gradients in another order, GPipe last
micro-batch first, and the norm is summed stage by stage)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from nn.distributed.pipeline import (bubble_formula, gpipe_schedule, named_optimizer_state, one_f_one_b_schedule,
                                     optimizer_state_from_named, owner_stage, simulate, stage_layers)
from test_mpi import ROOT, corpus, run_mpi  # noqa: F401  (corpus: a fixture)

WORKER = ROOT / "tests" / "mpi" / "pp_worker.py"
sys.path.insert(0, str(WORKER.parent))
from pp_worker import pp_config  # noqa: E402

W_TOL = dict(rtol=2e-5, atol=2e-6)


def parse(text: str) -> list[tuple[str, int]]:
    return [(t[0], int(t[1:])) for t in text.split()]


def test_gpipe_order_is_the_published_one() -> None:
    # Huang et al. 2019, fig. 2c: every device runs F0..F3, then B3..B0
    for s in range(4):
        assert gpipe_schedule(s, 4, 4) == parse("F0 F1 F2 F3 B3 B2 B1 B0")


def test_1f1b_order_is_the_published_one() -> None:
    # Narayanan et al. 2021, fig. 4 (top): 4 devices, 8 micro-batches; device s warms up with 3-s forwards
    want = ["F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7",
            "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7",
            "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7",
            "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7"]
    for s in range(4):
        assert one_f_one_b_schedule(s, 4, 8) == parse(want[s])
    assert one_f_one_b_schedule(0, 4, 2) == parse("F0 F1 B0 B1")  # fewer micro-batches than stages


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_each_micro_batch_once_and_its_forward_first(schedule: str) -> None:
    fn = gpipe_schedule if schedule == "gpipe" else one_f_one_b_schedule
    for p in (1, 2, 3, 4):
        for m in (1, 2, 5, 8):
            for s in range(p):
                steps = fn(s, p, m)
                assert sorted(steps) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
                assert all(steps.index(("F", i)) < steps.index(("B", i)) for i in range(m))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_bubble_of_both_schedules_is_the_closed_form(schedule: str) -> None:
    # backward = 2 x forward, messages free: each stage idles (p-1)(tf+tb) of (m+p-1)(tf+tb)
    for p, m in ((2, 1), (2, 4), (4, 4), (4, 16), (3, 5)):
        for idle in simulate(schedule, p, m):
            assert idle == pytest.approx(bubble_formula(p, m), abs=1e-12)


def test_stage_split_and_owners() -> None:
    assert stage_layers(5, 2) == [range(0, 2), range(2, 5)]
    assert stage_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="3 layers cannot be split over 4 stages"):
        stage_layers(3, 4)
    assert owner_stage("transformer.wte.weight", 4, 2) == 0 and owner_stage("transformer.wpe.weight", 4, 2) == 0
    assert owner_stage("transformer.h.1.ln_1.weight", 4, 2) == 0 and owner_stage("transformer.h.2.mlp.c_fc.bias", 4, 2) == 1
    assert owner_stage("transformer.ln_f.weight", 4, 2) == 1


@pytest.mark.parametrize("pp", [2, 3])
def test_stages_own_every_parameter_once_under_its_whole_model_name(pp: int) -> None:
    from nn.distributed.pipeline import PipelineStage
    from tinygrad_lm.memory import param_shapes
    from tinygrad_lm.model import GPT, GPTConfig
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=5, n_head=2, n_embd=8, pos_encoding="learned")
    stages = [PipelineStage(GPT(cfg, seed=1), s, pp) for s in range(pp)]
    names = [n for st in stages for n, _ in st.named_parameters()]
    assert sorted(names) == sorted(param_shapes(cfg))  # each once: the last stage's wte copy is not owned
    assert stages[-1].tied_wte is stages[-1].lm_head.weight is stages[-1].transformer.wte.weight
    assert all(owner_stage(n, cfg.n_layer, pp) == s for s, st in enumerate(stages) for n, _ in st.named_parameters())
    # the stages chained equal the whole model's loss
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8))
    h = x
    for st in stages:
        h = st(h, y)
    assert float(h.item()) == pytest.approx(float(GPT(cfg, seed=1)(x, y)[1].item()), rel=1e-6)


def test_optimizer_state_by_name_round_trips_plain_and_zero1() -> None:
    rng = np.random.default_rng(0)
    shapes = {"a": (2, 3), "b": (4,), "c": (3, 1)}
    groups = [["a", "c"], ["b"]]
    named = {f"{n}/{m}": rng.standard_normal(shapes[n]).astype(np.float32) for n in shapes for m in ("m", "v")}
    info = {"step": 7, "type": "AdamW", "param_groups": [{"lr": 0.1}, {"lr": 0.2}]}
    for zero1 in (False, True):
        sd = optimizer_state_from_named(named, info, groups, shapes, zero1)
        back, info2 = named_optimizer_state(sd, groups, shapes)
        assert info2 == info and set(back) == set(named)
        for k in named:
            np.testing.assert_array_equal(back[k], named[k])


# ---------------------------------------------------------------- under mpiexec
def single_process(corpus: str, out: Path, steps: int, batch: int, accum: int, resume: str | None = None,
                   **kw: str) -> tuple:
    from tinygrad_lm.train import Trainer
    t = Trainer(pp_config(corpus, str(out), steps, batch, accum, **kw), resume=resume, log=lambda s: None)
    losses = []
    while t.step < steps:
        losses.append(t.check_finite(t.train_step()))
    return t, losses


def weights(run: Path) -> dict:
    from nn.serialization import load_safetensors
    return load_safetensors(next(run.glob("step-*")) / "model.safetensors")[0]


def assert_same(a: dict, b: dict, **tol: float) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], err_msg=k, **(tol or W_TOL))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pp2_equals_one_process(tmp_path: Path, corpus: str, schedule: str) -> None:
    steps, b, m = 3, 2, 4
    r = run_mpi(2, [str(WORKER), str(tmp_path / "pp"), corpus, str(steps), str(b), str(m), "2", schedule])
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads((tmp_path / "pp" / "losses.json").read_text())
    ref, losses = single_process(corpus, tmp_path / "one", steps, b, m)
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)
    ev = ref.estimate_loss()
    assert got["eval"] == pytest.approx(ev, rel=1e-5)
    assert_same(weights(tmp_path / "pp"), ref.model.state_dict())
    init = single_process(corpus, tmp_path / "init", 0, b, m)[0].model.state_dict()
    assert any(not np.allclose(init[k], ref.model.state_dict()[k]) for k in init)  # the weights moved


def test_pp4_with_middle_stages_equals_one_process(tmp_path: Path, corpus: str) -> None:
    """Four stages of one block each: two of them hold neither the embedding nor the head."""
    steps, b, m = 2, 2, 5
    r = run_mpi(4, [str(WORKER), str(tmp_path / "pp"), corpus, str(steps), str(b), str(m), "4", "1f1b"])
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads((tmp_path / "pp" / "losses.json").read_text())
    ref, losses = single_process(corpus, tmp_path / "one", steps, b, m)
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)
    assert_same(weights(tmp_path / "pp"), ref.model.state_dict())


def test_pp2_fp16_agrees_on_one_loss_scale(tmp_path: Path, corpus: str) -> None:
    """fp16: every stage skips the same steps (one overflow verdict) and the run equals one process."""
    steps, b, m = 3, 2, 2
    r = run_mpi(2, [str(WORKER), str(tmp_path / "pp"), corpus, str(steps), str(b), str(m), "2", "1f1b",
                    "precision=fp16"])
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads((tmp_path / "pp" / "losses.json").read_text())
    ref, losses = single_process(corpus, tmp_path / "one", steps, b, m, precision="fp16")
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-3)
    st = json.loads((next((tmp_path / "pp").glob("step-*")) / "state.json").read_text())
    assert st["loss_scaler"] == ref.scaler.state_dict()
    assert_same(weights(tmp_path / "pp"), ref.model.state_dict(), rtol=1e-3, atol=1e-4)


def test_dp2_pp2_equals_one_process(tmp_path: Path, corpus: str) -> None:
    steps, b, m = 2, 2, 3
    r = run_mpi(4, [str(WORKER), str(tmp_path / "pp"), corpus, str(steps), str(b), str(m), "2", "1f1b"])
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads((tmp_path / "pp" / "losses.json").read_text())
    ref, losses = single_process(corpus, tmp_path / "one", steps, 2 * b, m)  # the same global batch
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)
    assert_same(weights(tmp_path / "pp"), ref.model.state_dict())


def test_pp2_checkpoint_resumes_on_one_process(tmp_path: Path, corpus: str) -> None:
    b, m = 2, 2
    r = run_mpi(2, [str(WORKER), str(tmp_path / "pp"), corpus, "2", str(b), str(m), "2", "gpipe"])
    assert r.returncode == 0, r.stdout + r.stderr
    from tinygrad_lm.sample import generate, load_checkpoint_model
    model, tok = load_checkpoint_model(str(tmp_path / "pp"))  # `sample` loads it in one process
    assert_same(model.state_dict(), weights(tmp_path / "pp"), rtol=0, atol=0)
    assert generate(model, np.zeros((1, 1), dtype=np.int64), 5, seed=0).shape == (1, 6)
    resumed, _ = single_process(corpus, tmp_path / "pp", 4, b, m, resume=str(tmp_path / "pp"))
    straight, _ = single_process(corpus, tmp_path / "one", 4, b, m)
    sa, sb = resumed.model.state_dict(), straight.model.state_dict()
    for k in sb:
        np.testing.assert_allclose(sa[k], sb[k], err_msg=k, **W_TOL)


def test_one_process_checkpoint_resumes_as_pp2_with_zero1(tmp_path: Path, corpus: str) -> None:
    b, m = 2, 2
    first, _ = single_process(corpus, tmp_path / "one", 2, b, m)
    first.save_checkpoint()
    r = run_mpi(2, [str(WORKER), str(tmp_path / "one"), corpus, "4", str(b), str(m), "2", "1f1b", "zero=1",
                    f"resume={tmp_path / 'one'}"])
    assert r.returncode == 0, r.stdout + r.stderr
    straight, _ = single_process(corpus, tmp_path / "straight", 4, b, m)
    from nn.serialization import load_safetensors
    got = load_safetensors(tmp_path / "one" / "step-000004" / "model.safetensors")[0]
    assert_same(got, straight.model.state_dict())


def test_bad_layouts_fail_on_every_rank_before_training(tmp_path: Path, corpus: str) -> None:
    common = ["-m", "tinygrad_lm", "train", "--data", corpus, "--n-head", "2", "--n-embd", "16", "--block-size", "8",
              "--out", str(tmp_path / "x"), "--cache-dir", str(tmp_path / "cache"), "--progress", "false"]
    r = run_mpi(2, common + ["--pp", "3", "--n-layer", "4"], timeout=60)
    assert r.returncode == 2 and r.stderr.count("error: the job has 2 ranks but --dp 1 x --pp 3 x --tp 1 = 3") == 2, r.stderr
    r = run_mpi(2, common + ["--pp", "2", "--n-layer", "1"], timeout=60)
    assert r.returncode == 2 and r.stderr.count("--pp 2: only 1 layer (n_layer) to split into 2 pipeline stages") == 2, r.stderr
    r = run_mpi(3, common + ["--tp", "2", "--pp", "2", "--n-layer", "4"], timeout=60)  # tp x pp
    assert r.returncode == 2 and r.stderr.count("the job has 3 ranks but --dp 1 x --pp 2 x --tp 2 = 4") == 3, r.stderr
    r = run_mpi(4, common + ["--tp", "2", "--pp", "2", "--n-layer", "1"], timeout=60)
    assert r.returncode == 2 and r.stderr.count("--pp 2: only 1 layer (n_layer)") == 4, r.stderr
    from tinygrad_lm.config import ConfigError, make_config
    with pytest.raises(ConfigError, match="--cuda-graph is not supported with model parallelism .*--pp 2"):
        make_config(None, None, pp=2, n_layer=2, cuda_graph=True, device="cuda")
    with pytest.raises(ConfigError, match="--pp-schedule: must be one of gpipe, 1f1b"):
        make_config(None, None, pp=2, n_layer=2, pp_schedule="zigzag")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pp2_on_gpu_equals_one_gpu(tmp_path: Path, corpus: str, precision: str) -> None:
    """The same code with CuPy arrays: two stages (sharing one GPU, or a GPU each); activations
    travel staged through the host, the tied-wte and norm reductions by the device transport."""
    from tensor import backend
    if not backend.cuda_available():
        pytest.skip("needs CuPy and an NVIDIA GPU")
    steps, b, m = 3, 2, 4
    r = run_mpi(2, [str(WORKER), str(tmp_path / "pp"), corpus, str(steps), str(b), str(m), "2", "1f1b",
                    "device=cuda", f"precision={precision}"])
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads((tmp_path / "pp" / "losses.json").read_text())
    ref, losses = single_process(corpus, tmp_path / "one", steps, b, m, device="cuda", precision=precision)
    tol = W_TOL if precision == "fp32" else dict(rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(got["losses"], losses, rtol=tol["rtol"])
    assert_same(weights(tmp_path / "pp"), ref.model.state_dict(), **tol)


# ---------------------------------------------------------------- tensor x pipeline parallel
# With tp the tied, vocabulary-split wte and the heads' partial sums reorder more of the sums than
# pp alone; at this config's lr 1e-2 Adam turns that round-off into weight differences of up to 5e-6
# (tp 2 alone shows the same ones), so these runs use lr 3e-3 and the same tolerances as above.
TP_LR = 3e-3

def test_tp2_pp2_equals_one_process(tmp_path: Path, corpus: str) -> None:
    """Four ranks, each the tp shard of a pipeline stage (the char vocabulary padded for tp 2):
    losses, evaluation and every weight equal one process with the same global batch."""
    steps, b, m = 3, 2, 3
    r = run_mpi(4, [str(WORKER), str(tmp_path / "mp"), corpus, str(steps), str(b), str(m), "2", "1f1b", "tp=2",
                    f"lr={TP_LR}"])
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads((tmp_path / "mp" / "losses.json").read_text())
    ref, losses = single_process(corpus, tmp_path / "one", steps, b, m, lr=TP_LR)
    assert ref.tokenizer.vocab_size % 2  # odd: the vocabulary-parallel table is padded
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)
    assert got["eval"] == pytest.approx(ref.estimate_loss(), rel=1e-5)
    assert_same(weights(tmp_path / "mp"), ref.model.state_dict())


def test_tp2_checkpoint_resumes_as_pp2(tmp_path: Path, corpus: str) -> None:
    """Train tp 2 for k steps, resume the checkpoint on pp 2 (weights and AdamW moments resharded
    by name) to 2k: the same as one process running 2k steps."""
    k, b, m = 2, 2, 2
    r = run_mpi(2, [str(WORKER), str(tmp_path / "run"), corpus, str(k), str(b), str(m), "1", "1f1b", "tp=2",
                    f"lr={TP_LR}"])
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_mpi(2, [str(WORKER), str(tmp_path / "run"), corpus, str(2 * k), str(b), str(m), "2", "gpipe",
                    f"lr={TP_LR}", f"resume={tmp_path / 'run'}"])
    assert r.returncode == 0, r.stdout + r.stderr
    straight, _ = single_process(corpus, tmp_path / "one", 2 * k, b, m, lr=TP_LR)
    from nn.serialization import load_safetensors
    got = load_safetensors(tmp_path / "run" / f"step-{2 * k:06d}" / "model.safetensors")[0]
    assert_same(got, straight.model.state_dict())


def test_dp2_tp2_pp2_zero1_bf16_runs(tmp_path: Path, corpus: str) -> None:
    """Every kind at once (8 ranks, about 10 s here): it trains, evaluates and checkpoints; its
    losses follow one process's in bf16 (to 2%: bf16 GEMMs round differently when split, so the
    weights are only checked to be finite and in the one-process layout)."""
    steps, b, m = 2, 1, 2
    r = run_mpi(8, [str(WORKER), str(tmp_path / "all"), corpus, str(steps), str(b), str(m), "2", "1f1b", "tp=2",
                    "dp=2", "zero=1", "precision=bf16", f"lr={TP_LR}"], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads((tmp_path / "all" / "losses.json").read_text())
    ref, losses = single_process(corpus, tmp_path / "one", steps, 2 * b, m, precision="bf16", lr=TP_LR)
    np.testing.assert_allclose(got["losses"], losses, rtol=2e-2)
    w, want = weights(tmp_path / "all"), ref.model.state_dict()
    assert set(w) == set(want) and all(w[k].shape == want[k].shape and np.isfinite(w[k]).all() for k in w)
