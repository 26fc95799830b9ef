"""Loading a tokenizer file of either kind: its "type" field says which class reads it."""
from __future__ import annotations

import os
from typing import Union

from tinygrad_lm.tokenizer import schema
from tinygrad_lm.tokenizer.bpe import BPETokenizer
from tinygrad_lm.tokenizer.char import CharTokenizer

Tokenizer = Union[BPETokenizer, CharTokenizer]
KINDS = {"bpe": BPETokenizer, "char": CharTokenizer}


def tokenizer_from_dict(d: dict, source: str = "tokenizer dict") -> Tokenizer:
    """The tokenizer a dict from `to_dict` describes; a bad dict is a TokenizerFileError naming `source`."""
    return KINDS[schema.check_kind(d, source)].from_dict(d, source=source)


def load_tokenizer(path: Union[str, os.PathLike]) -> Tokenizer:
    """Read a tokenizer JSON file of either kind, or a `.tiktoken` ranks file as GPT-2's tokenizer
    (GPT-2's split pattern and `<|endoftext|>`: `BPETokenizer.gpt2`).

    Every field is checked before any is used: a file that is missing, unreadable, not
    UTF-8, not JSON or not a valid tokenizer is a `TokenizerFileError` (a `UserError`)
    naming the file, the field, what was found and what was expected.
    """
    if str(path).endswith(".tiktoken"):
        return BPETokenizer.gpt2(path)
    return tokenizer_from_dict(schema.read_json(path), source=f"tokenizer file {path}")
