"""Export a checkpoint as a Hugging Face GPT-2 directory: the `export` command.

    python -m tinygrad_lm export --ckpt runs/demo --hf out/gpt2-demo

The directory holds config.json and model.safetensors in GPT-2's layout (tinygrad_lm/hf.py), which
`transformers.GPT2LMHeadModel.from_pretrained("out/gpt2-demo")` loads. Models GPT-2 cannot represent
(sinusoidal or rotary positions, RMSNorm) are refused with the reason.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tinygrad_lm.errors import UserError


def add_cli(sub: Any) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face GPT-2 directory",
                       description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="run or checkpoint directory")
    p.add_argument("--hf", required=True, metavar="OUT",
                   help="the directory to write (config.json + model.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in OUT")
    p.set_defaults(func=cli_export)


def cli_export(args: argparse.Namespace) -> int:
    from tinygrad_lm.hf import CONFIG_FILE, WEIGHTS_FILE, export_hf
    from tinygrad_lm.sample import load_checkpoint_model
    out = Path(args.hf)
    if out.exists() and not out.is_dir():
        raise UserError(f"--hf {out}: exists and is not a directory")
    earlier = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if (out / name).exists()]
    if earlier and not args.overwrite:
        raise UserError(f"--hf {out} already holds {' and '.join(earlier)}; pass --overwrite to replace them")
    model, _ = load_checkpoint_model(args.ckpt)
    export_hf(model, out)
    print(f"wrote {out / CONFIG_FILE} and {out / WEIGHTS_FILE} ({model.config.n_layer} layers, "
          f"{sum(p.size for p in model.parameters()):,} parameters)")
    return 0
