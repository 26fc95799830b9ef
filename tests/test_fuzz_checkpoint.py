"""Fuzzing real checkpoints: Hypothesis damages the files of a checkpoint written by an actual
training run (`tinygrad_lm.cli.main(["train", ...])`), then runs `sample` and `train --resume`
in this process through `tinygrad_lm.cli.main`.

Every mutant must end one of two ways:
* exit status 2 with one `error: ...` line that names a file of the checkpoint, or
* success, only where the mutant is semantically the same checkpoint (bytes unchanged, JSON
  that parses to the same value, `latest` naming another intact checkpoint) or, for `sample`,
  where only optimizer.safetensors changed in a way its manifest was resealed for (sample
  never reads it; `train --resume` must refuse it).
Any other exception escaping `main` is a traceback: the test fails.

Mutations: flip/insert/delete bytes and truncate any file; replace state.json values with
wrong types, None, NaN, infinities, huge or negative numbers; replace state.json with
unparseable or deeply nested text; edit safetensors headers (dtype, shape, offsets); swap
files with the previous step's; add or remove files; point `latest` at junk. Structured edits
are also tried "resealed" (`checkpoint.write_manifest` rerun over them, as a careless tool
would), so the checks behind the manifest are exercised too.

The counts are printed at the end of the module (pytest -s): mutants tried, refused, accepted
as the same checkpoint, tracebacks (must be 0) and silent accepts (must be 0).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_sample import run_main
from tinygrad_lm import checkpoint as C

STEP = "step-000004"
FILES = [C.MODEL_FILE, C.OPTIM_FILE, C.STATE_FILE, C.TOKENIZER_FILE, C.MANIFEST_FILE]
NAMES_A_FILE = re.compile(r"state\.json|model\.safetensors|optimizer\.safetensors|tokenizer\.json|manifest\.json"
                          r"|latest|step-\d+|no checkpoint")
COUNTS = {"mutants": 0, "refused": 0, "accepted (same checkpoint)": 0, "tracebacks": 0, "silent accepts": 0}


@pytest.fixture(scope="module")
def pristine():
    """One real run: 4 steps of a tiny model, checkpoints at steps 2 and 4."""
    root = Path(tempfile.mkdtemp(prefix="fuzz-ckpt-"))
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))
    (root / "corpus.txt").write_text(text)
    code, err = run_main("train", "--data", str(root / "corpus.txt"), "--tokenizer", "char", "--n-layer", "1",
                         "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
                         "--max-iters", "4", "--eval-interval", "4", "--eval-iters", "1", "--ckpt-interval", "2",
                         "--sample-tokens", "0", "--progress", "false", "--out", str(root / "run"),
                         "--cache-dir", str(root / "cache"))
    assert code == 0, err
    assert C.resolve(root / "run") == root / "run" / STEP
    yield root
    print(f"\ncheckpoint fuzz: {COUNTS}")
    shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ mutations
# Each returns (label, fn(run_dir) -> same: bool, optimizer_only: bool); `same` is computed
# from the files themselves (bytes or parsed JSON before and after), never from the loader.

def _rw(path: Path, fn) -> bool:
    old = path.read_bytes()
    new = fn(old)
    path.write_bytes(new)
    if new == old:
        return True
    if path.name == C.MANIFEST_FILE:   # not hashed itself: the same JSON is the same manifest
        try:
            return json.loads(new) == json.loads(old)
        except (ValueError, RecursionError):
            return False
    return False


def edit_json(f: Path, path: tuple, value, delete: bool) -> dict:
    """Set (or delete) the leaf at `path` of the JSON file f; -> the document written."""
    doc = json.loads(f.read_text())
    d = doc
    for k in path[:-1]:
        d = d[k]
    if delete:
        del d[path[-1]]
    else:
        d[path[-1]] = value
    f.write_text(json.dumps(doc))
    return doc


@st.composite
def byte_edits(draw):
    name = draw(st.sampled_from(FILES))
    op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
    frac = draw(st.floats(0, 1))
    mask = draw(st.integers(1, 255))
    junk = draw(st.binary(min_size=1, max_size=8))
    width = draw(st.integers(1, 64))

    def apply(run: Path) -> tuple[bool, bool]:
        def fn(b: bytes) -> bytes:
            i = min(int(frac * len(b)), max(len(b) - 1, 0))
            if op == "flip":
                return b[:i] + bytes([b[i] ^ mask]) + b[i + 1:]
            if op == "insert":
                return b[:i] + junk + b[i:]
            if op == "delete":
                return b[:i] + b[i + width:]
            return b[:i]
        return _rw(run / STEP / name, fn), False
    return f"{op} {name} at {frac:.3f}", apply


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    else:
        yield path, obj


INVALID_FOR_ALL = [None, [], {}, [[[[0]]]], math.nan]


@st.composite
def state_values(draw, template: dict):
    leaves = [(p, v) for p, v in _leaves(template) if p[0] != "train_config"]
    path, old = draw(st.sampled_from(leaves))
    choices = list(INVALID_FOR_ALL)
    in_rng = path[0] == "dropout_rng"
    if not isinstance(old, str):
        choices.append("abc")
    if not in_rng and path[0] != "schedule" and type(old) in (int, float):
        choices.append(-1)
    if type(old) is int and not in_rng:
        choices.append(3.7)
    if path[0] in ("format", "step", "model_config") or path == ("data_position", "next_step"):
        choices.append(10 ** 30)
    if not in_rng and path != ("best_val",):
        choices.append(math.inf)
    if not in_rng and type(old) is not bool and path[0] != "model_config":
        choices.append(True)
    value = draw(st.sampled_from(choices))
    delete = draw(st.booleans()) and len(path) == 1
    reseal = draw(st.booleans())

    def apply(run: Path) -> tuple[bool, bool]:
        f = run / STEP / C.STATE_FILE
        edit_json(f, path, value, delete)
        if reseal:
            C.write_manifest(run / STEP, step=4)
        return False, False
    return f"state.json {'.'.join(map(str, path))} = {'(deleted)' if delete else repr(value)} reseal={reseal}", apply


@st.composite
def manifest_values(draw, template: dict):
    leaves = list(_leaves(template))
    path, old = draw(st.sampled_from(leaves))
    choices = [None, [], {}, "abc", math.nan, -1, 10 ** 30, True, "0" * 64]
    if type(old) is int:
        choices += [old + 1, old - 1]
    value = draw(st.sampled_from(choices))
    delete = draw(st.booleans())

    def apply(run: Path) -> tuple[bool, bool]:
        f = run / STEP / C.MANIFEST_FILE
        doc = edit_json(f, path, value, delete)
        return doc == json.loads((run.parent.parent / "run" / STEP / C.MANIFEST_FILE).read_text()), False
    return f"manifest.json {'.'.join(map(str, path))} = {'(deleted)' if delete else repr(value)}", apply


@st.composite
def state_texts(draw):
    text = draw(st.sampled_from(["[" * 50_000 + "]" * 50_000, '{"a":' * 50_000 + "1" + "}" * 50_000, "[]", "null",
                                 '"state"', "", "{", "NaN", '{"step": ' + "9" * 5000 + "}", "\udcff"]))
    reseal = draw(st.booleans())

    def apply(run: Path) -> tuple[bool, bool]:
        (run / STEP / C.STATE_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
        if reseal:
            C.write_manifest(run / STEP, step=4)
        return False, False
    return f"state.json replaced by {text[:20]!r}... reseal={reseal}", apply


@st.composite
def json_whitespace(draw):
    name = draw(st.sampled_from([C.STATE_FILE, C.TOKENIZER_FILE, C.MANIFEST_FILE]))
    indent = draw(st.sampled_from([None, 0, 3]))
    reseal = draw(st.booleans()) and name != C.MANIFEST_FILE

    def apply(run: Path) -> tuple[bool, bool]:
        f = run / STEP / name
        old = f.read_bytes()
        f.write_text(json.dumps(json.loads(old), indent=indent) + "\n\n")
        if reseal:
            C.write_manifest(run / STEP, step=4)
        return reseal or name == C.MANIFEST_FILE or f.read_bytes() == old, False
    return f"{name} re-indented reseal={reseal}", apply


def _edit_header(path: Path, fn) -> bool:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    before = json.dumps(header, sort_keys=True)
    fn(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return json.dumps(header, sort_keys=True) == before


@st.composite
def header_edits(draw):
    name = draw(st.sampled_from([C.MODEL_FILE, C.OPTIM_FILE]))
    pick = draw(st.integers(0, 10 ** 6))
    what = draw(st.sampled_from(["dtype", "shape", "offsets"]))
    dtype = draw(st.sampled_from(["F16", "BF16", "F64", "I32", "U8", "BOOL", "X9"]))
    shape = draw(st.sampled_from(["reverse", "one", "scalar", "huge", "negative"]))
    shift = draw(st.sampled_from([-4, 4, 10 ** 12]))
    reseal = draw(st.booleans())

    def apply(run: Path) -> tuple[bool, bool]:
        def fn(h: dict) -> None:
            keys = sorted(k for k in h if k != "__metadata__")
            e = h[keys[pick % len(keys)]]
            if what == "dtype":
                e["dtype"] = dtype
            elif what == "shape":
                e["shape"] = {"reverse": e["shape"][::-1], "one": [1], "scalar": [], "huge": [10 ** 12, 10 ** 12],
                              "negative": [-1] + e["shape"][1:]}[shape]
            else:
                e["data_offsets"] = [e["data_offsets"][0] + shift, e["data_offsets"][1] + shift]
        same = _edit_header(run / STEP / name, fn)
        if reseal:
            C.write_manifest(run / STEP, step=4)
        return same, name == C.OPTIM_FILE and reseal
    return f"{name} header {what} {dtype if what == 'dtype' else shape if what == 'shape' else shift} " \
           f"reseal={reseal}", apply


@st.composite
def swaps(draw):
    name = draw(st.sampled_from(FILES))
    reseal = draw(st.booleans()) and name in (C.STATE_FILE, C.TOKENIZER_FILE)

    def apply(run: Path) -> tuple[bool, bool]:
        same = (run / "step-000002" / name).read_bytes() == (run / STEP / name).read_bytes()
        shutil.copy(run / "step-000002" / name, run / STEP / name)
        if reseal:
            C.write_manifest(run / STEP, step=4)
        return same, False
    return f"{name} from step-000002 reseal={reseal}", apply


@st.composite
def file_sets(draw):
    op = draw(st.sampled_from(["remove", "extra", "dir"]))
    name = draw(st.sampled_from(FILES + ["notes.txt", ".hidden", "model.safetensors.tmp"]))

    def apply(run: Path) -> tuple[bool, bool]:
        p = run / STEP / name
        if op == "remove":
            if p.exists():
                p.unlink()
                return False, False
            return True, False
        if op == "dir":
            if p.exists():
                p.unlink()
            p.mkdir()
            return False, False
        if p.exists():
            p.unlink()
            p.write_bytes(b"")
        else:
            p.write_text("extra")
        return False, False
    return f"{op} {name}", apply


@st.composite
def latests(draw):
    content = draw(st.sampled_from(["../../etc", "/etc/passwd", "step-000003", "step-000002\n", STEP, "", "\xff\xfe",
                                    "x" * 100_000, "step-" + "9" * 5000, "step-000004/../step-000002", "DIR", "LOOP",
                                    "GONE"]))

    def apply(run: Path) -> tuple[bool, bool]:
        latest = run / "latest"
        latest.unlink()
        if content == "DIR":
            latest.mkdir()
        elif content == "LOOP":
            os.symlink(latest, latest)
        elif content != "GONE":
            latest.write_bytes(content.encode("utf-8", "surrogateescape"))
        return content.strip() in ("step-000002", STEP), False
    return f"latest = {content[:30]!r}", apply


# ------------------------------------------------------------------ the check
def _check(pristine: Path, label: str, apply, argv_for) -> None:
    work = Path(tempfile.mkdtemp(prefix="mutant-", dir=pristine))
    try:
        run = work / "run"
        shutil.copytree(pristine / "run", run, symlinks=True)
        same, optimizer_only = apply(run)
        argv, is_sample = argv_for(run)
        COUNTS["mutants"] += 1
        try:
            code, err = run_main(*argv)
        except BaseException:
            COUNTS["tracebacks"] += 1
            raise
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if code == 0:
            ok = same or (is_sample and optimizer_only)
            if not ok:
                COUNTS["silent accepts"] += 1
            assert ok, f"{label}: accepted a damaged checkpoint ({argv[0]})"
            COUNTS["accepted (same checkpoint)"] += 1
        else:
            assert code == 2, f"{label}: exit {code}: {err[-2000:]}"
            errors = [ln for ln in lines if ln.startswith("error: ")]
            assert len(errors) == 1 and NAMES_A_FILE.search(errors[0]), f"{label}: {err[-2000:]}"
            COUNTS["refused"] += 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _template(pristine: Path) -> dict:
    return json.loads((pristine / "run" / STEP / C.STATE_FILE).read_text())


def _mutations(template: dict, manifest: dict):
    return st.one_of(byte_edits(), state_values(template), manifest_values(manifest), state_texts(),
                     json_whitespace(), header_edits(), swaps(), file_sets(), latests())



@pytest.fixture(scope="module")
def template(pristine) -> dict:
    return _template(pristine)


@pytest.fixture(scope="module")
def manifest(pristine) -> dict:
    return json.loads((pristine / "run" / STEP / C.MANIFEST_FILE).read_text())


def _sample_argv(run: Path):
    return ("sample", "--ckpt", str(run), "--max-new-tokens", "3", "--seed", "0"), True


def _resume_argv(run: Path):
    return ("train", "--resume", str(run), "--max-iters", "5", "--progress", "false", "--sample-tokens", "0",
            "--eval-iters", "1"), False


# CI sizes; TINYGRAD_LM_FUZZ_EXAMPLES=N runs N sample mutants (and N/4 resumes) for a longer hunt
_N = int(os.environ.get("TINYGRAD_LM_FUZZ_EXAMPLES", "200"))


@settings(max_examples=_N, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_sample_on_damaged_checkpoints(pristine, template, manifest, data):
    label, apply = data.draw(_mutations(template, manifest))
    _check(pristine, label, apply, _sample_argv)


@settings(max_examples=max(_N // 4, 1), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_resume_on_damaged_checkpoints(pristine, template, manifest, data):
    label, apply = data.draw(_mutations(template, manifest))
    _check(pristine, label, apply, _resume_argv)


def test_intact_checkpoint_works(pristine):
    """The control: the unmutated copy samples, and resumes to step 5 with a new checkpoint."""
    _check(pristine, "none", lambda run: (True, False), _sample_argv)
    run = Path(tempfile.mkdtemp(prefix="control-", dir=pristine)) / "run"
    shutil.copytree(pristine / "run", run)
    code, err = run_main(*_resume_argv(run)[0])
    assert code == 0, err
    assert C.resolve(run) == run / "step-000005" and C.read_state(C.resolve(run))["step"] == 5
