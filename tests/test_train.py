"""Training: gradient accumulation, exact resume (with dropout too), atomic checkpoints,
clear errors for damaged or mismatched checkpoints, non-finite losses, SIGINT, the CLI,
config files and the metrics log. Tiny models on a small corpus written into tmp_path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinygrad_lm.train as train_mod
import tinygrad_lm.trainer as trainer_mod
from tinygrad_lm import checkpoint as ckpt_io
from tinygrad_lm.errors import UserError
from tinygrad_lm.train import Trainer, TrainConfig, make_config

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(path: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind"]
    lines = [" ".join(rng.choice(words, size=8)) + ("." if i % 3 else ",") for i in range(300)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


def config(tmp_path: Path, corpus: Path, name: str = "run", **kw) -> TrainConfig:
    d = dict(data=str(corpus), tokenizer="char", n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=4,
             max_iters=6, lr=3e-3, min_lr=3e-4, warmup_iters=2, lr_decay_iters=20, eval_interval=1000,
             eval_iters=2, log_interval=1, ckpt_interval=1000, sample_tokens=0, progress=False, seed=3,
             out=str(tmp_path / name), cache_dir=str(tmp_path / "cache"))
    d.update(kw)
    return make_config(**d)


def weights(trainer: Trainer) -> dict[str, np.ndarray]:
    return trainer.model.state_dict()


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def quiet_trainer(cfg: TrainConfig, resume=None) -> tuple[Trainer, list[str]]:
    msgs: list[str] = []
    return Trainer(cfg, resume=resume, log=msgs.append), msgs


# ------------------------------------------------------------------ gradient accumulation
def test_grad_accum_equals_larger_batch(tmp_path, corpus):
    """batch b x grad_accum 2 == batch 2b x grad_accum 1, to float32 round-off."""
    a, _ = quiet_trainer(config(tmp_path, corpus, "a", batch_size=8, grad_accum=1, max_iters=4))
    b, _ = quiet_trainer(config(tmp_path, corpus, "b", batch_size=4, grad_accum=2, max_iters=4))
    c, _ = quiet_trainer(config(tmp_path, corpus, "c", batch_size=4, grad_accum=1, max_iters=4))
    w0 = weights(a)
    for k, v in weights(b).items():   # the same start
        np.testing.assert_array_equal(v, w0[k])
    la = [float(a.train_step()) for _ in range(4)]
    lb = [float(b.train_step()) for _ in range(4)]
    [c.train_step() for _ in range(4)]
    np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-6)
    wa, wb, wc = weights(a), weights(b), weights(c)
    for k in wa:
        assert not np.array_equal(wa[k], w0[k]) or k.endswith("bias"), f"{k} did not train"
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # control: half the batch without accumulation is a different computation
    assert max(np.abs(wc[k] - wa[k]).max() for k in wa) > 1e-4
    assert a.tokens_seen == b.tokens_seen == 4 * 8 * 8


def test_micro_batches_cut_one_global_batch(tmp_path, corpus):
    t, _ = quiet_trainer(config(tmp_path, corpus, batch_size=3, grad_accum=4))
    mbs = t.micro_batches(5)
    assert len(mbs) == 4 and all(x.shape == (3, 8) for x, _ in mbs)
    gx, gy = t.data.get_batch("train", 12, t.cfg.seed, 5)
    np.testing.assert_array_equal(np.concatenate([x for x, _ in mbs]), gx)
    np.testing.assert_array_equal(np.concatenate([y for _, y in mbs]), gy)


# ------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_resume_is_exact(tmp_path, corpus, dropout):
    """2N steps straight == N steps, checkpoint, new Trainer(resume=...), N steps: bit for bit."""
    N = 3
    straight, _ = quiet_trainer(config(tmp_path, corpus, "straight", max_iters=2 * N, dropout=dropout))
    assert straight.run() == 0

    first, _ = quiet_trainer(config(tmp_path, corpus, "split", max_iters=N, dropout=dropout))
    assert first.run() == 0
    del first
    second, msgs = quiet_trainer(config(tmp_path, corpus, "split", max_iters=2 * N, dropout=dropout),
                                 resume=str(tmp_path / "split"))
    assert second.step == N
    assert second.run() == 0
    assert any(f"resumed at step {N}" in m for m in msgs)

    ls, lr = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert sorted(ls) == sorted(lr) == list(range(1, 2 * N + 1))
    assert [ls[k] for k in sorted(ls)] == [lr[k] for k in sorted(lr)]
    ws, wr = weights(straight), weights(second)
    assert ws.keys() == wr.keys()
    for k in ws:
        assert np.array_equal(ws[k], wr[k]), k
    so, ro = straight.optimizer.state_dict()["arrays"], second.optimizer.state_dict()["arrays"]
    assert so.keys() == ro.keys() and all(np.array_equal(so[k], ro[k]) for k in so)
    assert straight.tokens_seen == second.tokens_seen
    if dropout:  # dropout really was on: the same steps without it give other weights
        nodrop, _ = quiet_trainer(config(tmp_path, corpus, "nodrop", max_iters=2 * N, dropout=0.0))
        nodrop.run()
        assert any(not np.array_equal(weights(nodrop)[k], ws[k]) for k in ws)


def test_checkpoint_contents(tmp_path, corpus):
    t, _ = quiet_trainer(config(tmp_path, corpus, max_iters=4, ckpt_interval=2))
    assert t.run() == 0
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == "step-000004"
    ck = ckpt_io.resolve(run)
    assert ck == run / "step-000004"
    assert {p.name for p in ck.iterdir()} == {"model.safetensors", "optimizer.safetensors", "state.json", "tokenizer.json", "manifest.json"}
    st = json.loads((ck / "state.json").read_text())
    assert st["step"] == 4 and st["tokens_seen"] == 4 * 4 * 8
    assert st["model_config"]["n_embd"] == 16
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step-000002", "step-000004"]
    from safetensors.numpy import load_file
    saved = load_file(str(ck / "model.safetensors"))
    for k, v in weights(t).items():
        assert np.array_equal(saved[k], v), k
    assert not list(run.glob("*.tmp*")) and not list(ck.glob("*.tmp*"))


# ------------------------------------------------------------------ atomicity and damaged checkpoints
def test_crash_while_writing_checkpoint_keeps_previous(tmp_path, corpus, monkeypatch):
    cfg = config(tmp_path, corpus, max_iters=4, ckpt_interval=2)
    t, _ = quiet_trainer(cfg)
    real = trainer_mod.save_optimizer

    def crashing_save_optimizer(opt, path, *a, **k):
        if t.step == 4:
            Path(path).write_bytes(b"\x00" * 10)  # a partial file, then the "crash"
            raise OSError("simulated crash while writing the optimizer")
        return real(opt, path, *a, **k)
    monkeypatch.setattr(trainer_mod, "save_optimizer", crashing_save_optimizer)
    with pytest.raises(UserError, match="simulated crash"):
        t.run()
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == "step-000002"
    assert ckpt_io.resolve(run) == run / "step-000002"
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step-000002"]
    monkeypatch.undo()
    r, _ = quiet_trainer(cfg, resume=str(run))
    assert r.step == 2
    # ... and finishing from there gives the straight run's weights
    assert r.run() == 0
    # the log rows of steps 3-4 from the crashed attempt are replaced, not duplicated
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r_["step"] for r_ in rows if "loss" in r_] == [1, 2, 3, 4]
    s, _ = quiet_trainer(config(tmp_path, corpus, "straight", max_iters=4))
    s.run()
    assert all(np.array_equal(weights(s)[k], v) for k, v in weights(r).items())


def test_crash_before_latest_is_updated_keeps_previous(tmp_path, corpus, monkeypatch):
    cfg = config(tmp_path, corpus, max_iters=4, ckpt_interval=2)
    t, _ = quiet_trainer(cfg)
    real = ckpt_io.atomic_write

    def crash_on_latest(path, text):
        if Path(path).name == "latest" and "step-000004" in text:
            raise OSError("simulated crash before the pointer moved")
        return real(path, text)
    monkeypatch.setattr(ckpt_io, "atomic_write", crash_on_latest)
    with pytest.raises(UserError, match="simulated crash"):
        t.run()
    monkeypatch.undo()
    r, _ = quiet_trainer(cfg, resume=str(tmp_path / "run"))
    assert r.step == 2


def test_truncated_model_file_is_a_clear_error(tmp_path, corpus):
    cfg = config(tmp_path, corpus, max_iters=4, ckpt_interval=2)
    quiet_trainer(cfg)[0].run()
    run = tmp_path / "run"
    f = run / "step-000004" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ckpt_io.CheckpointError) as e:
        quiet_trainer(cfg, resume=str(run))
    msg = str(e.value)
    assert "model.safetensors" in msg and "step-000004" in msg
    assert "step-000002" in msg, "the message should point at the earlier checkpoint"
    r, _ = quiet_trainer(cfg, resume=str(run / "step-000002"))
    assert r.step == 2


def test_keep_prunes_oldest_by_step_number(tmp_path):
    """Pruning keeps the newest `keep` checkpoints by step, also past step 999999 (7 digits)."""
    def writer(step):
        def write(d):
            ckpt_io.atomic_write(d / "state.json", json.dumps({"step": step}))
        return write
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        ckpt_io.save(tmp_path, step, writer(step), keep=2)
        assert json.loads((ckpt_io.resolve(tmp_path) / "state.json").read_text())["step"] == step
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step-1000000", "step-1000001"]


def test_missing_or_corrupt_state_is_a_clear_error(tmp_path, corpus):
    cfg = config(tmp_path, corpus, max_iters=2, ckpt_interval=2)
    quiet_trainer(cfg)[0].run()
    run = tmp_path / "run"
    (run / "step-000002" / "state.json").write_text("{not json")
    with pytest.raises(ckpt_io.CheckpointError, match="state.json"):
        quiet_trainer(cfg, resume=str(run))
    with pytest.raises(ckpt_io.CheckpointError, match="no checkpoint"):
        quiet_trainer(cfg, resume=str(tmp_path / "elsewhere"))


def test_resume_with_other_architecture_names_the_mismatch(tmp_path, corpus):
    quiet_trainer(config(tmp_path, corpus, max_iters=2))[0].run()
    with pytest.raises(ValueError, match=r"n-embd.*16.*32"):
        quiet_trainer(config(tmp_path, corpus, n_embd=32, max_iters=4), resume=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="pos-encoding"):
        quiet_trainer(config(tmp_path, corpus, pos_encoding="learned", max_iters=4), resume=str(tmp_path / "run"))


# ------------------------------------------------------------------ non-finite loss
def poison_after(monkeypatch, step: int) -> None:
    """After optimizer step `step`, put a NaN into one weight (as a bad update would)."""
    real = Trainer.train_step

    def train_step(self):
        loss = real(self)
        if self.step == step:
            w = self.model.transformer.h[0].mlp.c_fc.weight
            w.data = w.data.copy()
            w.data[0, 0] = np.nan
        return loss
    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize("log_interval, grad_clip", [(1, 1.0), (10, 1.0), (10, 0.0)])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus, monkeypatch, log_interval, grad_clip):
    """Also when the NaN step is not a logging step: no checkpoint of NaN weights is ever written."""
    poison_after(monkeypatch, 3)   # step 4's loss is the first NaN
    t, msgs = quiet_trainer(config(tmp_path, corpus, max_iters=8, ckpt_interval=2, log_interval=log_interval,
                                   grad_clip=grad_clip))
    rc = t.run()
    assert rc != 0
    err = [m for m in msgs if "nan" in m.lower()]
    assert err and "step 4" in err[0], msgs
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == "step-000002"
    monkeypatch.undo()
    r, _ = quiet_trainer(config(tmp_path, corpus, max_iters=8), resume=str(run))
    assert r.step == 2
    assert all(np.isfinite(v).all() for v in weights(r).values())


def test_huge_learning_rate_is_caught(tmp_path, corpus):
    t, msgs = quiet_trainer(config(tmp_path, corpus, max_iters=20, lr=1e30, min_lr=1e30, warmup_iters=0,
                                   ckpt_interval=1, grad_clip=0.0))
    with np.errstate(all="ignore"):
        rc = t.run()
    assert rc != 0
    assert any(f"at step {t.step + 1}" in m or f"at step {t.step}" in m for m in msgs if "nan" in m or "inf" in m), msgs
    ck = ckpt_io.resolve(tmp_path / "run")
    from safetensors.numpy import load_file
    assert all(np.isfinite(v).all() for v in load_file(str(ck / "model.safetensors")).values())


# ------------------------------------------------------------------ SIGINT
def test_sigint_saves_a_checkpoint_and_returns_zero(tmp_path, corpus, monkeypatch):
    real = Trainer.train_step

    def train_step(self):
        loss = real(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss
    monkeypatch.setattr(Trainer, "train_step", train_step)
    before = signal.getsignal(signal.SIGINT)
    t, _ = quiet_trainer(config(tmp_path, corpus, max_iters=8))
    assert t.run() == 0
    assert t.step == 3
    assert signal.getsignal(signal.SIGINT) is before   # the handler is restored
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == "step-000003"
    monkeypatch.undo()
    # the interrupted run continues exactly
    r, _ = quiet_trainer(config(tmp_path, corpus, max_iters=8), resume=str(run))
    assert r.step == 3 and r.run() == 0
    s, _ = quiet_trainer(config(tmp_path, corpus, "straight", max_iters=8))
    s.run()
    assert all(np.array_equal(weights(s)[k], v) for k, v in weights(r).items())


def test_second_sigint_stops_at_once(tmp_path, corpus, monkeypatch):
    real = Trainer.train_step

    def train_step(self):
        loss = real(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return loss
    monkeypatch.setattr(Trainer, "train_step", train_step)
    before = signal.getsignal(signal.SIGINT)
    t, _ = quiet_trainer(config(tmp_path, corpus, max_iters=8, ckpt_interval=2))
    with pytest.raises(KeyboardInterrupt):
        t.run()
    assert signal.getsignal(signal.SIGINT) is before
    assert ckpt_io.resolve(tmp_path / "run") == tmp_path / "run" / "step-000002"


# ------------------------------------------------------------------ metrics log
def test_metrics_log_has_loss_and_val_loss_rows(tmp_path, corpus):
    t, _ = quiet_trainer(config(tmp_path, corpus, max_iters=6, log_interval=2, eval_interval=3))
    assert t.run() == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    ev = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in ev] == [3, 6]
    for r in rows:
        for k in ("loss", "val_loss", "train_loss", "lr"):
            if k in r:
                assert np.isfinite(r[k])
    # the eval loss is the mean over eval_iters fixed batches, recomputed independently here
    with train_mod.no_grad():
        t.model.eval()
        ref = np.mean([t.model(*t.data.get_batch("val", 4, t.cfg.seed + 1, i))[1].item() for i in range(2)])
    assert abs(ev[-1]["val_loss"] - ref) < 1e-6
    assert abs(ev[0]["val_loss"] - np.log(t.tokenizer.vocab_size)) < 0.3  # near log V early on


# ------------------------------------------------------------------ config: presets, files, flags
def test_config_from_toml_and_json_with_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[train]\nn_layer = 3\nlr = 0.002\ndropout = 0.1\ndata = "x.txt"\nprogress = false\n')
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"n_layer": 5, "batch_size": 7, "bias": False}))
    c = make_config(config_file=str(toml))
    assert (c.model.n_layer, c.lr, c.model.dropout, c.data, c.progress) == (3, 0.002, 0.1, "x.txt", False)
    c = make_config(config_file=str(toml), n_layer="2", lr=None)   # flags (strings) override, None ignored
    assert c.model.n_layer == 2 and isinstance(c.model.n_layer, int) and c.lr == 0.002
    c = make_config(preset="shakespeare-char", config_file=str(js), max_iters="50")
    assert (c.model.n_layer, c.batch_size, c.model.bias, c.max_iters) == (5, 7, False, 50)
    assert c.model.pos_encoding == "learned" and c.model.n_embd == 128   # from the preset
    c = make_config(progress="false", dropout="0.25")
    assert c.progress is False and c.model.dropout == 0.25


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("n_layers = 3\n")
    with pytest.raises(ValueError, match="n_layers"):
        make_config(config_file=str(bad))
    with pytest.raises(ValueError, match="unknown preset"):
        make_config(preset="nope")
    with pytest.raises(UserError, match="missing.toml"):
        make_config(config_file=str(tmp_path / "missing.toml"))
    with pytest.raises(ValueError, match="max-iters"):
        make_config(max_iters="ten")
    with pytest.raises(ValueError, match="progress"):
        make_config(progress="maybe")
    for name in ("eval_interval", "log_interval", "ckpt_interval", "batch_size", "grad_accum", "eval_iters"):
        with pytest.raises(ValueError, match=name.replace("_", "-")):
            make_config(**{name: 0})
    with pytest.raises(ValueError, match="lr"):
        make_config(lr=-1e-3)
    # a CUDA graph replays one recorded micro-batch: GPU only, no accumulation, no dropout masks
    for kw in (dict(), dict(device="cuda", grad_accum=2), dict(device="cuda", dropout=0.1)):
        with pytest.raises(ValueError, match="cuda-graph"):
            make_config(cuda_graph="true", **kw)


def test_presets_are_valid_configs():
    for name in train_mod.PRESETS:
        if name == "gpt2-finetune":  # needs --init-from a GPT-2 directory (tests/test_hf.py runs it)
            with pytest.raises(UserError, match="needs --init-from DIR"):
                make_config(preset=name)
            continue
        c = make_config(preset=name)
        c.model_config(65)   # builds a valid GPTConfig
    c = make_config(preset="shakespeare-char")
    m = c.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, c.batch_size, c.max_iters, m.pos_encoding) == \
        (4, 4, 128, 64, 12, 2000, "learned")


# ------------------------------------------------------------------ CLI
def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "tinygrad_lm", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, expect", [
    (["--preset", "nope"], "invalid choice"),
    (["--bogus-flag", "1"], "unrecognized arguments"),
    (["--data", "no/such/corpus.txt"], "no/such/corpus.txt"),
    (["--config", "missing.toml"], "missing.toml"),
    (["--max-iters", "ten"], "max-iters"),
    (["--eval-interval", "0"], "eval-interval"),
])
def test_cli_errors_are_messages_not_tracebacks(tmp_path, args, expect):
    r = cli(*args, cwd=tmp_path)
    assert r.returncode != 0
    assert expect in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_cli_trains_from_config_file_and_resumes(tmp_path, corpus):
    cfg_file = tmp_path / "tiny.toml"
    cfg_file.write_text(f'''[train]
data = "{corpus.as_posix()}"
n_layer = 1
n_head = 2
n_embd = 16
block_size = 8
batch_size = 4
max_iters = 100
eval_interval = 1000
eval_iters = 1
sample_tokens = 0
progress = false
cache_dir = "{(tmp_path / "cache").as_posix()}"
''')
    r = cli("--config", str(cfg_file), "--max-iters", "2", "--out", "runs/t", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    st = json.loads((ckpt_io.resolve(tmp_path / "runs" / "t") / "state.json").read_text())
    assert st["step"] == 2 and st["train_config"]["max_iters"] == 2 and st["model_config"]["n_embd"] == 16
    r = cli("--resume", "runs/t", "--max-iters", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    st = json.loads((ckpt_io.resolve(tmp_path / "runs" / "t") / "state.json").read_text())
    assert st["step"] == 3
    r = cli("--resume", "runs/t", "--n-embd", "32", "--max-iters", "4", cwd=tmp_path)
    assert r.returncode == 2 and "--n-embd: 16 in the checkpoint, 32 now" in r.stderr and "Traceback" not in r.stderr
    # resuming from a checkpoint directory, from another working directory, continues in that run
    (tmp_path / "elsewhere").mkdir()
    r = cli("--resume", "../runs/t/step-000003", "--max-iters", "4", cwd=tmp_path / "elsewhere")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs" / "t" / "latest").read_text().strip() == "step-000004"
    assert not (tmp_path / "elsewhere" / "runs").exists()


def test_export_example_reads_a_training_checkpoint(tmp_path, corpus):
    torch = pytest.importorskip("torch")
    t, _ = quiet_trainer(config(tmp_path, corpus, max_iters=3, pos_encoding="learned"))
    assert t.run() == 0
    out = tmp_path / "gpt.pt"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "export_to_pytorch.py"),
                        "--checkpoint", str(tmp_path / "run"), "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "max |logit difference|" in r.stdout
    sd = torch.load(out, weights_only=True)
    for k, v in weights(t).items():
        assert np.array_equal(sd[k].numpy(), v), k
    assert np.array_equal(sd["lm_head.weight"].numpy(), weights(t)["transformer.wte.weight"])
