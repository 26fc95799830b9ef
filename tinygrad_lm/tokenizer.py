"""Tokenizers: byte-level BPE (GPT-2 / GPT-4 style) and a character-level one.

Byte-level BPE in four sentences. Text is UTF-8 encoded, so every string is a
sequence of the 256 byte values, and those are the first 256 tokens. A regex
first cuts the text into *pre-tokens* (words, numbers, punctuation runs,
whitespace), and merges never cross a pre-token boundary. Training repeatedly
takes the most frequent adjacent pair of tokens and makes it a new token.
Encoding replays those merges, lowest rank (earliest learned) first.

    >>> tok = BPETokenizer.train("low lower lowest " * 50, vocab_size=270)
    >>> tok.decode(tok.encode("lowest"))
    'lowest'

Both tokenizers share one interface: ``encode``, ``encode_ordinary``,
``encode_batch``, ``decode``, ``decode_bytes``, ``token_bytes``, ``vocab_size``,
``save`` and ``load``. ``load_tokenizer(path)`` reads either kind of JSON file.

File formats (one JSON file each):

    {"type": "bpe", "version": 1, "pattern": "<regex>",
     "merges": [[a, b], ...],                 # rank order: merge i makes token 256 + i
     "special_tokens": {"<|endoftext|>": id}} # ids after the merged vocabulary
    {"type": "char", "version": 1, "chars": "..."}   # token i is chars[i]

``BPETokenizer.to_tiktoken`` / ``from_tiktoken`` convert to and from tiktoken's
ranks file (one ``base64(token_bytes) rank`` line per token).
"""
from __future__ import annotations

import argparse
import base64
import glob
import heapq
import json
import operator
import os
import sys
import tempfile
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence, Union

import regex

__all__ = [
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "BPETokenizer",
    "CharTokenizer",
    "load_tokenizer",
    "add_cli",
]

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

# Pre-tokens longer than this many bytes are merged with a heap (O(n log n))
# instead of the simple rescan loop (O(n^2)); e.g. a run of 100k spaces.
_LONG_PIECE = 128
# The encode cache is cleared when it grows past this many distinct pre-tokens.
_CACHE_LIMIT = 1 << 18


def resolve_pattern(pattern: str) -> str:
    """Map a pattern name ("gpt2", "gpt4") to its regex; any other string is a regex itself."""
    return PATTERNS.get(pattern, pattern)


def _compile(pattern: str) -> regex.Pattern:
    try:
        return regex.compile(pattern)
    except regex.error as e:
        raise ValueError(f"invalid split pattern {pattern!r}: {e}") from None


def _split(compiled: regex.Pattern, text: str) -> list[str]:
    """All matches of the split pattern, as strings (works for patterns with groups too)."""
    if compiled.groups == 0:
        return compiled.findall(text)
    return [m.group(0) for m in compiled.finditer(text)]


@lru_cache(maxsize=64)
def _special_regex(specials: frozenset[str]) -> regex.Pattern:
    """One regex matching any of `specials`, longest first, captured (for re.split)."""
    alternatives = sorted(specials, key=lambda s: (-len(s), s))
    return regex.compile("(" + "|".join(regex.escape(s) for s in alternatives) + ")")


def _texts(text_or_iterable: TextSource) -> Iterable[str]:
    if isinstance(text_or_iterable, str):
        return [text_or_iterable]
    return text_or_iterable


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of `text`; a lone surrogate (not valid Unicode) is a ValueError naming its index."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _surrogate_error(text, e.start) from None


def _surrogate_error(text: str, start: int = 0) -> ValueError:
    index = next(i for i in range(start, len(text)) if "\ud800" <= text[i] <= "\udfff")
    return ValueError(f"text is not valid Unicode: lone surrogate U+{ord(text[index]):04X} at index {index}")


def _merge_pair(ids: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace every non-overlapping occurrence of (a, b) in `ids`, left to right, by `new`."""
    out = []
    i, n = 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """Write to a temporary file next to `path`, fsync, then rename over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _bad_id_error(ids: Sequence[int], size: int, valid) -> ValueError:
    """A ValueError naming the first entry of `ids` that is not a token id (used after a lookup failed)."""
    for position, i in enumerate(ids):
        try:
            i = operator.index(i)
        except TypeError:
            return ValueError(f"token id {i!r} at position {position} is not an integer")
        if not (0 <= i < size) or not valid(i):
            return ValueError(f"token id {i} at position {position} is not in the vocabulary (size {size})")
    return ValueError("ids must be a sequence of integers")


# ----------------------------------------------------------------------------------------------
# Byte-level BPE


class BPETokenizer:
    """Byte-level BPE tokenizer.

    Token ids are ranks: ids 0-255 are the single bytes, id 256 + i is the token
    made by merge i, and special tokens come after the merged vocabulary.

    Encoding follows tiktoken exactly, so an exported vocabulary encodes the same
    way in tiktoken: the text is split around (allowed) special tokens, each
    remaining chunk is cut into pre-tokens by the split pattern, and each
    pre-token is encoded on its own: if its bytes are a token it is that token;
    otherwise, starting from its bytes, repeatedly merge the adjacent pair whose
    concatenation is the token of lowest rank (the leftmost such pair on ties)
    until no adjacent pair concatenates to a token. Results are cached per
    pre-token string.
    """

    def __init__(
        self,
        merges: Sequence[Sequence[int]] = (),
        pattern: str = "gpt4",
        special_tokens: Union[dict[str, int], Sequence[str], None] = None,
    ) -> None:
        """Build a tokenizer from merges in rank order: merge i, a pair (a, b), makes token 256 + i.

        `special_tokens` is a dict name -> id (every id at least 256 + len(merges)) or a
        list of names, which get consecutive ids after the merged vocabulary.
        """
        self.pattern: str = resolve_pattern(pattern)
        self._regex = _compile(self.pattern)

        # id -> bytes for the byte tokens and the merged tokens
        vocab = [bytes([i]) for i in range(256)]
        bytes_to_id = {b: i for i, b in enumerate(vocab)}
        self.merges: list[tuple[int, int]] = []
        for rank, pair in enumerate(merges):
            if len(pair) != 2:
                raise ValueError(f"merge {rank} is {pair!r}, not a pair of token ids")
            a, b = int(pair[0]), int(pair[1])
            new_id = 256 + rank
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise ValueError(f"merge {rank} ({a}, {b}) uses an id that is not yet defined (must be < {new_id})")
            token = vocab[a] + vocab[b]
            if token in bytes_to_id:
                raise ValueError(
                    f"merge {rank} ({a}, {b}) makes {token!r}, which is already token {bytes_to_id[token]}"
                )
            vocab.append(token)
            bytes_to_id[token] = new_id
            self.merges.append((a, b))
        self._vocab = vocab
        self._bytes_to_id = bytes_to_id
        self._pair_to_id = self._build_pair_table(vocab, bytes_to_id)

        # special tokens: name -> id, after the merged vocabulary
        n = len(vocab)
        if special_tokens is None:
            special_tokens = {}
        if not isinstance(special_tokens, dict):
            names = list(special_tokens)
            special_tokens = {name: n + i for i, name in enumerate(names)}
            if len(special_tokens) != len(names):
                raise ValueError(f"special tokens contain duplicates: {names}")
        self.special_tokens: dict[str, int] = {}
        self._special_by_id: dict[int, str] = {}
        for name, i in special_tokens.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"special token {name!r} must be a non-empty string")
            i = int(i)
            if i < n:
                raise ValueError(
                    f"special token {name!r} has id {i}, inside the merged vocabulary (ids below {n})"
                )
            if i in self._special_by_id:
                raise ValueError(f"special tokens {self._special_by_id[i]!r} and {name!r} share id {i}")
            self.special_tokens[name] = i
            self._special_by_id[i] = name
        # id -> bytes for every id below vocab_size (None for unused ids between specials)
        self._id_to_bytes: list[bytes | None] = list(vocab)
        for i in sorted(self._special_by_id):
            self._id_to_bytes.extend([None] * (i - len(self._id_to_bytes)))
            self._id_to_bytes.append(self._special_by_id[i].encode("utf-8"))
        self._cache: dict[str, list[int]] = {}

    @staticmethod
    def _build_pair_table(vocab: list[bytes], bytes_to_id: dict[bytes, int]) -> dict[tuple[int, int], int]:
        """(a, b) -> id of the token whose bytes are bytes(a) + bytes(b), for every such pair.

        This contains every merge (a, b) -> 256 + i, and also any other split of a
        token into two tokens; tiktoken merges by concatenated bytes, so to agree
        with it we must too. A token's id is its rank, so the table gives ranks.
        """
        table = {}
        for token_id in range(256, len(vocab)):
            token = vocab[token_id]
            for k in range(1, len(token)):
                left = bytes_to_id.get(token[:k])
                right = bytes_to_id.get(token[k:])
                if left is not None and right is not None:
                    table[(left, right)] = token_id
        return table

    # -- training -------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        text_or_iterable: TextSource,
        vocab_size: int,
        pattern: str = "gpt4",
        special_tokens: Sequence[str] = (),
        progress: bool = False,
    ) -> "BPETokenizer":
        """Learn merges from a text (or an iterable of texts, e.g. documents or files).

        `vocab_size` counts everything: 256 byte tokens + merges + special tokens.
        Training stops early if no adjacent pair is left to merge.

        Algorithm: pre-tokenize once into unique words with counts (special-token
        strings are cut out of the text first and never learned). Keep the count
        of every adjacent pair over all words and an index pair -> words that
        contain it. Each step takes the best pair from a heap, rewrites only the
        words that contain it, and updates the counts of the pairs that changed,
        pushing their new counts; stale heap entries are skipped when popped.

        Tie rule: the pair with the highest count wins; among equal counts, the
        smallest pair (a, b) in lexicographic id order.

        Defensive case: should the best pair's bytes already be a token (the same
        bytes reached by a second split, e.g. ("ab", "c") after ("a", "bc"); we have
        not seen it happen, but nothing here rules it out), the words are rewritten
        to that existing token and no new token is made, so token bytes stay
        unique, as the tiktoken format needs.
        """
        special_tokens = list(special_tokens)
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(
                f"vocab_size {vocab_size} is too small: 256 byte tokens + {len(special_tokens)} special "
                f"tokens need at least {256 + len(special_tokens)}"
            )
        pattern = resolve_pattern(pattern)
        word_counts = _count_pretokens(
            _texts(text_or_iterable), _compile(pattern), special_tokens, progress=progress
        )
        merges = _learn_merges(word_counts, n_merges, progress=progress)
        return cls(merges, pattern=pattern, special_tokens=special_tokens)

    # -- encoding -------------------------------------------------------------------------------

    def _encode_piece(self, piece: bytes) -> list[int]:
        """BPE on one pre-token (see the class docstring for the rule)."""
        whole = self._bytes_to_id.get(piece)
        if whole is not None:
            return [whole]
        ids = list(piece)
        if len(ids) > _LONG_PIECE:
            return self._encode_long_piece(ids)
        table = self._pair_to_id
        none = len(self._vocab)  # larger than any rank: "no merge"
        while len(ids) >= 2:
            ranks = [table.get(pair, none) for pair in zip(ids, ids[1:])]
            best = min(ranks)
            if best == none:
                break
            i = ranks.index(best)  # leftmost pair of lowest rank
            ids[i : i + 2] = [best]
        return ids

    def _encode_long_piece(self, ids: list[int]) -> list[int]:
        """Same result as the loop in `_encode_piece`, in O(n log n) for long pre-tokens.

        Tokens live in a linked list; a heap holds (rank, position) of candidate pairs.
        Popping the smallest (rank, position) is "lowest rank, leftmost". Entries made
        stale by earlier merges are recognised and skipped.
        """
        table = self._pair_to_id
        n = len(ids)
        tok = list(ids)  # tok[i] is -1 once position i was merged into its left neighbour
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap = [(r, i) for i, pair in enumerate(zip(ids, ids[1:])) if (r := table.get(pair)) is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if tok[i] < 0 or j >= n or table.get((tok[i], tok[j])) != rank:
                continue  # stale
            tok[i], tok[j] = rank, -1
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
                r = table.get((rank, tok[nxt[i]]))
                if r is not None:
                    heapq.heappush(heap, (r, i))
            if prv[i] >= 0:
                r = table.get((tok[prv[i]], rank))
                if r is not None:
                    heapq.heappush(heap, (r, prv[i]))
        return [t for t in tok if t >= 0]

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text`, treating special-token strings as ordinary text."""
        pieces = _split(self._regex, text)
        if sum(map(len, pieces)) != len(text):
            raise ValueError(
                f"split pattern {self.pattern!r} does not match every character of the text; "
                "a pattern must cover all text or the skipped characters would be lost"
            )
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        ids: list[int] = []
        try:
            for piece in pieces:
                piece_ids = cache.get(piece)
                if piece_ids is None:
                    piece_ids = cache[piece] = self._encode_piece(piece.encode("utf-8"))
                ids.extend(piece_ids)
        except UnicodeEncodeError:
            raise _surrogate_error(text) from None
        return ids

    def _allowed_specials(self, allowed_special: AllowedSpecial) -> tuple[frozenset[str], frozenset[str]]:
        """(allowed, disallowed) special-token names for an `allowed_special` argument."""
        everything = frozenset(self.special_tokens)
        if isinstance(allowed_special, str):
            if allowed_special == "all":
                return everything, frozenset()
            if allowed_special == "none":
                return frozenset(), frozenset()
            if allowed_special == "none_raise":
                return frozenset(), everything
            if allowed_special in everything:
                raise ValueError(
                    f"allowed_special={allowed_special!r}: pass a set of names, e.g. {{{allowed_special!r}}}"
                )
            raise ValueError(
                f"allowed_special={allowed_special!r} must be 'all', 'none', 'none_raise' or a set of special tokens"
            )
        allowed = frozenset(allowed_special)
        unknown = allowed - everything
        if unknown:
            raise ValueError(f"allowed_special names unknown special tokens: {sorted(unknown)}")
        return allowed, everything - allowed

    def encode(self, text: str, allowed_special: AllowedSpecial = "none_raise") -> list[int]:
        """Encode `text`, handling special tokens like tiktoken.

        allowed_special: "none_raise" (default): raise ValueError if the text contains
        a special token's string; "all": every special token string becomes its id;
        a set of names: those become ids and any other special token raises;
        "none": special-token strings are encoded as ordinary text.
        """
        allowed, disallowed = self._allowed_specials(allowed_special)
        if disallowed:
            match = _special_regex(disallowed).search(text)
            if match:
                raise ValueError(
                    f"text contains the special token {match.group()!r} at index {match.start()}; "
                    f"pass allowed_special={{{match.group()!r}}} or 'all' to encode it as a special token, "
                    "or allowed_special='none' to encode it as ordinary text"
                )
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        # split() with a capturing group alternates: text, special, text, special, ..., text
        for k, chunk in enumerate(_special_regex(allowed).split(text)):
            if k % 2:
                ids.append(self.special_tokens[chunk])
            elif chunk:
                ids.extend(self.encode_ordinary(chunk))
        return ids

    def encode_batch(self, texts: Iterable[str], allowed_special: AllowedSpecial = "none_raise") -> list[list[int]]:
        """`encode` for each text of a list."""
        return [self.encode(text, allowed_special) for text in texts]

    # -- decoding -------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the tokens stand for (special tokens as their UTF-8 string)."""
        ids = ids if isinstance(ids, list) else list(ids)
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return b"".join(map(self._id_to_bytes.__getitem__, ids))
        except (IndexError, TypeError):
            raise _bad_id_error(ids, self.vocab_size, lambda i: self._id_to_bytes[i] is not None) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Decode to text; byte sequences that are not valid UTF-8 become U+FFFD (never raises for that)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token."""
        return self.decode_bytes([token_id])

    @property
    def vocab_size(self) -> int:
        """Number of token ids: byte tokens + merges + special tokens (max id + 1)."""
        return len(self._id_to_bytes)

    # -- files ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The JSON-ready description of this tokenizer."""
        return {
            "type": "bpe",
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "merges": [list(m) for m in self.merges],
            "special_tokens": dict(self.special_tokens),
        }

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the tokenizer as one JSON file (one merge per line, so it diffs well)."""
        d = self.to_dict()
        merges = ",\n".join(f"    [{a}, {b}]" for a, b in d["merges"])
        text = (
            "{\n"
            f'  "type": "bpe",\n'
            f'  "version": {FORMAT_VERSION},\n'
            f'  "pattern": {json.dumps(d["pattern"])},\n'
            f'  "special_tokens": {json.dumps(d["special_tokens"])},\n'
            f'  "merges": [\n{merges}\n  ]\n'
            "}\n"
        )
        _atomic_write_text(path, text)

    @classmethod
    def from_dict(cls, d: dict) -> "BPETokenizer":
        """Inverse of `to_dict`."""
        _check_header(d, "bpe")
        for key in ("pattern", "merges"):
            if key not in d:
                raise ValueError(f"BPE tokenizer file has no {key!r} field")
        return cls(d["merges"], pattern=d["pattern"], special_tokens=d.get("special_tokens", {}))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "BPETokenizer":
        """Read a file written by `save`."""
        return cls.from_dict(_read_json(path))

    def to_tiktoken(self, path: Union[str, os.PathLike]) -> None:
        """Write tiktoken's ranks file: `base64(token bytes) rank` per line (special tokens excluded).

        Load it in tiktoken with `tiktoken.Encoding(name, pat_str=tok.pattern,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(path), special_tokens=tok.special_tokens)`.
        """
        lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n" for rank, token in enumerate(self._vocab)]
        _atomic_write_text(path, "".join(lines))

    @classmethod
    def from_tiktoken(
        cls,
        path: Union[str, os.PathLike],
        pattern: str = "gpt4",
        special_tokens: Union[dict[str, int], Sequence[str], None] = None,
    ) -> "BPETokenizer":
        """Read a tiktoken ranks file (such as one written by `to_tiktoken`).

        Ranks must be 0..n-1 with ranks 0-255 the single bytes 0-255 in order. The
        merge of each later token is recovered by running BPE on its bytes with the
        lower-ranked tokens only (it must end in exactly two tokens).
        """
        ranked: dict[int, bytes] = {}
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    b64, rank = line.split()
                    ranked[int(rank)] = base64.b64decode(b64, validate=True)
                except ValueError:
                    raise ValueError(f"{path}:{line_no}: expected 'base64 rank', got {line[:80]!r}") from None
        if sorted(ranked) != list(range(len(ranked))):
            raise ValueError(f"{path}: ranks are not the consecutive numbers 0..{len(ranked) - 1}")
        for i in range(min(256, len(ranked))):
            if ranked[i] != bytes([i]):
                raise ValueError(f"{path}: rank {i} is {ranked[i]!r}, expected the single byte {bytes([i])!r}")
        if len(ranked) < 256:
            raise ValueError(f"{path}: has {len(ranked)} ranks; the 256 single bytes must come first")
        bytes_to_rank = {token: rank for rank, token in ranked.items()}
        merges = []
        for rank in range(256, len(ranked)):
            parts = _bpe_by_bytes(ranked[rank], bytes_to_rank, max_rank=rank)
            if len(parts) != 2:
                raise ValueError(
                    f"{path}: token {rank} ({ranked[rank]!r}) is not a merge of two lower-ranked tokens"
                )
            merges.append((bytes_to_rank[parts[0]], bytes_to_rank[parts[1]]))
        return cls(merges, pattern=pattern, special_tokens=special_tokens)

    def __repr__(self) -> str:
        name = next((k for k, v in PATTERNS.items() if v == self.pattern), "custom")
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"pattern={name}, special_tokens={list(self.special_tokens)})"
        )


def _bpe_by_bytes(token: bytes, bytes_to_rank: dict[bytes, int], max_rank: int) -> list[bytes]:
    """tiktoken's merge rule on raw bytes, using only tokens of rank < max_rank."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) >= 2:
        ranks = [bytes_to_rank.get(a + b, max_rank) for a, b in zip(parts, parts[1:])]
        best = min(ranks)
        if best >= max_rank:
            break
        i = ranks.index(best)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _count_pretokens(
    texts: Iterable[str], compiled: regex.Pattern, special_tokens: Sequence[str], progress: bool = False
) -> Counter:
    """Count each distinct pre-token over all texts; special-token strings are cut out first."""
    counts: Counter = Counter()
    special = _special_regex(frozenset(special_tokens)) if special_tokens else None
    bar = _progress(texts, progress, desc="pre-tokenizing", unit="text")
    for text in bar:
        chunks = special.split(text)[::2] if special else [text]  # even entries: the text between
        for chunk in chunks:
            counts.update(_split(compiled, chunk))
    return counts


def _learn_merges(word_counts: dict[str, int], n_merges: int, progress: bool = False) -> list[tuple[int, int]]:
    """The BPE training loop (see `BPETokenizer.train`); returns merges in rank order."""
    words = [list(_utf8(w)) for w in word_counts]
    counts = list(word_counts.values())
    vocab = [bytes([i]) for i in range(256)]
    bytes_to_id = {b: i for i, b in enumerate(vocab)}

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # may list words that lost the pair
    for w, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += counts[w]
            where[pair].add(w)
    # max-heap via negated counts; (-count, a, b) orders by count, then smallest (a, b)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    bar = _progress(None, progress, desc="merging", unit="merge", total=n_merges)
    while len(merges) < n_merges and heap:
        neg_count, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b)) != -neg_count:
            continue  # stale entry: this pair's count changed after the push
        pair = (a, b)
        token = vocab[a] + vocab[b]
        new_id = bytes_to_id.get(token)
        if new_id is None:  # a genuinely new token (the usual case)
            new_id = len(vocab)
            vocab.append(token)
            bytes_to_id[token] = new_id
            merges.append(pair)
            bar.update(1)

        # rewrite the words that contain the pair, collecting pair count changes
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for w in where.pop(pair):
            old = words[w]
            new = _merge_pair(old, a, b, new_id)
            if len(new) == len(old):
                continue  # stale index entry
            c = counts[w]
            for p in zip(old, old[1:]):
                delta[p] -= c
            for p in zip(new, new[1:]):
                delta[p] += c
                where[p].add(w)
            words[w] = new
        for p, d in delta.items():
            if d == 0:
                continue
            c = pair_counts.get(p, 0) + d
            if c > 0:
                pair_counts[p] = c
                heapq.heappush(heap, (-c, p[0], p[1]))
            else:
                pair_counts.pop(p, None)
                where.pop(p, None)
    bar.close()
    return merges


def _progress(iterable, enabled: bool, **kwargs):
    """A tqdm progress bar on stderr when `enabled`; a silent stand-in otherwise."""
    if enabled:
        from tqdm import tqdm

        return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)

    class _Silent:
        def __iter__(self):
            return iter(iterable)

        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

    return _Silent()


# ----------------------------------------------------------------------------------------------
# Character level


class CharTokenizer:
    """One token per Unicode character; the vocabulary is the sorted set of the corpus's characters.

    Shares BPETokenizer's interface. There are no special tokens, so `allowed_special`
    is accepted and ignored. Characters outside the vocabulary are an error that names them.
    """

    def __init__(self, chars: str) -> None:
        """`chars[i]` is token i; characters must be distinct."""
        if len(set(chars)) != len(chars):
            dupes = sorted(c for c, k in Counter(chars).items() if k > 1)
            raise ValueError(f"chars contain duplicates: {dupes!r}")
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
        for text in _progress(_texts(text_or_iterable), progress, desc="reading", unit="text"):
            chars.update(text)
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
            raise _bad_id_error(ids, self.vocab_size, lambda i: True) from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """UTF-8 bytes of `decode(ids)`."""
        return self.decode(ids).encode("utf-8", errors="surrogatepass")

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
        """Write the tokenizer as one JSON file."""
        _atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False) + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        """Inverse of `to_dict`."""
        _check_header(d, "char")
        if not isinstance(d.get("chars"), str):
            raise ValueError("char tokenizer file has no string 'chars' field")
        return cls(d["chars"])

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "CharTokenizer":
        """Read a file written by `save`."""
        return cls.from_dict(_read_json(path))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------------------------
# Loading either kind

Tokenizer = Union[BPETokenizer, CharTokenizer]
_KINDS = {"bpe": BPETokenizer, "char": CharTokenizer}


def _read_json(path: Union[str, os.PathLike]) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return d


def _check_header(d: dict, kind: str) -> None:
    if d.get("type") != kind:
        raise ValueError(f"expected a tokenizer of type {kind!r}, got type {d.get('type')!r}")
    if d.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported {kind} tokenizer version {d.get('version')!r} (this code reads {FORMAT_VERSION})")


def load_tokenizer(path: Union[str, os.PathLike]) -> Tokenizer:
    """Read a tokenizer JSON file of either kind (its "type" field says which)."""
    d = _read_json(path)
    kind = d.get("type")
    if kind not in _KINDS:
        raise ValueError(f"{path}: unknown tokenizer type {kind!r} (expected one of {sorted(_KINDS)})")
    return _KINDS[kind].from_dict(d)


# ----------------------------------------------------------------------------------------------
# Command line: python -m tinygrad_lm tokenizer {train,encode,decode}


def data_files(spec: str) -> list[Path]:
    """A file, a folder (all *.txt inside, sorted) or a glob pattern -> list of files."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise ValueError(f"folder {spec} contains no *.txt files")
        return files
    if p.is_file():
        return [p]
    files = sorted(Path(f) for f in glob.glob(spec) if Path(f).is_file())
    if not files:
        raise ValueError(f"--data {spec!r} is not a file, a folder or a glob matching any file")
    return files


def _read_files(files: Sequence[Path]) -> Iterable[str]:
    for f in files:
        try:
            with open(f, encoding="utf-8", newline="") as fh:  # keep "\r\n" as it is
                yield fh.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{f} is not UTF-8 text ({e})") from None


def _cli_train(args: argparse.Namespace) -> int:
    files = [f for spec in args.data for f in data_files(spec)]
    print(f"training a {args.type} tokenizer on {len(files)} file(s)", file=sys.stderr)
    if args.type == "char":
        tok = CharTokenizer.train(_read_files(files), progress=True)
    else:
        tok = BPETokenizer.train(
            _read_files(files), args.vocab_size, pattern=args.pattern,
            special_tokens=args.special_token or (), progress=True,
        )
    tok.save(args.out)
    print(f"wrote {tok!r} to {args.out}", file=sys.stderr)
    if args.tiktoken and isinstance(tok, BPETokenizer):
        tok.to_tiktoken(args.tiktoken)
        print(f"wrote tiktoken ranks to {args.tiktoken}", file=sys.stderr)
    return 0


def _read_input(args: argparse.Namespace) -> str:
    if getattr(args, "text", None) is not None:
        return args.text
    if args.input and args.input != "-":
        with open(args.input, encoding="utf-8", newline="") as f:  # keep "\r\n" as it is
            return f.read()
    return sys.stdin.read()


def _cli_encode(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    allowed = args.allowed_special
    if allowed not in ("all", "none", "none_raise"):
        allowed = set(allowed.split(","))
    ids = tok.encode(_read_input(args), allowed_special=allowed)
    if args.out and args.out.endswith(".npy"):
        import numpy as np

        np.save(args.out, np.asarray(ids, dtype=np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32))
    else:
        text = " ".join(map(str, ids)) + "\n"
        if args.out:
            Path(args.out).write_text(text)
        else:
            sys.stdout.write(text)
    print(f"{len(ids)} tokens", file=sys.stderr)
    return 0


def _cli_decode(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    if args.ids is not None:
        source = args.ids
    elif args.input and args.input.endswith(".npy"):
        import numpy as np

        source = np.load(args.input).ravel().tolist()
    else:
        source = _read_input(args)
    ids = source if isinstance(source, list) else [int(t) for t in source.replace(",", " ").split()]
    text = tok.decode(ids)
    if args.out:
        with open(args.out, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _cli_errors(func):
    """Turn the ValueErrors/OSErrors we raise for bad input into a one-line message and exit code 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return run


def add_cli(subparsers) -> None:
    """Register `tokenizer train|encode|decode` on an argparse subparsers object."""
    parser = subparsers.add_parser("tokenizer", help="train a tokenizer, encode or decode text")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    p = sub.add_parser("train", help="learn a tokenizer from text files")
    p.add_argument("--data", required=True, action="append",
                   help="a text file, a folder (its *.txt files) or a glob; repeatable")
    p.add_argument("--vocab-size", type=int, default=4096, help="total vocabulary size incl. special tokens")
    p.add_argument("--pattern", default="gpt4", help="split pattern: gpt2, gpt4 or a regex (default gpt4)")
    p.add_argument("--special-token", action="append", metavar="TOKEN",
                   help="a special token such as '<|endoftext|>'; repeatable")
    p.add_argument("--type", choices=["bpe", "char"], default="bpe")
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--tiktoken", metavar="PATH", help="also write tiktoken's ranks file here")
    p.set_defaults(func=_cli_errors(_cli_train))

    p = sub.add_parser("encode", help="text -> token ids")
    p.add_argument("--tokenizer", "-t", required=True, help="tokenizer JSON file")
    p.add_argument("--text", help="text to encode (default: --input or stdin)")
    p.add_argument("--input", "-i", help="UTF-8 text file to encode ('-' for stdin)")
    p.add_argument("--out", "-o", help="write ids here: .npy for a uint16/uint32 array, else space-separated")
    p.add_argument("--allowed-special", default="none_raise",
                   help="all, none, none_raise (default) or comma-separated special tokens")
    p.set_defaults(func=_cli_errors(_cli_encode))

    p = sub.add_parser("decode", help="token ids -> text")
    p.add_argument("--tokenizer", "-t", required=True, help="tokenizer JSON file")
    p.add_argument("--ids", help="space- or comma-separated ids (default: --input or stdin)")
    p.add_argument("--input", "-i", help="file of ids: .npy, or whitespace-separated text")
    p.add_argument("--out", "-o", help="write the text here (default stdout)")
    p.set_defaults(func=_cli_errors(_cli_decode))
