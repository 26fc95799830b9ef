"""What both tokenizers share: split patterns, limits, the file error, helpers on text and ids.

Nothing here knows about a particular tokenizer; `bpe.py`, `char.py` and `schema.py` build on it.
"""
from __future__ import annotations

import operator
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, Union

from tensor.backend import optional_module
from tinygrad_lm.errors import UserError

if TYPE_CHECKING:
    import regex

# Split patterns, exactly as tiktoken ships them (r50k_base for GPT-2, cl100k_base
# for GPT-4). The possessive forms (`++`, `?+`) are equivalent to the original
# greedy ones but never backtrack, which is faster.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

FORMAT_VERSION = 1
TextSource = Union[str, Iterable[str]]
AllowedSpecial = Union[str, Iterable[str]]

# The longest token, in bytes. Merges double lengths, so 40 merges of a token with itself
# would describe a terabyte; every merged token is checked against this before it is built.
# Training skips a pair that would make a longer token (only runs of over 2**16 bytes could).
MAX_TOKEN_BYTES = 1 << 16
# The most bytes all tokens together may hold (real vocabularies hold a few MiB), so that no
# merges list, however long its tokens, allocates more than this.
MAX_VOCAB_BYTES = 1 << 26
# The regex engine expands a counted repeat such as `a{1000000}` into that many copies when it
# compiles (gigabytes for a few characters of pattern), so a split pattern's counts {m}, {m,},
# {m,n}, multiplied together (a conservative bound when they nest), must stay below this.
MAX_PATTERN_REPEATS = 10_000
MAX_PATTERN_CHARS = 100_000
_COUNTED_REPEAT = re.compile(r"\{(\d+)")


class TokenizerFileError(UserError, ValueError):
    """A tokenizer file (JSON, or a tiktoken ranks file) that cannot be used.

    The message names the file, the field, what was found and what was expected. It is a
    `UserError` (the CLI prints one line and exits with status 2) and, as before the
    files were checked field by field, a `ValueError`.
    """


def resolve_pattern(pattern: str) -> str:
    """Map a pattern name ("gpt2", "gpt4") to its regex; any other string is a regex itself."""
    return PATTERNS.get(pattern, pattern)


def regex_module() -> Any:
    """The `regex` package (the split patterns' Unicode classes such as \\p{L}; extra [bpe])."""
    return optional_module("regex", "bpe", "the BPE tokenizer's split patterns")


def compile_pattern(pattern: str) -> regex.Pattern:
    """Compile a split pattern; a bad regex is a ValueError that quotes it."""
    if not isinstance(pattern, str):
        raise ValueError(f"split pattern must be a string ('gpt2', 'gpt4' or a regex), got {short(pattern)}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"split pattern has {len(pattern)} characters, more than the limit of {MAX_PATTERN_CHARS}")
    repeats = 1
    for m in _COUNTED_REPEAT.finditer(pattern):
        digits = m.group(1)
        repeats *= max(1, int(digits)) if len(digits) <= 6 else MAX_PATTERN_REPEATS + 1
        if repeats > MAX_PATTERN_REPEATS:
            raise ValueError(
                f"split pattern {short(pattern)} has repeat counts ({{m}}, {{m,}}, {{m,n}}) whose product exceeds "
                f"{MAX_PATTERN_REPEATS}; the regex engine would expand them in memory"
            )
    rx = regex_module()
    try:
        return rx.compile(pattern)
    except (rx.error, RecursionError, OverflowError) as e:
        raise ValueError(f"invalid split pattern {short(pattern, 200)}: {e}") from None


def split(compiled: regex.Pattern, text: str) -> list[str]:
    """All matches of the split pattern, as strings (works for patterns with groups too)."""
    if compiled.groups == 0:
        return compiled.findall(text)
    return [m.group(0) for m in compiled.finditer(text)]


def first_uncovered(compiled: regex.Pattern, text: str, timeout: float | None = None) -> int | None:
    """Index of the first character of `text` that no match of the split pattern covers, or None.

    Matches never overlap and come in order, so the text is covered exactly when each
    match starts where the previous one ended and the last one ends at the end.
    """
    pos = 0
    for m in compiled.finditer(text, timeout=timeout):
        if m.start() != pos:
            return pos
        pos = m.end()
    return None if pos == len(text) else pos


@lru_cache(maxsize=64)
def special_regex(specials: frozenset[str]) -> regex.Pattern:
    """One regex matching any of `specials`, longest first, captured (for re.split)."""
    alternatives = sorted(specials, key=lambda s: (-len(s), s))
    return re.compile("(" + "|".join(re.escape(s) for s in alternatives) + ")")


def as_texts(text_or_iterable: TextSource) -> Iterable[str]:
    """A single text as a one-element list; an iterable of texts as it is."""
    if isinstance(text_or_iterable, str):
        return [text_or_iterable]
    return text_or_iterable


def utf8(text: str) -> bytes:
    """UTF-8 bytes of `text`; a lone surrogate (not valid Unicode) is a ValueError naming its index."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise surrogate_error(text, e.start) from None


def surrogate_error(text: str, start: int = 0) -> ValueError:
    """The ValueError for the first lone surrogate of `text` at or after `start`."""
    index = next(i for i in range(start, len(text)) if "\ud800" <= text[i] <= "\udfff")
    return ValueError(f"text is not valid Unicode: lone surrogate U+{ord(text[index]):04X} at index {index}")


def short(value: Any, limit: int = 60) -> str:
    """repr(value) cut to about `limit` characters, for error messages (a bad file may hold anything)."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits has no repr
        return "an integer too long to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_id(value: Any, what: str) -> int:
    """`value` as a Python int (NumPy integers too); bools, floats, strings... are a ValueError naming `what`."""
    if isinstance(value, bool):
        raise ValueError(f"{what} is {short(value)}, not an integer id")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} is {short(value)}, not an integer id") from None


def bad_id_error(ids: Sequence[Any], size: int, valid: Callable[[int], bool]) -> ValueError:
    """A ValueError naming the first entry of `ids` that is not a token id (used after a lookup failed)."""
    for position, i in enumerate(ids):
        try:
            i = operator.index(i)
        except TypeError:
            return ValueError(f"token id {short(i)} at position {position} is not an integer")
        if not (0 <= i < size) or not valid(i):
            return ValueError(f"token id {i} at position {position} is not in the vocabulary (size {size})")
    return ValueError("ids must be a sequence of integers")
