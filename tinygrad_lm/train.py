"""Training: config (presets, TOML/JSON file, flags), the loop, evaluation,
checkpoints with exact resume, and what the user sees (tqdm bar, JSONL log, PNG curve).

    python -m tinygrad_lm train --preset shakespeare-char --max-iters 600 --out runs/demo
    python -m tinygrad_lm train --resume runs/demo --max-iters 2000

Resume is exact: the batch of step k is a pure function of (seed, k) (see data.py),
and model, optimizer, schedule position and dropout RNG are all in the checkpoint,
so N steps + resume + N steps == 2N steps straight, bit for bit.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nn.lr_scheduler import WarmupCosine
from nn.optim import AdamW
from nn.serialization import load_model, load_optimizer, save_model, save_optimizer
from nn.amp import PRECISIONS, LossScaler, autocast_
from nn.distributed import World, ZeRO1, init as init_world, run_or_abort
from nn.utils import clip_grad_norm_
from tensor import backend
from tensor.tensor import no_grad
from tinygrad_lm import checkpoint as ckpt_io
from tinygrad_lm.data import DEFAULT_CORPUS, TokenData, resolve_corpus, read_corpus, tokenize_to_cache
from tinygrad_lm.model import GPT, GPTConfig
from tinygrad_lm.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer


@dataclass
class TrainConfig:
    # data
    data: str = DEFAULT_CORPUS
    tokenizer: str = "char"          # "char", "bpe:VOCAB" (trained on the corpus, cached) or a tokenizer .json
    val_fraction: float = 0.1
    cache_dir: str = ".cache/tinygrad_lm"
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True
    pos_encoding: str = "sinusoidal"
    # optimisation
    batch_size: int = 12
    grad_accum: int = 1
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    # bookkeeping
    seed: int = 1337
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    ckpt_interval: int = 250
    sample_tokens: int = 200
    out: str = "runs/default"
    device: str = "cpu"
    precision: str = "fp32"
    zero: int = 0                    # 1: ZeRO stage 1, optimizer state sharded over the MPI ranks
    allreduce_dtype: str = "float32"  # "float16" halves the bytes of the gradient all-reduce
    cuda_graph: bool = False         # GPU: record forward+backward once as a CUDA graph, replay it each step
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval",
                     "ckpt_interval"):
            if int(getattr(self, name)) < 1:  # (an interval of 0 would be a division by zero mid-run)
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "sample_tokens", "lr", "min_lr", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.allreduce_dtype not in ("float32", "float16"):
            raise ValueError(f"--allreduce-dtype must be float32 or float16, got {self.allreduce_dtype!r}")
        if self.zero not in (0, 1):
            raise ValueError(f"--zero must be 0 or 1, got {self.zero}")
        if self.zero and self.precision == "fp16":
            raise ValueError("--zero 1 does not support --precision fp16 (its loss scaler); use bf16 or fp32")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.cuda_graph and (self.device != "cuda" or self.grad_accum != 1 or self.dropout > 0):
            raise ValueError("--cuda-graph needs --device cuda, --grad-accum 1 and --dropout 0 (a graph replays "
                             f"one recorded micro-batch with its dropout masks); got device {self.device!r}, "
                             f"grad_accum {self.grad_accum}, dropout {self.dropout}")

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=self.n_embd, dropout=self.dropout, bias=self.bias, pos_encoding=self.pos_encoding)


PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT's CPU recipe for shakespeare_char (its README: val loss ~1.88): learned positions and, as
    # nanoGPT's train.py defaults, no biases in Linear and LayerNorm
    "shakespeare-char": dict(tokenizer="char", n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, bias=False,
                             max_iters=2000, lr_decay_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100,
                             dropout=0.0, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=250,
                             eval_iters=20, pos_encoding="learned"),
    # the same model on a byte-level BPE vocabulary learned from the corpus
    "shakespeare-bpe": dict(tokenizer="bpe:2048", n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                            max_iters=2000, lr_decay_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100,
                            dropout=0.0, beta2=0.99, eval_interval=250, eval_iters=20),
}


# ------------------------------------------------------------------ config from preset, file, flags
def _field_types() -> dict[str, Any]:
    return {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    default = getattr(TrainConfig, name, None)
    kind = type(default) if default is not None else str
    if kind is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name.replace('_', '-')}: expected true/false, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{name.replace('_', '-')}: expected {kind.__name__}, got {value!r}") from None


def load_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    if p.suffix == ".toml":
        import tomllib
        d = tomllib.loads(p.read_text())
    elif p.suffix == ".json":
        d = json.loads(p.read_text())
    else:
        raise ValueError(f"config file {p}: expected a .toml or .json file")
    d = d.get("train", d)
    unknown = set(d) - set(_field_types())
    if unknown:
        raise ValueError(f"config file {p}: unknown keys {sorted(unknown)}")
    return d


def make_config(preset: str | None = None, config_file: str | None = None, **overrides: Any) -> TrainConfig:
    """preset < config file < explicit overrides (None values are ignored)."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        values.update(PRESETS[preset])
    if config_file:
        values.update(load_config_file(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - set(_field_types())
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}")
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


# ------------------------------------------------------------------ pieces
def build_tokenizer(cfg: TrainConfig, files: list[Path]) -> Any:
    spec = cfg.tokenizer
    if spec == "char":
        return CharTokenizer.train(read_corpus(files))
    if spec.startswith("bpe:"):
        vocab = int(spec.split(":", 1)[1])
        from tinygrad_lm.data import corpus_key
        cache = Path(cfg.cache_dir) / f"bpe-{vocab}-{corpus_key(files, {'bpe': vocab})}.json"
        if cache.is_file():
            return BPETokenizer.load(cache)
        tok = BPETokenizer.train(read_corpus(files), vocab, special_tokens=("<|endoftext|>",))
        cache.parent.mkdir(parents=True, exist_ok=True)
        tok.save(cache)
        return tok
    if Path(spec).is_file():
        return load_tokenizer(spec)
    raise ValueError(f"--tokenizer: expected 'char', 'bpe:VOCAB' or a tokenizer .json file, got {spec!r}")


def make_optimizer(model: GPT, cfg: TrainConfig, world: World | None = None) -> Any:
    """AdamW with weight decay on 2-D weights only (matmuls, embeddings); none on biases and LayerNorm.
    With cfg.zero == 1 the AdamW state is sharded over the ranks (nn.distributed.ZeRO1)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.zero:
        return ZeRO1(world or World(), groups, lambda gs: AdamW(gs, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)))
    return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def make_schedule(cfg: TrainConfig) -> WarmupCosine:
    return WarmupCosine(cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters)


def model_rng_state(model: GPT) -> Any:
    return model.dropout_rng.bit_generator.state if getattr(model, "dropout_rng", None) is not None else None


class _Frozen:
    """An already-gathered optimizer state, in the shape save_optimizer expects."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state


class NonFiniteLoss(FloatingPointError):
    """The loss or the gradient norm became inf/nan; the step was not applied."""


class Trainer:
    """Holds the model, optimizer, data and counters; `run()` trains to cfg.max_iters."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, log: Callable[[str], None] = print,
                 world: World | None = None) -> None:
        self.cfg, self.log = cfg, log
        self.world = world if world is not None else World()
        if cfg.allreduce_dtype != "float32":
            self.world.reduce_dtype = cfg.allreduce_dtype
        self.is_main = self.world.is_main
        self.out = Path(cfg.out)
        files = resolve_corpus(cfg.data)
        self.resume_state = None
        if resume:
            ckpt = ckpt_io.resolve(resume)
            self.resume_state = ckpt_io.read_state(ckpt)
            self.tokenizer = load_tokenizer(ckpt / ckpt_io.TOKENIZER_FILE)
        else:
            self.tokenizer = build_tokenizer(cfg, files)
        tokens = tokenize_to_cache(files, self.tokenizer, cfg.cache_dir)
        self.data = TokenData(tokens, cfg.block_size, cfg.val_fraction)
        mcfg = cfg.model_config(self.tokenizer.vocab_size)
        if self.resume_state is not None:
            saved = GPTConfig.from_dict(self.resume_state["model_config"])
            if saved != mcfg:
                diff = {k: (v, getattr(mcfg, k)) for k, v in saved.to_dict().items() if getattr(mcfg, k) != v}
                raise ValueError(f"--resume: the checkpoint's model does not match this config "
                                 f"(checkpoint vs now: {diff}); use the checkpoint's settings")
        self.model = GPT(mcfg, seed=cfg.seed)
        self.model.dropout_rng = np.random.default_rng([cfg.seed, 7])
        for m in self.model.modules():
            if hasattr(m, "generator") and m.generator is None:
                m.generator = self.model.dropout_rng
        if cfg.device != "cpu":
            if self.world.size > 1:
                self.world.use_cuda()  # this rank's GPU and the gradient transport (NCCL or MPI)
            self.model.to(cfg.device)
        autocast_(self.model, cfg.precision)  # fp16/bf16 GEMMs; the float32 parameters stay the master weights
        self.scaler = LossScaler(enabled=cfg.precision == "fp16")  # bf16 has float32's range: no scaling
        self.captured = None  # the CUDA graph of forward+backward (--cuda-graph), recorded at the first step
        self.world.broadcast_parameters(self.model.parameters())  # every rank starts from rank 0's weights
        self.optimizer = make_optimizer(self.model, cfg, self.world)
        self.schedule = make_schedule(cfg)
        self.step = 0
        self.first_bad_step: Any = -1  # GPU: a device scalar, the first step with a non-finite grad norm
        if cfg.device != "cpu":
            self.first_bad_step = backend.to_device(np.asarray(-1), cfg.device)
        self.best_val = math.inf
        self.tokens_seen = 0
        if self.resume_state is not None:
            self._load(ckpt_io.resolve(resume))

    # ---------------------------------------------------------------- checkpoint
    def state(self) -> dict:
        return {"format": 1, "step": self.step, "tokens_seen": self.tokens_seen, "best_val": self.best_val,
                "model_config": self.model.config.to_dict(), "train_config": dataclasses.asdict(self.cfg),
                "schedule": self.schedule.state_dict(), "loss_scaler": self.scaler.state_dict(), "dropout_rng": model_rng_state(self.model),
                "data_position": {"seed": self.cfg.seed, "next_step": self.step},
                "tokenizer": ckpt_io.TOKENIZER_FILE}

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes the checkpoint (every rank calls this: ZeRO gathers its shards first)."""
        optimizer_state = self.optimizer.state_dict() if self.cfg.zero else None
        if not self.is_main:
            return None

        def write(d: Path) -> None:
            save_model(self.model, d / ckpt_io.MODEL_FILE)
            save_optimizer(_Frozen(optimizer_state) if self.cfg.zero else self.optimizer, d / ckpt_io.OPTIM_FILE)
            self.tokenizer.save(d / ckpt_io.TOKENIZER_FILE)
            ckpt_io.atomic_write_text(d / ckpt_io.STATE_FILE, json.dumps(self.state(), indent=1))
        return ckpt_io.save(self.out, self.step, write)

    def _load(self, ckpt: Path) -> None:
        st = self.resume_state
        try:
            load_model(self.model, ckpt / ckpt_io.MODEL_FILE)
            load_optimizer(self.optimizer, ckpt / ckpt_io.OPTIM_FILE)
        except ckpt_io.CheckpointError:
            raise
        except Exception as e:
            prev = [str(p) for p in ckpt_io.list_checkpoints(ckpt.parent) if p != ckpt]
            hint = f"; an earlier checkpoint may still load: --resume {prev[-1]}" if prev else ""
            raise ckpt_io.CheckpointError(f"cannot load checkpoint {ckpt}: {e}{hint}") from None
        self.schedule.load_state_dict(st["schedule"])
        if "loss_scaler" in st:
            self.scaler.load_state_dict(st["loss_scaler"])
        if st.get("dropout_rng") is not None:
            self.model.dropout_rng.bit_generator.state = st["dropout_rng"]
        self.step, self.tokens_seen, self.best_val = st["step"], st["tokens_seen"], st["best_val"]

    # ---------------------------------------------------------------- steps
    def batch(self, split: str, step: int, batch_size: int, seed: int) -> tuple[Any, Any]:
        """Host arrays; the model uploads them to its device (GPT.forward, through pinned memory)."""
        return self.data.get_batch(split, batch_size, seed, step)

    def micro_batches(self, step: int) -> list[tuple[Any, Any]]:
        """This rank's micro-batches for `step`: the global batch (world x grad_accum x batch_size
        rows) is drawn once, then cut, so k micro-batches == one batch k times larger."""
        cfg = self.cfg
        world, rank = self.world.size, self.world.rank
        per_rank = cfg.batch_size * cfg.grad_accum
        x, y = self.batch("train", step, per_rank * world, cfg.seed)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        B = cfg.batch_size
        return [(x[i * B:(i + 1) * B], y[i * B:(i + 1) * B]) for i in range(cfg.grad_accum)]

    def train_step(self) -> Any:
        """One optimizer step; returns the mean loss of this rank's micro-batches (a 0-d array).

        On the GPU nothing here waits for the device (except the fp16 loss scaler's
        overflow check, as in PyTorch): the gradient norm stays on the device and is
        checked with the loss at log and checkpoint steps (`check_finite`).
        """
        cfg = self.cfg
        lr = self.schedule(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        total = None
        if cfg.cuda_graph:  # one replay: the batch and the loss scale in, loss and grads out
            from nn.cuda_graph import CapturedStep
            if self.captured is None:
                self.captured = CapturedStep(self.model, cfg.batch_size, cfg.block_size)
            (x, y), = self.micro_batches(self.step)
            total = self.captured(x, y, self.scaler.scale_value if self.scaler.enabled else 1.0)
        else:
            for x, y in self.micro_batches(self.step):
                _, loss = self.model(x, y)
                self.scaler.scale(loss * (1.0 / cfg.grad_accum)).backward()
                total = loss.data if total is None else total + loss.data
        params = self.model.parameters()
        if cfg.zero:  # reduce-scatter, clip, update this rank's shard, all-gather
            norm = self.optimizer.step(cfg.grad_clip)
            if not math.isfinite(norm):
                raise NonFiniteLoss(f"gradient norm is {norm} at step {self.step + 1}")
        else:
            self.world.allreduce_grads(params)  # average over ranks (no-op for one process)
        if not cfg.zero and self.scaler.unscale_(params):  # fp16: skip the step when a gradient overflowed
            if cfg.grad_clip > 0:
                on_host = cfg.device == "cpu"
                norm = clip_grad_norm_(params, cfg.grad_clip, error_if_nonfinite=False, sync=on_host)
                if on_host and not math.isfinite(norm):  # never apply a non-finite update
                    raise NonFiniteLoss(f"gradient norm is {norm} at step {self.step + 1}")
                if not on_host:
                    xp = backend.array_module(norm)
                    bad = ~xp.isfinite(norm)
                    self.first_bad_step = xp.where((self.first_bad_step < 0) & bad, self.step + 1, self.first_bad_step)
            self.optimizer.step()
        self.scaler.update()
        self.optimizer.zero_grad()
        self.step += 1
        self.tokens_seen += cfg.batch_size * cfg.grad_accum * cfg.block_size * self.world.size
        return total / cfg.grad_accum

    def check_finite(self, loss: Any) -> float:
        """Synchronise once: the loss averaged over ranks, after checking that no step since
        the last check had a non-finite gradient norm (GPU) -> NonFiniteLoss naming the step."""
        lossf = self.world.allreduce_mean(float(backend.to_numpy(loss)))
        if not isinstance(self.first_bad_step, int):
            bad = int(backend.to_numpy(self.first_bad_step))
            if bad >= 0:
                raise NonFiniteLoss(f"gradient norm became non-finite at step {bad}")
        if not math.isfinite(lossf):
            raise NonFiniteLoss(f"loss is {lossf} at step {self.step}")
        return lossf

    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over eval_iters fixed batches of each split (the same batches every time)."""
        self.model.eval()
        out = {}
        with no_grad():
            for split in ("train", "val"):
                losses = [float(self.model(*self.batch(split, i, self.cfg.batch_size, self.cfg.seed + 1))[1].item())
                          for i in range(self.cfg.eval_iters)]
                out[split] = float(np.mean(losses))
        self.model.train()
        return out

    def sample_text(self, n_tokens: int, seed: int = 0) -> str:
        from tinygrad_lm.sample import generate
        start = np.asarray([[self.data.val[0]]], dtype=np.int64)
        ids = generate(self.model, start, n_tokens, temperature=0.8, top_k=None, seed=seed)
        return self.tokenizer.decode(backend.to_numpy(ids)[0].tolist())

    # ---------------------------------------------------------------- loop
    def run(self) -> int:
        cfg = self.cfg
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.log(f"model: {self.model.num_parameters():,} parameters ({cfg.n_layer} layers, {cfg.n_head} heads, "
                     f"width {cfg.n_embd}, context {cfg.block_size}, vocab {self.tokenizer.vocab_size}); "
                     f"{len(self.data.train):,} train / {len(self.data.val):,} val tokens")
            if self.step:
                self.log(f"resumed at step {self.step}")
            truncate_metrics(self.out / "metrics.jsonl", self.step)
        metrics = open(self.out / "metrics.jsonl", "a") if self.is_main else None
        interrupted = {"flag": False}

        def on_sigint(signum: int, frame: Any) -> None:
            if interrupted["flag"]:  # a second Ctrl-C: stop now (the last checkpoint is intact)
                raise KeyboardInterrupt
            interrupted["flag"] = True
        old_handler = signal.signal(signal.SIGINT, on_sigint)
        bar = _progress(self.step, cfg.max_iters, enabled=cfg.progress and self.is_main)
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
                except NonFiniteLoss as e:
                    if self.is_main:
                        self.log(f"error: {e}; stopping. The last good checkpoint is kept in {self.out}")
                    return 3
                bar.update(1)
                last = self.step == cfg.max_iters
                if self.step % cfg.log_interval == 0 or self.step % cfg.ckpt_interval == 0 or last:
                    # the one device->host sync per log interval; the mean over ranks
                    try:
                        lossf = self.check_finite(loss)
                    except NonFiniteLoss as e:
                        if self.is_main:
                            self.log(f"error: {e}; stopping. The last good checkpoint is kept in {self.out}")
                        return 3
                    dt = time.perf_counter() - t_last
                    tps = (self.tokens_seen - tokens_last) / max(dt, 1e-9)
                    t_last, tokens_last = time.perf_counter(), self.tokens_seen
                    lr = self.optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{lossf:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                    if metrics:
                        metrics.write(json.dumps({"step": self.step, "loss": lossf, "lr": lr, "tokens_per_s": tps}) + "\n")
                        metrics.flush()
                if self.step % cfg.eval_interval == 0 or last:
                    ev = self.estimate_loss()
                    self.best_val = min(self.best_val, ev["val"])
                    if self.is_main:
                        bar.write(f"step {self.step}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f} "
                                  f"(best {self.best_val:.4f})")
                        if cfg.sample_tokens > 0:
                            bar.write("---- sample ----\n" + self.sample_text(cfg.sample_tokens) + "\n----------------")
                        metrics.write(json.dumps({"step": self.step, "train_loss": ev["train"], "val_loss": ev["val"]}) + "\n")
                        metrics.flush()
                        plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
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
        finally:
            gc.unfreeze()  # a caller's objects are collectable again
            bar.close()
            if metrics:
                metrics.close()
            signal.signal(signal.SIGINT, old_handler)
        if self.is_main:
            self.log(f"done: {self.step} steps, best val loss {self.best_val:.4f}, checkpoint in {self.out}")
        return 0


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the log rows after `step` (the step a run starts or resumes at): rows written
    after the checkpoint by a run that then crashed, or by an earlier run in the same folder."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a crash
            pass
    if len(keep) != len(lines):
        ckpt_io.atomic_write_text(path, "".join(line + "\n" for line in keep))


def plot_losses(metrics_path: Path, png: Path) -> bool:
    """Train/val loss curves from the JSONL log into a PNG (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["train_loss"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), lw=0.8, alpha=0.6, label="train (batch)")
    if ev:
        s, a, b = zip(*ev)
        ax.plot(s, a, "o-", label="train (eval)")
        ax.plot(s, b, "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)
    return True


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def write(self, s: str) -> None: print(s, flush=True)
    def close(self) -> None: ...


def _progress(start: int, total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)


# ------------------------------------------------------------------ CLI
def add_cli(sub: Any) -> None:
    p = sub.add_parser("train", help="train a GPT", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration")
    p.add_argument("--config", help="a .toml or .json file of settings (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue a run from its checkpoint directory")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "out":
            p.add_argument("--out", "--out-dir", dest="out", default=None, help="run directory (checkpoints, logs)")
        elif f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, default=None, metavar="true|false")
        else:
            p.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                           help=f"(default {f.default})")
    p.set_defaults(func=cli_train)


def cli_train(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    try:
        world = init_world()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = print if world.is_main else (lambda s: None)

    def build() -> Trainer:
        if args.resume and not args.preset and not args.config:
            ckpt = ckpt_io.resolve(args.resume)
            st = ckpt_io.read_state(ckpt)
            base = {k: v for k, v in st["train_config"].items() if k in _field_types()}
            base.update({k: v for k, v in overrides.items() if v is not None})
            if args.out is None:  # the run the checkpoint lives in (the saved `out` may be relative to another cwd)
                base["out"] = str(ckpt.parent) if (ckpt.parent / "latest").exists() else st["train_config"]["out"]
            cfg = make_config(None, None, **base)
        else:
            cfg = make_config(args.preset, args.config, **overrides)
        if not world.is_main:
            cfg.progress = False
        return Trainer(cfg, resume=args.resume, log=log, world=world)

    try:
        trainer = build()
    except (ValueError, FileNotFoundError, ckpt_io.CheckpointError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)  # every rank fails the same way: no hang
        return 2
    return run_or_abort(world, trainer.run)
