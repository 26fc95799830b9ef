"""Tokenizers: byte-level BPE (GPT-2 / GPT-4 style) and a character-level one.

Both share one interface: ``encode``, ``encode_ordinary``, ``encode_batch``, ``decode``,
``decode_bytes``, ``token_bytes``, ``vocab_size``, ``to_dict``/``from_dict``, ``save`` and
``load``. ``load_tokenizer(path)`` reads either kind of JSON file, checking every field
first: a bad file is a ``TokenizerFileError`` (a ``UserError``) naming the file and field.

One idea per file, each readable top to bottom:

    base.py       split patterns, limits, TokenizerFileError, helpers on text and ids
    train_bpe.py  learning merges: count pre-tokens, merge the most frequent pair, repeat
    bpe.py        BPETokenizer: encoding (tiktoken's rule), decoding, special tokens
    char.py       CharTokenizer: one token per character
    schema.py     the file formats (JSON, tiktoken ranks): checks for every field, writers
    load.py       load_tokenizer: a file of either kind
    cli.py        `python -m tinygrad_lm tokenizer train|encode|decode` (add_cli)
"""
from tinygrad_lm.tokenizer.base import (
    FORMAT_VERSION,
    GPT2_PATTERN,
    GPT4_PATTERN,
    MAX_TOKEN_BYTES,
    PATTERNS,
    TokenizerFileError,
    resolve_pattern,
)
from tinygrad_lm.tokenizer.bpe import BPETokenizer
from tinygrad_lm.tokenizer.char import CharTokenizer
from tinygrad_lm.tokenizer.cli import add_cli, data_files
from tinygrad_lm.tokenizer.load import Tokenizer, load_tokenizer, tokenizer_from_dict

__all__ = [
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "PATTERNS",
    "FORMAT_VERSION",
    "MAX_TOKEN_BYTES",
    "BPETokenizer",
    "CharTokenizer",
    "Tokenizer",
    "TokenizerFileError",
    "load_tokenizer",
    "tokenizer_from_dict",
    "resolve_pattern",
    "data_files",
    "add_cli",
]
