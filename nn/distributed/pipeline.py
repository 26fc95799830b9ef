"""Pipeline parallelism: the GPT's blocks split into stages, micro-batches flowing through them.

    stage 0             stage 1              ...   stage p-1
    wte (+wpe), blocks  blocks                     blocks, ln_f, lm_head (tied to wte), loss
        --- activations (B, T, C) --->
        <--- their gradients (B, T, C) ---

Each stage (one rank of the pipeline communicator) holds only its blocks. A step cuts the
batch into m micro-batches (`--grad-accum`); each goes forward through every stage, then
backward in reverse, and the gradients of all m add up exactly as gradient accumulation does
in one process. The order in which a stage runs its forwards F i and backwards B i is its
*schedule*, a short list of steps (`gpipe_schedule`, `one_f_one_b_schedule`):

    GPipe (Huang et al. 2019):  all forwards, then all backwards (last micro-batch first).
        Holds the activations of all m micro-batches.
    1F1B  (PipeDream-Flush, Narayanan et al. 2021): p-s-1 warm-up forwards, then one forward
        and one backward in turn, then the remaining backwards. Holds at most p-s.
Both leave each stage idle for the same share of the step, the *bubble*:
    idle / total = (p - 1) / (m + p - 1)                  (equal forward/backward costs per stage)

Activations and gradients travel as contiguous arrays (Isend/Irecv). A stage finishes each send
before it computes again, with the receive its next step needs already posted (Megatron-LM's
send_forward_recv_backward): two neighbours sending to each other at once then wait together
and never deadlock, and the message moves while both are inside MPI. (MPI without an
asynchronous progress thread moves a large message only then; a send left pending through the
next compute held the receiver up for that whole compute: measured under Open MPI, the bubble
was 20-45 points over the formula.) The tied `wte` lives on the first stage (the embedding) and, as a copy, on the
last (the head): the head's gradient is all-reduced into the first stage's, the first stage
alone updates it (so the optimizer, the gradient norm and the checkpoint count it once) and
sends the new value to the last stage after the step.

Checkpoints stay in the one-process layout: `gather_named` brings every stage's arrays to
stage 0 by name, `named_optimizer_state` / `optimizer_state_from_named` convert an optimizer's
state (plain or ZeRO-1) to and from {parameter name: moments}, so any layout loads any file.
"""
from __future__ import annotations

import re
import time
from typing import Any, Callable, Sequence

import numpy as np

from nn.distributed.comm import Communicator
from nn.module import Module, ModuleList
from nn.optim import decay_groups
from tensor import backend
from tensor.tensor import Tensor, no_grad

Step = tuple[str, int]  # ("F", i): forward of micro-batch i; ("B", i): its backward
ACT_DTYPE = np.float32  # the residual stream (and so every activation sent) is float32, also under autocast


# ---------------------------------------------------------------- the split and the schedules
def stage_layers(n_layer: int, n_stages: int) -> list[range]:
    """Blocks of each stage: n_layer split as evenly as possible, earlier stages never larger."""
    if n_stages < 1 or n_layer < n_stages:
        raise ValueError(f"pipeline: {n_layer} layers cannot be split over {n_stages} stages; "
                         f"expected n_layer >= pp >= 1")
    return [range(s * n_layer // n_stages, (s + 1) * n_layer // n_stages) for s in range(n_stages)]


def gpipe_schedule(stage: int, n_stages: int, n_micro: int) -> list[Step]:
    """GPipe: F 0 .. F m-1, then B m-1 .. B 0 (the same on every stage)."""
    return [("F", i) for i in range(n_micro)] + [("B", i) for i in reversed(range(n_micro))]


def one_f_one_b_schedule(stage: int, n_stages: int, n_micro: int) -> list[Step]:
    """1F1B: w = min(p - s - 1, m) warm-up forwards; then F w+k, B k in turn; then the last w backwards."""
    warmup = min(n_stages - stage - 1, n_micro)
    steps: list[Step] = [("F", i) for i in range(warmup)]
    for k in range(n_micro - warmup):
        steps += [("F", warmup + k), ("B", k)]
    return steps + [("B", i) for i in range(n_micro - warmup, n_micro)]


SCHEDULES: dict[str, Callable[[int, int, int], list[Step]]] = {"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule}


def bubble_formula(n_stages: int, n_micro: int) -> float:
    """The idle share of a pipelined step: (p - 1) / (m + p - 1)."""
    return (n_stages - 1) / (n_micro + n_stages - 1)


def simulate(schedule: str, n_stages: int, n_micro: int, t_forward: float = 1.0,
             t_backward: float = 2.0) -> list[float]:
    """Play the schedule with fixed step costs and free messages; each stage's idle share of
    the whole step (from the first stage's first forward to the last backward anywhere)."""
    steps = [SCHEDULES[schedule](s, n_stages, n_micro) for s in range(n_stages)]
    done: dict[tuple[str, int, int], float] = {}  # (op, i, stage) -> finish time
    clock, pos = [0.0] * n_stages, [0] * n_stages
    while any(pos[s] < len(steps[s]) for s in range(n_stages)):
        moved = False
        for s in range(n_stages):
            if pos[s] == len(steps[s]):
                continue
            op, i = steps[s][pos[s]]
            need = ("F", i, s - 1) if op == "F" and s > 0 else ("B", i, s + 1) if op == "B" and s < n_stages - 1 else None
            if need is not None and need not in done:
                continue
            start = max(clock[s], done.get(need, 0.0)) if need else clock[s]
            clock[s] = done[(op, i, s)] = start + (t_forward if op == "F" else t_backward)
            pos[s] += 1
            moved = True
        if not moved:
            raise RuntimeError(f"simulate: schedule {schedule!r} deadlocks with {n_stages} stages, {n_micro} micro-batches")
    total = max(clock)
    busy = n_micro * (t_forward + t_backward)
    return [(total - busy) / total for _ in range(n_stages)]


# ---------------------------------------------------------------- one stage of a GPT
_LAYER = re.compile(r"^transformer\.h\.(\d+)\.")


def owner_stage(name: str, n_layer: int, n_stages: int) -> int:
    """The stage that owns (updates and saves) a GPT parameter: wte/wpe the first, ln_f the last."""
    m = _LAYER.match(name)
    if m:
        i = int(m.group(1))
        return next(s for s, r in enumerate(stage_layers(n_layer, n_stages)) if i in r)
    return n_stages - 1 if name.startswith("transformer.ln_f.") else 0


class _Body(Module):
    """The stage's share of GPT.transformer: (wte, wpe, drop), h (its blocks), (ln_f)."""


class PipelineStage(Module):
    """The part of a GPT that stage `stage` of `n_stages` holds, taken from a GPT `model` (the other
    parts are dropped). In training `model`'s drawn weights are placeholders (nn.init.Placeholders,
    no memory): the stage's own parameters get their values after the split
    (tinygrad_lm/parallel_model.py: fill_parameters, load_parameters). A GPT built from the seed works too. `model` may be a GPT or one tensor-parallel rank's TensorParallelGPT
    (tinygrad_lm/parallel_model.py): the stage runs the model's own embed and head code. Parameter names are the whole model's (`transformer.h.<global i>...`).

    forward(x, targets): x is idx (B, T) ints on the first stage, activations (B, T, C) on the
    others; returns activations (B, T, C), or on the last stage the mean cross-entropy loss.
    `named_parameters()` lists the parameters this stage owns: the last stage's copy of wte
    (used by its lm_head) is `tied_wte`, not among them.
    """

    def __init__(self, model: Any, stage: int, n_stages: int) -> None:
        cfg = model.config
        self.config, self.stage, self.n_stages = cfg, stage, n_stages
        self.layers = stage_layers(cfg.n_layer, n_stages)[stage]
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        t = model.transformer
        self.transformer = body = _Body()
        if self.is_first or self.is_last:
            body.wte = t.wte
        if self.is_first:
            if hasattr(t, "wpe"):
                body.wpe = t.wpe
            body.drop = t.drop
            if hasattr(model, "pos"):
                self.pos = model.pos
        body.h = ModuleList(t.h[i] for i in self.layers)
        if self.is_last:
            body.ln_f = t.ln_f
            self.lm_head = model.lm_head  # its weight is wte's
        self.tied_wte = t.wte.weight if self.is_last and not self.is_first else None
        self._embed = type(model).embed  # the model's own embedding and head code, run on this stage's parts
        self._head = type(model).head
        self.dropout_rng = getattr(model, "dropout_rng", None)
        if hasattr(model, "comm"):  # a TensorParallelGPT's tp group (its head's loss is vocabulary-parallel)
            self.comm = model.comm

    def named_parameters(self, prefix: str = "") -> Any:
        for name, p in super().named_parameters(prefix):
            if p is self.tied_wte:
                continue
            m = _LAYER.match(name)
            yield (f"transformer.h.{self.layers[int(m.group(1))]}.{name[m.end():]}" if m else name), p

    def forward(self, x: Any, targets: Any = None) -> Tensor:
        xp = backend.array_module(self.transformer.h[0].ln_1.weight.data)
        positions = xp.arange(x.shape[1])
        if self.is_first:
            h = self._embed(self, xp.asarray(x), positions)
        else:
            h = x
        for block in self.transformer.h:
            h = block(h, positions=positions)
        if not self.is_last:
            return h
        return self._head(self, self.transformer.ln_f(h), xp.asarray(targets))[1]


# ---------------------------------------------------------------- running a step
class Pipeline:
    """Runs micro-batches through a PipelineStage under a schedule; comm is the pipeline
    communicator (rank s = stage s). `timing` accumulates seconds busy (forward and backward
    compute) and in all (wall time of `run`); `bytes_sent` counts activation and gradient bytes;
    `peak_live` is the most micro-batches whose activations this stage held at once."""

    def __init__(self, stage: PipelineStage, comm: Communicator | None, schedule: str = "1f1b") -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"Pipeline: schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        self.stage, self.comm, self.schedule = stage, comm, schedule
        self.timing = {"busy": 0.0, "total": 0.0}
        self.bytes_sent = 0
        self.peak_live = 0
        # the first and last stage, for the tied wte (None on the others); a collective over comm
        ends = stage.is_first or stage.is_last
        self.tied = comm.split(color=0 if ends else -1) if comm is not None and stage.n_stages > 1 else None

    def _act_buffer(self, x: Any) -> Any:
        B, T = x.shape[:2]
        xp = backend.array_module(self.stage.transformer.h[0].ln_1.weight.data)
        return xp.empty(B * T * self.stage.config.n_embd, dtype=ACT_DTYPE)

    def _send(self, arr: Any, dest: int, tag: int) -> Any:
        xp = backend.array_module(arr)
        buf = xp.ascontiguousarray(arr, dtype=ACT_DTYPE).reshape(-1)
        self.bytes_sent += buf.nbytes
        return self.comm.isend(buf, dest, tag)

    def _post_recv(self, step: Step | None, micro_batches: Sequence[tuple[Any, Any]]) -> tuple | None:
        """Post the receive that `step` needs before it can run (F i: the activations from the stage
        before; B i: their gradient from the stage after): (buffer, request, (B, T)), or None."""
        if step is None:
            return None
        (op, i), st = step, self.stage
        if (op == "F" and st.is_first) or (op == "B" and st.is_last):
            return None
        x = micro_batches[i][0]
        buf = self._act_buffer(x)
        source, tag = (st.stage - 1, 2 * i) if op == "F" else (st.stage + 1, 2 * i + 1)
        return buf, self.comm.irecv(buf, source, tag), x.shape[:2]

    @staticmethod
    def _wait_recv(posted: tuple) -> Any:
        buf, request, (B, T) = posted
        request.wait()
        return buf.reshape(B, T, -1)

    def run(self, micro_batches: Sequence[tuple[Any, Any]], loss_scale: float = 1.0) -> Any:
        """Forward and backward of every (x, y) micro-batch in the schedule's order. Gradients
        accumulate into the parameters, each micro-batch's loss weighted loss_scale / m.
        Returns the sum of the micro-batch losses (a 0-d array) on the last stage, else None."""
        st, m = self.stage, len(micro_batches)
        t_start, busy = time.perf_counter(), 0.0
        live: dict[int, tuple[Tensor | None, Tensor]] = {}  # i -> (input activations, output or loss)
        total = None
        steps = SCHEDULES[self.schedule](st.stage, st.n_stages, m)
        posted = self._post_recv(steps[0] if steps else None, micro_batches)
        for n, (op, i) in enumerate(steps):
            x, y = micro_batches[i]
            received = None if posted is None else self._wait_recv(posted)
            sending = None
            if op == "F":
                inp = None if st.is_first else Tensor(received, requires_grad=True)
                t0 = time.perf_counter()
                out = st(x if st.is_first else inp, y)
                busy += time.perf_counter() - t0
                if st.is_last:
                    total = out.data if total is None else total + out.data
                else:
                    sending = self._send(out.data, st.stage + 1, 2 * i)
                live[i] = (inp, out)
                self.peak_live = max(self.peak_live, len(live))
            else:
                inp, out = live.pop(i)
                t0 = time.perf_counter()
                if st.is_last:
                    (out * (loss_scale / m)).backward()
                else:
                    out.backward(received.astype(out.data.dtype, copy=False))
                busy += time.perf_counter() - t0
                if inp is not None:
                    sending = self._send(inp.grad, st.stage - 1, 2 * i + 1)
            # the next step's receive is posted before this send is waited for: both move together
            posted = self._post_recv(steps[n + 1] if n + 1 < len(steps) else None, micro_batches)
            if sending is not None:
                sending.wait()
        self.timing["busy"] += busy
        self.timing["total"] += time.perf_counter() - t_start
        return total

    def forward_only(self, x: Any, y: Any) -> float:
        """The loss of one batch (no gradients), on every stage."""
        st = self.stage
        with no_grad():
            h = x if st.is_first else Tensor(self._wait_recv(self._post_recv(("F", 0), [(x, y)])))
            out = st(h, y)
            if not st.is_last:
                self._send(out.data, st.stage + 1, 0).wait()
        loss = np.array([float(backend.to_numpy(out.data)) if st.is_last else 0.0])
        self.comm.broadcast(loss, root=st.n_stages - 1)
        return float(loss[0])

    # ------------------------------------------------------------ the tied embedding
    def reduce_tied_grads(self) -> None:
        """wte's gradient <- embedding part + head part, on the first stage (all-reduced with the last)."""
        comm = self.tied
        if comm is None:
            return
        w = self.stage.transformer.wte.weight
        xp = backend.array_module(w.data)
        g = xp.zeros(w.size, dtype=w.dtype) if w.grad is None else xp.ascontiguousarray(w.grad).reshape(-1)
        comm.allreduce(g, op="sum")
        w.grad = g.reshape(w.shape) if self.stage.is_first else None

    def sync_tied_weights(self) -> None:
        """The last stage's copy of wte <- the first stage's (after its update)."""
        comm = self.tied
        if comm is None:
            return
        w = self.stage.transformer.wte.weight
        xp = backend.array_module(w.data)
        buf = xp.ascontiguousarray(w.data).reshape(-1)
        comm.broadcast(buf, root=0)
        if self.stage.is_last:
            w.data = buf.reshape(w.shape)
            w._version += 1


# ---------------------------------------------------------------- checkpoints: by parameter name
def gather_named(comm: Communicator, n_stages: int, names: Sequence[str], shapes: dict[str, tuple],
                 owner: Callable[[str], int], mine: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """Bring every stage's named float32 arrays to stage 0 (one flat message per stage, names in
    `names` order; stage s holds those with owner(name) == s, given as `mine`). Returns the whole
    dict on stage 0, None elsewhere. A collective over the pipeline communicator."""
    out: dict[str, np.ndarray] = {}
    for s in range(n_stages):
        part = [n for n in names if owner(n) == s]
        if s == comm.rank == 0:
            out.update({n: np.asarray(backend.to_numpy(mine[n]), dtype=np.float32) for n in part})
        elif comm.rank == s:
            comm.send(np.concatenate([np.asarray(backend.to_numpy(mine[n]), dtype=np.float32).reshape(-1)
                                      for n in part]), dest=0, tag=7)
        elif comm.rank == 0:
            buf = np.empty(sum(int(np.prod(shapes[n])) for n in part), dtype=np.float32)
            comm.recv(buf, source=s, tag=7)
            offset = 0
            for n in part:
                size = int(np.prod(shapes[n]))
                out[n] = buf[offset:offset + size].reshape(shapes[n])
                offset += size
    return out if comm.rank == 0 else None


def named_optimizer_state(sd: dict, names_by_group: Sequence[Sequence[str]],
                          shapes: dict[str, tuple]) -> tuple[dict[str, np.ndarray], dict]:
    """An optimizer state dict (plain, or ZeRO1's whole-group flat arrays) over parameters named
    names_by_group -> ({"<param name>/<moment>": array}, {"step": int, "param_groups": hyper-parameters})."""
    meta = sd["meta"]
    zero = bool(meta.get("zero1"))
    inner = meta["inner"] if zero else meta
    flat_names = [n for g in names_by_group for n in g]
    out: dict[str, np.ndarray] = {}
    for key, arr in sd["arrays"].items():
        if zero:  # "zero.state.<group>.<moment>": the group's parameters end to end
            _, _, g, moment = key.split(".", 3)
            offset = 0
            flat = np.asarray(arr).reshape(-1)
            for n in names_by_group[int(g)]:
                size = int(np.prod(shapes[n]))
                out[f"{n}/{moment}"] = flat[offset:offset + size].reshape(shapes[n])
                offset += size
        else:  # "state.<i>.<moment>"
            _, i, moment = key.split(".", 2)
            out[f"{flat_names[int(i)]}/{moment}"] = np.asarray(arr)
    steps = [int(v.get("step", 0)) for v in inner.get("state", {}).values()]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]
    return out, {"step": max(steps, default=0), "type": inner["type"], "param_groups": groups}


def optimizer_state_from_named(named: dict[str, np.ndarray], info: dict, names_by_group: Sequence[Sequence[str]],
                               shapes: dict[str, tuple], zero1: bool) -> dict:
    """The inverse of named_optimizer_state: the state dict of an optimizer over names_by_group,
    plain or (zero1) ZeRO1's whole-group format. No moments (no step yet) -> an empty state."""
    moments = sorted({k.split("/", 1)[1] for k in named})
    groups = [dict(g) for g in info["param_groups"]]
    arrays: dict[str, np.ndarray] = {}
    if zero1:
        for g, names in enumerate(names_by_group):
            groups[g]["params"] = [g]
            for mo in moments:
                arrays[f"zero.state.{g}.{mo}"] = np.concatenate(
                    [np.asarray(named[f"{n}/{mo}"], dtype=np.float32).reshape(-1) for n in names])
        state = {str(g): {"step": info["step"]} for g in range(len(names_by_group))} if moments else {}
        return {"meta": {"zero1": True, "inner": {"type": info["type"], "param_groups": groups, "state": state}},
                "arrays": arrays}
    i, state = 0, {}
    for g, names in enumerate(names_by_group):
        groups[g]["params"] = list(range(i, i + len(names)))
        for n in names:
            if moments:
                state[str(i)] = {"step": info["step"]}
            for mo in moments:
                arrays[f"state.{i}.{mo}"] = np.asarray(named[f"{n}/{mo}"]).reshape(shapes[n])
            i += 1
    return {"meta": {"type": info["type"], "param_groups": groups, "state": state}, "arrays": arrays}


def names_by_group(names: Sequence[str], shapes: dict[str, tuple]) -> list[list[str]]:
    """Parameter names in the optimizer's two groups (nn.optim.decay_groups, as make_optimizer):
    the 2-D weights (decayed), then the rest."""
    return list(decay_groups(names, lambda n: len(shapes[n])))


def gather_checkpoint(comm: Communicator, stage: PipelineStage, optimizer_sd: dict, shapes: dict[str, tuple],
                      zero1: bool, weights: dict[str, Any] | None = None) -> tuple[dict | None, dict | None]:
    """Every stage of one pipeline calls it with its optimizer's state dict; stage 0 gets the whole
    model's weights {name: array} and optimizer state dict in the one-process layout (`shapes`:
    the whole model's names and shapes in order); the others get (None, None). weights: this
    stage's parameters by name in the full shapes (default: the stage's own arrays; with tensor
    parallelism, the tp-gathered ones, and optimizer_sd's moments likewise)."""
    names = list(shapes)
    named, info = named_optimizer_state(optimizer_sd, names_by_group([n for n, _ in stage.named_parameters()], shapes),
                                        shapes)
    moments = sorted({k.split("/", 1)[1] for k in named})
    keys = [f"{n}/{m}" for n in names for m in moments]
    key_shapes = {**shapes, **{k: shapes[k.split("/", 1)[0]] for k in keys}}

    def owner(key: str) -> int:
        return owner_stage(key.split("/", 1)[0], stage.config.n_layer, stage.n_stages)
    if weights is None:
        weights = {n: p.data for n, p in stage.named_parameters()}
    weights_all = gather_named(comm, stage.n_stages, names, key_shapes, owner, weights)
    moments_all = gather_named(comm, stage.n_stages, keys, key_shapes, owner, named)
    if weights_all is None:
        return None, None
    return weights_all, optimizer_state_from_named(moments_all, info, names_by_group(names, shapes), shapes, zero1)


def stage_optimizer_state(sd: dict, stage: PipelineStage, shapes: dict[str, tuple], zero1: bool) -> dict:
    """The whole model's optimizer state dict (one-process layout, plain or ZeRO-1) -> the state
    dict of this stage's optimizer (plain, or zero1: ZeRO1's)."""
    named, info = named_optimizer_state(sd, names_by_group(list(shapes), shapes), shapes)
    mine = names_by_group([n for n, _ in stage.named_parameters()], shapes)
    keep = set(mine[0] + mine[1])
    own = {k: v for k, v in named.items() if k.split("/", 1)[0] in keep}
    return optimizer_state_from_named(own, info, mine, shapes, zero1)
