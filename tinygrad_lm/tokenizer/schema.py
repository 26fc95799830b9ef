"""The tokenizer file formats: what a valid file holds, checked field by field, and how it is written.

    {"type": "bpe", "version": 1, "pattern": "<regex>",
     "special_tokens": {"<|endoftext|>": id},  # optional; ids right after the merged vocabulary
     "merges": [[a, b], ...]}                  # rank order: merge i makes token 256 + i
    {"type": "char", "version": 1, "chars": "..."}   # token i is chars[i]

and tiktoken's ranks file, one `base64(token_bytes) rank` line per token.

Every check runs before any of the file is used, and every failure is a
`TokenizerFileError` that names the file, the field, what was found and what was
expected. The checks here are about the JSON itself (types, keys, a pattern that compiles
and splits text); what only a tokenizer can tell (ids in range, no duplicate token) is
checked by its constructor, whose ValueError `from_dict` turns into a TokenizerFileError.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import os
import string
from typing import Any, Union

from tinygrad_lm.tokenizer.base import (
    FORMAT_VERSION,
    MAX_TOKEN_BYTES,
    TokenizerFileError,
    compile_pattern,
    first_uncovered,
    resolve_pattern,
    short,
)

PathLike = Union[str, os.PathLike]
BPE_FIELDS = {"type": True, "version": True, "pattern": True, "special_tokens": False, "merges": True,
              "byte_order": False}
CHAR_FIELDS = {"type": True, "version": True, "chars": True}
KINDS = ("bpe", "char")
MAX_FILE_BYTES = 1 << 28  # a tokenizer file of a million merges takes about 15 MB

# A split pattern must cut this text into pieces that cover every character (a pattern that skips
# characters would lose them when encoding), within PATTERN_TIMEOUT seconds: some prose, then every
# ordered pair of characters from different classes (letters, digits, marks, punctuation, symbols,
# spaces, controls), so each class is seen alone and next to each other class.
_PROBE_CHARS = ["a", "Z", "é", "日", "7", "٣", ".", "'", "“", "—", "(", "😀", "+", "$", " ", "\t", "\n",
                "\r\n", "\u00a0", "\u3000", "\u0301", "\u200d", "\x00", "\x7f", "\ufeff", "\U0010ffff"]
_PROBE_CHARS += [c for c in string.punctuation if c not in _PROBE_CHARS]
PATTERN_PROBE = (
    "Hello, World! It's 2024-12-02: we'll see 3.14159 & 100% naïve café résumé — “quotes” 日本語 中文, "
    "한국어. 😀👩\u200d👦 e\u0301 \t tab\n new\r\n  lines   end "
    + "".join(a + b for a in _PROBE_CHARS for b in _PROBE_CHARS)
    + "".join(_PROBE_CHARS) + string.printable + " ".join(string.printable)
)
PATTERN_TIMEOUT = 2.0


def json_kind(value: Any) -> str:
    """How a decoded JSON value is named in messages: 'a string', 'null', 'the number 1.5'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}" if abs(value) < 10**30 else "a huge integer"
    if isinstance(value, float):
        return f"the number {value}" if math.isfinite(value) else f"the non-finite number {value}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, list):
        return f"a list of {len(value)} entries"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    d = {}
    for key, value in pairs:
        if key in d:
            raise ValueError(f"the key {short(key)} appears twice in one object")
        d[key] = value
    return d


def read_file(path: PathLike, what: str) -> bytes:
    """The bytes of a tokenizer file, at most MAX_FILE_BYTES (so /dev/zero cannot fill the memory)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as e:  # ValueError: a NUL character in the path
        raise TokenizerFileError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise TokenizerFileError(f"{what} {path} is larger than {MAX_FILE_BYTES} bytes; expected a tokenizer file")
    return data


def read_json(path: PathLike) -> dict:
    """The JSON object in the file at `path`; anything else is a TokenizerFileError naming the file."""
    data = read_file(path, "tokenizer file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerFileError(
            f"tokenizer file {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "expected a JSON file written by a tokenizer's save()"
        ) from None
    try:
        d = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise TokenizerFileError(
            f"tokenizer file {path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from None
    except ValueError as e:  # a duplicate key, or an integer with thousands of digits
        raise TokenizerFileError(f"tokenizer file {path} is not a valid tokenizer JSON: {e}") from None
    except RecursionError:
        raise TokenizerFileError(f"tokenizer file {path} holds JSON nested too deeply to be a tokenizer") from None
    if not isinstance(d, dict):
        raise TokenizerFileError(
            f"tokenizer file {path} holds {json_kind(d)}, expected a JSON object with a 'type' field"
        )
    return d


def check_kind(d: Any, source: str) -> str:
    """The "type" field of a tokenizer dict: "bpe" or "char"."""
    if not isinstance(d, dict):
        raise TokenizerFileError(f"{source}: holds {json_kind(d)}, expected a JSON object with a 'type' field")
    if "type" not in d:
        raise TokenizerFileError(f"{source}: has no 'type' field (expected one of {list(KINDS)})")
    kind = d["type"]
    if kind not in KINDS:
        raise TokenizerFileError(
            f"{source}: unknown tokenizer type {short(kind)} in field 'type' (expected one of {list(KINDS)})"
        )
    return kind


def _check_fields(d: Any, kind: str, fields: dict[str, bool], source: str) -> None:
    """The type, version and key set of a tokenizer dict (`fields`: name -> required)."""
    if check_kind(d, source) != kind:
        raise TokenizerFileError(f"{source}: expected a tokenizer of type {kind!r}, got type {short(d['type'])}")
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise TokenizerFileError(
            f"{source}: unknown field {short(unknown[0])} in a {kind} tokenizer (expected the fields {list(fields)})"
        )
    missing = [k for k, required in fields.items() if required and k not in d]
    if missing:
        raise TokenizerFileError(f"{source}: the {kind} tokenizer has no {missing[0]!r} field")
    version = d["version"]
    if not _is_int(version) or version != FORMAT_VERSION:
        raise TokenizerFileError(
            f"{source}: unsupported {kind} tokenizer version {short(version)} in field 'version' "
            f"(this code reads version {FORMAT_VERSION})"
        )


def check_pattern(pattern: Any, source: str) -> str:
    """A split pattern (a name or a regex) that compiles and covers PATTERN_PROBE; returns the regex."""
    if not isinstance(pattern, str):
        raise TokenizerFileError(
            f"{source}: field 'pattern' is {json_kind(pattern)}, expected a string ('gpt2', 'gpt4' or a regex)"
        )
    pattern = resolve_pattern(pattern)
    try:
        compiled = compile_pattern(pattern)
        uncovered = first_uncovered(compiled, PATTERN_PROBE, timeout=PATTERN_TIMEOUT)
    except ValueError as e:
        raise TokenizerFileError(f"{source}: field 'pattern': {e}") from None
    except TimeoutError:
        raise TokenizerFileError(
            f"{source}: field 'pattern' {short(pattern)} took over {PATTERN_TIMEOUT}s to split a short test text"
        ) from None
    if uncovered is not None:
        raise TokenizerFileError(
            f"{source}: field 'pattern' {short(pattern)} skips the character {PATTERN_PROBE[uncovered]!r} of a test "
            "text; a split pattern must match every character, or encoding would lose text"
        )
    return pattern


def check_bpe_fields(d: Any, source: str) -> tuple[str, list[tuple[int, int]], dict[str, int], list[int] | None]:
    """(pattern regex, merges, special tokens, byte order or None) of a BPE tokenizer dict, with every JSON
    type checked (that byte_order is a permutation: the constructor)."""
    _check_fields(d, "bpe", BPE_FIELDS, source)
    pattern = check_pattern(d["pattern"], source)
    merges = d["merges"]
    if not isinstance(merges, list):
        raise TokenizerFileError(f"{source}: field 'merges' is {json_kind(merges)}, expected a list of [a, b] pairs")
    for rank, pair in enumerate(merges):
        if not (isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0]) and _is_int(pair[1])):
            shown = json_kind(pair) if not isinstance(pair, list) else "[" + ", ".join(map(json_kind, pair[:3])) + "]"
            raise TokenizerFileError(
                f"{source}: field 'merges': merge {rank} is {shown}, expected a pair [a, b] of integer token ids"
            )
    specials = d.get("special_tokens", {})
    if not isinstance(specials, dict):
        raise TokenizerFileError(
            f"{source}: field 'special_tokens' is {json_kind(specials)}, expected an object name -> integer id"
        )
    for name, i in specials.items():
        if not _is_int(i):
            raise TokenizerFileError(
                f"{source}: field 'special_tokens': {short(name)} has id {json_kind(i)}, expected an integer id"
            )
    byte_order = d.get("byte_order")
    if byte_order is not None and not (isinstance(byte_order, list) and all(map(_is_int, byte_order))):
        raise TokenizerFileError(f"{source}: field 'byte_order' is {json_kind(byte_order)}, expected a list of "
                                 "the 256 byte values in id order")
    return pattern, [(a, b) for a, b in merges], dict(specials), byte_order


def check_char_fields(d: Any, source: str) -> str:
    """The `chars` string of a char tokenizer dict: non-empty, valid Unicode (duplicates: the constructor)."""
    _check_fields(d, "char", CHAR_FIELDS, source)
    chars = d["chars"]
    if not isinstance(chars, str):
        raise TokenizerFileError(f"{source}: field 'chars' is {json_kind(chars)}, expected a string")
    if not chars:
        raise TokenizerFileError(f"{source}: field 'chars' is empty, expected at least one character")
    return chars


def bpe_json(d: dict) -> str:
    """The text of a BPE tokenizer file for `BPETokenizer.to_dict()`: one merge per line, so it diffs well."""
    merges = ",\n".join(f"    [{a}, {b}]" for a, b in d["merges"])
    return (
        "{\n"
        f'  "type": "bpe",\n'
        f'  "version": {FORMAT_VERSION},\n'
        f'  "pattern": {json.dumps(d["pattern"])},\n'
        f'  "special_tokens": {json.dumps(d["special_tokens"])},\n'
        + (f'  "byte_order": {json.dumps(d["byte_order"])},\n' if "byte_order" in d else "")
        + f'  "merges": [\n{merges}\n  ]\n'
        "}\n"
    )


# ---------------------------------------------------------------------------------------------
# tiktoken's ranks file


def tiktoken_text(tokens: list[bytes]) -> str:
    """tiktoken's ranks file for tokens in rank order: `base64(token) rank` per line."""
    return "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for rank, token in enumerate(tokens))


def read_tiktoken_ranks(path: PathLike) -> list[bytes]:
    """The tokens of a tiktoken ranks file, in rank order.

    Ranks must be the numbers 0..n-1, each once; token bytes distinct, non-empty and at
    most MAX_TOKEN_BYTES long; ranks 0-255 the 256 single bytes (in any order: GPT-2's are permuted).
    """
    data = read_file(path, "tiktoken file")
    ranked: dict[int, bytes] = {}
    rank_of: dict[bytes, int] = {}
    for line_no, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        where = f"tiktoken file {path} line {line_no}"
        fields = line.split()
        if len(fields) != 2:
            raise TokenizerFileError(f"{where}: expected 'base64 rank', got {line[:80]!r}")
        b64, rank_text = fields
        if not (rank_text.isdigit() and len(rank_text) <= 18):  # bytes.isdigit: ASCII digits only
            raise TokenizerFileError(f"{where}: rank {rank_text[:40]!r} is not a non-negative integer")
        rank = int(rank_text)
        try:
            token = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise TokenizerFileError(f"{where}: {b64[:80]!r} is not valid base64") from None
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise TokenizerFileError(
                f"{where}: the token is {len(token)} bytes long, expected 1 to {MAX_TOKEN_BYTES} bytes"
            )
        if rank in ranked:
            raise TokenizerFileError(f"{where}: rank {rank} appears a second time")
        if token in rank_of:
            raise TokenizerFileError(
                f"{where}: token {token[:40]!r} appears a second time (first as rank {rank_of[token]})"
            )
        ranked[rank] = token
        rank_of[token] = rank
    n = len(ranked)
    if n < 256:
        raise TokenizerFileError(f"tiktoken file {path} has {n} ranks; the 256 single bytes must come first")
    missing = next((i for i in range(n) if i not in ranked), None)
    if missing is not None:  # n distinct ranks, not all below n: one below n is missing
        raise TokenizerFileError(
            f"tiktoken file {path}: rank {missing} is missing; ranks must be the numbers 0..{n - 1}, each once"
        )
    for i in range(256):
        if len(ranked[i]) != 1:
            raise TokenizerFileError(
                f"tiktoken file {path}: rank {i} is {ranked[i][:40]!r}; ranks 0-255 must be the 256 single bytes"
            )
    return [ranked[i] for i in range(n)]


def bpe_by_bytes(token: bytes, rank_of: dict[bytes, int], max_rank: int) -> list[bytes]:
    """tiktoken's merge rule on raw bytes, using only tokens of rank < max_rank."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) >= 2:
        ranks = [rank_of.get(a + b, max_rank) for a, b in zip(parts, parts[1:])]
        best = min(ranks)
        if best >= max_rank:
            break
        i = ranks.index(best)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def merges_from_ranks(tokens: list[bytes], path: PathLike) -> list[tuple[int, int]]:
    """The merge of each token after the first 256: BPE on its bytes with the lower-ranked tokens only
    (it must end in exactly two tokens)."""
    rank_of = {token: rank for rank, token in enumerate(tokens)}
    merges = []
    for rank in range(256, len(tokens)):
        parts = bpe_by_bytes(tokens[rank], rank_of, max_rank=rank)
        if len(parts) != 2:
            raise TokenizerFileError(
                f"tiktoken file {path}: token {rank} ({tokens[rank][:40]!r}) is not a merge of two lower-ranked tokens"
            )
        merges.append((rank_of[parts[0]], rank_of[parts[1]]))
    return merges
