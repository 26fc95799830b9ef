"""Run under `mpiexec -n N python tests/mpi/pp_worker.py OUT CORPUS STEPS BATCH ACCUM PP SCHEDULE [KEY=VALUE ...]`
by tests/test_pipeline.py: a few training steps of a tiny GPT split into PP pipeline stages
(world = dp x pp, or dp x pp x tp with tp=T); rank 0 writes the loss of every step to OUT/losses.json and the run ends
with a checkpoint (gathered to rank 0) in OUT. KEY=VALUE: zero=1, resume=DIR (a checkpoint to
continue from), device=cuda, precision=fp16|bf16, tp=T (tensor parallel: world = dp x pp x tp),
dp=D (default world / (tp x pp)), lr=LR.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from nn.distributed import init, run_or_abort
from tinygrad_lm.train import Trainer, make_config


def pp_config(corpus: str, out: str, steps: int, batch: int, accum: int, pp: int = 1, schedule: str = "1f1b",
              zero: int = 0, device: str = "cpu", precision: str = "fp32", tp: int = 1, dp: int = 0, lr: float = 1e-2) -> object:
    """A tiny 4-layer GPT whose gradient clipping is active (the global norm matters)."""
    return make_config(None, None, data=corpus, tokenizer="char", n_layer=4, n_head=2, n_embd=16, block_size=8,
                       pos_encoding="learned", batch_size=batch, grad_accum=accum, max_iters=steps, warmup_iters=1,
                       lr_decay_iters=8, lr=float(lr), grad_clip=0.05, eval_interval=10 ** 6, ckpt_interval=10 ** 6,
                       log_interval=10 ** 6, eval_iters=2, sample_tokens=0, progress=False, out=out,
                       cache_dir=str(Path(out).parent / "cache"), seed=5, pp=pp, pp_schedule=schedule, zero=zero,
                       device=device, precision=precision, tp=tp, dp=dp)


def main() -> int:
    out, corpus = sys.argv[1], sys.argv[2]
    steps, batch, accum, pp = (int(a) for a in sys.argv[3:7])
    schedule = sys.argv[7]
    opts = dict(a.split("=", 1) for a in sys.argv[8:])
    resume = opts.pop("resume", None)
    for key in ("zero", "tp", "dp"):
        if key in opts:
            opts[key] = int(opts[key])
    world = init()
    trainer = Trainer(pp_config(corpus, out, steps, batch, accum, pp, schedule, **opts), resume=resume, world=world,
                      log=lambda s: None)

    def work() -> int:
        losses = []
        while trainer.step < steps:
            losses.append(trainer.check_finite(trainer.train_step()))
        evals = trainer.estimate_loss()
        trainer.save_checkpoint()
        if world.rank == 0:
            Path(out, "losses.json").write_text(json.dumps({"losses": losses, "eval": evals,
                                                            "timing": trainer.pipeline.timing if trainer.pipeline else None}))
        return 0

    return run_or_abort(world, work)


if __name__ == "__main__":
    sys.exit(main())
