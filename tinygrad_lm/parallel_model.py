"""The GPT split over a tensor-parallel group (Megatron-LM; nn/distributed/tensor_parallel.py).

    init = SeedInit(cfg, seed)                         # GPT(cfg, seed) with placeholder weights (no memory)
    model = TensorParallelGPT(init.model, grid.tp)     # this rank's shards (still placeholders)
    parts = local_parameters(model, model.tp_layout().kinds)
    fill_parameters(parts, init.arrays(parts), grid.t, tp, cfg.padded_vocab_size)   # GPT(cfg, seed)'s values, sliced

(or `load_parameters(parts, checkpoint_file, ...)`; a PipelineStage of the model may come between the
split and the fill.) A rank never holds more than its own part plus one full parameter (drawn or
read whole, sliced, dropped). TensorParallelGPT(GPT(cfg, seed), comm) works too (a whole model split
in place: tests, benchmarks, --init-from).

Rank t of tp keeps, of each block, the heads t*H/tp .. (t+1)*H/tp - 1 (their q, k, v columns of
c_attn and their rows of attn.c_proj's input) and the block t of the MLP's 4C hidden units; of
the tied wte / lm_head the vocabulary rows t*V_pad/tp .. (V padded with zero rows to a multiple
of tp: those rows stay zero and their logits are left out of the loss). LayerNorms, wpe and the
row-parallel biases are replicated. The block code is the one-process code (nn/layers.py): only
its Linears and the embedding are swapped for their parallel versions.

Collectives, all over the tp group: per block, forward 2 all-reduces (attn.c_proj's g,
mlp.c_proj's g), backward 2 (c_attn's f, c_fc's f); the embedding one all-reduce forward (g),
the lm_head one backward (f); the loss one all-gather (row maxima) and one all-reduce (sums).

Replicated parameters get the same gradient on every tp rank without a collective: the loss
is the same on every rank, every f sums its gradient over the ranks, so the gradient reaching
each replicated activation (the residual stream, the LayerNorm outputs and inputs, the
embedding sum) is the same everywhere, and so are the gradients computed from it.

Dropout: the masks of replicated activations (embedding, residual outputs of attn and mlp)
come from the model's `dropout_rng`, the same stream on every tp rank (the same mask where the
activation is the same); attention-weight dropout acts on this rank's heads only and draws
from a stream of its own per tp rank (reseeded from (seed, step, t) each step, so a resumed
run draws the same masks). With dropout > 0 the masks differ from one process's.

`state_dict()` and `load_state_dict()` use the full, unsharded layout of the one-process GPT
(so checkpoints do not depend on the layout); state_dict is a collective over the tp group.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np

from nn.init import Placeholders, replay
from nn.serialization import iter_safetensors, read_safetensors_header
from nn.distributed.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                            gather_full, shard, vocab_parallel_cross_entropy)
from tensor import backend
from tensor.tensor import Tensor
from tinygrad_lm.model import GPT, GPTConfig


def full_shape(kind: str, local: tuple, tp: int, rows: int) -> tuple:
    """The full array's shape from one rank's part (see tensor_parallel.shard)."""
    if kind in ("rows", "qkv"):
        return (local[0] * tp,) + tuple(local[1:])
    if kind == "vocab":
        return (rows,) + tuple(local[1:])
    if kind == "cols":
        return tuple(local[:-1]) + (local[-1] * tp,)
    return tuple(local)


def reseed_sharded_dropout(model: Any, comm: Any, seed: int, step: int) -> None:
    """Attention dropout of model's blocks (a TensorParallelGPT or a pipeline stage of one; this
    rank's heads): a stream of this tp rank's own (comm.rank) for this step."""
    rng = np.random.default_rng([seed, 7, 1 + comm.rank, step])
    for block in model.transformer.h:
        block.attn.generator = rng


class TensorParallelGPT(GPT):
    """One tp rank's share of a GPT. model(idx (B, T), targets) -> (this rank's logits
    (B, T, V_pad/tp), the loss (the same on every rank) or None).

    full: the one-process GPT (the same on every tp rank: same seed or same checkpoint, or
    SeedInit's placeholders, whose shards are placeholders to fill); its modules are taken over and
    sharded in place. comm: the tp group's Communicator."""

    def __init__(self, full: GPT, comm: Any) -> None:
        cfg, tp = full.config, comm.size
        if cfg.n_head % tp:
            raise ValueError(f"TensorParallelGPT: n_head {cfg.n_head} is not divisible by tp {tp} "
                             "(each rank holds whole heads)")
        self.config, self.comm = cfg, comm
        self.transformer = tr = full.transformer
        tr.wte = VocabParallelEmbedding.from_embedding(tr.wte, comm)
        for block in tr.h:
            attn, mlp = block.attn, block.mlp
            attn.c_attn = ColumnParallelLinear.from_linear(attn.c_attn, comm, parts=3)
            attn.c_proj = RowParallelLinear.from_linear(attn.c_proj, comm)
            attn.n_head, attn.n_embd = attn.n_head // tp, attn.n_embd // tp
            mlp.c_fc = ColumnParallelLinear.from_linear(mlp.c_fc, comm)
            mlp.c_proj = RowParallelLinear.from_linear(mlp.c_proj, comm)
        self.lm_head = ColumnParallelLinear(tr.wte.weight, None, comm)  # tied to this rank's wte rows
        self.lm_head.compute_dtype = full.lm_head.compute_dtype
        if hasattr(full, "pos"):
            self.pos = full.pos
        if hasattr(full, "dropout_rng"):
            self.dropout_rng = full.dropout_rng

    def head(self, x: Tensor, targets: Any = None) -> tuple[Tensor, Tensor | None]:
        """x (B, T, C) replicated -> this rank's logits (B, T, V_pad/tp), the vocabulary-parallel loss."""
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        # the loss spans the model's padded_vocab_size columns, as one process's (GPT.head); the
        # tp padding past them is left out
        return logits, vocab_parallel_cross_entropy(logits, targets, self.comm, self.transformer.wte.start,
                                                    self.config.padded_vocab_size)

    def reseed_sharded_dropout(self, seed: int, step: int) -> None:
        """Attention dropout (this rank's heads): a stream of this tp rank's own for this step."""
        reseed_sharded_dropout(self, self.comm, seed, step)

    def new_caches(self, batch: int, max_len: int | None = None) -> list:
        raise NotImplementedError("TensorParallelGPT: incremental decoding runs on one process; load the "
                                  "checkpoint into a GPT (python -m tinygrad_lm sample)")

    def num_parameters(self) -> int:
        """Parameters of the whole model (all tp ranks, the tp padding of the vocabulary left out)."""
        kinds, tp, V = self.tp_kinds(), self.comm.size, self.config.padded_vocab_size
        return sum(int(np.prod(full_shape(kinds[n], p.shape, tp, V))) for n, p in self.named_parameters())

    # ------------------------------------------------------------ layout
    def tp_kinds(self) -> dict[str, str]:
        """Parameter name -> how it is split (tensor_parallel.KINDS: rep, rows, qkv, cols, vocab)."""
        kinds = {}
        for mname, m in self.named_modules():
            for pname, kind in getattr(m, "shard_kinds", {}).items():
                kinds[f"{mname}.{pname}" if mname else pname] = kind
        return {n: kinds.get(n, "rep") for n, _ in self.named_parameters()}

    def tp_layout(self) -> "TPLayout":
        """How this rank's parameters relate to the full ones (kept by a pipeline stage of this model)."""
        kinds = self.tp_kinds()
        return TPLayout(self.comm, {id(p): kinds[n] for n, p in self.named_parameters()},
                        self.config.padded_vocab_size)

    def state_dict(self) -> dict[str, np.ndarray]:
        """A collective over the tp group: name -> the full host array (the one-process layout)."""
        return self.tp_layout().full_weights(self.named_parameters())

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> tuple[list[str], list[str]]:
        """Full (one-process layout) arrays -> this rank's parts (no communication)."""
        kinds, tp, t = self.tp_kinds(), self.comm.size, self.comm.rank
        params = dict(self.named_parameters())
        local = {}
        for n, a in state.items():
            if n in params and tuple(np.shape(a)) == full_shape(kinds[n], params[n].shape, tp,
                                                                      self.config.padded_vocab_size):
                local[n] = shard(np.asarray(a), kinds[n], t, tp)
            else:  # unknown or mis-shaped: left to Module.load_state_dict to report
                local[n] = a
        return super().load_state_dict(local, strict=strict)

    def optimizer_state_full(self, optimizer: Any, sd: dict) -> dict:
        """See TPLayout.optimizer_state_full (a collective over the tp group)."""
        return self.tp_layout().optimizer_state_full(optimizer, sd)

    def optimizer_state_local(self, optimizer: Any, sd: dict) -> dict:
        """See TPLayout.optimizer_state_local (no communication)."""
        return self.tp_layout().optimizer_state_local(optimizer, sd)


class TPLayout:
    """How one tp rank's parameters relate to the full (one-process) ones: comm, the tp group;
    kinds, id(parameter) -> how it is split (tensor_parallel.KINDS); vocab, the full vocabulary.
    Works for any set of these parameters (the whole TensorParallelGPT, or one pipeline stage of it)."""

    def __init__(self, comm: Any, kinds: dict[int, str], vocab: int) -> None:
        self.comm, self.kinds, self.vocab = comm, kinds, vocab

    def copies(self) -> dict[int, int]:
        """id(parameter) -> tp for the replicated ones (the gradient norm counts them once)."""
        return {i: self.comm.size for i, kind in self.kinds.items() if kind == "rep"}

    def full_weights(self, named: Any, keep: bool = True) -> dict[str, np.ndarray] | None:
        """A collective over the tp group: (name, parameter) pairs -> name: the full host array.
        keep=False (a rank that does not write them): each full array is dropped once gathered (one
        at a time in memory), and the result is None."""
        out = {}
        for n, p in named:
            full = np.array(backend.to_numpy(gather_full(self.comm, p.data, self.kinds[id(p)], self.vocab)))
            if keep:
                out[n] = full
            del full
        return out if keep else None

    @staticmethod
    def _optimizer_layout(optimizer: Any) -> tuple[str, list]:
        """("zero", [params of group g]) for ZeRO1, else ("plain", [param of index i])."""
        if hasattr(optimizer, "layout") and hasattr(optimizer, "groups"):  # nn.distributed.ZeRO1
            return "zero", [g["params"] for g in optimizer.groups]
        return "plain", [p for _, _, p in optimizer._indexed_params()]

    def optimizer_state_full(self, optimizer: Any, sd: dict, keep: bool = True) -> dict | None:
        """A collective over the tp group: optimizer.state_dict()'s arrays (this rank's parts) ->
        the arrays the one-process run would save (moments of the full parameters). keep=False: as
        in full_weights, each gathered array is dropped at once and the result is None."""
        kinds = self.kinds
        mode, layout = self._optimizer_layout(optimizer)
        V, arrays = self.vocab, {}
        for key, arr in sd["arrays"].items():
            if mode == "plain":  # state.<i>.<moment>
                p = layout[int(key.split(".")[1])]
                full = np.asarray(gather_full(self.comm, np.asarray(arr), kinds[id(p)], V))
                if keep:
                    arrays[key] = full
                del full
            else:  # zero.state.<g>.<moment>: one flat array over group g's parameters
                flat, offset, pieces = np.asarray(arr).reshape(-1), 0, []
                for p in layout[int(key.split(".")[2])]:
                    part = flat[offset:offset + p.size].reshape(p.shape)
                    full = gather_full(self.comm, np.ascontiguousarray(part), kinds[id(p)], V).reshape(-1)
                    if keep:
                        pieces.append(full)
                    del full
                    offset += p.size
                if keep:
                    arrays[key] = np.concatenate(pieces) if pieces else flat[:0]
        return {"meta": sd["meta"], "arrays": arrays} if keep else None

    def optimizer_state_local(self, optimizer: Any, sd: dict) -> dict:
        """The inverse of optimizer_state_full, without communication: full arrays -> this rank's parts."""
        kinds = self.kinds
        mode, layout = self._optimizer_layout(optimizer)
        tp, t, V, arrays = self.comm.size, self.comm.rank, self.vocab, {}
        for key, arr in sd["arrays"].items():
            arr = np.asarray(arr)
            if mode == "plain":
                p = layout[int(key.split(".")[1])] if int(key.split(".")[1]) < len(layout) else None
                if p is None or arr.shape != full_shape(kinds[id(p)], p.shape, tp, V):
                    arrays[key] = arr  # left to the optimizer to report
                else:
                    arrays[key] = shard(arr, kinds[id(p)], t, tp)
            else:
                flat, offset, pieces = arr.reshape(-1), 0, []
                for p in layout[int(key.split(".")[2])]:
                    shape = full_shape(kinds[id(p)], p.shape, tp, V)
                    n = int(np.prod(shape))
                    pieces.append(shard(flat[offset:offset + n].reshape(shape), kinds[id(p)], t, tp).reshape(-1))
                    offset += n
                arrays[key] = np.concatenate(pieces) if pieces else flat[:0]
        return {"meta": sd["meta"], "arrays": arrays}


# ---------------------------------------------------------------- building one rank's part only
class SeedInit:
    """GPT(cfg, seed) without its weights: `model` is that GPT with every drawn weight a placeholder
    (nn.init.Placeholders: no memory), to be split first (TensorParallelGPT, PipelineStage: the
    placeholders' parts are placeholders) and filled after, by `fill_parameters(parts, init.arrays(parts))`:
    the same values, the full parameters drawn one at a time in GPT's order and only this rank's
    slices kept. Biases and norm weights (zeros, ones) are made as in GPT; they are small."""

    def __init__(self, cfg: GPTConfig, seed: int) -> None:
        log = Placeholders()
        self.model, self.seed = GPT(cfg, rng=log), seed
        self.draws, self.owners = log.draws, log.owners(self.model.named_parameters())

    def arrays(self, parts: dict[str, tuple[Any, str]]) -> Iterator[tuple[str, np.ndarray]]:
        """(name, the full float32 value GPT(cfg, seed) gives it) for the drawn parameters in `parts`,
        one at a time (nn.init.replay; the others' draws are made and dropped)."""
        return replay(self.draws, self.owners, set(parts), np.random.default_rng(self.seed))


def local_parameters(model: Any, kinds: dict[int, str] | None = None) -> dict[str, tuple[Any, str]]:
    """This rank's parameters by their whole-model name, each with how it is split over the tp group
    (tensor_parallel.KINDS; kinds: id(parameter) -> kind, TPLayout.kinds, None without tp: "rep").
    model: a GPT, a TensorParallelGPT, or a PipelineStage of either (its copy of wte included)."""
    kinds = kinds or {}
    parts = {n: (p, kinds.get(id(p), "rep")) for n, p in model.named_parameters()}
    tied = getattr(model, "tied_wte", None)
    if tied is not None:
        parts["transformer.wte.weight"] = (tied, kinds.get(id(tied), "rep"))
    return parts


def fill_parameters(parts: dict[str, tuple[Any, str]], arrays: Iterable[tuple[str, Any]], t: int, tp: int,
                    vocab: int, where: str = "fill_parameters") -> set[str]:
    """Each (name, full array) of `arrays` (one at a time: a generator) -> this rank's slice of it
    (tensor_parallel.shard as parts[name]'s kind says) as that parameter's data, on its device.
    Returns the names filled. A full array of the wrong shape or a non-float dtype -> ValueError naming `where`."""
    done = set()
    for name, full in arrays:
        p, kind = parts[name]
        want = full_shape(kind, p.shape, tp, vocab)
        dt = np.dtype(full.dtype)
        if tuple(full.shape) != want or not (dt.kind == "f" or dt.name == "bfloat16"):
            raise ValueError(f"{where}: {name!r} is {dt.name} {tuple(full.shape)}; expected a float array of "
                             f"shape {want} (this rank holds {kind} part {tuple(p.shape)} of it)")
        device = backend.device_of(p.data)
        p.data = backend.to_device(shard(np.asarray(full).astype(p.dtype, copy=False), kind, t, tp), device)
        p._version += 1
        done.add(name)
        del full  # (before the next one is read: one full array at a time)
    return done


def load_parameters(parts: dict[str, tuple[Any, str]], path: Any, t: int, tp: int, vocab: int) -> None:
    """A whole-model safetensors file (save_model's, one-process layout) -> this rank's parameters,
    one full tensor read at a time (nn.serialization.iter_safetensors): never the whole state dict.
    A name the file lacks -> KeyError; a wrong shape or dtype -> ValueError (both name the file)."""
    names = list(parts)
    header = read_safetensors_header(path)
    missing = [n for n in names if n not in header]
    if missing:
        raise KeyError(f"{path}: missing {missing[:8]}")
    fill_parameters(parts, iter_safetensors(path, names), t, tp, vocab, where=str(path))
