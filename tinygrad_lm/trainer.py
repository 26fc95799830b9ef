"""The Trainer: model, optimizer, data and counters; `run()` trains to cfg.max_iters with
evaluation, the metrics log and checkpoints that resume exactly.

Resume is exact: the batch of step k is a pure function of (seed, k) (see data.py), and
model, optimizer, schedule position and dropout RNG are all in the checkpoint, so
N steps + resume + N steps == 2N steps straight, bit for bit.

Start-up under MPI: everything that can fail on one rank alone (files, tokenizer, data,
checkpoint, the model on the host) is built before any collective; then the ranks agree
(`world.any`) that all started, so a bad path on one rank ends every rank with an error
instead of leaving the others waiting in the parameter broadcast.
"""
from __future__ import annotations

import gc
import json
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nn.amp import LossScaler, autocast_
from nn.distributed import Grid, MPIWorld, World
from nn.distributed.model_parallel import ModelParallel
from nn.distributed.pipeline import Pipeline, PipelineStage, gather_checkpoint, stage_optimizer_state
from nn.serialization import atomic_write, load_model, load_optimizer, save_model, save_optimizer
from tensor import backend
from tensor.tensor import no_grad
from tinygrad_lm import checkpoint as ckpt_io
from tinygrad_lm.config import TrainConfig, resume_config
from tinygrad_lm.data import TokenData, build_tokenizer, resolve_corpus, tokenize_to_cache
from tinygrad_lm.errors import UserError
from tinygrad_lm.gradient_step import (GradientStep, NonFiniteLoss, all_finite, apply_hyperparameters,
                                       make_optimizer, make_schedule)
from tinygrad_lm.hf import iter_hf_weights, load_hf
from tinygrad_lm.model import GPT
from tinygrad_lm.parallel_model import (SeedInit, TensorParallelGPT, fill_parameters, load_parameters,
                                       local_parameters, reseed_sharded_dropout)
from tinygrad_lm.plot import plot_losses, truncate_metrics
from tinygrad_lm.progress import progress
from tinygrad_lm.memory import check_fits, param_shapes


class ParallelLayout:
    """The (dp, pp, tp) grid of a job (nn.distributed.Grid) and the data-parallel world the
    gradients are averaged over. One process, or tp = pp = 1: dp_world is the world itself.
    A collective (every rank builds it with the same sizes)."""

    def __init__(self, world: World, tp: int = 1, pp: int = 1) -> None:
        self.grid = None
        self.dp_world = world
        if tp * pp > 1:
            self.grid = Grid(world.comm, tp, pp)
            self.dp_world = (MPIWorld(self.grid.dp, collective_timeout=world.collective_timeout)
                             if self.grid.dp_size > 1 else World())


def check_layout(cfg: TrainConfig, world_size: int) -> int:
    """The number of data-parallel ranks of cfg's layout on world_size ranks (dp x pp x tp must
    be the world) -> dp; a UserError otherwise."""
    dp = cfg.dp or max(world_size // (cfg.tp * cfg.pp), 1)
    if dp * cfg.tp * cfg.pp != world_size:
        raise UserError(f"the job has {world_size} rank{'s' if world_size > 1 else ''} but --dp {dp} x --pp {cfg.pp} "
                        f"x --tp {cfg.tp} = {dp * cfg.pp * cfg.tp}; launch dp x pp x tp ranks (mpiexec -n N) "
                        f"or change the layout")
    return dp


class StartupError(UserError):
    """Another rank failed to start (it printed its own error)."""


def agree_started(world: World, error: BaseException | None, what: str = "start") -> None:
    """Collective (every rank calls it): did every rank get here without an error? If not, the
    failing ranks re-raise their own error and the others raise StartupError naming them."""
    failed = error is not None
    if not world.any(failed):
        return
    count = round(world.allreduce_mean(float(failed)) * world.size)
    first = round(world.allreduce_mean(float(world.rank if failed else 0)) * world.size)
    if failed:
        raise error  # type: ignore[misc]
    who = f"rank {first}" if count == 1 else f"{count} ranks"
    raise StartupError(f"{who} failed to {what} (its error is printed above); rank {world.rank} stops too")


def run_dir_in_use(out: Path) -> bool:
    return (out / "latest").exists() or (out / "metrics.jsonl").exists() or any(out.glob("step-*"))


class Trainer:
    """Holds the model, optimizer, data and counters; `run()` trains to cfg.max_iters.

    resume: a run or checkpoint directory to continue (settings checked by config.resume_config).
    overwrite: cfg.out may hold an earlier run; its checkpoints, latest, metrics.jsonl and loss.png
    are removed when `run()` starts (without it, such a directory is refused)."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, log: Callable[[str], None] = print,
                 world: World | None = None, overwrite: bool = False) -> None:
        self.log, self.overwrite = log, overwrite
        self.world = world if world is not None else World()
        self.is_main = self.world.is_main
        error = None
        try:
            self._prepare(cfg, resume)  # no collectives in here
        except Exception as e:
            error = e
        agree_started(self.world, error)
        cfg = self.cfg
        if cfg.device != "cpu" and self.world.size > 1:
            self.world.use_cuda()  # this rank's GPU and the gradient transport (NCCL or MPI)
        self.layout = ParallelLayout(self.world, cfg.tp, cfg.pp)  # after use_cuda: its groups inherit the transport
        self.dp_world = self.layout.dp_world  # gradients are averaged over these ranks only
        if cfg.allreduce_dtype != "float32":
            self.dp_world.reduce_dtype = cfg.allreduce_dtype
        mp = self._split_model()  # tp and/or pp: keep this rank's part of the model
        error = None
        try:
            self._fill_part()  # tp and/or pp: this rank's weights (the seed's or the checkpoint's), and nothing more
        except Exception as e:
            error = e
        agree_started(self.world, error, "load the checkpoint" if self.ckpt is not None else "initialise its weights")
        if cfg.device != "cpu":
            self.model.to(cfg.device)
        backend.set_tf32(cfg.tf32)  # the backend's float32 GEMM precision (--tf32); a no-op on the CPU
        autocast_(self.model, cfg.precision)  # fp16/bf16 GEMMs; the float32 parameters stay the master weights
        self.captured = None  # the CUDA graph of forward+backward (--cuda-graph), recorded at the first step
        self.dp_world.broadcast_parameters(self.model.parameters())  # every rank starts from rank 0's weights
        self.optimizer = make_optimizer(self.model, cfg, self.dp_world, mp)
        self.grad_step = GradientStep(self.optimizer, self.dp_world, self.scaler, cfg, mp)
        error = None
        try:
            if self.ckpt is not None:
                self._load_optimizer(self.ckpt)
        except Exception as e:
            error = e
        agree_started(self.world, error, "load the checkpoint")
        apply_hyperparameters(self.optimizer, cfg)  # a resumed run takes this run's lr, betas, weight decay

    def _split_model(self) -> Any:
        """tp and/or pp > 1 (a collective, after the grid is made): this rank keeps its part of the
        model, the tp rank's shards (tinygrad_lm/parallel_model.py) of its pipeline stage
        (nn/distributed/pipeline.py). Returns GradientStep's model_parallel (None for one part)."""
        cfg, grid = self.cfg, self.layout.grid
        self.pipeline, self.tp_layout = None, None
        self.n_params = self.model.num_parameters()  # the whole model's
        if grid is None:
            return None
        self.grid = grid
        self.shapes = param_shapes(self.model.config)  # the whole model's names and shapes, for checkpoints
        if cfg.tp > 1:  # the same model on every tp rank (placeholders, or --init-from's weights): keep this rank's part
            self.model = TensorParallelGPT(self.model, grid.tp)
            self.tp_layout = self.model.tp_layout()
        if cfg.pp > 1:  # then this rank's stage of it
            self.model = PipelineStage(self.model, grid.p, cfg.pp)
            self.pipeline = Pipeline(self.model, grid.pp, cfg.pp_schedule)
        copies = self.tp_layout.copies() if self.tp_layout is not None else {}
        return ModelParallel(self.world.comm, [grid.tp, grid.pp], copies, self.pipeline)

    def _fill_part(self) -> None:
        """tp and/or pp, after _split_model (no collectives): this rank's parameters, built as placeholders
        (SeedInit), get their values: the checkpoint's or --init-from's (read one tensor at a time) or the
        seed's (the whole model's init drawn one parameter at a time, this rank's slices kept). Never the
        whole model."""
        if self.seed_init is None:
            return
        parts = local_parameters(self.model, self.tp_layout.kinds if self.tp_layout is not None else None)
        t, tp, V = self.grid.t, self.cfg.tp, self.model.config.padded_vocab_size  # the table's rows (--pad-vocab-to)
        if self.ckpt is not None:
            self._load_file(lambda into, path: load_parameters(into, path, t, tp, V), parts, self.ckpt,
                            ckpt_io.MODEL_FILE)
        elif self.init_from:
            fill_parameters(parts, iter_hf_weights(self.init_from, self.model.config.block_size, set(parts)),
                            t, tp, V, where=self.init_from)
        else:
            fill_parameters(parts, self.seed_init.arrays(parts), t, tp, V)
        self.seed_init = None  # its log of draws holds only placeholders, but is not needed any more

    # ---------------------------------------------------------------- start-up (no collectives)
    def _prepare(self, cfg: TrainConfig, resume: str | None) -> None:
        self.ckpt, st = None, None
        dp = check_layout(cfg, self.world.size)
        if resume:
            self.ckpt = ckpt_io.resolve(resume)
            st = ckpt_io.read_state(self.ckpt)
            cfg = resume_config(cfg, st, dp)
        self.cfg, self.out = cfg, Path(cfg.out)
        if self.is_main:
            self._check_out_dir()
        files = resolve_corpus(cfg.data)
        if self.ckpt is not None:
            self.tokenizer = ckpt_io.load_tokenizer(self.ckpt, verify_files=False)  # verified by read_state
        else:
            self.tokenizer = build_tokenizer(cfg, files)
        init_from = cfg.init_from if self.ckpt is None else ""  # a resumed run's weights are its checkpoint's
        if init_from and self.tokenizer.vocab_size != cfg.model.vocab_size:
            raise UserError(f"--tokenizer {cfg.tokenizer}: {self.tokenizer.vocab_size} tokens, but the --init-from "
                            f"model {init_from} has vocab_size {cfg.model.vocab_size}; fine-tune GPT-2 with its own "
                            "vocabulary (--tokenizer gpt2.tiktoken, see README)")
        mcfg = cfg.model_config(self.tokenizer.vocab_size)
        check_fits(mcfg, cfg.batch_size, cfg.precision, cfg.device, training=True, tp=cfg.tp)
        self.data = TokenData(tokenize_to_cache(files, self.tokenizer, cfg.cache_dir), mcfg.block_size,
                              cfg.val_fraction)
        self.seed_init, self.init_from = None, init_from
        if cfg.tp > 1 or cfg.pp > 1:  # no weights yet: each rank fills its own part once split (_fill_part)
            self.seed_init = SeedInit(mcfg, cfg.seed)
            self.model = self.seed_init.model
        elif init_from:
            self.model = load_hf(init_from, mcfg.dropout, mcfg.block_size).train()
        else:
            self.model = GPT(mcfg, seed=cfg.seed)
        self.model.dropout_rng = np.random.default_rng([cfg.seed, 7])
        for m in self.model.modules():
            if hasattr(m, "generator") and m.generator is None:
                m.generator = self.model.dropout_rng
        self.scaler = LossScaler(enabled=cfg.precision == "fp16")  # bf16 has float32's range: no scaling
        self.schedule = make_schedule(cfg)  # rebuilt from this run's settings, also on resume
        self.step, self.tokens_seen, self.best_val = 0, 0, math.inf
        if st is not None:
            self._load_state(self.ckpt, st)

    def _check_out_dir(self) -> None:
        same_run = self.ckpt is not None and self.ckpt.parent.resolve() == self.out.resolve()
        if same_run and self.overwrite:
            raise UserError(f"--overwrite would delete the run {self.out} that --resume continues; use one of them")
        if not same_run and not self.overwrite and self.out.is_dir() and run_dir_in_use(self.out):
            raise UserError(f"--out {self.out} already holds a run (checkpoints or metrics.jsonl); continue it "
                            f"with --resume {self.out}, or start over with --overwrite (deletes its checkpoints "
                            f"and logs), or choose another --out")

    def _load_state(self, ckpt: Path, st: dict) -> None:
        where = ckpt / ckpt_io.STATE_FILE
        if self.seed_init is None:  # (split over ranks: each reads its own part once split, _fill_part)
            self._load_file(load_model, self.model, ckpt, ckpt_io.MODEL_FILE)
        if "loss_scaler" in st:
            self.scaler.load_state_dict(st["loss_scaler"])
        rng = st.get("dropout_rng")
        try:
            self.model.dropout_rng.bit_generator.state = rng
        except (TypeError, ValueError, KeyError) as e:  # a resume without it would not be exact
            raise ckpt_io.CheckpointError(f"checkpoint file {where}: dropout_rng is missing or malformed "
                                          f"({type(e).__name__}: {e}); found {str(rng)[:80]!r}") from None
        try:
            self.step, self.tokens_seen = int(st["step"]), int(st["tokens_seen"])
            self.best_val = float(st["best_val"])
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt_io.CheckpointError(f"checkpoint file {where}: step/tokens_seen/best_val missing or "
                                          f"malformed ({e})") from None

    def _load_optimizer(self, ckpt: Path) -> None:
        into = self.optimizer
        if self.cfg.tp > 1 or self.pipeline is not None:  # the file holds the whole model's moments
            trainer = self

            class ThisPart:  # keep this rank's part of them: its stage's parameters, its tp shards
                def load_state_dict(self, sd: dict) -> None:
                    if trainer.pipeline is not None:
                        sd = stage_optimizer_state(sd, trainer.model, trainer.shapes, bool(trainer.cfg.zero))
                    if trainer.tp_layout is not None:
                        sd = trainer.tp_layout.optimizer_state_local(trainer.optimizer, sd)
                    # copies of this rank's share only (the file is mapped, not read: see below)
                    sd = {**sd, "arrays": {k: np.array(v) for k, v in sd["arrays"].items()}}
                    trainer.optimizer.load_state_dict(sd)
            into = ThisPart()
            self._load_file(lambda part, path: load_optimizer(part, path, mmap=True), into, ckpt, ckpt_io.OPTIM_FILE)
            return
        self._load_file(load_optimizer, into, ckpt, ckpt_io.OPTIM_FILE)

    def _load_file(self, load: Callable[[Any, Path], Any], into: Any, ckpt: Path, name: str) -> None:
        """load(into, ckpt/name); a file that does not fit `into` (names, shapes, metadata) -> CheckpointError."""
        try:
            load(into, ckpt / name)
        except (ValueError, KeyError, TypeError, OSError) as e:
            if isinstance(e, ckpt_io.CheckpointError):
                raise
            raise ckpt_io.CheckpointError(f"cannot load checkpoint {ckpt}: {e}{self._earlier(ckpt)}") from None

    @staticmethod
    def _earlier(ckpt: Path) -> str:
        prev = [str(p) for p in ckpt_io.list_checkpoints(ckpt.parent) if p != ckpt]
        return f"; an earlier checkpoint may still load: --resume {prev[-1]}" if prev else ""

    # ---------------------------------------------------------------- checkpoint
    @property
    def global_batch_size(self) -> int:
        """Rows per optimizer step over the whole job: batch_size x grad_accum x data-parallel ranks."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.dp_world.size

    def state(self) -> dict:
        return {"format": 1, "step": self.step, "tokens_seen": self.tokens_seen, "best_val": self.best_val,
                "model_config": self.model.config.to_dict(), "train_config": self.cfg.flat(),
                "schedule": self.schedule.state_dict(), "loss_scaler": self.scaler.state_dict(),
                "dropout_rng": self.model.dropout_rng.bit_generator.state,
                "data_position": {"seed": self.cfg.seed, "next_step": self.step},
                "tokenizer": ckpt_io.TOKENIZER_FILE, "world_size": self.dp_world.size,
                "global_batch_size": self.global_batch_size}

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes the checkpoint (every rank calls this: ZeRO gathers its shards first). Refuses
        (NonFiniteLoss) when a weight or optimizer moment is not finite: checkpoints on disk stay usable."""
        model_state = None  # None: self.model's own state dict
        optimizer_state = self.optimizer.state_dict() if self.cfg.zero else None
        moments = (list(optimizer_state["arrays"].values()) if optimizer_state is not None else
                   [v for st in self.optimizer.state.values() for v in st.values() if hasattr(v, "dtype")])
        ok = all_finite([p.data for p in self.model.parameters()] + moments)  # every rank: its own part
        if self.cfg.tp > 1 or self.pipeline is not None:  # gathered to the one-process layout on rank 0
            model_state, optimizer_state = self._gather_full(optimizer_state)
        if self.world.any(not ok):
            raise NonFiniteLoss(f"the weights or optimizer moments after step {self.step} are not finite; "
                                f"checkpoint step-{self.step:06d} not written")
        if not self.is_main:
            return None

        class Frozen:  # an already-gathered state, in the shape save_model / save_optimizer expect
            def __init__(self, sd: Any) -> None:
                self.sd = sd

            def state_dict(self) -> Any:
                return self.sd

        def write(d: Path) -> None:
            save_model(self.model if model_state is None else Frozen(model_state), d / ckpt_io.MODEL_FILE)
            save_optimizer(self.optimizer if optimizer_state is None else Frozen(optimizer_state),
                           d / ckpt_io.OPTIM_FILE)
            self.tokenizer.save(d / ckpt_io.TOKENIZER_FILE)
            atomic_write(d / ckpt_io.STATE_FILE, json.dumps(self.state(), indent=1))
        try:
            return ckpt_io.save(self.out, self.step, write)
        except OSError as e:
            raise UserError(f"--out {self.out}: cannot write checkpoint step-{self.step:06d} "
                            f"({e}); the previous checkpoint is kept") from e

    def _gather_full(self, optimizer_state: dict | None) -> tuple[Any, Any]:
        """tp and/or pp (every rank calls it): the whole model's weights and optimizer state in the
        one-process layout on rank 0: each stage of data-parallel replica 0 gathers its tp shards
        (all-gathers over the tp group, one tensor at a time; only tp rank 0 keeps the full arrays),
        then those tp ranks 0 send their stage's to stage 0. The other replicas hold the same values
        and gather nothing. Rank 0, the writer, holds the whole model's weights and moments (the
        file is written in one piece, docs/DESIGN.md); every other rank at most its stage's."""
        sd = optimizer_state if optimizer_state is not None else self.optimizer.state_dict()
        if self.grid.d != 0:  # (after the optimizer's state_dict: ZeRO-1 gathers over dp in it)
            return None, None
        weights, keep = None, self.grid.t == 0
        if self.tp_layout is not None:
            weights = self.tp_layout.full_weights(self.model.named_parameters(), keep=keep)
            sd = self.tp_layout.optimizer_state_full(self.optimizer, sd, keep=keep)
        if self.pipeline is None or not keep:
            return weights, sd
        return gather_checkpoint(self.grid.pp, self.model, sd, self.shapes, bool(self.cfg.zero), weights)

    # ---------------------------------------------------------------- steps
    def batch(self, split: str, step: int, batch_size: int, seed: int) -> tuple[Any, Any]:
        """Host arrays (B, T); the model uploads them to its device (GPT.forward, through pinned memory)."""
        return self.data.get_batch(split, batch_size, seed, step)

    def micro_batches(self, step: int) -> list[tuple[Any, Any]]:
        """This rank's micro-batches for `step`: the global batch (ranks x grad_accum x batch_size
        rows) is drawn once, then cut, so k micro-batches == one batch k times larger, and any
        split of the same global batch over ranks sees the same rows."""
        cfg, rank = self.cfg, self.dp_world.rank
        per_rank = cfg.batch_size * cfg.grad_accum
        x, y = self.batch("train", step, self.global_batch_size, cfg.seed)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        B = cfg.batch_size
        return [(x[i * B:(i + 1) * B], y[i * B:(i + 1) * B]) for i in range(cfg.grad_accum)]

    def train_step(self) -> Any:
        """One optimizer step; returns the mean loss of this rank's micro-batches (a 0-d array).
        On the GPU nothing here waits for the device (but fp16's overflow check): see check_finite."""
        cfg = self.cfg
        for g in self.optimizer.param_groups:
            g["lr"] = self.schedule(self.step)
        self.model.train()
        if cfg.tp > 1 and cfg.model.dropout > 0:
            reseed_sharded_dropout(self.model, self.layout.grid.tp, cfg.seed, self.step)
        if cfg.cuda_graph:  # one replay: the batch and the loss scale in, loss and grads out
            from nn.cuda_graph import CapturedStep
            if self.captured is None:
                self.captured = CapturedStep(self.model, cfg.batch_size, cfg.model.block_size)
            (x, y), = self.micro_batches(self.step)
            total = self.captured(x, y, self.scaler.scale_value if self.scaler.enabled else 1.0)
        elif self.pipeline is not None:  # the loss lives on the last stage (0 on the others)
            total = self.pipeline.run(self.micro_batches(self.step),
                                      self.scaler.scale_value if self.scaler.enabled else 1.0)
            total = 0.0 if total is None else total
        else:
            total = 0.0
            for x, y in self.micro_batches(self.step):
                _, loss = self.model(x, y)
                self.scaler.scale(loss * (1.0 / cfg.grad_accum)).backward()
                total = total + loss.data
        self.grad_step(self.model.parameters(), self.step + 1)  # average, unscale, clip, update
        self.step += 1
        self.tokens_seen += self.global_batch_size * cfg.model.block_size
        return total / cfg.grad_accum

    def check_finite(self, loss: Any) -> float:
        """Synchronise once: the loss averaged over ranks, after checking that no step since
        the last check had a non-finite gradient norm (GPU) -> NonFiniteLoss naming the step."""
        lossf = self.world.allreduce_mean(float(backend.to_numpy(loss))) * self.cfg.pp  # (pp: one stage has it)
        self.grad_step.raise_if_nonfinite()
        if not math.isfinite(lossf):
            raise NonFiniteLoss(f"loss is {lossf} at step {self.step}")
        return lossf

    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over eval_iters fixed batches of each split (the same batches every time)."""
        self.model.eval()
        out = {}
        with no_grad():
            for split in ("train", "val"):
                batches = (self.batch(split, i, self.cfg.batch_size, self.cfg.seed + 1) for i in range(self.cfg.eval_iters))
                if self.pipeline is not None:
                    losses = [self.pipeline.forward_only(x, y) for x, y in batches]
                else:
                    losses = [float(self.model(x, y)[1].item()) for x, y in batches]
                out[split] = float(np.mean(losses))
        self.model.train()
        return out

    def sample_text(self, n_tokens: int, seed: int = 0) -> str:
        from tinygrad_lm.sample import generate
        start = np.asarray([[self.data.val[0]]], dtype=np.int64)
        ids = generate(self.model, start, n_tokens, temperature=0.8, top_k=None, seed=seed)
        return self.tokenizer.decode(backend.to_numpy(ids)[0].tolist())

    # ---------------------------------------------------------------- loop
    def _start_run_dir(self) -> Path:
        """Rank 0: create cfg.out (clearing an old run with --overwrite); the metrics log path."""
        metrics = self.out / "metrics.jsonl"
        try:
            if self.overwrite and self.ckpt is None and self.out.is_dir():
                for d in list(self.out.glob("step-*")):
                    shutil.rmtree(d) if d.is_dir() else d.unlink()
                for name in ("latest", "metrics.jsonl", "loss.png"):
                    (self.out / name).unlink(missing_ok=True)
            self.out.mkdir(parents=True, exist_ok=True)
            truncate_metrics(metrics, self.step)
        except OSError as e:
            raise UserError(f"--out {self.out}: cannot prepare the run directory ({e})") from e
        return metrics

    def run(self) -> int:
        """Train to cfg.max_iters. 0: done or interrupted (checkpoint saved); 3: stopped on a non-finite value."""
        cfg, mcfg = self.cfg, self.model.config
        metrics = None
        if self.is_main:
            metrics_path = self._start_run_dir()
            self.log(f"model: {self.n_params:,} parameters ({mcfg.n_layer} layers, {mcfg.n_head} "
                     f"heads, width {mcfg.n_embd}, context {mcfg.block_size}, vocab {self.tokenizer.vocab_size}); "
                     f"{len(self.data.train):,} train / {len(self.data.val):,} val tokens")
            dp = self.dp_world.size
            self.log(f"global batch {self.global_batch_size} sequences = batch_size {cfg.batch_size} x grad_accum "
                     f"{cfg.grad_accum} x {dp} {'data-parallel ' if cfg.tp * cfg.pp > 1 else ''}rank{'s' if dp > 1 else ''}")
            if cfg.tp > 1 or cfg.pp > 1:
                self.log(f"layout: dp {dp} x pp {cfg.pp} x tp {cfg.tp} = {self.world.size} ranks"
                         + (f"; pipeline schedule {cfg.pp_schedule}" if cfg.pp > 1 else "")
                         + ("; samples at evaluation are off (they decode on one process)" if cfg.sample_tokens else ""))
            if self.step:
                self.log(f"resumed at step {self.step}")
            try:
                metrics = open(metrics_path, "a", encoding="utf-8")
            except OSError as e:
                raise UserError(f"--out {self.out}: cannot open {metrics_path} ({e})") from e
        interrupted = {"flag": False}

        def on_sigint(signum: int, frame: Any) -> None:
            if interrupted["flag"]:  # a second Ctrl-C: stop now (the last checkpoint is intact)
                raise KeyboardInterrupt
            interrupted["flag"] = True
        old_handler = signal.signal(signal.SIGINT, on_sigint)
        bar = progress(total=cfg.max_iters, initial=self.step, desc="train", enabled=cfg.progress and self.is_main)
        t_last, tokens_last = time.perf_counter(), self.tokens_seen
        # Everything built so far (model, optimizer, data, imported libraries) lives for the whole
        # run: freeze it out of Python's cyclic garbage collector, whose full collections would
        # otherwise walk all of it several times a step (a GPU step's host time halved in bf16;
        # benchmarks/RESULTS.md). The graph of each step is still collected as usual.
        gc.collect()
        gc.freeze()
        try:
            while self.step < cfg.max_iters:
                try:
                    loss = self.train_step()
                    bar.update(1)
                    last = self.step == cfg.max_iters
                    if self.step % cfg.log_interval == 0 or self.step % cfg.ckpt_interval == 0 or last:
                        lossf = self.check_finite(loss)  # the one device->host sync per log interval
                        dt = time.perf_counter() - t_last
                        tps = (self.tokens_seen - tokens_last) / max(dt, 1e-9)
                        t_last, tokens_last = time.perf_counter(), self.tokens_seen
                        lr = self.optimizer.param_groups[0]["lr"]
                        bar.set_postfix(loss=f"{lossf:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                        if metrics:
                            metrics.write(json.dumps({"step": self.step, "loss": lossf, "lr": lr,
                                                      "tokens_per_s": tps}) + "\n")
                            metrics.flush()
                    if self.step % cfg.eval_interval == 0 or last:
                        self._evaluate(bar, metrics)
                    saved = self.step % cfg.ckpt_interval == 0 or last
                    if saved:
                        self.save_checkpoint()
                    if self.world.any(interrupted["flag"]):  # every rank stops at the same step
                        if not saved:
                            self.save_checkpoint()
                        if self.is_main:
                            bar.write(f"interrupted at step {self.step}: checkpoint saved; "
                                      f"continue with --resume {self.out}")
                        return 0
                except NonFiniteLoss as e:
                    if self.is_main:
                        self.log(f"error: {e}; stopping. The last good checkpoint is kept in {self.out}")
                    return 3
        finally:
            gc.unfreeze()  # a caller's objects are collectable again
            bar.close()
            if metrics:
                metrics.close()
            signal.signal(signal.SIGINT, old_handler)
        if self.is_main:
            self.log(f"done: {self.step} steps, best val loss {self.best_val:.4f}, checkpoint in {self.out}")
        return 0

    def _evaluate(self, bar: Any, metrics: Any) -> None:
        ev = self.estimate_loss()
        self.best_val = min(self.best_val, ev["val"])
        if not self.is_main:
            return
        bar.write(f"step {self.step}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f} (best {self.best_val:.4f})")
        if self.cfg.sample_tokens > 0 and self.cfg.tp * self.cfg.pp == 1:  # (else no rank holds the whole model)
            bar.write("---- sample ----\n" + self.sample_text(self.cfg.sample_tokens) + "\n----------------")
        metrics.write(json.dumps({"step": self.step, "train_loss": ev["train"], "val_loss": ev["val"]}) + "\n")
        metrics.flush()
        plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
