"""Run under `mpiexec -n N python tests/mpi/tp_worker.py MODE OUT ...` by tests/test_tensor_parallel.py.

MODE pieces OUT:  f, g, the column-, row- and vocabulary-parallel pieces against the unsplit ops
                  (float64, tp = N), and the collectives of one GPT forward and backward;
                  rank 0 writes OUT/pieces.json.
MODE train OUT CORPUS STEPS BATCH TP ZERO [resume=CKPT] [device=cuda] [fail=1]: a few training steps of a tiny GPT on the
                  layout dp = N / TP x tp = TP (batch BATCH per data-parallel rank); rank 0 writes
                  OUT/result.json (losses) and OUT/weights.npz (the full weights); every rank
                  writes OUT/replicated.<rank>.json (checksums of its replicated parameters).
                  A checkpoint is saved at the end (OUT/run); resume=CKPT: a checkpoint to start from;
                  fail=1: rank 1 raises before step 2 while rank 0 waits in its collectives (the job must end).
MODE memory OUT CORPUS: on N = 2 ranks, a Trainer of a 4-layer, 256-wide GPT on tp 2, then one on pp 2, each built
                  under tracemalloc; every rank writes OUT/memory.<rank>.json: per layout, the bytes of its
                  parameters and the traced peak of the construction (the seed's init: every rank draws it
                  all, keeps its part).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nn.distributed import Communicator, init, run_or_abort  # noqa: E402
from nn.distributed.tensor_parallel import (ColumnParallelLinear, CountingComm, RowParallelLinear,  # noqa: E402
                                            VocabParallelEmbedding, copy_to_tp, reduce_from_tp, shard,
                                            vocab_parallel_cross_entropy)
from nn.layers import Embedding, Linear  # noqa: E402
import tensor.functional as F  # noqa: E402
from tensor import backend  # noqa: E402
from tensor.tensor import Tensor  # noqa: E402


def pieces(out: Path) -> int:
    comm = Communicator()
    tp, t = comm.size, comm.rank
    rng = np.random.default_rng(0)  # the same draws on every rank
    err: dict[str, float] = {}

    def gap(name: str, a: np.ndarray, b: np.ndarray) -> None:
        err[name] = max(err.get(name, 0.0), float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))

    # f and g on their own: forward values and backward gradients
    x = rng.standard_normal((3, 5))
    w_up = rng.standard_normal((tp, 3, 5))  # rank r's loss weights
    xt = Tensor(x, requires_grad=True)
    (copy_to_tp(xt, comm) * Tensor(w_up[t])).sum().backward()
    gap("f_forward", copy_to_tp(Tensor(x), comm).data, x)
    gap("f_backward", xt.grad, w_up.sum(0))  # d/dx of sum_r <w_r, x>
    parts = rng.standard_normal((tp, 3, 5))
    pt = Tensor(parts[t], requires_grad=True)
    y = reduce_from_tp(pt, comm)
    gap("g_forward", y.data, parts.sum(0))
    (y * Tensor(w_up[0])).sum().backward()
    gap("g_backward", pt.grad, w_up[0])

    # an MLP: column-parallel then row-parallel == the unsplit Linears
    C, H = 4, 8
    fc, proj = Linear(C, H, rng=rng), Linear(H, C, rng=rng)
    for lin in (fc, proj):
        lin.weight.data, lin.bias.data = lin.weight.data.astype(np.float64), lin.bias.data.astype(np.float64)
    x = rng.standard_normal((2, 3, C))
    x_ref, x_tp = Tensor(x, requires_grad=True), Tensor(x, requires_grad=True)
    ref = proj(fc(x_ref).gelu())
    col, row = ColumnParallelLinear.from_linear(fc, comm), RowParallelLinear.from_linear(proj, comm)
    out_tp = row(col(x_tp).gelu())
    gap("mlp_forward", out_tp.data, ref.data)
    wy = rng.standard_normal(ref.shape)
    (ref * Tensor(wy)).sum().backward()
    (out_tp * Tensor(wy)).sum().backward()
    gap("mlp_dx", x_tp.grad, x_ref.grad)
    gap("mlp_dw_col", col.weight.grad, shard(fc.weight.grad, "rows", t, tp))
    gap("mlp_db_col", col.bias.grad, shard(fc.bias.grad, "rows", t, tp))
    gap("mlp_dw_row", row.weight.grad, shard(proj.weight.grad, "cols", t, tp))
    gap("mlp_db_row", row.bias.grad, proj.bias.grad)

    # c_attn's q | k | v split per head
    qkv = Linear(C, 3 * C, rng=rng)
    xs = Tensor(x)
    full = qkv(xs).data.reshape(2, 3, 3, C)  # (B, T, part, C)
    local = ColumnParallelLinear.from_linear(qkv, comm, parts=3)(xs).data.reshape(2, 3, 3, C // tp)
    gap("qkv_columns", local, np.split(full, tp, axis=-1)[t])

    # vocabulary-parallel embedding and cross-entropy (V = 7: padded when tp does not divide it)
    V = 7
    emb = Embedding(V, C, rng=rng)
    emb.weight.data = emb.weight.data.astype(np.float64)
    ids = rng.integers(0, V, size=(2, 3))
    targets = rng.integers(0, V, size=(2, 3))
    targets[0, 0] = -100  # ignored
    h = rng.standard_normal((2, 3, C))
    h_ref, h_tp = Tensor(h, requires_grad=True), Tensor(h, requires_grad=True)
    e_ref = emb(ids)
    loss_ref = F.cross_entropy(h_ref @ emb.weight.T, targets)
    vemb = VocabParallelEmbedding.from_embedding(emb, comm)
    e_tp = vemb(ids)
    gap("embedding_forward", e_tp.data, e_ref.data)
    lm = ColumnParallelLinear(vemb.weight, None, comm)
    loss_tp = vocab_parallel_cross_entropy(lm(h_tp), targets, comm, vemb.start, V)
    gap("vocab_ce_forward", loss_tp.data, loss_ref.data)
    (loss_ref + (e_ref * Tensor(wy[..., :C])).sum()).backward()
    (loss_tp + (e_tp * Tensor(wy[..., :C])).sum()).backward()
    gap("vocab_ce_dh", h_tp.grad, h_ref.grad)
    gap("vocab_dw", vemb.weight.grad, shard(emb.weight.grad, "vocab", t, tp))

    # the collectives of one GPT forward + backward (tp group only)
    from tinygrad_lm.model import GPT, GPTConfig
    from tinygrad_lm.parallel_model import TensorParallelGPT
    counting = CountingComm(comm)
    n_layer = 3
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=n_layer, n_head=2 * tp, n_embd=8 * tp)
    model = TensorParallelGPT(GPT(cfg, seed=1), counting)
    idx = rng.integers(0, 11, size=(2, 8))
    _, loss = model(idx, rng.integers(0, 11, size=(2, 8)))
    forward = dict(counting.calls)
    counting.reset()
    loss.backward()
    backward = dict(counting.calls)
    if t == 0:
        (out / "pieces.json").write_text(json.dumps({"tp": tp, "errors": err, "n_layer": n_layer,
                                                     "forward": forward, "backward": backward}))
    return 0


def tp_config(corpus: str, out: str, batch: int, steps: int, zero: int = 0, tp: int = 1, pad: int = 1) -> object:
    """dp_worker's tiny GPT (4 heads, so tp 2 and 4 divide them) with a schedule that does not depend on
    `steps` (so a run resumed to more steps continues the same schedule); pad: its pad_vocab_to."""
    from dp_worker import tiny_config
    return dataclasses.replace(tiny_config(corpus, out, batch, steps, zero=zero), tp=tp, lr_decay_iters=8,
                               model=dataclasses.replace(tiny_config(corpus, out, batch, steps).model, n_head=4,
                                                         pad_vocab_to=pad))


def train(out: Path, corpus: str, steps: int, batch: int, tp: int, zero: int, resume: str | None,
          device: str = "cpu", fail: bool = False, pad: int = 1) -> int:
    from tinygrad_lm.train import Trainer
    world = init()
    cfg = dataclasses.replace(tp_config(corpus, str(out / "run"), batch, steps, zero=zero, tp=tp, pad=pad),
                              device=device)
    trainer = Trainer(cfg, world=world, log=lambda s: None, resume=resume)

    def work() -> int:
        losses = []
        while trainer.step < steps:
            if fail and world.rank == 1 and trainer.step == 1:
                raise RuntimeError("injected failure on rank 1")
            losses.append(trainer.check_finite(trainer.train_step()))
        trainer.save_checkpoint()
        weights = trainer.model.state_dict()  # full layout (a collective with tp)
        kinds = trainer.model.tp_kinds() if tp > 1 else {n: "rep" for n in weights}
        rep = {n: float(backend.to_numpy(p.data).astype(np.float64).sum())
               for n, p in trainer.model.named_parameters() if kinds[n] == "rep"}
        (out / f"replicated.{world.rank}.json").write_text(json.dumps(rep))
        if world.rank == 0:
            np.savez(out / "weights.npz", **weights)
            (out / "result.json").write_text(json.dumps({"losses": losses, "size": world.size}))
        return 0
    return run_or_abort(world, work)


def memory(out: Path, corpus: str) -> int:
    import tracemalloc
    from tinygrad_lm.parallel_model import local_parameters
    from tinygrad_lm.train import Trainer
    world = init()
    rows = {}
    for tp, pp in ((2, 1), (1, 2)):
        base = tp_config(corpus, str(out / f"tp{tp}pp{pp}"), 2, 1, tp=tp)
        cfg = dataclasses.replace(base, pp=pp, model=dataclasses.replace(base.model, n_layer=4, n_embd=256))
        tracemalloc.start()
        trainer = Trainer(cfg, world=world, log=lambda s: None)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        kinds = trainer.tp_layout.kinds if trainer.tp_layout is not None else None
        parts = local_parameters(trainer.model, kinds)
        rows[f"tp{tp}pp{pp}"] = {"param_bytes": sum(int(p.data.nbytes) for p, _ in parts.values()),
                                 "owned_bytes": sum(int(p.data.nbytes) for p in trainer.model.parameters()),
                                 "construction_peak": peak, "model": trainer.model.config.to_dict()}
        del trainer, parts
    (out / f"memory.{world.rank}.json").write_text(json.dumps(rows))
    return 0


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if mode == "pieces":
        return pieces(out)
    if mode == "memory":
        return memory(out, sys.argv[3])
    corpus, steps, batch, tp, zero = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    extra = dict(a.split("=", 1) for a in sys.argv[8:])  # resume=CKPT, device=cuda, pad=PAD_VOCAB_TO
    return train(out, corpus, steps, batch, tp, zero, extra.get("resume"), extra.get("device", "cpu"),
                 extra.get("fail") == "1", int(extra.get("pad", 1)))


if __name__ == "__main__":
    sys.exit(main())
