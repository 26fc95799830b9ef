"""Saving and loading arrays, models and optimizers as safetensors files.

safetensors (https://github.com/huggingface/safetensors) is a file of raw little-endian arrays
behind a JSON header:

    [8 bytes: header length N, little-endian u64][N bytes: JSON header][array bytes]
    header = {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [...], "data_offsets": [a, b]}, ...}

It holds no code, so loading it can never run any (unlike pickle, which this project never uses).

* Writes are atomic: the bytes go to a temporary file in the same directory, are fsync'ed, then
  `os.replace`d over the target, so a crash at any moment leaves the old file or the new one.
* bfloat16 (`ml_dtypes.bfloat16`) is written as safetensors' native BF16 (PyTorch reads it as
  torch.bfloat16). If the installed safetensors cannot write BF16 from NumPy, such arrays are
  stored as their uint16 bit patterns and their names listed in the metadata key
  `_BF16_AS_UINT16`; `load_safetensors` turns both forms back into bfloat16.
* The optimizer file stores the moment arrays as tensors and `Optimizer.state_dict()["meta"]`
  (plus an optional schedule) as JSON in the header metadata.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from tensor import backend

__all__ = ["atomic_write", "fsync_dir", "save_safetensors", "load_safetensors", "save_model", "load_model",
           "save_optimizer", "load_optimizer"]

_BF16_AS_UINT16 = "tinygrad_lm.bf16_as_uint16"   # metadata key: JSON list of names stored as uint16 bits
_OPTIMIZER_KEY = "tinygrad_lm.optimizer"         # metadata key: JSON of Optimizer.state_dict()["meta"]
_SCHEDULE_KEY = "tinygrad_lm.schedule"           # metadata key: JSON of Schedule.state_dict()

# safetensors dtype codes -> NumPy dtypes (BF16 via ml_dtypes, imported only when met)
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
           "U8": np.uint8, "BOOL": np.bool_}

_native_bf16: bool | None = None


def _bfloat16() -> Any:
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def _is_bf16(dtype: Any) -> bool:
    return getattr(dtype, "name", "") == "bfloat16"


def _supports_native_bf16() -> bool:
    """Can this safetensors version write a bfloat16 NumPy array as BF16? (checked once)"""
    global _native_bf16
    if _native_bf16 is None:
        from safetensors.numpy import save
        try:
            _native_bf16 = b'"BF16"' in save({"x": np.zeros(1, _bfloat16())})
        except Exception:
            _native_bf16 = False
    return _native_bf16


# ---------------------------------------------------------------- atomic write
def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable (a no-op where directories have no file descriptor)."""
    try:
        dfd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (bytes, or str as UTF-8) to `path` so that `path` is at every moment either
    the old file or the new one: a temporary file in the same directory, fsync, rename, fsync the
    directory. The one atomic write of the project (checkpoints, tokenizers, caches, logs)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path)[:200] + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())                 # the bytes are on disk before the name points at them
        os.replace(tmp, path)                    # atomic rename over the old file
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)                         # make the rename itself durable


# ---------------------------------------------------------------- arrays
def save_safetensors(path: str | os.PathLike, tensors: dict[str, Any],
                     metadata: dict[str, str] | None = None) -> None:
    """Write name -> array (NumPy or CuPy, any shape) to a safetensors file, atomically.

    `metadata` is a flat str -> str dict stored in the header (put JSON in the values for more).
    """
    from safetensors.numpy import save

    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"save_safetensors({path}): metadata must map str to str, got {k!r}: {type(v).__name__}")
    arrays: dict[str, np.ndarray] = {}
    as_bits: list[str] = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"save_safetensors({path}): tensor names must be str, got {name!r}")
        arr = np.asarray(backend.to_numpy(value))
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")   # (ascontiguousarray makes 0-d 1-d)
        if _is_bf16(arr.dtype) and not _supports_native_bf16():
            arr, _ = arr.view(np.uint16), as_bits.append(name)
        elif arr.dtype.type not in _DTYPES.values() and not _is_bf16(arr.dtype):
            raise TypeError(f"save_safetensors({path}): {name!r} has dtype {arr.dtype}, which safetensors cannot store")
        arrays[name] = arr
    if as_bits:
        meta[_BF16_AS_UINT16] = json.dumps(as_bits)
    atomic_write(path, save(arrays, metadata=meta or None))


def _read_header(path: str, data: bytes) -> dict[str, Any]:
    """Parse and sanity-check the header, with errors that say what is wrong with which file."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: not a valid safetensors file ({why}); it may be truncated or corrupt")

    if len(data) < 8:
        raise bad(f"only {len(data)} bytes")
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise bad(f"the header claims {n} bytes but the file has {len(data)}")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise bad(f"entry {name!r} has no valid data_offsets") from None
    if 8 + n + end != len(data):
        raise bad(f"the arrays should end at byte {8 + n + end} but the file has {len(data)} bytes")
    return header


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file -> (name -> writable NumPy array, metadata dict).

    Raises FileNotFoundError for a missing file, ValueError naming the file for a corrupt one.
    """
    from safetensors import SafetensorError, deserialize

    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    header = _read_header(path, data)
    metadata = dict(header.get("__metadata__") or {})
    try:
        entries = deserialize(data)              # validated by the safetensors library itself
    except SafetensorError as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
    as_bits = set(json.loads(metadata.pop(_BF16_AS_UINT16, "[]")))
    out: dict[str, np.ndarray] = {}
    for name, info in entries:
        code = info["dtype"]
        if code == "BF16":
            dtype = _bfloat16()
        elif code in _DTYPES:
            dtype = np.dtype(_DTYPES[code]).newbyteorder("<")
        else:
            raise ValueError(f"{path}: {name!r} has dtype {code}, which this loader does not handle")
        arr = np.frombuffer(info["data"], dtype=dtype).reshape(info["shape"])
        arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
        if name in as_bits:
            arr = arr.view(_bfloat16())
        out[name] = arr if arr.flags.writeable else arr.copy()
    order = [k for k in header if k != "__metadata__"]
    return {k: out[k] for k in order}, metadata


# ---------------------------------------------------------------- models
def save_model(model: Any, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write `model.state_dict()` (DESIGN.md names, e.g. `transformer.h.0.attn.c_attn.weight`)
    to a safetensors file, atomically. The header carries {"format": "pt"} so Hugging Face tools
    accept it, plus `metadata`."""
    save_safetensors(path, model.state_dict(), {"format": "pt", **(metadata or {})})


def load_model(model: Any, path: str | os.PathLike, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load weights saved by `save_model` (or any safetensors with the same names) into `model`.

    Arrays are cast to each parameter's dtype and moved to its device. With strict=True, missing,
    unexpected or mis-shaped names raise KeyError naming the file and listing them.
    Returns (missing, unexpected) names.
    """
    tensors, _ = load_safetensors(path)
    try:
        return model.load_state_dict(tensors, strict=strict)
    except KeyError as e:
        raise KeyError(f"{os.fspath(path)}: {e.args[0] if e.args else e}") from None


# ---------------------------------------------------------------- optimizers
def save_optimizer(optimizer: Any, path: str | os.PathLike, schedule: Any = None) -> None:
    """Write an optimizer's state (and optionally its LR schedule's settings) to one safetensors
    file: arrays "state.<i>.<name>" as tensors, the JSON metadata in the header."""
    sd = optimizer.state_dict()
    meta = {_OPTIMIZER_KEY: json.dumps(sd["meta"])}
    if schedule is not None:
        meta[_SCHEDULE_KEY] = json.dumps(schedule.state_dict())
    save_safetensors(path, sd["arrays"], meta)


def load_optimizer(optimizer: Any, path: str | os.PathLike, schedule: Any = None) -> None:
    """Restore an optimizer saved by `save_optimizer` (and the schedule's settings, if one is
    given and the file has them). Mismatches raise ValueError naming the file."""
    path = os.fspath(path)
    arrays, metadata = load_safetensors(path)
    if _OPTIMIZER_KEY not in metadata:
        raise ValueError(f"{path}: no optimizer state in this safetensors file (metadata key {_OPTIMIZER_KEY!r} missing)")
    try:
        meta = json.loads(metadata[_OPTIMIZER_KEY])
    except ValueError as e:
        raise ValueError(f"{path}: the optimizer metadata is not valid JSON ({e})") from None
    try:
        optimizer.load_state_dict({"meta": meta, "arrays": arrays})
        if schedule is not None and _SCHEDULE_KEY in metadata:
            schedule.load_state_dict(json.loads(metadata[_SCHEDULE_KEY]))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
