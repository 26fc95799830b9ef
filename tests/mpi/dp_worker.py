"""Run under `mpiexec -n N python tests/mpi/dp_worker.py MODE OUT CORPUS` by tests/test_mpi.py.

MODE train: a few training steps of a tiny GPT; each rank records a checksum of its
             weights after every step, rank 0 saves the final weights to OUT/weights.npz.
MODE fail:   like train, but rank 1 raises at step 2 (the job must end, not hang).
MODE zero:   like train, with ZeRO-1 (optimizer state sharded); also records the
             optimizer-state bytes each rank holds.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from nn.distributed import init, run_or_abort
from tensor import backend
from tinygrad_lm.train import Trainer, make_config


def tiny_config(corpus: str, out: str, batch_size: int, steps: int, zero: int = 0, device: str = "cpu") -> object:
    return make_config(None, None, zero=zero, device=device, data=corpus, tokenizer="char", n_layer=1, n_head=2, n_embd=16, block_size=8,
                       batch_size=batch_size, max_iters=steps, warmup_iters=2, lr_decay_iters=steps, lr=1e-2,
                       eval_interval=10 ** 6, ckpt_interval=10 ** 6, log_interval=10 ** 6, sample_tokens=0,
                       progress=False, out=out, cache_dir=str(Path(out) / "cache"), seed=5)


def main() -> int:
    mode, out, corpus = sys.argv[1], sys.argv[2], sys.argv[3]
    steps, batch = int(sys.argv[4]), int(sys.argv[5])
    device = sys.argv[6] if len(sys.argv) > 6 else "cpu"
    world = init()
    trainer = Trainer(tiny_config(corpus, out, batch, steps, zero=int(mode == "zero"), device=device), world=world,
                      log=lambda s: None)

    def work() -> int:
        sums = []
        for step in range(steps):
            if mode == "fail" and world.rank == 1 and step == 2:
                raise RuntimeError("injected failure on rank 1")
            trainer.train_step()
            sums.append(float(sum(backend.to_numpy(p.data).astype(np.float64).sum() for p in trainer.model.parameters())))
        opt = trainer.optimizer
        opt_bytes = opt.optimizer_state_bytes() if hasattr(opt, "optimizer_state_bytes") else sum(
            v.nbytes for st in opt.state.values() for v in st.values() if hasattr(v, "nbytes"))
        Path(out, f"checksums.{world.rank}.json").write_text(json.dumps({"size": world.size, "sums": sums,
                                                                          "transport": getattr(world, "transport", None),
                                                                          "optimizer_bytes": opt_bytes}))
        if world.rank == 0:
            np.savez(Path(out, "weights.npz"), **trainer.model.state_dict())
        return 0

    return run_or_abort(world, work)


if __name__ == "__main__":
    sys.exit(main())
