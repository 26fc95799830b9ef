"""The train command's hardening: one-line errors for bad flags and files (exit 2), no
abbreviated flags, run directories never silently reused, resume flag policy applied
exactly, checkpoints that are always finite, and a strict dropout RNG on resume.
Tiny models on a small corpus written into tmp_path; the CLI runs in-process (`cli.main`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from nn.lr_scheduler import WarmupCosine
from tinygrad_lm import checkpoint as ckpt_io
from tinygrad_lm.cli import main
from tinygrad_lm.config import make_config, resume_config
from tinygrad_lm.errors import UserError
from tinygrad_lm.model import GPTConfig
from tinygrad_lm.train import Trainer

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "4",
        "--eval-interval", "1000", "--eval-iters", "1", "--sample-tokens", "0", "--progress", "false",
        "--log-interval", "1", "--warmup-iters", "1", "--lr-decay-iters", "20"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind"]
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(" ".join(rng.choice(words, size=8)) for _ in range(300)) + "\n")
    return p


def train(tmp_path: Path, corpus: Path, *args: str, out: str = "run") -> list[str]:
    return ["train", "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / out),
            *TINY, *args]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def expect_error(argv: list[str], capsys, *fragments: str) -> str:
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    for f in fragments:
        assert f in err, (f, err)
    return err


# ------------------------------------------------------------------ flags and files
def test_no_command_exits_nonzero(capsys):
    code, _, err = run_cli([], capsys)
    assert code == 2 and "COMMAND" in err


def test_abbreviated_flag_is_refused_with_the_subcommands_usage(capsys):
    err = expect_error(["train", "--max-iter", "3"], capsys, "--max-iter")
    assert "usage: tinygrad-lm train" in err


@pytest.mark.parametrize("args, fragments", [
    (["--seed", "-1"], ["--seed", "-1"]),
    (["--grad-clip", "nan"], ["--grad-clip", "nan"]),
    (["--lr", "inf"], ["--lr", "inf"]),
    (["--dropout", "nan"], ["--dropout"]),
    (["--tokenizer", "bpe:abc"], ["--tokenizer", "bpe:abc"]),
    (["--n-head", "3"], ["--n-embd: 16", "n_head 3"]),
    (["--n-layer", "999999999999"], ["--n-layer", "999999999999"]),
    (["--n-embd", "10000000"], ["--n-embd", "10000000"]),
    (["--block-size", "100000"], ["block"]),
    (["--beta2", "1.5"], ["--beta2"]),
])
def test_bad_flag_values_are_one_line_errors(tmp_path, corpus, capsys, args, fragments):
    expect_error(train(tmp_path, corpus, *args), capsys, "error: ", *fragments)
    assert not (tmp_path / "run").exists()


def test_device_cuda_without_cupy_is_one_line(tmp_path, corpus, capsys):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed")
    except ImportError:
        pass
    err = expect_error(train(tmp_path, corpus, "--device", "cuda"), capsys, "--device cuda", "CuPy")
    assert len(err.strip().splitlines()) == 1


def test_missing_and_unreadable_data(tmp_path, corpus, capsys):
    expect_error(train(tmp_path, tmp_path / "nope.txt"), capsys, "nope.txt")
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    corpus.chmod(0)
    try:
        expect_error(train(tmp_path, corpus), capsys, "--data", str(corpus))
    finally:
        corpus.chmod(0o644)


def test_tokenizer_file_and_cache_dir_errors(tmp_path, corpus, capsys):
    expect_error(train(tmp_path, corpus, "--tokenizer", str(tmp_path / "tok.json")), capsys, "--tokenizer", "tok.json")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = train(tmp_path, corpus)
    argv[argv.index("--cache-dir") + 1] = str(blocker / "cache")
    expect_error(argv, capsys, "--cache-dir", str(blocker))


@pytest.mark.parametrize("name, text, fragments", [
    ("bad.toml", "n_layer = 2\nlr = = 3\n", ["bad.toml", "line 2"]),
    ("bad.json", '{"n_layer": 2,\n "lr": }', ["bad.json", "line 2"]),
    ("dash.toml", "n-layer = 2\n", ["dash.toml", "'n-layer'", "'n_layer'"]),
    ("typo.json", '{"n_layr": 2}', ["typo.json", "'n_layr'", "'n_layer'"]),
    ("type.toml", 'n_layer = "two"\n', ["type.toml", "n_layer", "'two'"]),
])
def test_config_file_errors_name_the_file_and_line(tmp_path, corpus, capsys, name, text, fragments):
    f = tmp_path / name
    f.write_text(text)
    expect_error(train(tmp_path, corpus, "--config", str(f)), capsys, *fragments)
    expect_error(train(tmp_path, corpus, "--config", str(tmp_path / "none.toml")), capsys, "none.toml")


def test_gptconfig_validates_types_and_ranges():
    GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16)
    for kw, frag in [(dict(n_layer=1.5), "n_layer"), (dict(n_head=True), "n_head"), (dict(n_embd=0), "n_embd"),
                     (dict(n_embd=15, n_head=2), "divisible"), (dict(dropout=1.0), "dropout"),
                     (dict(dropout=float("nan")), "dropout"), (dict(bias="yes"), "bias")]:
        args = dict(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16)
        args.update(kw)
        with pytest.raises(ValueError, match=frag):
            GPTConfig(**args)


# ------------------------------------------------------------------ run directories
def test_existing_run_is_refused_and_overwrite_starts_over(tmp_path, corpus, capsys):
    assert run_cli(train(tmp_path, corpus, "--max-iters", "2", "--ckpt-interval", "1"), capsys)[0] == 0
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_text()
    expect_error(train(tmp_path, corpus, "--max-iters", "1"), capsys, f"--resume {run}", "--overwrite")
    assert (run / "metrics.jsonl").read_text() == before  # nothing touched
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step-000001", "step-000002"]
    (run / "loss.png").write_bytes(b"old")
    assert run_cli(train(tmp_path, corpus, "--max-iters", "1", "--overwrite"), capsys)[0] == 0
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step-000001"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]
    assert not (run / "loss.png").exists() or (run / "loss.png").read_bytes() != b"old"


# ------------------------------------------------------------------ resume policy
def test_resume_applies_changed_schedule_and_optimizer_settings(tmp_path, corpus, capsys):
    assert run_cli(train(tmp_path, corpus, "--max-iters", "3", "--lr", "0.01", "--min-lr", "0.001"), capsys)[0] == 0
    run = tmp_path / "run"
    argv = ["train", "--resume", str(run), "--max-iters", "5", "--lr", "0.02", "--min-lr", "0.002",
            "--weight-decay", "0.5", "--beta1", "0.8"]
    assert run_cli(argv, capsys)[0] == 0
    new = WarmupCosine(0.02, 0.002, 1, 20)
    rows = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    old = WarmupCosine(0.01, 0.001, 1, 20)
    assert [rows[k] for k in (1, 2, 3)] == pytest.approx([old(k - 1) for k in (1, 2, 3)], rel=1e-12)
    assert [rows[k] for k in (4, 5)] == pytest.approx([new(k - 1) for k in (4, 5)], rel=1e-12)
    st = json.loads((ckpt_io.resolve(run) / "state.json").read_text())
    assert st["train_config"]["lr"] == 0.02 and st["train_config"]["weight_decay"] == 0.5
    assert st["schedule"]["max_lr"] == 0.02
    t = Trainer(make_config(**{**st["train_config"], **{k: v for k, v in st["model_config"].items()
                                                        if k != "vocab_size"}}), resume=str(run), log=lambda s: None)
    assert t.optimizer.param_groups[0]["weight_decay"] == 0.5 and t.optimizer.param_groups[1]["weight_decay"] == 0.0
    assert tuple(t.optimizer.param_groups[0]["betas"]) == (0.8, 0.99)


@pytest.mark.parametrize("flag, value, saved", [("--seed", "4", "1337"), ("--batch-size", "8", "4"),
                                                 ("--n-embd", "32", "16"), ("--tokenizer", "bpe:300", "'char'"),
                                                 ("--precision", "bf16", "'fp32'")])
def test_resume_refuses_settings_that_make_another_run(tmp_path, corpus, capsys, flag, value, saved):
    assert run_cli(train(tmp_path, corpus, "--max-iters", "1"), capsys)[0] == 0
    run = tmp_path / "run"
    expect_error(["train", "--resume", str(run), "--max-iters", "2", flag, value], capsys,
                 f"{flag}: {saved} in the checkpoint, ", value)
    assert ckpt_io.resolve(run).name == "step-000001"


def test_resume_config_keeps_the_global_batch_on_other_rank_counts(tmp_path, corpus):
    cfg = make_config(data=str(corpus), batch_size=4, grad_accum=4)
    st = {"model_config": cfg.model_config(20).to_dict(), "train_config": cfg.flat(), "world_size": 1}
    assert resume_config(cfg, st, 1) == cfg
    two = resume_config(cfg, st, 2)
    assert (two.batch_size, two.grad_accum) == (4, 2)
    three = make_config(data=str(corpus), batch_size=3, grad_accum=1)
    st3 = {"model_config": three.model_config(20).to_dict(), "train_config": three.flat(), "world_size": 1}
    with pytest.raises(UserError, match="global batch is 3"):
        resume_config(three, st3, 2)
    odd = make_config(data=str(corpus), batch_size=3, grad_accum=4)  # 12 rows: 4 ranks x 3 x accum 1
    st4 = {"model_config": odd.model_config(20).to_dict(), "train_config": odd.flat(), "world_size": 1}
    assert (lambda c: (c.batch_size, c.grad_accum))(resume_config(odd, st4, 4)) == (3, 1)


@pytest.mark.parametrize("bad", [None, "missing", {"bit_generator": "MT19937", "state": 3}])
def test_missing_or_malformed_dropout_rng_is_an_error(tmp_path, corpus, capsys, bad):
    assert run_cli(train(tmp_path, corpus, "--max-iters", "1"), capsys)[0] == 0
    run = tmp_path / "run"
    f = ckpt_io.resolve(run) / "state.json"
    st = json.loads(f.read_text())
    if bad == "missing":
        del st["dropout_rng"]
    else:
        st["dropout_rng"] = bad
    f.write_text(json.dumps(st))
    ckpt_io.write_manifest(f.parent)  # sealed again: the schema check itself must catch it, not the checksum
    expect_error(["train", "--resume", str(run), "--max-iters", "2"], capsys, "dropout_rng", str(f))


# ------------------------------------------------------------------ non-finite values never reach a checkpoint
def test_huge_lr_without_clipping_leaves_only_finite_checkpoints(tmp_path, corpus, capsys):
    with np.errstate(all="ignore"):
        code, out, err = run_cli(train(tmp_path, corpus, "--max-iters", "12", "--lr", "1e6", "--min-lr", "1e6",
                                       "--grad-clip", "0", "--ckpt-interval", "1", "--log-interval", "100"), capsys)
    run = tmp_path / "run"
    assert code == 3 and "not finite" in out, (code, out, err)  # the first non-finite update stops the run
    from safetensors.numpy import load_file
    for ck in ckpt_io.list_checkpoints(run):
        for name in ("model.safetensors", "optimizer.safetensors"):
            assert all(np.isfinite(v).all() for v in load_file(str(ck / name)).values()), (ck, name)


def test_checkpoint_with_nonfinite_weights_is_not_written(tmp_path, corpus, monkeypatch):
    real = Trainer.train_step

    def train_step(self):
        loss = real(self)
        if self.step == 3:  # a bad update: the loss of this step was still finite
            w = self.model.transformer.h[0].mlp.c_fc.weight
            w.data = w.data.copy()
            w.data[0, 0] = np.inf
        return loss
    monkeypatch.setattr(Trainer, "train_step", train_step)
    msgs: list[str] = []
    cfg = make_config(data=str(corpus), n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=4, max_iters=6,
                      ckpt_interval=1, log_interval=100, eval_interval=100, eval_iters=1, sample_tokens=0,
                      progress=False, out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))
    assert Trainer(cfg, log=msgs.append).run() == 3
    assert any("not finite" in m and "step-000003 not written" in m for m in msgs), msgs
    assert ckpt_io.resolve(tmp_path / "run").name == "step-000002"


def test_collective_timeout_reaches_distributed_init(tmp_path, corpus, capsys, monkeypatch):
    import tinygrad_lm.train as train_mod
    from nn.distributed import World
    seen = {}

    def fake_init(**kw):
        seen.update(kw)
        return World()
    monkeypatch.setattr(train_mod, "init_world", fake_init)
    assert run_cli(train(tmp_path, corpus, "--max-iters", "1", "--collective-timeout", "2.5"), capsys)[0] == 0
    assert seen["collective_timeout"] == 2.5
    st = json.loads((ckpt_io.resolve(tmp_path / "run") / "state.json").read_text())
    assert st["train_config"]["collective_timeout"] == 2.5 and st["world_size"] == 1 and st["global_batch_size"] == 4
    expect_error(train(tmp_path, corpus, "--collective-timeout", "-1", out="other"), capsys, "--collective-timeout")


def test_overwrite_never_deletes_the_run_being_resumed(tmp_path, corpus, capsys):
    assert run_cli(train(tmp_path, corpus, "--max-iters", "1"), capsys)[0] == 0
    run = tmp_path / "run"
    expect_error(["train", "--resume", str(run), "--max-iters", "2", "--overwrite"], capsys, "--overwrite", str(run))
    assert ckpt_io.resolve(run).name == "step-000001"


# ------------------------------------------------------------------ optional packages
@pytest.mark.parametrize("blocked, argv, extra", [
    ("safetensors", ["train", "--max-iters", "1"], "[safetensors]"),
    ("regex", ["train", "--tokenizer", "bpe:300", "--max-iters", "1"], "[bpe]"),
])
def test_a_missing_optional_package_names_its_extra(tmp_path, corpus, blocked, argv, extra):
    """NumPy is the one dependency: without an optional package the command says which extra to install."""
    import subprocess
    import sys
    code = (f"import sys; sys.modules[{blocked!r}] = None; from tinygrad_lm.cli import main; "
            f"main({argv + ['--data', str(corpus), '--out', str(tmp_path / 'run'), '--cache-dir', str(tmp_path / 'c')]!r})")
    root = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and extra in r.stderr and "error:" in r.stderr, r.stderr


def test_char_tokenizer_and_model_need_only_numpy():
    """Importing the model and the char tokenizer loads none of the optional packages."""
    import subprocess
    import sys
    code = ("import sys\nfor m in ('regex', 'safetensors', 'ml_dtypes', 'tqdm'): sys.modules[m] = None\n"
            "import numpy as np\nfrom tinygrad_lm.model import GPT, GPTConfig\nfrom tinygrad_lm.tokenizer import CharTokenizer\n"
            "t = CharTokenizer.train('hello world')\nm = GPT(GPTConfig(vocab_size=t.vocab_size, block_size=8, n_layer=1, "
            "n_head=2, n_embd=8))\nidx = np.array([t.encode('hello')])\nprint(m(idx, idx)[1].item() > 0)")
    root = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "True", (r.stdout, r.stderr)
