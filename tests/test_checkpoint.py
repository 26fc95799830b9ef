"""Checkpoints you can trust (tinygrad_lm/checkpoint.py): the manifest and `verify`, the
state.json schema, `resolve` on bad paths, the policy for a damaged latest checkpoint, and
pruning. Expected hashes are computed here with hashlib; every damaged input is made by
editing real files written by `checkpoint.save`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from nn.amp import LossScaler
from nn.lr_scheduler import WarmupCosine
from nn.optim import AdamW
from nn.serialization import save_model, save_optimizer
from tinygrad_lm import checkpoint as C
from tinygrad_lm.errors import UserError
from tinygrad_lm.model import GPT, GPTConfig
from tinygrad_lm.tokenizer import CharTokenizer

CHARS = "\n abcdefgh."
CFG = GPTConfig(len(CHARS), 8, n_layer=1, n_head=2, n_embd=8, pos_encoding="learned")


def state(step: int, cfg: GPTConfig = CFG) -> dict:
    return {"format": 1, "step": step, "tokens_seen": 16 * step, "best_val": math.inf, "model_config": cfg.to_dict(),
            "train_config": {"seed": 0}, "schedule": WarmupCosine(1e-3, 1e-4, 10, 100).state_dict(),
            "loss_scaler": LossScaler(enabled=False).state_dict(),
            "dropout_rng": np.random.default_rng(step).bit_generator.state,
            "data_position": {"seed": 0, "next_step": step}, "tokenizer": C.TOKENIZER_FILE,
            "world_size": 1, "global_batch_size": 1}


def writer(step: int, seed: int = 0):
    def write(d: Path) -> None:
        model = GPT(CFG, seed=seed)
        save_model(model, d / C.MODEL_FILE)
        opt = AdamW(model.parameters(), lr=1e-3)
        for p in model.parameters():
            p.grad = np.ones_like(p.data)
        opt.step()
        save_optimizer(opt, d / C.OPTIM_FILE)
        CharTokenizer(CHARS).save(d / C.TOKENIZER_FILE)
        C.atomic_write(d / C.STATE_FILE, json.dumps(state(step), indent=1))
    return write


@pytest.fixture
def run(tmp_path) -> Path:
    r = tmp_path / "run"
    for step in (2, 4):
        C.save(r, step, writer(step, seed=step))
    return r


# ------------------------------------------------------------------ the manifest
def test_manifest_records_every_file(run):
    ck = C.resolve(run)
    assert ck == run / "step-000004"
    m = json.loads((ck / C.MANIFEST_FILE).read_text())
    names = {C.MODEL_FILE, C.OPTIM_FILE, C.STATE_FILE, C.TOKENIZER_FILE}
    assert m["format"] == 1 and m["step"] == 4 and set(m["files"]) == names
    for name in names:
        data = (ck / name).read_bytes()
        assert m["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert m["tokenizer"] == {"sha256": m["files"][C.TOKENIZER_FILE]["sha256"], "vocab_size": len(CHARS)}
    assert C.verify(ck)["step"] == 4
    assert C.read_state(ck)["step"] == 4
    assert C.load_tokenizer(ck).vocab_size == len(CHARS)


def _flip(p: Path, at: int) -> None:
    b = bytearray(p.read_bytes())
    b[at % len(b)] ^= 0x01
    p.write_bytes(bytes(b))


def _edit_header(p: Path, fn) -> None:
    data = p.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    fn(header)
    raw = json.dumps(header).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


DAMAGE = {
    "flip-model": (lambda ck: _flip(ck / C.MODEL_FILE, -3), C.MODEL_FILE),
    "flip-optimizer": (lambda ck: _flip(ck / C.OPTIM_FILE, 100), C.OPTIM_FILE),
    "flip-state": (lambda ck: _flip(ck / C.STATE_FILE, 20), C.STATE_FILE),
    "flip-tokenizer": (lambda ck: _flip(ck / C.TOKENIZER_FILE, 30), C.TOKENIZER_FILE),
    "truncate-model": (lambda ck: (ck / C.MODEL_FILE).write_bytes((ck / C.MODEL_FILE).read_bytes()[:50]), C.MODEL_FILE),
    "empty-state": (lambda ck: (ck / C.STATE_FILE).write_bytes(b""), C.STATE_FILE),
    "dtype-edit": (lambda ck: _edit_header(ck / C.MODEL_FILE, lambda h: h["transformer.wte.weight"].update(dtype="I32")),
                   C.MODEL_FILE),
    "extra-file": (lambda ck: (ck / "notes.txt").write_text("hi"), "notes.txt"),
    "missing-file": (lambda ck: (ck / C.OPTIM_FILE).unlink(), C.OPTIM_FILE),
    "manifest-junk": (lambda ck: (ck / C.MANIFEST_FILE).write_text("[1, 2"), C.MANIFEST_FILE),
    "manifest-missing": (lambda ck: (ck / C.MANIFEST_FILE).unlink(), C.MANIFEST_FILE),
    "swap-model-from-step-2": (lambda ck: shutil.copy(ck.parent / "step-000002" / C.MODEL_FILE, ck / C.MODEL_FILE),
                               C.MODEL_FILE),
    "swap-state+manifest-from-step-2": (
        lambda ck: [shutil.copy(ck.parent / "step-000002" / f, ck / f) for f in (C.STATE_FILE, C.MANIFEST_FILE)],
        C.MANIFEST_FILE),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damage_is_refused_naming_the_file_and_the_good_checkpoint(run, kind):
    damage, name = DAMAGE[kind]
    ck = run / "step-000004"
    damage(ck)
    with pytest.raises(C.CheckpointError) as e:
        C.read_state(C.resolve(run))
    msg = str(e.value)
    assert isinstance(e.value, UserError)
    assert name in msg and "step-000004" in msg, msg
    # the policy: refuse, and name the newest checkpoint of the run that verifies
    assert str(run / "step-000002") in msg, msg
    with pytest.raises(C.CheckpointError, match=name.replace(".", r"\.")):
        C.verify(ck)
    assert C.read_state(run / "step-000002")["step"] == 2


def test_no_manifest_is_refused_as_older_version_until_sealed(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    writer(3)(d)
    with pytest.raises(C.CheckpointError, match="older version"):
        C.read_state(d)
    with pytest.raises(C.CheckpointError, match="older version"):
        C.load_tokenizer(d)
    C.write_manifest(d)   # the user vouches for the files
    assert C.read_state(d)["step"] == 3


def test_step_of_directory_must_match(run):
    os.rename(run / "step-000002", run / "step-000003")
    with pytest.raises(C.CheckpointError, match="step-000003"):
        C.verify(run / "step-000003")


def test_model_file_must_match_model_config(run):
    ck = run / "step-000004"
    st = state(4, GPTConfig(len(CHARS), 8, n_layer=2, n_head=2, n_embd=8, pos_encoding="learned"))
    (ck / C.STATE_FILE).write_text(json.dumps(st))
    C.write_manifest(ck)
    with pytest.raises(C.CheckpointError, match="model.safetensors.*model_config"):
        C.read_state(ck)


def test_tokenizer_vocab_must_match_model(run):
    ck = run / "step-000004"
    CharTokenizer(CHARS + "ijklmnop").save(ck / C.TOKENIZER_FILE)
    C.write_manifest(ck)
    with pytest.raises(C.CheckpointError, match="tokenizer.json.*19 tokens.*vocab_size is 11"):
        C.read_state(ck)


def test_unloadable_tokenizer_names_the_file(run):
    ck = run / "step-000004"
    (ck / C.TOKENIZER_FILE).write_text('{"type": "char", "chars": 5}')
    with pytest.raises(C.CheckpointError, match="tokenizer.json"):
        C.write_manifest(ck)


# ------------------------------------------------------------------ state.json schema
def _set(path: str, value):
    def edit(st: dict) -> None:
        keys = path.split(".")
        d = st
        for k in keys[:-1]:
            d = d[k]
        if value is KeyError:
            del d[keys[-1]]
        else:
            d[keys[-1]] = value
    return edit


def _nested(depth: int):
    v: object = 0
    for _ in range(depth):
        v = [v]
    return v


BAD_STATES = [
    ("list", lambda st: [], "JSON object"),
    ("null", lambda st: None, "JSON object"),
    ("string", lambda st: "abc", "JSON object"),
    ("missing-step", _set("step", KeyError), "missing keys.*step"),
    ("missing-dropout", _set("dropout_rng", KeyError), "missing keys.*dropout_rng"),
    ("step-str", _set("step", "abc"), "'step'"),
    ("step-float", _set("step", 3.7), "'step'"),
    ("step-bool", _set("step", True), "'step'"),
    ("step-negative", _set("step", -1), "'step'"),
    ("tokens-negative", _set("tokens_seen", -5), "'tokens_seen'"),
    ("best-nan", _set("best_val", math.nan), "'best_val'"),
    ("best-neg-inf", _set("best_val", -math.inf), "'best_val'"),
    ("best-str", _set("best_val", "low"), "'best_val'"),
    ("format-unknown", _set("format", 99), "'format'.*99"),
    ("format-str", _set("format", "1"), "'format'"),
    ("config-null", _set("model_config", None), "'model_config'"),
    ("config-field-null", _set("model_config.n_embd", None), "model_config.n_embd"),
    ("config-field-float", _set("model_config.vocab_size", 11.5), "model_config.vocab_size"),
    ("config-field-huge-float", _set("model_config.n_layer", 1e308), "model_config.n_layer"),
    ("config-bias-str", _set("model_config.bias", "yes"), "model_config.bias"),
    ("config-invalid", _set("model_config.n_head", 3), "model_config.*divisible"),
    ("config-unknown-key", _set("model_config.colour", 1), "model_config.*unknown"),
    ("train-config-list", _set("train_config", []), "'train_config'"),
    ("schedule-name", _set("schedule.name", "Nope"), "'schedule'"),
    ("schedule-nan", _set("schedule.max_lr", math.nan), "'schedule'"),
    ("schedule-null", _set("schedule", None), "'schedule'"),
    ("scaler-scale-str", _set("loss_scaler.scale", "big"), "loss_scaler.scale"),
    ("scaler-enabled-int", _set("loss_scaler.enabled", 1), "loss_scaler.enabled"),
    ("scaler-missing", _set("loss_scaler.clean_steps", KeyError), "loss_scaler.clean_steps"),
    ("rng-null", _set("dropout_rng", None), "'dropout_rng'"),
    ("rng-unknown", _set("dropout_rng.bit_generator", "Mersenne"), "'dropout_rng'"),
    ("rng-state-bad", _set("dropout_rng.state.state", "x"), "'dropout_rng'"),
    ("rng-state-list", _set("dropout_rng.state", [1, 2]), "'dropout_rng'"),
    ("position-step", _set("data_position.next_step", 3), "data_position.next_step"),
    ("position-seed", _set("data_position.seed", None), "data_position.seed"),
    ("tokenizer-int", _set("tokenizer", 5), "'tokenizer'"),
]


@pytest.mark.parametrize("label,edit,match", BAD_STATES, ids=[b[0] for b in BAD_STATES])
def test_bad_state_is_refused_naming_the_key(run, label, edit, match):
    ck = run / "step-000004"
    st = json.loads((ck / C.STATE_FILE).read_text())
    new = edit(st)
    (ck / C.STATE_FILE).write_text(json.dumps(st if new is None and label != "null" else new))
    C.write_manifest(ck, step=4)  # sealed: only the schema stands between the file and the trainer
    with pytest.raises(C.CheckpointError, match=match) as e:
        C.read_state(ck)
    assert "state.json" in str(e.value)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"step": ' + "9" * 5000 + "}", "\xff\xfe"])
def test_unparseable_state_is_refused(run, text):
    ck = run / "step-000004"
    (ck / C.STATE_FILE).write_text(text, encoding="latin-1")
    C.write_manifest(ck, step=4)
    with pytest.raises(C.CheckpointError, match="state.json"):
        C.read_state(ck)


def test_whitespace_and_extra_keys_are_accepted(run):
    ck = run / "step-000004"
    st = json.loads((ck / C.STATE_FILE).read_text())
    st["note"] = "extra keys are allowed"
    (ck / C.STATE_FILE).write_text("\n\n" + json.dumps(st, indent=4) + "\n  ")
    C.write_manifest(ck)
    assert C.read_state(ck)["note"] == "extra keys are allowed"


# ------------------------------------------------------------------ resolve
@pytest.mark.parametrize("content", ["../../etc", "/etc", "step-000004/../../x", "", "step-abc", "x" * 100_000])
def test_latest_must_name_a_step_directory(run, content):
    (run / "latest").write_text(content)
    with pytest.raises(C.CheckpointError, match="latest"):
        C.resolve(run)


def test_resolve_os_errors(run, tmp_path):
    (run / "latest").unlink()
    (run / "latest").mkdir()
    with pytest.raises(C.CheckpointError, match="latest"):
        C.resolve(run)
    with pytest.raises(C.CheckpointError, match="does not exist"):
        C.resolve(tmp_path / "nope")
    with pytest.raises(C.CheckpointError, match="is a file"):
        C.resolve(run / "step-000002" / C.STATE_FILE)
    with pytest.raises(C.CheckpointError, match="cannot access"):
        C.resolve(tmp_path / ("n" * 100_000))
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(C.CheckpointError, match="loop"):
        C.resolve(tmp_path / "loop")
    with pytest.raises(C.CheckpointError, match="cannot access"):
        C.resolve(str(tmp_path) + "/a\0b")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads everything")
def test_resolve_permission_error(run):
    os.chmod(run, 0)
    try:
        with pytest.raises(C.CheckpointError, match="run"):
            C.read_state(C.resolve(run))
    finally:
        os.chmod(run, 0o755)


def test_checkpoint_directory_without_state(run):
    (run / "step-000004" / C.STATE_FILE).unlink()
    with pytest.raises(C.CheckpointError, match=r"missing: .*step-000004/state\.json.*step-000002"):
        C.resolve(run / "step-000004")
    with pytest.raises(C.CheckpointError, match=r"step-000004.*no state\.json.*step-000002"):
        C.resolve(run)


def test_latest_naming_a_missing_directory_points_at_a_good_one(run):
    (run / "latest").write_text("step-000009\n")
    with pytest.raises(C.CheckpointError, match="step-000009.*step-000004"):
        C.resolve(run)


# ------------------------------------------------------------------ saving and pruning
def _steps(run: Path) -> list[int]:
    return [C._step_of(d) for d in C.list_checkpoints(run)]


def test_prune_keeps_newest_good(tmp_path):
    r = tmp_path / "run"
    for s in (1, 2, 3, 4):
        C.save(r, s, writer(s), keep=2)
    assert _steps(r) == [3, 4]
    assert not list(r.glob("*.tmp")) and not list(r.glob("*.old"))


def test_damaged_checkpoints_do_not_count_as_kept(tmp_path):
    r = tmp_path / "run"
    for s in (1, 2):
        C.save(r, s, writer(s), keep=2)
    (r / "step-000002" / C.MODEL_FILE).write_bytes(b"short")   # damaged later (a quick check sees the size)
    C.save(r, 3, writer(3), keep=2)
    assert _steps(r) == [1, 2, 3]        # 1 is still one of the two good ones; 2 is kept for inspection
    C.save(r, 4, writer(4), keep=2)
    assert _steps(r) == [3, 4]


def test_resumed_from_an_earlier_step_keeps_the_later_ones(tmp_path):
    """A run resumed at step 2 (its step 3 damaged) saves step 2.5 ~ 3 again: nothing good is lost."""
    r = tmp_path / "run"
    for s in (10, 20, 30):
        C.save(r, s, writer(s), keep=2)
    assert _steps(r) == [20, 30]
    C.save(r, 25, writer(25), keep=2)          # resumed from 20
    assert _steps(r) == [20, 25, 30]           # 30 (the abandoned future) is not pruned, nor counted
    assert C.resolve(r) == r / "step-000025"
    C.save(r, 30, writer(30), keep=2)          # the resumed run replaces it when it gets there
    assert _steps(r) == [25, 30] and C.read_state(C.resolve(r))["step"] == 30


def test_failed_seal_deletes_nothing(tmp_path, monkeypatch):
    r = tmp_path / "run"
    for s in (1, 2):
        C.save(r, s, writer(s), keep=1) if s == 1 else C.save(r, s, writer(s), keep=2)

    def broken(*a, **k):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(C, "write_manifest", broken)
    with pytest.raises(OSError, match="simulated"):
        C.save(r, 3, writer(3), keep=1)
    assert _steps(r) == [1, 2] and C.resolve(r) == r / "step-000002"
    assert C.read_state(r / "step-000002")["step"] == 2


def test_saving_the_same_step_again_replaces_it(tmp_path):
    r = tmp_path / "run"
    C.save(r, 5, writer(5, seed=1))
    C.save(r, 5, writer(5, seed=2))
    assert _steps(r) == [5] and not (r / "step-000005.old").exists()
    assert C.read_state(C.resolve(r))["step"] == 5


def test_save_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="step"):
        C.save(tmp_path, -1, writer(0))
    with pytest.raises(ValueError, match="keep"):
        C.save(tmp_path, 1, writer(1), keep=0)


# ------------------------------------------------------------------ the policy through the CLI
def test_resume_refuses_a_damaged_latest_and_names_the_good_one(tmp_path):
    import contextlib
    import io
    from tinygrad_lm.cli import main

    def cli(*argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main(list(argv))
            except SystemExit as e:
                return e.code, err.getvalue()
            except UserError as e:
                return 2, f"error: {e}\n"
        return 0, err.getvalue()
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 40)
    run = tmp_path / "run"
    code, err = cli("train", "--data", str(tmp_path / "corpus.txt"), "--n-layer", "1", "--n-head", "2",
                    "--n-embd", "8", "--block-size", "8", "--batch-size", "2", "--max-iters", "4",
                    "--eval-interval", "4", "--eval-iters", "1", "--ckpt-interval", "2", "--sample-tokens", "0",
                    "--progress", "false", "--out", str(run), "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    _flip(run / "step-000004" / C.OPTIM_FILE, 200)
    code, err = cli("train", "--resume", str(run), "--max-iters", "6")
    assert code == 2 and err.startswith("error: "), err
    assert "step-000004/optimizer.safetensors" in err and f"--resume {run / 'step-000002'}" in err, err
    code, err = cli("train", "--resume", str(run / "step-000002"), "--max-iters", "3")
    assert code == 0, err
    # the resumed run saved step 3; the damaged step 4 (a later step) is still there, untouched
    assert _steps(run) == [2, 3, 4] and C.resolve(run) == run / "step-000003"
