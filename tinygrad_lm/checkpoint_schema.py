"""The schema of a checkpoint's state.json, checked by `tinygrad_lm.checkpoint.read_state`
before anything uses it: every required key, its type and its range (NaN and the JSON
infinities parse in Python, so they are refused explicitly; `best_val` may be +Infinity,
meaning no evaluation yet). Extra keys are allowed. Every error is a CheckpointError naming
the file, the key, what was found and what was expected. `train_config`'s values are the
training config's to validate; here it only has to be an object whose model settings agree
with `model_config`.
"""
from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from nn.lr_scheduler import schedule_from_state_dict
from tinygrad_lm.checkpoint import CheckpointError, _is_int, _short
from tinygrad_lm.model import GPTConfig

__all__ = ["validate_state", "STATE_FORMATS", "REQUIRED_KEYS"]

STATE_FORMATS = (1,)            # state.json "format" values this version reads
REQUIRED_KEYS = ("format", "step", "tokens_seen", "best_val", "model_config", "train_config", "schedule",
                 "loss_scaler", "dropout_rng", "data_position", "tokenizer", "world_size", "global_batch_size")


def _expect(path: Path, key: str, ok: bool, want: str, found: Any) -> None:
    if not ok:
        raise CheckpointError(f"{path}: key {key!r}: expected {want}, found {_short(found)}")


def _num(v: Any) -> bool:
    return type(v) in (int, float)


def _finite(v: Any) -> bool:
    return _num(v) and math.isfinite(v)


def validate_state(path: Path, st: Any) -> dict:
    """Check the shape, types and ranges of a parsed state.json; returns it. Errors name path and key."""
    if not isinstance(st, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(st).__name__} {_short(st)}")
    missing = [k for k in REQUIRED_KEYS if k not in st]
    if missing:
        raise CheckpointError(f"{path}: missing keys {missing} (a checkpoint's state needs {list(REQUIRED_KEYS)})")
    f = st["format"]
    _expect(path, "format", _is_int(f), "an integer format version", f)
    if f not in STATE_FORMATS:
        raise CheckpointError(f"{path}: key 'format': this version reads formats {list(STATE_FORMATS)}, found {f} "
                              "(written by a newer or unknown version)")
    _expect(path, "step", _is_int(st["step"]) and st["step"] >= 0, "an integer >= 0", st["step"])
    _expect(path, "tokens_seen", _is_int(st["tokens_seen"]) and st["tokens_seen"] >= 0, "an integer >= 0",
            st["tokens_seen"])
    bv = st["best_val"]
    _expect(path, "best_val", _num(bv) and not math.isnan(bv) and bv >= 0,
            "a loss >= 0 (Infinity before the first evaluation)", bv)
    mc = st["model_config"]
    _expect(path, "model_config", isinstance(mc, dict), "an object", mc)
    types = {"int": int, "float": (int, float), "bool": bool, "str": str}
    for fld in fields(GPTConfig):
        if fld.name in mc:
            want = types.get(str(fld.type), object)
            v = mc[fld.name]
            ok = isinstance(v, want) and (want is bool or not isinstance(v, bool)) and (not _num(v) or _finite(v))
            _expect(path, f"model_config.{fld.name}", ok, f"{fld.type}", v)
    try:
        GPTConfig.from_dict(mc)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: key 'model_config': not a valid model configuration ({e})") from None
    tc = st["train_config"]
    _expect(path, "train_config", isinstance(tc, dict), "an object", tc)
    for k, v in mc.items():  # the trainer writes both: they must agree
        if k in tc and k != "vocab_size" and tc[k] != v:
            raise CheckpointError(f"{path}: key 'model_config.{k}' is {_short(v)} but 'train_config.{k}' is "
                                  f"{_short(tc[k])}; they were written together and must agree")
    sc = st["schedule"]
    _expect(path, "schedule", isinstance(sc, dict) and isinstance(sc.get("name"), str)
            and all(_finite(v) for k, v in sc.items() if k != "name"),
            "an object with a 'name' and finite numbers", sc)
    try:
        schedule_from_state_dict(sc)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: key 'schedule': not a valid schedule ({e})") from None
    ls = st["loss_scaler"]
    _expect(path, "loss_scaler", isinstance(ls, dict), "an object", ls)
    for k, ok, want in (("scale", lambda v: _finite(v) and v > 0, "a finite number > 0"),
                        ("growth_factor", lambda v: _finite(v) and v > 0, "a finite number > 0"),
                        ("backoff_factor", lambda v: _finite(v) and v > 0, "a finite number > 0"),
                        ("growth_interval", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
                        ("enabled", lambda v: type(v) is bool, "true or false"),
                        ("clean_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
                        ("skipped_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0")):
        _expect(path, f"loss_scaler.{k}", k in ls and ok(ls[k]), want, ls.get(k, "(missing)"))
    _check_rng_state(path, st["dropout_rng"])
    dp = st["data_position"]
    _expect(path, "data_position", isinstance(dp, dict), "an object", dp)
    _expect(path, "data_position.seed", _is_int(dp.get("seed")) and dp["seed"] >= 0, "an integer >= 0",
            dp.get("seed", "(missing)"))
    _expect(path, "data_position.next_step", dp.get("next_step") == st["step"] and _is_int(dp.get("next_step")),
            f"the step, {st['step']}", dp.get("next_step", "(missing)"))
    _expect(path, "tokenizer", isinstance(st["tokenizer"], str), "a file name", st["tokenizer"])
    for k in ("world_size", "global_batch_size"):
        _expect(path, k, _is_int(st[k]) and st[k] >= 1, "an integer >= 1", st[k])
    tc = st["train_config"]
    per_rank = tc.get("batch_size"), tc.get("grad_accum", 1)
    if all(_is_int(v) for v in per_rank):  # (their own types are the config's to check)
        want = per_rank[0] * per_rank[1] * st["world_size"]
        _expect(path, "global_batch_size", st["global_batch_size"] == want,
                f"batch_size x grad_accum x world_size = {want}", st["global_batch_size"])
    return st


def _check_rng_state(path: Path, s: Any) -> None:
    want = "NumPy's bit_generator.state: {'bit_generator': 'PCG64', 'state': {...}, ...}"
    _expect(path, "dropout_rng", isinstance(s, dict) and s.get("bit_generator") in
            ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64") and isinstance(s.get("state"), dict), want, s)
    try:
        getattr(np.random, s["bit_generator"])().state = s
    except (TypeError, ValueError, KeyError, OverflowError, IndexError) as e:
        raise CheckpointError(f"{path}: key 'dropout_rng': not a valid {s['bit_generator']} state ({e})") from None
