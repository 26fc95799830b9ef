"""Training checkpoints (docs/DESIGN.md): a directory holding model.safetensors,
optimizer.safetensors, state.json, tokenizer.json and manifest.json.

Atomicity: a checkpoint is first written, file by file with fsync, into
`RUN/step-000500.tmp/`, sealed with its manifest, renamed to `RUN/step-000500/` (a
directory rename is atomic), then the one-line pointer `RUN/latest` is replaced
atomically. A crash at any moment leaves `latest` naming a complete checkpoint (saving a
step that already exists first sets the old copy aside as `step-N.old`, removed once
`latest` names the new one).

Integrity: `manifest.json` records the format version, the step, the byte size and
SHA-256 of every other file in the directory, and the tokenizer's hash and vocabulary
size. `verify(ckpt)` checks all of it before anything is used (`read_state` and
`load_tokenizer` call it): flipped bytes, truncated files, extra or missing files, files
mixed from two steps (the manifest's step must equal the directory's and state.json's)
are refused with a `CheckpointError` naming the file. (SHA-256 reads ~1.6 GB/s here, so
it costs well under a second per GB.)

Policies:
* A checkpoint without manifest.json (written before manifests existed, or not by this
  code) is refused: nothing vouches for its bytes. If you trust its files,
  `write_manifest(DIR)` seals it.
* A damaged checkpoint is refused, never silently replaced by another: the error names
  the damaged file and the newest other checkpoint of the run that verifies, so
  `--resume`/`--ckpt` can be pointed at it explicitly.
* Pruning (`save(..., keep)`) runs only after the new checkpoint is sealed and `latest`
  names it. A checkpoint is deleted only when `keep` newer checkpoints (the new one
  included) pass a quick check (manifest readable, files present with the recorded
  sizes); damaged ones are never counted as good. Checkpoints of steps *after* the one
  being saved (left by a run that was resumed from an earlier step) are never deleted by
  pruning and do not count: the resumed run replaces each when it saves that same step.
* `latest` must hold one name `step-N`; anything else (a path, `..`, junk) is refused.

`state.json` is validated by `read_state` (tinygrad_lm/checkpoint_schema.py): every required
key, its type and its range; errors name the file, the key, what was found and what was
expected. `read_state` also matches model.safetensors' header (names, shapes) to the
model_config and the tokenizer's vocabulary size to vocab_size.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Callable

from nn.serialization import atomic_write, fsync_dir, read_safetensors_header
from tinygrad_lm.errors import UserError

__all__ = ["CheckpointError", "resolve", "list_checkpoints", "save", "verify", "write_manifest", "read_state",
           "validate_state", "load_tokenizer", "newest_verified", "fsync_dir", "atomic_write"]

STATE_FILE, MODEL_FILE, OPTIM_FILE, TOKENIZER_FILE = "state.json", "model.safetensors", "optimizer.safetensors", "tokenizer.json"
MANIFEST_FILE, LATEST_FILE = "manifest.json", "latest"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d+)")
_MAX_JSON = 64 << 20            # state.json / manifest.json larger than this are refused unread


class CheckpointError(UserError):
    """A checkpoint is missing, damaged or inconsistent; the message names the file."""


# ---------------------------------------------------------------- small readers
def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _stat(path: Path, follow: bool = True) -> os.stat_result | None:
    """os.stat, None when nothing is there; any other OSError -> CheckpointError naming the path."""
    try:
        return os.stat(path) if follow else os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:  # ELOOP, ENAMETOOLONG, EACCES, embedded NUL...
        raise CheckpointError(f"{str(path)[:200]}: cannot access it ({str(e)[:300]})") from None


def _read_bytes(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read it ({e})") from None
    if len(data) > limit:
        raise CheckpointError(f"{path}: larger than {limit} bytes; expected a small file")
    return data


def _parse_json(path: Path, data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt: not valid UTF-8 JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"checkpoint file {path} is corrupt: JSON nested too deeply") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e})") from None
    return h.hexdigest()


def _step_of(d: Path) -> int:
    m = _STEP_DIR.fullmatch(d.name)
    return int(m.group(1)) if m else -1


# ---------------------------------------------------------------- finding checkpoints
def resolve(path: str | os.PathLike) -> Path:
    """A run directory (follows its `latest` pointer) or a checkpoint directory -> the checkpoint directory.

    Every problem (nothing there, a file, unreadable, a symlink loop, a `latest` that is not
    one `step-N` name) is a CheckpointError naming the path."""
    try:
        p = Path(path)
    except TypeError as e:
        raise CheckpointError(f"checkpoint path {_short(path)}: {e}") from None
    st = _stat(p)
    if st is None:
        raise CheckpointError(f"no checkpoint at {_short(str(p))}: it does not exist")
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"no checkpoint at {p}: it is a file; expected a run directory (with {LATEST_FILE}) "
                              f"or a checkpoint directory (with {STATE_FILE})")
    own = _stat(p / STATE_FILE)
    if own is not None and stat.S_ISREG(own.st_mode):
        return p
    latest = p / LATEST_FILE
    lst = _stat(latest)
    if lst is not None:
        if not stat.S_ISREG(lst.st_mode):
            raise CheckpointError(f"{latest}: expected a one-line file naming a checkpoint, found a directory or "
                                  "special file")
        raw = _read_bytes(latest, 4096)
        try:
            name = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            name = None
        if name is None or not _STEP_DIR.fullmatch(name):
            raise CheckpointError(f"{latest}: expected one line naming a checkpoint directory like step-000500, "
                                  f"found {_short(raw[:100])}" + _hint(p, None))
        ckpt = p / name
        cst = _stat(ckpt / STATE_FILE)
        if cst is None or not stat.S_ISREG(cst.st_mode):
            raise CheckpointError(f"checkpoint {ckpt} named by {latest} has no {STATE_FILE}" + _hint(p, ckpt))
        return ckpt
    if _stat(p / MANIFEST_FILE) is not None:  # a checkpoint directory that lost its state
        raise CheckpointError(f"checkpoint file missing: {p / STATE_FILE}" + _hint(p.parent, p))
    raise CheckpointError(f"no checkpoint at {p}: expected {latest} or {p / STATE_FILE}")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first by step number (names grow past 6 digits)."""
    try:
        found = [d for d in Path(run_dir).iterdir() if _step_of(d) >= 0 and d.is_dir()]
    except OSError:
        return []
    return sorted(found, key=_step_of)


def newest_verified(run_dir: Path, exclude: Path | None = None) -> Path | None:
    """The newest checkpoint of a run that passes `verify` (None if none does)."""
    for d in reversed(list_checkpoints(run_dir)):
        if exclude is not None and d == exclude:
            continue
        try:
            verify(d)
            return d
        except CheckpointError:
            continue
    return None


def _hint(run_dir: Path, bad: Path | None) -> str:
    good = newest_verified(run_dir, exclude=bad)
    if good is None:
        return ""
    return (f"; the newest checkpoint of this run that verifies is {good} "
            f"(use it explicitly: --resume {good} / --ckpt {good})")


# ---------------------------------------------------------------- the manifest
def write_manifest(ckpt: str | os.PathLike, step: int | None = None) -> dict:
    """Seal a checkpoint directory: hash every file into manifest.json (step from state.json when None)."""
    from tinygrad_lm.tokenizer import load_tokenizer as _load_tok
    ckpt = Path(ckpt)
    if step is None:
        step = _parse_json(ckpt / STATE_FILE, _read_bytes(ckpt / STATE_FILE, _MAX_JSON)).get("step")
        if type(step) is not int or step < 0:
            raise CheckpointError(f"{ckpt / STATE_FILE}: key 'step': expected an integer >= 0, found {_short(step)}")
    files = {}
    for entry in sorted(os.scandir(ckpt), key=lambda e: e.name):
        if entry.name == MANIFEST_FILE:
            continue
        if not entry.is_file(follow_symlinks=False):
            raise CheckpointError(f"{ckpt / entry.name}: a checkpoint holds only regular files")
        files[entry.name] = {"bytes": entry.stat().st_size, "sha256": _sha256(Path(entry.path))}
    tokenizer = None
    if TOKENIZER_FILE in files:
        try:
            vocab = int(_load_tok(ckpt / TOKENIZER_FILE).vocab_size)
        except (UserError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{ckpt / TOKENIZER_FILE}: the tokenizer written cannot be loaded ({e})") from None
        tokenizer = {"sha256": files[TOKENIZER_FILE]["sha256"], "vocab_size": vocab}
    manifest = {"format": MANIFEST_FORMAT, "step": int(step), "files": files, "tokenizer": tokenizer}
    atomic_write(ckpt / MANIFEST_FILE, json.dumps(manifest, indent=1))
    return manifest


def _is_int(v: Any) -> bool:
    return type(v) is int


def _check_manifest(path: Path, m: Any) -> dict:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}")
    if not isinstance(m, dict):
        raise bad(f"expected a JSON object, found {type(m).__name__}")
    if m.get("format") != MANIFEST_FORMAT:
        raise bad(f"key 'format': expected {MANIFEST_FORMAT}, found {_short(m.get('format'))}")
    if not _is_int(m.get("step")) or m["step"] < 0:
        raise bad(f"key 'step': expected an integer >= 0, found {_short(m.get('step'))}")
    files = m.get("files")
    if not isinstance(files, dict) or STATE_FILE not in files:
        raise bad(f"key 'files': expected an object listing at least {STATE_FILE}, found {_short(files)}")
    for name, info in files.items():
        if name in ("", ".", "..", MANIFEST_FILE) or "/" in name or "\\" in name or "\0" in name:
            raise bad(f"key 'files': {_short(name)} is not a plain file name")
        if (not isinstance(info, dict) or not _is_int(info.get("bytes")) or info["bytes"] < 0
                or not isinstance(info.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", info["sha256"])):
            raise bad(f"files[{name!r}]: expected {{'bytes': int >= 0, 'sha256': 64 hex digits}}, found {_short(info)}")
    tok = m.get("tokenizer")
    if tok is not None and (not isinstance(tok, dict) or not _is_int(tok.get("vocab_size")) or tok["vocab_size"] < 1
                            or TOKENIZER_FILE not in files or tok.get("sha256") != files[TOKENIZER_FILE]["sha256"]):
        raise bad(f"key 'tokenizer': expected {{'sha256': the hash of {TOKENIZER_FILE}, 'vocab_size': int >= 1}}, "
                  f"found {_short(tok)}")
    if tok is None and TOKENIZER_FILE in files:
        raise bad(f"key 'tokenizer': {TOKENIZER_FILE} is listed but its vocabulary size is not recorded")
    return m


def verify(ckpt: str | os.PathLike, hashes: bool = True) -> dict:
    """Check a checkpoint against its manifest; return the manifest. Raises CheckpointError naming
    the file for a missing manifest, missing/extra/resized/altered files or a step mismatch.
    hashes=False checks everything but the file contents (a quick check)."""
    ckpt = Path(ckpt)
    mpath = ckpt / MANIFEST_FILE
    if _stat(mpath) is None:
        raise CheckpointError(f"checkpoint {ckpt} has no {MANIFEST_FILE}: it was written by an older version of "
                              "tinygrad-lm or not completely, so its files cannot be verified and it is refused "
                              "(if you trust them, tinygrad_lm.checkpoint.write_manifest(DIR) seals it)")
    m = _check_manifest(mpath, _parse_json(mpath, _read_bytes(mpath, _MAX_JSON)))
    dir_step = _step_of(ckpt)
    if dir_step >= 0 and dir_step != m["step"]:
        raise CheckpointError(f"{mpath}: records step {m['step']} but the directory is {ckpt.name}: "
                              "files from two checkpoints are mixed")
    try:
        present = {e.name for e in os.scandir(ckpt)} - {MANIFEST_FILE}
    except OSError as e:
        raise CheckpointError(f"checkpoint {ckpt}: cannot list it ({e})") from None
    listed = set(m["files"])
    if present - listed:
        raise CheckpointError(f"checkpoint {ckpt}: unexpected files not in {MANIFEST_FILE}: {sorted(present - listed)}")
    if listed - present:
        raise CheckpointError(f"checkpoint {ckpt}: missing files listed in {MANIFEST_FILE}: {sorted(listed - present)}")
    for name in sorted(listed):
        path, info = ckpt / name, m["files"][name]
        st = _stat(path, follow=False)
        if st is None or not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: expected a regular file")
        if st.st_size != info["bytes"]:
            raise CheckpointError(f"{path}: {st.st_size} bytes, the manifest records {info['bytes']} "
                                  "(truncated or replaced)")
        if hashes and _sha256(path) != info["sha256"]:
            raise CheckpointError(f"{path}: its SHA-256 does not match {MANIFEST_FILE} (the file was altered or "
                                  "damaged)")
    return m


def _verify_with_hint(ckpt: Path) -> dict:
    try:
        return verify(ckpt)
    except CheckpointError as e:
        raise CheckpointError(str(e) + _hint(ckpt.parent, ckpt)) from None


# ---------------------------------------------------------------- writing
def save(run_dir: str | os.PathLike, step: int, write_files: Callable[[Path], Any], keep: int = 2) -> Path:
    """Create RUN/step-{step:06d}/ atomically. `write_files(tmp_dir)` writes the files
    (each must be fsynced); state.json must be among them. Then seal, rename, point
    `latest` at it and prune (module docstring)."""
    if not _is_int(step) or step < 0:
        raise ValueError(f"checkpoint.save: step must be an integer >= 0, got {step!r}")
    if not _is_int(keep) or keep < 1:
        raise ValueError(f"checkpoint.save: keep must be an integer >= 1, got {keep!r}")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = run / (name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_files(tmp)
    if not (tmp / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint writer left no {STATE_FILE} in {tmp}")
    write_manifest(tmp, step)
    verify(tmp, hashes=False)
    fsync_dir(tmp)
    final, aside = run / name, run / (name + ".old")
    if final.exists():  # the same step saved again: set the old copy aside until `latest` names the new one
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(run)
    atomic_write(run / LATEST_FILE, name + "\n")
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    _prune(run, step, keep)
    return final


def _prune(run: Path, step: int, keep: int) -> None:
    """Delete a checkpoint of an earlier step only once `keep` newer ones pass the quick check."""
    good = 0
    for d in reversed([d for d in list_checkpoints(run) if _step_of(d) <= step]):
        if good >= keep:
            shutil.rmtree(d, ignore_errors=True)
            continue
        try:
            verify(d, hashes=False)
            good += 1
        except CheckpointError:
            pass  # damaged: kept for inspection, not counted


# ---------------------------------------------------------------- reading
def validate_state(path: Path, st: Any) -> dict:
    """Check the shape, types and ranges of a parsed state.json; returns it (tinygrad_lm/checkpoint_schema.py)."""
    from tinygrad_lm.checkpoint_schema import validate_state as _validate
    return _validate(path, st)


def _check_model_header(ckpt: Path, mc: dict) -> None:
    """model.safetensors must hold exactly the parameters model_config describes (read from its header)."""
    from tinygrad_lm.memory import param_shapes
    from tinygrad_lm.model import GPTConfig
    path = ckpt / MODEL_FILE
    if _stat(path) is None:
        return
    try:
        header = read_safetensors_header(path)
    except (OSError, ValueError) as e:  # (the message names the file)
        raise CheckpointError(str(e)) from None
    cfg = GPTConfig.from_dict(mc)
    found = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    layers = {k.split(".")[2] for k in found if k.startswith("transformer.h.")}
    if len(layers) != cfg.n_layer or found.get("transformer.wte.weight") != (cfg.padded_vocab_size, cfg.n_embd):
        raise CheckpointError(f"{path}: its arrays do not match the model_config in {STATE_FILE}: {len(layers)} "
                              f"layers and wte {found.get('transformer.wte.weight')} in the file, n_layer "
                              f"{cfg.n_layer} and wte {(cfg.padded_vocab_size, cfg.n_embd)} in the config")
    want = param_shapes(cfg)
    quant = (header.get("__metadata__") or {}).get("quantization", "none")
    if quant == "int8":  # an int8 export (tinygrad_lm/export.py): the same arrays plus a scale per weight
        from tinygrad_lm.export import int8_shapes
        want = int8_shapes(want)
    elif quant != "none":
        raise CheckpointError(f"{path}: metadata 'quantization' is {_short(quant)}; expected 'none' or 'int8'")
    if found != want:
        diff = sorted(set(want) ^ set(found)) or [f"{k}: {found[k]} vs {want[k]}" for k in want if found[k] != want[k]]
        raise CheckpointError(f"{path}: its arrays do not match the model_config in {STATE_FILE} "
                              f"(file vs config: {diff[:5]})")


def read_state(ckpt: str | os.PathLike, verify_files: bool = True) -> dict:
    """Verify the checkpoint (unless verify_files=False: the caller just did), then read and
    validate state.json; also checks it against the manifest (step, tokenizer vocabulary size)
    and model.safetensors' header (parameter names and shapes)."""
    ckpt = Path(ckpt)
    manifest = _verify_with_hint(ckpt) if verify_files else None
    path = ckpt / STATE_FILE
    st = validate_state(path, _parse_json(path, _read_bytes(path, _MAX_JSON)))
    if manifest is not None:
        if manifest["step"] != st["step"]:
            raise CheckpointError(f"{path}: step {st['step']} but {MANIFEST_FILE} records step {manifest['step']}: "
                                  "files from two checkpoints are mixed")
        tok = manifest["tokenizer"]
        if tok is not None and tok["vocab_size"] != st["model_config"]["vocab_size"]:
            raise CheckpointError(f"{ckpt / TOKENIZER_FILE}: the tokenizer has {tok['vocab_size']} tokens but the "
                                  f"model's vocab_size is {st['model_config']['vocab_size']}")
    _check_model_header(ckpt, st["model_config"])
    if _stat(ckpt / OPTIM_FILE) is not None:  # its arrays are matched to the optimizer when the trainer loads it
        try:
            read_safetensors_header(ckpt / OPTIM_FILE)
        except (OSError, ValueError) as e:
            raise CheckpointError(str(e)) from None
    return st


def load_tokenizer(ckpt: str | os.PathLike, verify_files: bool = True) -> Any:
    """The checkpoint's tokenizer, verified against the manifest; errors name tokenizer.json."""
    from tinygrad_lm.tokenizer import load_tokenizer as _load_tok
    ckpt = Path(ckpt)
    manifest = _verify_with_hint(ckpt) if verify_files else None
    path = ckpt / TOKENIZER_FILE
    if _stat(path) is None:
        raise CheckpointError(f"checkpoint {ckpt} has no tokenizer ({path} is missing); sampling and resuming "
                              "need it to turn text into ids")
    try:
        tok = _load_tok(path)
    except (UserError, OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({e})") from None
    if manifest is not None and manifest["tokenizer"] is not None \
            and manifest["tokenizer"]["vocab_size"] != tok.vocab_size:
        raise CheckpointError(f"{path}: {tok.vocab_size} tokens, {MANIFEST_FILE} records "
                              f"{manifest['tokenizer']['vocab_size']}")
    return tok
