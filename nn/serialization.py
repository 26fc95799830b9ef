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
from typing import Any, Iterator

import numpy as np

from tensor import backend

__all__ = ["atomic_write", "fsync_dir", "save_safetensors", "load_safetensors", "read_safetensors_header",
           "iter_safetensors",
           "save_model", "load_model", "save_optimizer", "load_optimizer", "SafetensorsError"]

_BF16_AS_UINT16 = "tinygrad_lm.bf16_as_uint16"   # metadata key: JSON list of names stored as uint16 bits
_OPTIMIZER_KEY = "tinygrad_lm.optimizer"         # metadata key: JSON of Optimizer.state_dict()["meta"]
_SCHEDULE_KEY = "tinygrad_lm.schedule"           # metadata key: JSON of Schedule.state_dict()

# safetensors dtype codes -> NumPy dtypes (BF16 via ml_dtypes, imported only when met)
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
           "U8": np.uint8, "BOOL": np.bool_}

_ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in _DTYPES.items()}, "BF16": 2}
_MAX_HEADER = 100 << 20                          # a header larger than this is refused unread

_native_bf16: bool | None = None


class SafetensorsError(ValueError):
    """A safetensors file that is corrupt or does not fit what loads it; the message names the file."""


def _bfloat16() -> Any:
    return np.dtype(backend.optional_module("ml_dtypes", "bf16", "bfloat16 on the CPU").bfloat16)


def _safetensors(submodule: str = "") -> Any:
    """safetensors (or safetensors.numpy): every model, optimizer and checkpoint file (extra [safetensors])."""
    return backend.optional_module("safetensors" + submodule, "safetensors", "reading and writing weights")


def _is_bf16(dtype: Any) -> bool:
    return getattr(dtype, "name", "") == "bfloat16"


def _supports_native_bf16() -> bool:
    """Can this safetensors version write a bfloat16 NumPy array as BF16? (checked once)"""
    global _native_bf16
    if _native_bf16 is None:
        save = _safetensors(".numpy").save
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
    save = _safetensors(".numpy").save

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
    """Parse and check the header against the file: dtypes, shapes, and offsets that tile the data
    exactly. Errors say what is wrong with which file."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    return _parse_header(path, data[:8], data[8:8 + min(n, _MAX_HEADER)], len(data))


def _parse_header(path: str, prefix: bytes, rest: bytes, file_size: int) -> dict[str, Any]:
    def bad(why: str) -> SafetensorsError:
        return SafetensorsError(f"{path}: not a valid safetensors file ({why}); it may be truncated or corrupt")

    if len(prefix) < 8:
        raise bad(f"only {file_size} bytes")
    n = int.from_bytes(prefix, "little")
    if 8 + n > file_size:
        raise bad(f"the header claims {n} bytes but the file has {file_size}")
    if n > _MAX_HEADER:
        raise bad(f"a {n}-byte header, more than {_MAX_HEADER}")
    try:
        header = json.loads(rest[:n])
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"the header is not JSON: {e}") from None
    except RecursionError:
        raise bad("the header is JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    meta = header.get("__metadata__", {})
    if meta is not None and (not isinstance(meta, dict)
                             or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise bad("__metadata__ is not a JSON object of strings")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} is not a JSON object")
        code, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if code not in _ITEMSIZE:
            raise bad(f"entry {name!r} has dtype {code!r}; known: {sorted(_ITEMSIZE)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"entry {name!r} has shape {shape!r}; expected a list of integers >= 0")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise bad(f"entry {name!r} has no valid data_offsets (found {offs!r})")
        size = int(np.prod(shape, dtype=object)) * _ITEMSIZE[code]
        if offs[1] - offs[0] != size:
            raise bad(f"entry {name!r}: {code} {shape} needs {size} bytes but data_offsets {offs} span "
                      f"{offs[1] - offs[0]}")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    end = 0
    for a, b, name in spans:
        if a != end:
            raise bad(f"entry {name!r} starts at byte {a} of the data, expected {end} (overlapping or a gap)")
        end = b
    if 8 + n + end != file_size:
        raise bad(f"the arrays should end at byte {8 + n + end} but the file has {file_size} bytes")
    return header


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """Only the checked header of a safetensors file (reads the header bytes, not the arrays):
    {"__metadata__": {...}, name: {"dtype", "shape", "data_offsets"}}."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        rest = f.read(min(n, _MAX_HEADER)) if n <= size else b""
    return _parse_header(path, prefix, rest, size)


def _bf16_names(path: str, raw: str, header: dict[str, Any]) -> set[str]:
    """The metadata list of names stored as uint16 bit patterns of bfloat16, checked."""
    try:
        names = json.loads(raw)
    except (ValueError, RecursionError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SafetensorsError(f"{path}: metadata {_BF16_AS_UINT16!r} should be a JSON list of names, "
                               f"found {raw[:80]!r}")
    for n in names:
        if not isinstance(header.get(n), dict) or header[n].get("dtype") != "U16" or n == "__metadata__":
            raise SafetensorsError(f"{path}: metadata {_BF16_AS_UINT16!r} lists {n!r}, which is not a U16 array "
                                   "of the file")
    return set(names)


def load_safetensors(path: str | os.PathLike, mmap: bool = False) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file -> (name -> writable NumPy array, metadata dict).

    mmap=True: the file is mapped, not read; each array is a copy-on-write view of it (read from
    disk when touched; writes stay in this process), so a reader that slices a few parts out of
    a large file holds only those. Raises FileNotFoundError for a missing file, ValueError naming
    the file for a corrupt one.
    """
    if mmap:
        return _map_safetensors(os.fspath(path))
    st = _safetensors()
    SafetensorError, deserialize = st.SafetensorError, st.deserialize

    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    header = _read_header(path, data)
    metadata = dict(header.get("__metadata__") or {})
    try:
        entries = deserialize(data)              # validated by the safetensors library itself
    except SafetensorError as e:
        raise SafetensorsError(f"{path}: not a valid safetensors file ({e})") from None
    as_bits = _bf16_names(path, metadata.pop(_BF16_AS_UINT16, "[]"), header)
    out: dict[str, np.ndarray] = {}
    for name, info in entries:
        code = info["dtype"]
        if code == "BF16":
            dtype = _bfloat16()
        elif code in _DTYPES:
            dtype = np.dtype(_DTYPES[code]).newbyteorder("<")
        else:
            raise SafetensorsError(f"{path}: {name!r} has dtype {code}, which this loader does not handle")
        arr = np.frombuffer(info["data"], dtype=dtype).reshape(info["shape"])
        arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
        if name in as_bits:
            arr = arr.view(_bfloat16())
        out[name] = arr if arr.flags.writeable else arr.copy()
    order = [k for k in header if k != "__metadata__"]
    return {k: out[k] for k in order}, metadata


def _map_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    header = read_safetensors_header(path)       # checked: dtypes, shapes, offsets tiling the file
    metadata = dict(header.get("__metadata__") or {})
    as_bits = _bf16_names(path, metadata.pop(_BF16_AS_UINT16, "[]"), header)
    names = [k for k in header if k != "__metadata__"]
    if not names:
        return {}, metadata
    data = np.memmap(path, dtype=np.uint8, mode="c")
    start = 8 + int.from_bytes(bytes(data[:8]), "little")
    out = {}
    for name in names:
        info = header[name]
        code = info["dtype"]
        if code not in _DTYPES and code != "BF16":
            raise SafetensorsError(f"{path}: {name!r} has dtype {code}, which this loader does not handle")
        dtype = _bfloat16() if code == "BF16" else np.dtype(_DTYPES[code]).newbyteorder("<")
        a, b = info["data_offsets"]
        arr = data[start + a:start + b].view(dtype).reshape(info["shape"])
        arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
        out[name] = np.asarray(arr.view(_bfloat16()) if name in as_bits else arr)
    return out, metadata


def iter_safetensors(path: str | os.PathLike, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, NumPy array) for each of `names`, read one at a time at its offsets in the checked header
    (the memory of one array at a time, not the whole file). A name the file lacks is a KeyError."""
    path = os.fspath(path)
    header = read_safetensors_header(path)
    with open(path, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
        for name in names:
            info = header[name]
            code = info["dtype"]
            if code not in _ITEMSIZE:
                raise SafetensorsError(f"{path}: {name!r} has dtype {code}, which this loader does not handle")
            dtype = _bfloat16() if code == "BF16" else np.dtype(_DTYPES[code]).newbyteorder("<")
            a, b = info["data_offsets"]
            f.seek(start + a)
            arr = np.fromfile(f, dtype=dtype, count=(b - a) // dtype.itemsize).reshape(info["shape"])
            yield name, arr.astype(arr.dtype.newbyteorder("="), copy=False)


# ---------------------------------------------------------------- models
def save_model(model: Any, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write `model.state_dict()` (docs/DESIGN.md names, e.g. `transformer.h.0.attn.c_attn.weight`)
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
    for name, p in model.named_parameters():
        arr = tensors.get(name)
        if arr is None:
            continue
        p_float = np.dtype(p.dtype).kind == "f" or _is_bf16(np.dtype(p.dtype))
        if p_float and not (arr.dtype.kind == "f" or _is_bf16(arr.dtype)):
            raise SafetensorsError(f"{os.fspath(path)}: {name!r} is stored as {arr.dtype} {arr.shape}; the model's "
                                   f"parameter is {np.dtype(p.dtype)} {tuple(p.shape)} (a floating dtype is needed)")
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


def _check_optimizer_meta(path: str, meta: Any, arrays: dict[str, np.ndarray]) -> None:
    """Types and ranges of the optimizer metadata, checked at load (not at the first step)."""
    def bad(what: str) -> SafetensorsError:
        return SafetensorsError(f"{path}: optimizer metadata {what}")

    def finite(v: Any) -> bool:
        return type(v) in (int, float) and np.isfinite(v)

    if isinstance(meta, dict) and meta.get("zero1") is True:   # nn.distributed.ZeRO1 wraps the inner state
        meta = meta.get("inner")
    if not isinstance(meta, dict) or not isinstance(meta.get("type"), str):
        raise bad(f"should be an object with a 'type' string, found {str(meta)[:80]!r}")
    groups, state = meta.get("param_groups"), meta.get("state", {})
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise bad(f"'param_groups' should be a list of objects, found {str(groups)[:80]!r}")
    for gi, g in enumerate(groups):
        params = g.get("params")
        if not isinstance(params, list) or not all(type(i) is int and i >= 0 for i in params):
            raise bad(f"param group {gi}: 'params' should be a list of indices >= 0, found {str(params)[:80]!r}")
        for k, v in g.items():
            ok = (k == "params" or type(v) is bool or v is None or finite(v)
                  or (isinstance(v, list) and all(finite(x) for x in v)))
            if not ok or (k in ("lr", "eps", "weight_decay") and not (finite(v) and v >= 0)) \
                    or (k == "betas" and not (isinstance(v, list) and len(v) == 2 and all(0 <= x < 1 for x in v))):
                raise bad(f"param group {gi}: {k!r} = {str(v)[:80]!r} is not a valid setting")
    if not isinstance(state, dict):
        raise bad(f"'state' should be an object, found {str(state)[:80]!r}")
    for key, st in state.items():
        if not key.isdigit() or not isinstance(st, dict):
            raise bad(f"'state' entry {key!r} should be '<index>': {{...}}, found {str(st)[:80]!r}")
        for k, v in st.items():
            if (k == "step" and not (type(v) is int and v >= 0)) or (k != "step" and not finite(v)):
                raise bad(f"state {key}: {k!r} = {str(v)[:80]!r} is not valid (step: an integer >= 0)")
    for name, arr in arrays.items():
        if not (arr.dtype.kind == "f" or _is_bf16(arr.dtype)):
            raise SafetensorsError(f"{path}: optimizer array {name!r} has dtype {arr.dtype}; expected floating point")


def load_optimizer(optimizer: Any, path: str | os.PathLike, schedule: Any = None, mmap: bool = False) -> None:
    """Restore an optimizer saved by `save_optimizer` (and the schedule's settings, if one is
    given and the file has them). Mismatches raise ValueError naming the file. mmap: the arrays
    handed to optimizer.load_state_dict are views of the mapped file (load_safetensors), for a
    loader that keeps (copies) only its share of them."""
    path = os.fspath(path)
    arrays, metadata = load_safetensors(path, mmap=mmap)
    if _OPTIMIZER_KEY not in metadata:
        raise SafetensorsError(f"{path}: no optimizer state in this safetensors file "
                               f"(metadata key {_OPTIMIZER_KEY!r} missing)")
    try:
        meta = json.loads(metadata[_OPTIMIZER_KEY])
        sched = json.loads(metadata[_SCHEDULE_KEY]) if schedule is not None and _SCHEDULE_KEY in metadata else None
    except (ValueError, RecursionError) as e:
        raise SafetensorsError(f"{path}: the optimizer metadata is not valid JSON ({e})") from None
    _check_optimizer_meta(path, meta, arrays)
    try:
        optimizer.load_state_dict({"meta": meta, "arrays": arrays})
        if sched is not None:
            if not isinstance(sched, dict):
                raise ValueError(f"the schedule metadata should be an object, found {str(sched)[:80]!r}")
            schedule.load_state_dict(sched)
    except (ValueError, TypeError, KeyError) as e:
        raise SafetensorsError(f"{path}: {e}") from None
