"""The training configuration: `TrainConfig` (holding the model's `GPTConfig` as `cfg.model`),
named presets, and the merge preset < config file (TOML or JSON) < flags, validated.

    cfg = make_config("shakespeare-char", "my.toml", max_iters=500, n_layer=6)
    cfg.model.n_layer, cfg.lr            # 6, 0.001

Model settings are written flat everywhere a user types them (`--n-layer 6`, `n_layer = 6`
in a file); `make_config` puts them into `cfg.model`. The model's vocab_size comes from the
tokenizer once it is built (`cfg.model_config(vocab_size)`); until then it is a placeholder.
Bad values raise `ConfigError` (a `UserError`), naming the flag or the file and line.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nn.amp import PRECISIONS
from tinygrad_lm.data import DEFAULT_CORPUS
from tinygrad_lm.errors import UserError
from tinygrad_lm.model import GPTConfig

VOCAB_PLACEHOLDER = 1  # cfg.model.vocab_size until the tokenizer says (TrainConfig.model_config)
# sanity bounds that catch typos (`--n-layer 999999999999`) before any memory is asked for
MAX_MODEL = {"n_layer": 4096, "n_head": 4096, "n_embd": 1 << 16, "block_size": 1 << 20, "pad_vocab_to": 1 << 16}


class ConfigError(UserError, ValueError):
    """A flag, preset or config file value that is wrong; the message names it."""


def default_model() -> GPTConfig:
    return GPTConfig(vocab_size=VOCAB_PLACEHOLDER, block_size=64, n_layer=4, n_head=4, n_embd=128)


@dataclass
class TrainConfig:
    model: GPTConfig = field(default_factory=default_model)
    # data
    data: str = DEFAULT_CORPUS
    tokenizer: str = "char"          # "char", "bpe:VOCAB" (trained on the corpus, cached), a .json or a .tiktoken
    init_from: str = ""              # a Hugging Face GPT-2 directory to fine-tune from (the model comes from it)
    val_fraction: float = 0.1
    cache_dir: str = ".cache/tinygrad_lm"
    # optimisation; batch_size is the micro-batch of one rank: global batch = batch_size x grad_accum x ranks
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
    tf32: bool = False               # GPU: float32 GEMMs on the TF32 tensor cores (PyTorch's allow_tf32)
    zero: int = 0                    # 1: ZeRO stage 1, optimizer state sharded over the MPI ranks
    allreduce_dtype: str = "float32"  # "float16" halves the bytes of the gradient all-reduce
    cuda_graph: bool = False         # GPU: record forward+backward once as a CUDA graph, replay it each step
    progress: bool = True
    collective_timeout: float = 0.0  # seconds a collective may take before the job is aborted; 0: no limit
    # parallel layout (a property of the launch, not of the run: a run resumes on any layout)
    tp: int = 1                      # tensor-parallel ranks (Megatron-LM: heads, MLP and vocabulary split)
    pp: int = 1                      # pipeline-parallel stages (blocks split; micro-batches = grad_accum)
    dp: int = 0                      # data-parallel ranks; 0: world size / (tp x pp)
    pp_schedule: str = "1f1b"        # pipeline schedule: "gpipe" or "1f1b"

    def __post_init__(self) -> None:
        validate(self)

    def model_config(self, vocab_size: int) -> GPTConfig:
        """cfg.model with the tokenizer's vocabulary size."""
        return dataclasses.replace(self.model, vocab_size=vocab_size)

    def flat(self) -> dict[str, Any]:
        """The non-model fields as a flat dict (state.json's "train_config")."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def train_fields() -> dict[str, Any]:
    """Non-model field name -> default."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name != "model"}


def model_fields() -> dict[str, Any]:
    """GPTConfig field name -> default (from default_model()), vocab_size excluded (the tokenizer's)."""
    d = default_model()
    return {f.name: getattr(d, f.name) for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"}


def all_keys() -> list[str]:
    return list(train_fields()) + list(model_fields())


def _bad(name: str, msg: str) -> ConfigError:
    return ConfigError(f"{flag(name)}: {msg}")


def validate(cfg: TrainConfig) -> None:
    """Types, ranges and combinations; raises ConfigError naming the flag, the value and what is expected."""
    if not isinstance(cfg.model, GPTConfig):
        raise ConfigError(f"TrainConfig.model must be a GPTConfig, got {type(cfg.model).__name__}")
    for name, limit in MAX_MODEL.items():
        if getattr(cfg.model, name) > limit:
            raise _bad(name, f"{getattr(cfg.model, name)} is beyond any model this code can train (at most {limit})")
    for name, default in train_fields().items():
        v = getattr(cfg, name)
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise _bad(name, f"expected true or false, got {v!r}")
        elif isinstance(default, int):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise _bad(name, f"expected an integer, got {v!r}")
        elif isinstance(default, float):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise _bad(name, f"expected a number, got {v!r}")
            if not math.isfinite(v):
                raise _bad(name, f"must be a finite number, got {v}")
        elif isinstance(default, str) and not isinstance(v, str):
            raise _bad(name, f"expected a string, got {v!r}")
    for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval", "ckpt_interval"):
        if getattr(cfg, name) < 1:  # (an interval of 0 would be a division by zero mid-run)
            raise _bad(name, f"must be at least 1, got {getattr(cfg, name)}")
    for name in ("max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens", "seed", "lr", "min_lr",
                 "weight_decay", "grad_clip", "collective_timeout"):
        if getattr(cfg, name) < 0:
            raise _bad(name, f"must not be negative, got {getattr(cfg, name)}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise _bad(name, f"must be in [0, 1), got {getattr(cfg, name)}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise _bad("val_fraction", f"must be in (0, 1), got {cfg.val_fraction}")
    if cfg.seed >= 2 ** 63:
        raise _bad("seed", f"must be below 2**63, got {cfg.seed}")
    if cfg.tokenizer.startswith("bpe:"):
        vocab = cfg.tokenizer[4:]
        if not vocab.isdigit() or int(vocab) < 257:
            raise _bad("tokenizer", f"'bpe:VOCAB' needs an integer VOCAB of at least 257 (256 bytes + "
                       f"<|endoftext|>), got {cfg.tokenizer!r}")
    elif cfg.tokenizer != "char" and not cfg.tokenizer.endswith((".json", ".tiktoken")):
        raise _bad("tokenizer", f"expected 'char', 'bpe:VOCAB', a tokenizer .json file or a GPT-2 .tiktoken file, "
                   f"got {cfg.tokenizer!r}")
    choices = {"allreduce_dtype": ("float32", "float16"), "zero": (0, 1), "precision": tuple(PRECISIONS),
               "device": ("cpu", "cuda"), "pp_schedule": ("gpipe", "1f1b")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise _bad(name, f"must be one of {', '.join(map(str, allowed))}; got {getattr(cfg, name)!r}")
    for name in ("tp", "pp"):
        if getattr(cfg, name) < 1:
            raise _bad(name, f"must be at least 1, got {getattr(cfg, name)}")
    if cfg.dp < 0:
        raise _bad("dp", f"must be at least 1 (or 0: world size / (tp x pp)), got {cfg.dp}")
    if cfg.model.n_head % cfg.tp:
        raise ConfigError(f"--tp {cfg.tp}: n_head {cfg.model.n_head} is not divisible by tp (each tensor-parallel "
                          f"rank holds whole attention heads); choose a tp that divides {cfg.model.n_head}")
    if cfg.model.n_layer < cfg.pp:
        raise ConfigError(f"--pp {cfg.pp}: only {cfg.model.n_layer} layer{'s' * (cfg.model.n_layer > 1)} (n_layer) to "
                          f"split into {cfg.pp} pipeline stages; expected pp <= n_layer")
    if cfg.cuda_graph and (cfg.pp > 1 or cfg.tp > 1):
        raise ConfigError(f"--cuda-graph is not supported with model parallelism (--tp {cfg.tp}, --pp {cfg.pp}): "
                          "its collectives would have to be recorded in the graph")
    if cfg.zero and cfg.precision == "fp16":
        raise ConfigError("--zero 1 does not support --precision fp16 (its loss scaler); use bf16 or fp32")
    if cfg.cuda_graph and (cfg.device != "cuda" or cfg.grad_accum != 1 or cfg.model.dropout > 0):
        raise ConfigError("--cuda-graph needs --device cuda, --grad-accum 1 and --dropout 0 (a graph replays "
                          f"one recorded micro-batch with its dropout masks); got device {cfg.device!r}, "
                          f"grad_accum {cfg.grad_accum}, dropout {cfg.model.dropout}")


PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT's CPU recipe for shakespeare_char (its README: val loss ~1.88): learned positions and, as
    # nanoGPT's train.py defaults, no biases in Linear and LayerNorm
    "shakespeare-char": dict(tokenizer="char", n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, bias=False,
                             max_iters=2000, lr_decay_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100,
                             dropout=0.0, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=250,
                             eval_iters=20, pos_encoding="learned"),
    # nanoGPT's config/finetune_shakespeare.py: fine-tune GPT-2 weights (--init-from DIR, with GPT-2's vocabulary
    # --tokenizer gpt2.tiktoken) at a constant learning rate 3e-5 (min_lr = lr, no warm-up), 1 x 32 sequences per rank
    # per step; weight decay, beta2 and clipping are nanoGPT train.py's defaults. block_size is the checkpoint's
    # (1024 for GPT-2; a smaller --block-size crops the positions).
    "gpt2-finetune": dict(lr=3e-5, min_lr=3e-5, warmup_iters=0, lr_decay_iters=20, max_iters=20, batch_size=1,
                          grad_accum=32, eval_interval=5, eval_iters=40, ckpt_interval=5, weight_decay=0.1,
                          beta2=0.95, grad_clip=1.0, dropout=0.0),
    # the same model on a byte-level BPE vocabulary learned from the corpus
    "shakespeare-bpe": dict(tokenizer="bpe:2048", n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                            max_iters=2000, lr_decay_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100,
                            dropout=0.0, beta2=0.99, eval_interval=250, eval_iters=20),
    # GPT-2 small (124M) on one GPU: 12 layers, 12 heads, width 768, context 1024, learned positions, biases;
    # the vocabulary learned from the corpus at GPT-2's size (bpe:50257, ~7 s on the default corpus and cached
    # in --cache-dir; a small corpus runs out of pairs first: Shakespeare gives 49,919 tokens) or GPT-2's own
    # (--tokenizer gpt2.tiktoken), the table padded to a multiple of 64 rows (50257 -> 50304). nanoGPT's
    # train_gpt2 hyper-parameters (lr 6e-4 -> 6e-5, beta2 0.95, weight decay 0.1, clip 1.0, no dropout) with the
    # schedule scaled to a single-GPU run (16 x 1024 tokens a step, warm-up 100 of 2000 steps) and grad_accum 1,
    # so that --cuda-graph applies: train --preset gpt2-124m --device cuda --precision bf16 --cuda-graph
    "gpt2-124m": dict(tokenizer="bpe:50257", n_layer=12, n_head=12, n_embd=768, block_size=1024, pad_vocab_to=64,
                      bias=True, pos_encoding="learned", dropout=0.0, batch_size=16, grad_accum=1, max_iters=2000,
                      lr_decay_iters=2000, lr=6e-4, min_lr=6e-5, warmup_iters=100, weight_decay=0.1, beta1=0.9,
                      beta2=0.95, grad_clip=1.0, eval_interval=250, eval_iters=20),
}


# ------------------------------------------------------------------ merging
def unknown_key_message(key: str) -> str:
    """`n-layer` -> did you mean n_layer; typos -> the closest keys."""
    keys = all_keys()
    if key.replace("-", "_") in keys:
        return f"unknown key {key!r} (did you mean {key.replace('-', '_')!r}? keys are written with underscores)"
    close = difflib.get_close_matches(key.replace("-", "_"), keys, n=3, cutoff=0.6)
    return f"unknown key {key!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")


def coerce(name: str, value: Any, where: str) -> Any:
    """A flag's string (or a file's value) -> the field's type; `where` names the source in errors."""
    defaults = {**train_fields(), **model_fields()}
    kind = type(defaults[name])
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    try:
        out = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where}: expected {'an integer' if kind is int else kind.__name__}, got {value!r}") from None
    if kind is float and not math.isfinite(out):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    return out


def _toml_module() -> Any:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ConfigError("reading a .toml config on Python 3.10 needs tomli: pip install tomli "
                              "(a dependency of tinygrad-lm: pip install -e .)") from None
    return tomllib


def load_config_file(path: str) -> dict[str, Any]:
    """A .toml or .json file of flat settings (optionally under [train]) -> {key: typed value}."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config: config file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config: cannot read {p}: {e}") from None
    if p.suffix == ".toml":
        tomllib = _toml_module()
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:  # its message says "(at line L, column C)"
            raise ConfigError(f"config file {p}: invalid TOML: {e}") from None
    elif p.suffix == ".json":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {p}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {p}: expected a JSON object of settings, got {type(d).__name__}")
    else:
        raise ConfigError(f"--config: expected a .toml or .json file, got {p}")
    d = d.get("train", d)
    if not isinstance(d, dict):
        raise ConfigError(f"config file {p}: [train] must be a table of settings")
    problems = [unknown_key_message(k) for k in d if k not in all_keys()]
    if problems:
        raise ConfigError(f"config file {p}: " + "; ".join(problems))
    return {k: coerce(k, v, f"config file {p}: {k}") for k, v in d.items()}


def model_from_init(values: dict[str, Any]) -> GPTConfig:
    """With init_from, the model is the Hugging Face checkpoint's: a model setting that differs is refused,
    but for dropout and a block_size up to the checkpoint's n_positions (the positions are cropped)."""
    from tinygrad_lm.hf import read_hf_config
    hf = read_hf_config(values["init_from"])
    for k, v in values.items():
        if k in model_fields() and k not in ("dropout", "block_size") and v != getattr(hf, k):
            raise _bad(k, f"{v!r} conflicts with the --init-from checkpoint {values['init_from']}, whose model has "
                          f"{k} {getattr(hf, k)!r}; leave the model settings out: the model comes from the checkpoint")
    block = values.get("block_size", hf.block_size)
    if block > hf.block_size:
        raise _bad("block_size", f"{block} is longer than the --init-from checkpoint's context of {hf.block_size}")
    return dataclasses.replace(hf, dropout=values.get("dropout", 0.0), block_size=block)


def config_from_values(values: dict[str, Any], where: str = "config", resolve_init_from: bool = True) -> TrainConfig:
    """Flat {key: value} (train and model keys) -> a validated TrainConfig. With init_from (and
    resolve_init_from) the model settings are the Hugging Face checkpoint's (model_from_init)."""
    problems = [unknown_key_message(k) for k in values if k not in all_keys()]
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    model_keys = model_fields()
    vocab = VOCAB_PLACEHOLDER
    if values.get("init_from") and resolve_init_from:
        hf = model_from_init(values)
        values, vocab = {**values, **{k: v for k, v in hf.to_dict().items() if k in model_keys}}, hf.vocab_size
    model_kw = {k: v for k, v in values.items() if k in model_keys}
    for name, limit in MAX_MODEL.items():  # before GPTConfig sees a huge value
        if isinstance(model_kw.get(name), int) and model_kw[name] > limit:
            raise _bad(name, f"{model_kw[name]} is beyond any model this code can train (at most {limit})")
    try:
        model = dataclasses.replace(default_model(), vocab_size=vocab, **model_kw)
    except ValueError as e:  # GPTConfig's own checks; name the flag where the message names the field
        msg = str(e)
        for k in model_keys:
            msg = msg.replace(f"GPTConfig: {k} ", f"{flag(k)}: ", 1)
        raise ConfigError(msg) from None
    return TrainConfig(model=model, **{k: v for k, v in values.items() if k not in model_keys})


def make_config(preset: str | None = None, config_file: str | None = None, resolve_init_from: bool = True,
                **overrides: Any) -> TrainConfig:
    """preset < config file < explicit overrides (None values are ignored). Overrides are flat keys,
    train or model (`n_layer=2`), as strings (from flags) or typed values. resolve_init_from=False
    (a resumed run) keeps the model settings given instead of reading the init_from checkpoint's."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
        values.update(PRESETS[preset])
    if config_file:
        values.update(load_config_file(config_file))
    given = {k: v for k, v in overrides.items() if v is not None}
    problems = [unknown_key_message(k) for k in given if k not in all_keys()]
    if problems:
        raise ConfigError("make_config: " + "; ".join(problems))
    values.update({k: coerce(k, v, flag(k)) for k, v in given.items()})
    if preset == "gpt2-finetune" and not values.get("init_from"):
        raise ConfigError("--preset gpt2-finetune needs --init-from DIR, a Hugging Face GPT-2 directory (config.json "
                          "+ model.safetensors), and --tokenizer FILE.tiktoken, GPT-2's vocabulary (see README)")
    return config_from_values(values, resolve_init_from=resolve_init_from)


# ------------------------------------------------------------------ resume
# Settings a resumed run may change: the schedule, the optimizer's hyper-parameters and bookkeeping.
# They are applied exactly (the schedule and the optimizer groups are rebuilt from them) and recorded
# in the new checkpoints. Everything else (the model, tokenizer, data, seed, precision, batch) would
# make the resumed run a different run, so a change is refused.
RESUMABLE = ("max_iters", "lr", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "beta1",
             "beta2", "eval_interval", "eval_iters", "log_interval", "ckpt_interval", "sample_tokens", "progress",
             "out", "device", "collective_timeout", "cache_dir", "zero", "allreduce_dtype", "cuda_graph",
             "tf32")
LAYOUT = ("tp", "pp", "dp", "pp_schedule")  # the parallel layout: this launch's, never taken from a checkpoint


class ResumeError(UserError, ValueError):
    """--resume with settings that would make it another run."""


def resume_config(cfg: TrainConfig, state: dict, world_size: int, where: str = "--resume") -> TrainConfig:
    """Check `cfg` against a checkpoint's state.json and return the config to resume with.

    On another number of ranks the global batch (batch_size x grad_accum x ranks) is kept by
    changing grad_accum (or else batch_size) when it divides; otherwise ResumeError."""
    try:
        saved_model = GPTConfig.from_dict(state["model_config"])
        saved = dict(state["train_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ResumeError(f"{where}: state.json has no valid model_config/train_config ({e})") from None
    problems = []
    now_model = cfg.model_config(saved_model.vocab_size)
    for k, v in saved_model.to_dict().items():
        if getattr(now_model, k) != v:
            problems.append(f"{flag(k)}: {v!r} in the checkpoint, {getattr(now_model, k)!r} now")
    fixed = [k for k in train_fields() if k not in RESUMABLE + LAYOUT and k not in ("batch_size", "grad_accum")]
    for k in fixed:
        if k in saved and saved[k] != getattr(cfg, k):
            problems.append(f"{flag(k)}: {saved[k]!r} in the checkpoint, {getattr(cfg, k)!r} now")
    saved_world = int(state.get("world_size", 1))
    B, A = int(saved.get("batch_size", cfg.batch_size)), int(saved.get("grad_accum", cfg.grad_accum))
    G = int(state.get("global_batch_size", B * A * saved_world))
    if world_size == saved_world:
        for k, v in (("batch_size", B), ("grad_accum", A)):
            if getattr(cfg, k) != v:
                problems.append(f"{flag(k)}: {v!r} in the checkpoint, {getattr(cfg, k)!r} now")
    elif cfg.batch_size * cfg.grad_accum * world_size != G:
        if G % (cfg.batch_size * world_size) == 0:
            cfg = dataclasses.replace(cfg, grad_accum=G // (cfg.batch_size * world_size))
        elif G % (cfg.grad_accum * world_size) == 0:
            cfg = dataclasses.replace(cfg, batch_size=G // (cfg.grad_accum * world_size))
        else:
            problems.append(f"the global batch is {G} rows (batch_size {B} x grad_accum {A} x {saved_world} "
                            f"ranks), which {world_size} ranks cannot split evenly; resume on a number of "
                            f"ranks that divides {G}, or pass --batch-size and --grad-accum with "
                            f"batch_size x grad_accum x {world_size} == {G}")
    if problems:
        raise ResumeError(f"{where}: these settings cannot change when resuming (leave them out to keep the "
                          f"checkpoint's, or start a new run with another --out): " + "; ".join(problems))
    return cfg
