"""Hugging Face GPT-2 interop: read a local GPT-2 directory into our GPT, and write one back.

    model = load_hf("path/to/gpt2")            # config.json + model.safetensors -> GPT (eval mode)
    export_hf(model, "out/gpt2-finetuned")     # -> config.json + model.safetensors for transformers

GPT-2 is our GPT with `pos_encoding="learned"`, biases on, GELU (tanh), LayerNorm eps 1e-5 and
lm_head tied to wte (docs/DESIGN.md). The names map one to one after an optional `transformer.`
prefix. Two things differ:

* HF's GPT-2 uses `Conv1D` for `attn.c_attn`, `attn.c_proj`, `mlp.c_fc` and `mlp.c_proj`: its
  weight is (in, out) and computes `x @ W + b`; our Linear's weight is (out, in) and computes
  `x @ W.T + b`. So those four weights are transposed on load and on export.
* HF files may hold the attention-mask buffers `attn.bias` / `attn.masked_bias` (constants, not
  weights): they are dropped. A stored `lm_head.weight` must equal `wte.weight` (tied).

Anything else in config.json that our GPT cannot represent is refused with an `HFError` (a
`UserError`) naming the file, the field and its value. Nothing is downloaded: the user points
at files they have. Weights are read one tensor at a time straight into the model's parameters,
so loading holds about one copy of the weights (plus the largest tensor).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nn.init import Placeholders
from nn.serialization import atomic_write, iter_safetensors, read_safetensors_header, save_safetensors
from tensor import backend
from tinygrad_lm.errors import UserError
from tinygrad_lm.model import GPT, GPTConfig

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BUFFERS = ("attn.bias", "attn.masked_bias")  # HF's causal-mask constants, not weights
PREFIX = "transformer."
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
LN_EPS = 1e-5


class HFError(UserError, ValueError):
    """A Hugging Face directory we cannot read, or a model we cannot write as GPT-2; the message names why."""


# ------------------------------------------------------------------ config.json
def _field(cfg: dict, name: str, where: str) -> int:
    v = cfg.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise HFError(f"{where}: field {name!r} must be a positive integer, got {v!r}")
    return v


def config_from_hf(cfg: dict, where: str = CONFIG_FILE, dropout: float = 0.0) -> GPTConfig:
    """A GPT2Config dict (config.json) -> our GPTConfig; HFError naming the field we cannot represent."""
    if not isinstance(cfg, dict):
        raise HFError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise HFError(f"{where}: field 'model_type' is {cfg['model_type']!r}; only 'gpt2' checkpoints can be read")
    n_embd = _field(cfg, "n_embd", where)
    # field -> (value when absent, the accepted values, why)
    rules = {
        "activation_function": ("gelu_new", GELU_TANH, "our MLP uses GELU with the tanh approximation"),
        "n_inner": (None, (None, 4 * n_embd), f"our MLP is 4 * n_embd = {4 * n_embd} wide"),
        "scale_attn_weights": (True, (True,), "our attention scales by 1/sqrt(head size)"),
        "scale_attn_by_inverse_layer_idx": (False, (False,), "our attention has no per-layer scale"),
        "reorder_and_upcast_attn": (False, (False,), "our attention has no reordered/upcast variant"),
        "tie_word_embeddings": (True, (True,), "our lm_head is tied to wte"),
        "add_cross_attention": (False, (False,), "our blocks have no cross-attention"),
    }
    for name, (default, ok, why) in rules.items():
        v = cfg.get(name, default)
        if not any(type(v) is type(a) and v == a for a in ok):  # (True is not 1, None is not 0)
            raise HFError(f"{where}: field {name!r} is {v!r}, which this GPT cannot represent ({why}; "
                          f"expected {' or '.join(map(repr, ok))})")
    eps = cfg.get("layer_norm_epsilon", LN_EPS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isclose(eps, LN_EPS, rel_tol=1e-6):
        raise HFError(f"{where}: field 'layer_norm_epsilon' is {eps!r}, which this GPT cannot represent "
                      f"(its LayerNorm eps is {LN_EPS})")
    try:
        return GPTConfig(vocab_size=_field(cfg, "vocab_size", where), block_size=_field(cfg, "n_positions", where),
                         n_layer=_field(cfg, "n_layer", where), n_head=_field(cfg, "n_head", where), n_embd=n_embd,
                         dropout=dropout, bias=True, pos_encoding="learned", norm="layernorm")
    except ValueError as e:  # e.g. n_embd not divisible by n_head
        raise HFError(f"{where}: {e}") from None


def config_to_hf(cfg: GPTConfig) -> dict:
    """Our GPTConfig -> a GPT2Config dict (config.json) for transformers' GPT2LMHeadModel."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": LN_EPS, "initializer_range": 0.02,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True, "torch_dtype": "float32",
        "bos_token_id": cfg.vocab_size - 1, "eos_token_id": cfg.vocab_size - 1,  # <|endoftext|> is last in GPT-2
    }


# ------------------------------------------------------------------ weights
def _is_conv1d(name: str) -> bool:
    return name.startswith("transformer.h.") and name.split(".", 3)[3] in CONV1D


def _read_tensors(path: Path, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for each name, read one at a time."""
    header = read_safetensors_header(path)
    for name in names:
        if header[name]["dtype"] not in ("F32", "F16", "F64", "BF16"):
            raise HFError(f"{path}: tensor {name!r} has dtype {header[name]['dtype']}, expected a float type "
                          "(F32, F16, BF16, F64)")
    for name, arr in iter_safetensors(path, names):
        yield name, arr.astype(np.float32, copy=False)


def _plan(path: Path, model: GPT) -> tuple[dict[str, str], str | None]:
    """Our name -> the file's name for every parameter, and the file's lm_head name (or None);
    HFError listing missing, extra or mis-shaped tensors."""
    header = read_safetensors_header(path)
    ours = {n: p.shape for n, p in model.named_parameters()}
    found: dict[str, str] = {}
    extra, lm_head = [], None
    for name in header:
        if name == "__metadata__":
            continue
        bare = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if bare == "lm_head.weight" or name == "lm_head.weight":
            lm_head = name
        elif bare.startswith("h.") and bare.split(".", 2)[-1] in BUFFERS:
            continue
        elif PREFIX + bare in ours:
            if PREFIX + bare in found:
                raise HFError(f"{path}: tensor {bare!r} appears twice (as {found[PREFIX + bare]!r} and {name!r})")
            found[PREFIX + bare] = name
        else:
            extra.append(name)
    missing = [n for n in ours if n not in found]
    bad = []
    for ours_name, file_name in found.items():
        want = ours[ours_name][::-1] if _is_conv1d(ours_name) else ours[ours_name]
        if tuple(header[file_name]["shape"]) != tuple(want):
            bad.append(f"{file_name}: {tuple(header[file_name]['shape'])}, expected {tuple(want)}")
    if lm_head is not None and tuple(header[lm_head]["shape"]) != ours["transformer.wte.weight"]:
        bad.append(f"{lm_head}: {tuple(header[lm_head]['shape'])}, expected {ours['transformer.wte.weight']} (tied)")
    if missing or extra or bad:
        parts = ([f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}"] if missing else []) + \
                ([f"unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''}"] if extra else []) + \
                ([f"wrong shapes: {'; '.join(bad[:8])}"] if bad else [])
        raise HFError(f"{path} does not hold the GPT-2 that config.json describes: " + "; ".join(parts))
    return found, lm_head


def _hf_dir(path: str | os.PathLike) -> tuple[Path, Path]:
    d = Path(path)
    if not d.is_dir():
        raise HFError(f"{d}: not a directory; expected a Hugging Face GPT-2 directory holding "
                      f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            hint = (" (sharded checkpoints are not supported: merge the shards into one file)"
                    if name == WEIGHTS_FILE and (d / (WEIGHTS_FILE + ".index.json")).exists() else
                    " (a pytorch_model.bin is not read: pickle is never loaded; convert it to safetensors)"
                    if name == WEIGHTS_FILE and (d / "pytorch_model.bin").exists() else "")
            raise HFError(f"{d}: no {name}{hint}")
    return d / CONFIG_FILE, d / WEIGHTS_FILE


def read_hf_config(path: str | os.PathLike, dropout: float = 0.0) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 directory (reads config.json only)."""
    config_path, _ = _hf_dir(path)
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"{config_path}: cannot read it as JSON ({e})") from None
    return config_from_hf(cfg, str(config_path), dropout)


def iter_hf_weights(path: str | os.PathLike, block_size: int | None = None,
                    names: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """(our parameter name, float32 array in our layout) for each parameter of the GPT-2 in a local Hugging
    Face directory (or only those in `names`), read one at a time: the Conv1D weights transposed, wpe cut to
    its first block_size rows. The file is checked first (_plan: every tensor present, the right shapes;
    a stored lm_head must equal wte). Every problem is an HFError naming the file."""
    from nn.serialization import SafetensorsError, load_safetensors
    cfg = read_hf_config(path)
    _, weights = _hf_dir(path)
    if block_size is not None and not 0 < block_size <= cfg.block_size:
        raise HFError(f"{path}: block_size {block_size} must be in [1, {cfg.block_size}] "
                      "(the checkpoint's n_positions)")
    try:
        found, lm_head = _plan(weights, GPT(cfg, rng=Placeholders()))  # (shapes only: no weights drawn)
        if lm_head is not None:  # stored although tied: it must be wte (compared in the mapped file)
            mapped, _ = load_safetensors(weights, mmap=True)
            if not np.array_equal(mapped[lm_head], mapped[found["transformer.wte.weight"]]):
                raise HFError(f"{weights}: {lm_head!r} differs from wte.weight; untied output embeddings cannot "
                              "be represented (our lm_head is tied to wte)")
            del mapped
        ours_of = {file_name: ours for ours, file_name in found.items() if names is None or ours in names}
        for file_name, arr in _read_tensors(weights, list(ours_of)):
            ours = ours_of[file_name]
            arr = np.ascontiguousarray(arr.T) if _is_conv1d(ours) else arr
            if ours == "transformer.wpe.weight" and block_size is not None and block_size < cfg.block_size:
                arr = arr[:block_size].copy()
            yield ours, arr
            del arr
    except SafetensorsError as e:
        raise HFError(str(e)) from None


def load_hf(path: str | os.PathLike, dropout: float = 0.0, block_size: int | None = None) -> GPT:
    """A local Hugging Face GPT-2 directory (config.json + model.safetensors) -> our GPT (float32, CPU, eval mode).

    block_size: a shorter context than the checkpoint's n_positions keeps the first rows of wpe (as nanoGPT's
    crop_block_size). Every problem is an HFError naming the file and what is wrong.
    """
    cfg = read_hf_config(path, dropout)
    if block_size is not None and 0 < block_size < cfg.block_size:
        cfg.block_size = block_size
    model = GPT(cfg, rng=Placeholders())  # no weights drawn: every parameter is read below
    params = dict(model.named_parameters())
    for ours, arr in iter_hf_weights(path, block_size):
        p = params[ours]
        p.data = backend.to_device(arr, backend.device_of(p.data))
    return model.eval()


def export_hf(model: GPT, out_dir: str | os.PathLike) -> Path:
    """Write `model` as a Hugging Face GPT-2 directory (config.json + model.safetensors) that
    `transformers.GPT2LMHeadModel.from_pretrained(out_dir)` loads. Refuses (HFError) a model
    GPT-2 cannot represent. A model without biases is written with zero biases (the same function); a
    table padded past the vocabulary (pad_vocab_to) is cropped to vocab_size rows (the padding is never a token)."""
    cfg = model.config
    why = {"sinusoidal": "sinusoidal positions with the sqrt(n_embd) embedding scale (GPT-2 adds a learned wpe "
                         "to the unscaled, tied wte)",
           "rope": "rotary positions (GPT-2 has a learned wpe table)"}.get(cfg.pos_encoding)
    if why is None and cfg.norm != "layernorm":
        why = f"norm {cfg.norm!r} (GPT-2 uses LayerNorm with a bias)"
    if why:
        raise HFError(f"export: GPT-2 cannot represent this model: it uses {why}; train with --pos-encoding learned "
                      "--norm layernorm to export it")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HFError(f"export: cannot create {out}: {e.strerror or e}") from None
    tensors: dict[str, Any] = {}
    for name, p in model.named_parameters():
        arr = backend.to_numpy(p.data)
        if name == "transformer.wte.weight":  # a padded table (pad_vocab_to): the real vocabulary's rows
            arr = arr[:cfg.vocab_size]
        tensors[name] = arr.T if _is_conv1d(name) else arr
    if not cfg.bias:  # GPT-2 always has biases: zeros compute the same function
        for name, p in model.named_parameters():
            if name.endswith(".weight") and (".ln_" in name or name.startswith("transformer.ln_f")
                                             or _is_conv1d(name)):
                tensors[name[:-len("weight")] + "bias"] = np.zeros(p.shape[0], np.float32)
    save_safetensors(out / WEIGHTS_FILE, {k: np.asarray(v, np.float32) for k, v in tensors.items()},
                     {"format": "pt"})
    atomic_write(out / CONFIG_FILE, json.dumps(config_to_hf(cfg), indent=2) + "\n")
    return out
