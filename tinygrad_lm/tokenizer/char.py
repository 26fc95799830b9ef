"""The character-level tokenizer: one token per Unicode character of the corpus.

    >>> tok = CharTokenizer.train("hello")
    >>> tok.chars, tok.encode("hole")
    ('ehlo', [1, 3, 2, 0])
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Iterable, Sequence, Union

from nn.serialization import atomic_write
from tinygrad_lm.progress import progress as progress_bar
from tinygrad_lm.tokenizer import schema
from tinygrad_lm.tokenizer.base import (
    FORMAT_VERSION,
    AllowedSpecial,
    TextSource,
    TokenizerFileError,
    as_texts,
    bad_id_error,
)


class CharTokenizer:
    """One token per Unicode character; the vocabulary is the sorted set of the corpus's characters.

    Shares BPETokenizer's interface. There are no special tokens, so `allowed_special`
    is accepted and ignored. Characters outside the vocabulary are an error that names them.
    """

    def __init__(self, chars: str) -> None:
        """`chars[i]` is token i; characters must be distinct and valid Unicode (no lone surrogates)."""
        if not isinstance(chars, str):
            raise ValueError(f"chars must be a string, got {type(chars).__name__}")
        if len(set(chars)) != len(chars):
            dupes = sorted(c for c, k in Counter(chars).items() if k > 1)
            raise ValueError(f"chars contain duplicates: {dupes[:20]!r}")
        surrogates = [c for c in chars if "\ud800" <= c <= "\udfff"]
        if surrogates:
            raise ValueError(f"chars hold lone surrogates (not valid Unicode): {surrogates[:20]!r}")
        self.chars: str = chars
        self._stoi = {c: i for i, c in enumerate(chars)}
        self.special_tokens: dict[str, int] = {}

    @classmethod
    def train(
        cls,
        text_or_iterable: TextSource,
        vocab_size: int | None = None,
        pattern: str | None = None,
        special_tokens: Sequence[str] = (),
        progress: bool = False,
    ) -> "CharTokenizer":
        """Collect the distinct characters of the corpus (sorted by code point).

        `vocab_size`, if given, is an upper bound: a corpus with more distinct
        characters raises. `pattern` is ignored; special tokens are not supported.
        """
        if special_tokens:
            raise ValueError("CharTokenizer does not support special tokens")
        chars: set[str] = set()
        bar = progress_bar(as_texts(text_or_iterable), desc="reading", enabled=progress)
        for text in bar:
            chars.update(text)
        bar.close()
        if vocab_size is not None and len(chars) > vocab_size:
            raise ValueError(f"the corpus has {len(chars)} distinct characters, more than vocab_size={vocab_size}")
        return cls("".join(sorted(chars)))

    def encode_ordinary(self, text: str) -> list[int]:
        """One id per character."""
        try:
            return list(map(self._stoi.__getitem__, text))
        except KeyError:
            unknown = sorted(set(text) - self._stoi.keys())
            shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unknown[:20])
            more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
            raise ValueError(f"characters not in the vocabulary: {shown}{more}") from None

    def encode(self, text: str, allowed_special: AllowedSpecial = "none_raise") -> list[int]:
        """Same as `encode_ordinary` (there are no special tokens)."""
        return self.encode_ordinary(text)

    def encode_batch(self, texts: Iterable[str], allowed_special: AllowedSpecial = "none_raise") -> list[list[int]]:
        """`encode` for each text of a list."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """The characters of the ids."""
        ids = ids if isinstance(ids, list) else list(ids)
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return "".join(map(self.chars.__getitem__, ids))
        except (IndexError, TypeError):
            raise bad_id_error(ids, self.vocab_size, lambda i: True) from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """UTF-8 bytes of `decode(ids)`."""
        return self.decode(ids).encode("utf-8")

    def token_bytes(self, token_id: int) -> bytes:
        """UTF-8 bytes of one token's character."""
        return self.decode_bytes([token_id])

    @property
    def vocab_size(self) -> int:
        """Number of characters."""
        return len(self.chars)

    def to_dict(self) -> dict:
        """The JSON-ready description of this tokenizer."""
        return {"type": "char", "version": FORMAT_VERSION, "chars": self.chars}

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the tokenizer as one JSON file, atomically. An empty vocabulary is refused (it could not be loaded)."""
        if not self.chars:
            raise ValueError(f"refusing to save a char tokenizer with no characters to {path}")
        atomic_write(path, json.dumps(self.to_dict(), ensure_ascii=False) + "\n")

    @classmethod
    def from_dict(cls, d: dict, source: str = "char tokenizer dict") -> "CharTokenizer":
        """Inverse of `to_dict`. Every field is checked first; a bad one is a TokenizerFileError
        that starts with `source` (the file name, when loading a file)."""
        chars = schema.check_char_fields(d, source)
        try:
            return cls(chars)
        except ValueError as e:  # duplicates, lone surrogates
            raise TokenizerFileError(f"{source}: field 'chars': {e}") from None

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "CharTokenizer":
        """Read a file written by `save`; a bad file is a TokenizerFileError naming it."""
        return cls.from_dict(schema.read_json(path), source=f"tokenizer file {path}")

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
