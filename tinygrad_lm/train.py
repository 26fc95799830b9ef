"""Train a GPT: the `train` command.

    python -m tinygrad_lm train --preset shakespeare-char --max-iters 600 --out runs/demo
    python -m tinygrad_lm train --resume runs/demo --max-iters 2000
    OMP_NUM_THREADS=1 mpiexec -n 4 python -m tinygrad_lm train --preset shakespeare-char --batch-size 3

Settings: preset < --config FILE (TOML or JSON) < flags (tinygrad_lm/config.py). The loop,
evaluation and checkpoints are the Trainer's (tinygrad_lm/trainer.py); this module is the
command line and re-exports what scripts import from here.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from nn.distributed import init as init_world, run_or_abort
from tensor import backend
from tensor.tensor import no_grad  # noqa: F401  (re-exported)
from tinygrad_lm import checkpoint as ckpt_io
from tinygrad_lm.config import (LAYOUT, PRESETS, RESUMABLE, ConfigError, TrainConfig, flag, load_config_file,  # noqa: F401
                                make_config, model_fields, train_fields)
from tinygrad_lm.data import build_tokenizer  # noqa: F401
from tinygrad_lm.errors import UserError
from tinygrad_lm.gradient_step import GradientStep, NonFiniteLoss, make_optimizer, make_schedule  # noqa: F401
from tinygrad_lm.plot import plot_losses, truncate_metrics  # noqa: F401
from tinygrad_lm.trainer import Trainer, agree_started

__all__ = ["Trainer", "TrainConfig", "make_config", "build_tokenizer", "PRESETS", "add_cli", "cli_train"]

HELP = {
    "data": "corpus: a file, a folder of *.txt, a glob, or 'shakespeare' (the default)",
    "tokenizer": "'char', 'bpe:VOCAB' (learned from the corpus, cached), a tokenizer .json file or GPT-2's "
                 "vocabulary as a .tiktoken file",
    "init_from": "fine-tune from a Hugging Face GPT-2 directory (config.json + model.safetensors); the model "
                 "settings come from it",
    "batch_size": "sequences per micro-batch on each rank; global batch = batch_size x grad_accum x data-parallel ranks",
    "grad_accum": "micro-batches per optimizer step",
    "out": "run directory (checkpoints, metrics.jsonl, loss.png)",
    "collective_timeout": "MPI: abort the job when a collective waits longer than this many seconds (0: never)",
    "zero": "1: ZeRO stage 1, the optimizer state sharded over the MPI ranks",
    "cuda_graph": "GPU: record forward+backward once as a CUDA graph and replay it",
    "tf32": "GPU: float32 GEMMs on the TF32 tensor cores (~1e-3 relative error, as PyTorch's allow_tf32); "
            "no effect on the CPU or on --precision bf16/fp16's 16-bit GEMMs",
    "tp": "tensor-parallel ranks (Megatron-LM: attention heads, MLP and vocabulary split over them)",
    "pp": "pipeline-parallel stages (the blocks split over them; --grad-accum micro-batches)",
    "dp": "data-parallel ranks (0: world size / (tp x pp)); world size = dp x tp x pp",
    "pp_schedule": "pipeline schedule: gpipe or 1f1b",
}


def add_cli(sub: Any) -> None:
    p = sub.add_parser("train", help="train a GPT", description=__doc__.splitlines()[0],
                       epilog="On --resume only these may change: " + ", ".join(flag(k) for k in RESUMABLE))
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration")
    p.add_argument("--config", help="a .toml or .json file of settings (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue a run from its run or checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds an earlier run: delete its checkpoints and logs and start over")
    for name, default in {**model_fields(), **train_fields()}.items():
        names = [flag(name)] + (["--out-dir"] if name == "out" else [])
        flag_kw: dict[str, Any] = dict(metavar=name.upper())
        if isinstance(default, bool):  # `--cuda-graph` alone means `--cuda-graph true`
            flag_kw = dict(metavar="true|false", nargs="?", const="true")
        p.add_argument(*names, dest=name, default=None, **flag_kw,
                       help=(HELP.get(name, "") + f" (default {default})").strip())
    p.set_defaults(func=cli_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Flags over config file over preset; with --resume, all of them over the checkpoint's settings."""
    overrides = {k: getattr(args, k) for k in {**model_fields(), **train_fields()}}
    if not args.resume:
        return make_config(args.preset, args.config, **overrides)
    ckpt = ckpt_io.resolve(args.resume)
    st = ckpt_io.read_state(ckpt)
    try:
        saved = {k: v for k, v in {**st["train_config"], **st["model_config"]}.items()
                 if (k in train_fields() or k in model_fields()) and k not in LAYOUT}
    except (KeyError, TypeError) as e:
        raise ckpt_io.CheckpointError(f"checkpoint {ckpt / ckpt_io.STATE_FILE}: no train_config/model_config ({e})")
    if args.out is None:  # the run the checkpoint lives in (the saved `out` may be relative to another cwd)
        saved["out"] = str(ckpt.parent) if (ckpt.parent / "latest").exists() else saved.get("out", "runs/default")
    if args.preset:
        saved.update(PRESETS[args.preset])
    if args.config:
        saved.update(load_config_file(args.config))
    return make_config(None, None, resolve_init_from=False,  # the model is the checkpoint's
                       **{**saved, **{k: v for k, v in overrides.items() if v is not None}})


def cli_train(args: argparse.Namespace) -> int:
    backend.tune_host_allocator()
    backend.optional_module("safetensors", "safetensors", "writing checkpoints")  # now, not at the first checkpoint
    cfg, error = None, None
    try:  # no collectives yet: a failure here on one rank must not leave the others waiting
        cfg = config_from_args(args)
        if cfg.device == "cuda":
            try:
                backend.cupy_module()
            except RuntimeError as e:
                raise UserError(f"--device cuda: {e}") from None
    except (UserError, ckpt_io.CheckpointError) as e:
        error = e
    try:
        world = init_world(reduce_dtype=None, collective_timeout=cfg.collective_timeout if cfg else 0.0)
    except RuntimeError as e:
        raise UserError(str(e)) from None
    try:
        agree_started(world, error)
        assert cfg is not None
        if not world.is_main:
            cfg.progress = False
        trainer = Trainer(cfg, resume=args.resume, log=print if world.is_main else (lambda s: None), world=world,
                          overwrite=args.overwrite)
    except ckpt_io.CheckpointError as e:
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from None
    def run() -> int:
        try:
            return trainer.run()
        except UserError as e:  # e.g. an unwritable --out on rank 0: one line, then end every rank
            if world.size == 1:
                raise
            sys.stderr.write(f"error: [rank {world.rank}] {e}; aborting all {world.size} ranks\n")
            sys.stderr.flush()
            world.abort(2)
            return 2
    return run_or_abort(world, run)
