"""safetensors files: array round trips, atomic writes, corrupt files, models, optimizers."""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

import nn.serialization as ser
from nn.lr_scheduler import WarmupCosine, apply_lr
from nn.module import Module, Parameter
from nn.optim import AdamW
from nn.serialization import (load_model, load_optimizer, load_safetensors, save_model, save_optimizer,
                              save_safetensors)


class Block(Module):
    def __init__(self, rng: np.random.Generator) -> None:
        self.weight = Parameter(rng.standard_normal((4, 3)).astype(np.float32))
        self.bias = Parameter(np.zeros(4, np.float32))


class Net(Module):
    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.wte = Parameter(rng.standard_normal((5, 3)).astype(np.float32))
        self.block = Block(rng)


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f64": rng.standard_normal(5),
        "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal(3).astype(np.float16),
        "i64": np.arange(6).reshape(2, 3),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def assert_same(a: dict, b: dict) -> None:
    assert list(sorted(a)) == list(sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k                 # bit for bit


def test_round_trip_dtypes_and_metadata(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors(path, arrays(), {"step": "12", "note": "hello"})
    loaded, meta = load_safetensors(path)
    assert_same(arrays(), loaded)
    assert meta == {"step": "12", "note": "hello"}
    loaded["f32"][0, 0] = 1.0                                    # writable
    assert b'"BF16"' in path.read_bytes()                       # native BF16: PyTorch reads bfloat16


@pytest.mark.parametrize("native_bf16", [True, False])
def test_mapped_load_equals_the_read_one_and_writes_stay_in_memory(tmp_path, monkeypatch, native_bf16):
    monkeypatch.setattr(ser, "_native_bf16", native_bf16)
    path = tmp_path / "x.safetensors"
    save_safetensors(path, arrays(), {"a": "b"})
    before = path.read_bytes()
    loaded, meta = load_safetensors(path, mmap=True)
    assert_same(arrays(), loaded)
    assert meta == {"a": "b"} and list(loaded) == list(load_safetensors(path)[0])
    loaded["f32"][...] = 7.0                                     # copy-on-write: the file is unchanged
    assert path.read_bytes() == before
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(before[:-3])
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_safetensors(bad, mmap=True)


def test_iter_safetensors_reads_named_arrays_one_at_a_time(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors(path, arrays())
    names = list(reversed(sorted(arrays())))
    got = dict(ser.iter_safetensors(path, names))
    assert list(got) == names
    assert_same(arrays(), got)
    with pytest.raises(KeyError):
        dict(ser.iter_safetensors(path, ["missing"]))


def test_bfloat16_fallback_as_uint16(tmp_path, monkeypatch):
    monkeypatch.setattr(ser, "_native_bf16", False)              # as if safetensors lacked BF16
    path = tmp_path / "x.safetensors"
    save_safetensors(path, arrays(), {"a": "b"})
    assert b'"BF16"' not in path.read_bytes() and b'"U16"' in path.read_bytes()
    loaded, meta = load_safetensors(path)
    assert_same(arrays(), loaded)
    assert meta == {"a": "b"}


def test_readable_by_the_safetensors_library(tmp_path):
    from safetensors.numpy import load_file
    path = tmp_path / "x.safetensors"
    data = {k: v for k, v in arrays().items() if k != "bf16"}
    save_safetensors(path, data)
    assert_same(data, load_file(str(path)))


def test_bad_metadata_and_names(tmp_path):
    with pytest.raises(TypeError, match="metadata must map str to str"):
        save_safetensors(tmp_path / "x", {"a": np.zeros(1)}, {"step": 3})
    with pytest.raises(TypeError, match="cannot store"):
        save_safetensors(tmp_path / "x", {"a": np.zeros(1, np.complex64)})


# ---------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_failed_write_leaves_old_file_intact(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "model.safetensors"
    old = {"w": np.ones(3, np.float32)}
    save_safetensors(path, old, {"v": "1"})

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, fail_at, boom)
    with pytest.raises(OSError, match="simulated"):
        save_safetensors(path, {"w": np.zeros(100, np.float32)}, {"v": "2"})
    monkeypatch.undo()
    loaded, meta = load_safetensors(path)
    assert_same(old, loaded)
    assert meta == {"v": "1"}
    assert os.listdir(tmp_path) == ["model.safetensors"]         # the temporary file is gone


# ---------------------------------------------------------------------- corrupt files
def test_corrupt_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_safetensors(good, arrays())
    data = good.read_bytes()
    cases = {
        "truncated": data[:-10],
        "cut_header": data[:40],
        "tiny": data[:5],
        "empty": b"",
        "garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 8,
        "trailing": data + b"xx",
    }
    for name, blob in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        with pytest.raises(ValueError, match=f"{name}.safetensors: not a valid safetensors file"):
            load_safetensors(path)
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------- models
def test_save_load_model(tmp_path):
    path = tmp_path / "model.safetensors"
    src = Net(seed=1)
    save_model(src, path)
    tensors, meta = load_safetensors(path)
    assert list(tensors) and set(tensors) == {"wte", "block.weight", "block.bias"}
    assert meta["format"] == "pt"
    dst = Net(seed=2)
    assert load_model(dst, path) == ([], [])
    for (n, a), b in zip(src.named_parameters(), dst.parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=n)
        assert b._version == 1


def test_load_model_strict_errors_name_the_file(tmp_path):
    path = tmp_path / "partial.safetensors"
    save_safetensors(path, {"wte": np.zeros((5, 3), np.float32), "extra": np.zeros(1, np.float32)})
    model = Net()
    with pytest.raises(KeyError, match="partial.safetensors") as info:
        load_model(model, path)
    assert "block.weight" in str(info.value) and "extra" in str(info.value)
    missing, unexpected = load_model(model, path, strict=False)
    assert sorted(missing) == ["block.bias", "block.weight"] and unexpected == ["extra"]
    np.testing.assert_array_equal(model.wte.data, 0.0)


def test_bfloat16_weights_load_into_float32_model(tmp_path):
    path = tmp_path / "bf16.safetensors"
    src = Net(seed=3)
    save_safetensors(path, {k: v.astype(ml_dtypes.bfloat16) for k, v in src.state_dict().items()})
    dst = Net(seed=4)
    load_model(dst, path)
    assert dst.wte.dtype == np.float32
    np.testing.assert_array_equal(dst.wte.data, src.wte.data.astype(ml_dtypes.bfloat16).astype(np.float32))


# ---------------------------------------------------------------------- optimizers
def _opt(model: Net) -> AdamW:
    ps = model.parameters()
    return AdamW([{"params": [p for p in ps if p.ndim == 2], "weight_decay": 0.1},
                  {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}], lr=1e-2)


def _train(model: Net, opt: AdamW, sched: WarmupCosine, steps: range) -> None:
    for t in steps:
        apply_lr(opt, sched(t))
        rng = np.random.default_rng(t)
        for p in model.parameters():
            p.grad = rng.standard_normal(p.shape).astype(np.float32)
        opt.step()


def test_optimizer_checkpoint_resume_is_bitwise(tmp_path):
    sched = WarmupCosine(max_lr=1e-2, min_lr=1e-3, warmup_steps=2, decay_steps=8)
    ref = Net()
    ref_opt = _opt(ref)
    _train(ref, ref_opt, sched, range(8))

    a = Net()
    a_opt = _opt(a)
    _train(a, a_opt, sched, range(4))
    save_model(a, tmp_path / "model.safetensors")
    save_optimizer(a_opt, tmp_path / "optimizer.safetensors", schedule=sched)

    b = Net(seed=5)
    b_opt = _opt(b)
    b_sched = WarmupCosine(max_lr=1.0, min_lr=0.5, warmup_steps=0, decay_steps=1)
    load_model(b, tmp_path / "model.safetensors")
    load_optimizer(b_opt, tmp_path / "optimizer.safetensors", schedule=b_sched)
    assert b_sched.state_dict() == sched.state_dict()
    _train(b, b_opt, b_sched, range(4, 8))
    for (n, x), y in zip(ref.named_parameters(), b.parameters()):
        assert x.data.tobytes() == y.data.tobytes(), n


def test_load_optimizer_mismatch_names_the_file(tmp_path):
    a = Net()
    a_opt = _opt(a)
    _train(a, a_opt, WarmupCosine(1e-2, 1e-3, 1, 4), range(2))
    path = tmp_path / "optimizer.safetensors"
    save_optimizer(a_opt, path)
    other = AdamW(Net().parameters())
    with pytest.raises(ValueError, match=r"(?s)optimizer.safetensors: .*2 param groups saved, this optimizer has 1"):
        load_optimizer(other, path)
    plain = tmp_path / "plain.safetensors"
    save_safetensors(plain, {"x": np.zeros(1)})
    with pytest.raises(ValueError, match="plain.safetensors: no optimizer state"):
        load_optimizer(other, plain)


# ---------------------------------------------------------------------- hardened loading
def _raw(header: dict, data: bytes) -> bytes:
    import json
    import struct
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("header,data,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16, "needs 8 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlapping"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 10 ** 30]}}, b"\0" * 8, "data_offsets|needs"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": "0-8"}}, b"\0" * 8, "data_offsets"),
    ({"a": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype 'Q99'"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
    ({"a": {"dtype": "F32", "shape": None, "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
    ({"a": [1, 2]}, b"", "not a JSON object"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ({"__metadata__": {"tinygrad_lm.bf16_as_uint16": "{}"}}, b"", "JSON list"),
    ({"__metadata__": {"tinygrad_lm.bf16_as_uint16": '["a"]'},
      "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "not a U16"),
])
def test_bad_headers_are_refused(tmp_path, header, data, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_raw(header, data))
    with pytest.raises(ser.SafetensorsError, match=f"bad.safetensors.*({match})"):
        load_safetensors(path)


def test_deeply_nested_header_is_refused(tmp_path):
    import struct
    path = tmp_path / "deep.safetensors"
    h = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(h)) + h)
    with pytest.raises(ValueError, match="deep.safetensors"):
        load_safetensors(path)
    with pytest.raises(ValueError, match="deep.safetensors"):
        ser.read_safetensors_header(path)


def test_read_header_only(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors(path, {"w": np.zeros((3, 4), np.float32)})
    h = ser.read_safetensors_header(path)
    assert h["w"]["dtype"] == "F32" and h["w"]["shape"] == [3, 4]
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="x.safetensors"):
        ser.read_safetensors_header(path)


def test_integer_array_into_float_parameter_is_refused(tmp_path):
    path = tmp_path / "ints.safetensors"
    sd = Net().state_dict()
    sd["wte"] = np.zeros((5, 3), np.int32)
    save_safetensors(path, sd)
    with pytest.raises(ValueError, match=r"ints.safetensors: 'wte' is stored as int32 \(5, 3\).*float32 \(5, 3\)"):
        load_model(Net(), path)


def test_shape_mismatch_names_both_shapes(tmp_path):
    path = tmp_path / "shape.safetensors"
    sd = Net().state_dict()
    sd["wte"] = np.zeros((6, 3), np.float32)
    save_safetensors(path, sd)
    with pytest.raises(KeyError, match=r"shape.safetensors.*wte.*\(6, 3\).*\(5, 3\)"):
        load_model(Net(), path)


def _meta_edit(path, fn):
    import json
    arrays, meta = load_safetensors(path)
    m = json.loads(meta[ser._OPTIMIZER_KEY])
    fn(m)
    meta[ser._OPTIMIZER_KEY] = json.dumps(m)
    save_safetensors(path, arrays, meta)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["param_groups"][0].update(lr="abc"), "'lr'"),
    (lambda m: m["param_groups"][0].update(lr=-1.0), "'lr'"),
    (lambda m: m["param_groups"][0].update(betas=[2.0, 0.5]), "'betas'"),
    (lambda m: m["param_groups"][0].update(betas=None), "'betas'"),
    (lambda m: m["param_groups"][0].update(params="all"), "'params'"),
    (lambda m: m["param_groups"][1].update(eps=float("nan")), "'eps'"),
    (lambda m: m["state"]["0"].update(step="x"), "'step'"),
    (lambda m: m["state"]["0"].update(step=-3), "'step'"),
    (lambda m: m.update(state=[1]), "'state'"),
    (lambda m: m.update(param_groups={"a": 1}), "'param_groups'"),
    (lambda m: m.update(type=None), "'type'"),
])
def test_bad_optimizer_metadata_is_refused_at_load(tmp_path, edit, match):
    a = Net()
    opt = _opt(a)
    _train(a, opt, WarmupCosine(1e-2, 1e-3, 1, 4), range(2))
    path = tmp_path / "optimizer.safetensors"
    save_optimizer(opt, path)
    _meta_edit(path, edit)
    with pytest.raises(ser.SafetensorsError, match=f"optimizer.safetensors: optimizer metadata .*{match}"):
        load_optimizer(_opt(Net()), path)


def test_bad_schedule_metadata_is_refused(tmp_path):
    a = Net()
    opt = _opt(a)
    path = tmp_path / "optimizer.safetensors"
    save_optimizer(opt, path, schedule=WarmupCosine(1e-2, 1e-3, 1, 4))
    arrays, meta = load_safetensors(path)
    meta[ser._SCHEDULE_KEY] = '{"name": "WarmupCosine", "max_lr": null}'
    save_safetensors(path, arrays, meta)
    with pytest.raises(ser.SafetensorsError, match="optimizer.safetensors"):
        load_optimizer(_opt(Net()), path, schedule=WarmupCosine(1, 1, 1, 1))


def test_no_pickle_anywhere():
    import inspect
    for mod in (ser,):
        assert "pickle" not in inspect.getsource(mod).replace("unlike pickle", "")
