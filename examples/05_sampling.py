"""Tour 5: sampling - turning a trained GPT's next-token probabilities into text.

A GPT outputs logits for the next token. How we pick from them decides the text:
  * greedy (temperature 0): always the most likely token - safe, repetitive;
  * temperature T: divide the logits by T first (T < 1 sharper, T > 1 flatter);
  * top-k: keep only the k most likely tokens; top-p: the smallest set holding
    probability p. Both cut off the long tail of unlikely tokens.
We first show the filters on a toy distribution, then sample from the checkpoint of
Tour 4 (the KV cache makes each new token cost one position, not the whole window).

    python examples/05_sampling.py --ckpt runs/tour [--prompt "ROMEO:"] [--max-new-tokens 200]

It prints (the samples depend on the checkpoint):

    toy logits [2.0, 1.0, 0.5, 0.0, -1.0]
      temperature 1.0         -> p = [0.563  0.2071 0.1256 0.0762 0.028 ]
      temperature 0.5         -> p = [0.8292 0.1122 0.0413 0.0152 0.0021]
      top-k 2                 -> p = [0.7311 0.2689 0.     0.     0.    ]
      top-p 0.8               -> p = [0.6285 0.2312 0.1402 0.     0.    ]
    ---- greedy ----
    ROMEO:...
    ---- temperature 0.8, top-k 50, seed 0 ----
    ROMEO:...
    ---- top-p 0.9, seed 1 ----
    ROMEO:...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from tinygrad_lm.sample import filtered_probs, generate, load_checkpoint_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="runs/tour", help="run directory of Tour 4 (or any checkpoint)")
    ap.add_argument("--prompt", default="ROMEO:")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    args = ap.parse_args()

    np.set_printoptions(precision=4, suppress=True)
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0])
    print(f"toy logits {logits.tolist()}")
    for label, kw in (("temperature 1.0", {}), ("temperature 0.5", {"temperature": 0.5}),
                      ("top-k 2", {"top_k": 2}), ("top-p 0.8", {"top_p": 0.8})):
        print(f"  {label:<23} -> p = {filtered_probs(logits[None], **kw)[0]}")

    if not Path(args.ckpt).exists():
        print(f"no checkpoint at {args.ckpt}: train one first with  python examples/04_shakespeare_gpt.py "
              f"--out {args.ckpt}", file=sys.stderr)
        return 1
    model, tok = load_checkpoint_model(args.ckpt)
    prompt = np.array([tok.encode(args.prompt)], dtype=np.int64)
    for title, kw in (("greedy", dict(temperature=0.0)),
                      ("temperature 0.8, top-k 50, seed 0", dict(temperature=0.8, top_k=50, seed=0)),
                      ("top-p 0.9, seed 1", dict(temperature=1.0, top_p=0.9, seed=1))):
        ids = generate(model, prompt, args.max_new_tokens, **kw)
        print(f"---- {title} ----")
        print(tok.decode(ids[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
