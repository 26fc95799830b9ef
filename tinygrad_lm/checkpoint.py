"""Training checkpoints (DESIGN.md): a directory holding model.safetensors,
optimizer.safetensors, state.json and tokenizer.json.

Atomicity: a checkpoint is first written, file by file with fsync, into
`RUN/step-000500.tmp/`, then renamed to `RUN/step-000500/` (a directory rename is
atomic), then the one-line pointer `RUN/latest` is replaced atomically. A crash at
any moment leaves `latest` naming a complete checkpoint. The last `keep` checkpoints
are kept, so a checkpoint damaged later still has a good predecessor.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

STATE_FILE, MODEL_FILE, OPTIM_FILE, TOKENIZER_FILE = "state.json", "model.safetensors", "optimizer.safetensors", "tokenizer.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or inconsistent; the message names the file."""


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def resolve(path: str | os.PathLike) -> Path:
    """A run directory (follows its `latest` pointer) or a checkpoint directory -> the checkpoint directory."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    latest = p / "latest"
    if latest.is_file():
        ckpt = p / latest.read_text().strip()
        if not (ckpt / STATE_FILE).is_file():
            raise CheckpointError(f"checkpoint {ckpt} named by {latest} has no {STATE_FILE}")
        return ckpt
    raise CheckpointError(f"no checkpoint at {p}: expected {p / 'latest'} or {p / STATE_FILE}")


def _step_of(d: Path) -> int:
    try:
        return int(d.name[len("step-"):])
    except ValueError:
        return -1


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first by step number (names grow past 6 digits)."""
    found = (d for d in run_dir.glob("step-*") if d.is_dir() and not d.name.endswith(".tmp") and _step_of(d) >= 0)
    return sorted(found, key=_step_of)


def save(run_dir: str | os.PathLike, step: int, write_files: Any, keep: int = 2) -> Path:
    """Create RUN/step-{step:06d}/ atomically. `write_files(tmp_dir)` writes the files
    (each must be fsynced); state.json must be among them."""
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
    fsync_dir(tmp)
    final = run / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(run)
    atomic_write_text(run / "latest", name + "\n")
    for old in list_checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(ckpt: Path) -> dict:
    path = ckpt / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt ({e})") from None
