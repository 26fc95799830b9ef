"""Tour 6: the same GPT training on several processes at once (data parallelism over MPI).

    OMP_NUM_THREADS=1 mpiexec -n 2 python examples/06_mpi_training.py [--data FILE] [--iters 50]

(one BLAS thread per rank: the ranks already use one core each). Every rank (process)
holds the whole model. `--batch-size` is the batch of one rank, as in `python -m
tinygrad_lm train`: the global batch is batch_size x ranks. Each step, the global batch
is drawn once and cut into one slice per rank; every rank computes gradients on its slice, then

    world.allreduce_grads(params)     # grad = mean over ranks of each rank's grad

so every rank applies the same update and the weights stay identical - checked at
the end. Two ranks with batch b each compute exactly what one process computes with
batch 2b. Run without mpiexec, the same script trains as one process (world size 1).
The loop is written out by hand here; `python -m tinygrad_lm train` does the same
inside its Trainer (`OMP_NUM_THREADS=1 mpiexec -n 2 python -m tinygrad_lm train --preset shakespeare-char
--batch-size 6`).

It prints (rank 0 only; the losses depend on the corpus):

    world: 2 ranks; global batch 12 = 2 x 6
    model: 8... parameters; corpus ... characters, vocab ...
    step   0  loss 4.4...
    ...
    step  49  loss 2.7...
    weights identical on all 2 ranks: True
"""
from __future__ import annotations

import argparse

import numpy as np

from nn.distributed import init
from nn.optim import AdamW
from nn.utils import clip_grad_norm_
from tinygrad_lm.data import TokenData, read_corpus, resolve_corpus
from tinygrad_lm.model import GPT, GPTConfig
from tinygrad_lm.tokenizer import CharTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=6, help="sequences per rank; global batch = batch_size x ranks")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()

    world = init()  # MPI when launched by mpiexec with several ranks, else a world of one
    say = print if world.is_main else (lambda *a: None)
    per_rank = args.batch_size
    global_batch = per_rank * world.size
    say(f"world: {world.size} rank{'s' if world.size > 1 else ''}; global batch {global_batch} = "
        f"{world.size} x {per_rank}")

    text = read_corpus(resolve_corpus(args.data))
    tok = CharTokenizer.train(text)
    data = TokenData(np.array(tok.encode(text), dtype=np.int64), block_size=64)
    # the shakespeare-char model; the same seed on every rank (broadcast makes sure anyway)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128,
                          pos_encoding="learned"), seed=args.seed)
    world.broadcast_parameters(model.parameters())
    opt = AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    say(f"model: {model.num_parameters():,} parameters; corpus {len(text):,} characters, vocab {tok.vocab_size}")

    for step in range(args.iters):
        x, y = data.get_batch("train", global_batch, args.seed, step)   # the same global batch everywhere
        mine = slice(world.rank * per_rank, (world.rank + 1) * per_rank)  # ... and this rank's slice of it
        _, loss = model(x[mine], y[mine])
        loss.backward()
        world.allreduce_grads(model.parameters())                          # average the gradients
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        mean_loss = world.allreduce_mean(loss.item())                       # for printing only
        if step % 10 == 0 or step == args.iters - 1:
            say(f"step {step:3d}  loss {mean_loss:.4f}")

    checksum = float(sum(np.abs(p.numpy()).astype(np.float64).sum() for p in model.parameters()))
    same = not world.any(abs(world.allreduce_mean(checksum) - checksum) > 1e-9 * checksum)
    say(f"weights identical on all {world.size} rank{'s' if world.size > 1 else ''}: {same}")


if __name__ == "__main__":
    main()
