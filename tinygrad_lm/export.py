"""`python -m tinygrad_lm export`: a checkpoint written for another use.

    python -m tinygrad_lm export --ckpt RUN --out DIR [--quantize int8]   # an inference checkpoint
    python -m tinygrad_lm export --ckpt RUN --hf OUT                      # a Hugging Face GPT-2 directory

--out: DIR is a checkpoint directory that `sample --ckpt DIR` loads: model.safetensors, state.json and
tokenizer.json (copied from the source checkpoint, so the model config, step and tokenizer are
the trained ones), sealed by manifest.json with every file's SHA-256 (tinygrad_lm/checkpoint.py),
written into DIR.tmp and renamed when complete. It has no optimizer state: it is for sampling.
With --quantize int8, model.safetensors holds every Linear weight and the tied wte/lm_head as
int8 `NAME.weight` (out, in) plus float32 `NAME.weight_scale` (out,), per output channel
(nn/quant.py); biases, norms and wpe stay float32. Its header metadata says
{"quantization": "int8"}. The file is ~4x smaller than float32.

--hf: OUT holds config.json and model.safetensors in GPT-2's layout (tinygrad_lm/hf.py), which
`transformers.GPT2LMHeadModel.from_pretrained(OUT)` loads. Models GPT-2 cannot represent
(sinusoidal or rotary positions, RMSNorm) are refused with the reason.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from tinygrad_lm import checkpoint as ckpt_io
from tinygrad_lm.errors import UserError

QUANTIZE_MODES = ("none", "int8")
QUANT_KEY = "quantization"


def stored_quantization(ckpt: Path) -> str:
    """"int8" or "none": what model.safetensors' header metadata says (CheckpointError for anything else)."""
    from nn.serialization import read_safetensors_header
    path = ckpt / ckpt_io.MODEL_FILE
    try:
        meta = read_safetensors_header(path).get("__metadata__") or {}
    except FileNotFoundError:
        raise ckpt_io.CheckpointError(f"checkpoint {ckpt} has no {ckpt_io.MODEL_FILE}") from None
    except (OSError, ValueError) as e:
        raise ckpt_io.CheckpointError(str(e)) from None
    q = meta.get(QUANT_KEY, "none")
    if q not in QUANTIZE_MODES:
        raise ckpt_io.CheckpointError(f"{path}: metadata {QUANT_KEY!r} is {q!r}; expected one of {QUANTIZE_MODES}")
    return q


def int8_shapes(float_shapes: dict[str, tuple]) -> dict[str, tuple]:
    """The arrays of an int8 model.safetensors given the float model's (tinygrad_lm.memory.param_shapes):
    the same names and shapes, plus NAME.weight_scale (out,) for every quantized weight (every 2-D
    weight but the position table wpe)."""
    out = dict(float_shapes)
    for name, shape in float_shapes.items():
        if len(shape) == 2 and name != "transformer.wpe.weight":
            out[name[:-len(".weight")] + ".weight_scale"] = (shape[0],)
    return out


def load_weights(model: Any, ckpt: Path, quantize: str | None = None) -> Any:
    """Load ckpt's model.safetensors into `model` (a fresh GPT of its config), quantized as stored;
    quantize "int8" quantizes float weights after loading, "none" refuses int8 weights, None takes
    what is stored. Every problem with the file is a CheckpointError naming it."""
    from nn.quant import load_quantized_state_dict, quantize_
    from nn.serialization import load_model, load_safetensors
    path = ckpt / ckpt_io.MODEL_FILE
    stored = stored_quantization(ckpt)
    if stored == "int8" and quantize == "none":
        raise UserError(f"--quantize none: {path} holds int8 weights (written by `export --quantize int8`); "
                        "sample the float checkpoint it was exported from instead")
    try:
        if stored == "int8":
            quantize_(model)
            load_quantized_state_dict(model, load_safetensors(path)[0])
        else:
            load_model(model, path)
            if quantize == "int8":
                quantize_(model)
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ckpt_io.CheckpointError(f"cannot load {path}: {msg}") from None
    return model


def export(src: str, out: str, quantize: str = "none", overwrite: bool = False) -> Path:
    """Write the inference checkpoint DIR `out` from the checkpoint or run `src` (module docstring)."""
    from nn.quant import quantized_state_dict
    from nn.serialization import save_safetensors
    from tinygrad_lm.sample import load_checkpoint_model
    if quantize not in QUANTIZE_MODES:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    dst = Path(out)
    if dst.exists() and not overwrite:
        raise UserError(f"--out {dst} exists; pass --overwrite to replace it")
    ckpt = ckpt_io.resolve(src)
    if dst.resolve() == ckpt.resolve() or ckpt.resolve() in dst.resolve().parents:
        raise UserError(f"--out {dst} is inside the source checkpoint {ckpt}; choose another directory")
    model, _ = load_checkpoint_model(str(ckpt), quantize=quantize)
    step = ckpt_io.read_state(ckpt, verify_files=False)["step"]
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_safetensors(tmp / ckpt_io.MODEL_FILE, quantized_state_dict(model), {"format": "pt", QUANT_KEY: quantize})
    for name in (ckpt_io.STATE_FILE, ckpt_io.TOKENIZER_FILE):
        ckpt_io.atomic_write(tmp / name, (ckpt / name).read_bytes())
    ckpt_io.write_manifest(tmp, step)
    ckpt_io.verify(tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    ckpt_io.fsync_dir(dst.parent if str(dst.parent) else Path("."))
    return dst


def add_cli(sub: Any) -> None:
    p = sub.add_parser("export", help="write an inference checkpoint (optionally int8) or a Hugging Face GPT-2 directory",
                       description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="run or checkpoint directory to export")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="the directory to write (a checkpoint for `sample --ckpt`)")
    where.add_argument("--hf", metavar="OUT", help="write a Hugging Face GPT-2 directory (config.json + model.safetensors)")
    p.add_argument("--quantize", default="none", choices=QUANTIZE_MODES,
                   help="with --out: int8 per-output-channel weights, ~4x smaller (default none: float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export")
    p.set_defaults(func=cli_export)


def cli_export(args: argparse.Namespace) -> int:
    if args.hf:
        if args.quantize != "none":
            raise UserError("--quantize goes with --out; a Hugging Face export (--hf) holds float weights")
        return export_hf_dir(args.ckpt, Path(args.hf), args.overwrite)
    dst = export(args.ckpt, args.out, args.quantize, args.overwrite)
    size = (dst / ckpt_io.MODEL_FILE).stat().st_size
    print(f"wrote {dst} ({ckpt_io.MODEL_FILE}: {size:,} bytes, quantization {args.quantize})")
    return 0


def export_hf_dir(ckpt: str, out: Path, overwrite: bool) -> int:
    """Write the checkpoint `ckpt` as a Hugging Face GPT-2 directory `out` (module docstring)."""
    from tinygrad_lm.hf import CONFIG_FILE, WEIGHTS_FILE, export_hf
    from tinygrad_lm.sample import load_checkpoint_model
    if out.exists() and not out.is_dir():
        raise UserError(f"--hf {out}: exists and is not a directory")
    earlier = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if (out / name).exists()]
    if earlier and not overwrite:
        raise UserError(f"--hf {out} already holds {' and '.join(earlier)}; pass --overwrite to replace them")
    model, _ = load_checkpoint_model(ckpt)
    export_hf(model, out)
    print(f"wrote {out / CONFIG_FILE} and {out / WEIGHTS_FILE} ({model.config.n_layer} layers, "
          f"{sum(p.size for p in model.parameters()):,} parameters)")
    return 0
