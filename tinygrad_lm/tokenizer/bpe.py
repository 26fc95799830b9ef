"""Byte-level BPE: the tokenizer class, encoding (tiktoken's rule), decoding, special tokens, files.

Byte-level BPE in four sentences. Text is UTF-8 encoded, so every string is a
sequence of the 256 byte values, and those are the first 256 tokens. A regex
first cuts the text into *pre-tokens* (words, numbers, punctuation runs,
whitespace), and merges never cross a pre-token boundary. Training repeatedly
takes the most frequent adjacent pair of tokens and makes it a new token
(`train_bpe.py`). Encoding replays those merges, lowest rank (earliest learned) first.

    >>> tok = BPETokenizer.train("low lower lowest " * 50, vocab_size=270)
    >>> tok.decode(tok.encode("lowest"))
    'lowest'
"""
from __future__ import annotations

import heapq
import os
from typing import Iterable, Optional, Sequence, Union

from nn.serialization import atomic_write
from tinygrad_lm.tokenizer import schema
from tinygrad_lm.tokenizer.base import (
    FORMAT_VERSION,
    MAX_TOKEN_BYTES,
    MAX_VOCAB_BYTES,
    PATTERNS,
    AllowedSpecial,
    TextSource,
    TokenizerFileError,
    as_id,
    as_texts,
    bad_id_error,
    compile_pattern,
    resolve_pattern,
    short,
    special_regex,
    split,
    surrogate_error,
)
from tinygrad_lm.tokenizer.train_bpe import count_pretokens, learn_merges

# Pre-tokens longer than this many bytes are merged with a heap (O(n log n))
# instead of the simple rescan loop (O(n^2)); e.g. a run of 100k spaces.
_LONG_PIECE = 128
# The encode cache is cleared when it grows past this many distinct pre-tokens.
_CACHE_LIMIT = 1 << 18


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
        byte_order: Optional[Sequence[int]] = None,
    ) -> None:
        """Build a tokenizer from merges in rank order: merge i, a pair (a, b), makes token 256 + i.

        `byte_order`: the byte each of the ids 0-255 stands for (a permutation of 0..255; default
        id i is byte i). GPT-2's vocabulary ranks the printable bytes first, so its ids need it.

        `special_tokens` is a list of names, which get consecutive ids after the merged
        vocabulary, or a dict name -> id whose ids are exactly those ids, in any order.
        Anything else is a ValueError naming the merge or token, found and expected.
        """
        self.pattern: str = resolve_pattern(pattern)
        self._regex = compile_pattern(self.pattern)

        # id -> bytes for the byte tokens and the merged tokens
        order = list(range(256)) if byte_order is None else [as_id(b, "byte_order entry") for b in byte_order]
        if sorted(order) != list(range(256)):
            raise ValueError(f"byte_order must be a permutation of the 256 byte values 0..255, got "
                             f"{len(order)} values {short(order)}")
        self.byte_order: list[int] = order
        self._byte_to_id = bytes(sorted(range(256), key=order.__getitem__))  # bytes.translate table: byte -> id
        vocab = [bytes([b]) for b in order]
        bytes_to_id = {b: i for i, b in enumerate(vocab)}
        self.merges: list[tuple[int, int]] = []
        total_bytes = 256
        for rank, pair in enumerate(merges):
            if isinstance(pair, (str, bytes)) or len(pair) != 2:
                raise ValueError(f"merge {rank} is {short(pair)}, not a pair of token ids")
            a, b = as_id(pair[0], f"merge {rank}'s first id"), as_id(pair[1], f"merge {rank}'s second id")
            new_id = 256 + rank
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise ValueError(f"merge {rank} ({a}, {b}) uses an id that is not yet defined (must be < {new_id})")
            if len(vocab[a]) + len(vocab[b]) > MAX_TOKEN_BYTES:
                raise ValueError(
                    f"merge {rank} ({a}, {b}) makes a token of {len(vocab[a]) + len(vocab[b])} bytes, "
                    f"longer than the limit of {MAX_TOKEN_BYTES}"
                )
            total_bytes += len(vocab[a]) + len(vocab[b])
            if total_bytes > MAX_VOCAB_BYTES:
                raise ValueError(
                    f"merge {rank} ({a}, {b}) brings the tokens to {total_bytes} bytes in all, more than the "
                    f"limit of {MAX_VOCAB_BYTES}"
                )
            token = vocab[a] + vocab[b]
            if token in bytes_to_id:
                raise ValueError(
                    f"merge {rank} ({a}, {b}) makes {token[:40]!r}, which is already token {bytes_to_id[token]}"
                )
            vocab.append(token)
            bytes_to_id[token] = new_id
            self.merges.append((a, b))
        self._vocab = vocab
        self._bytes_to_id = bytes_to_id

        # special tokens: name -> id, the ids right after the merged vocabulary
        n = len(vocab)
        if special_tokens is None:
            special_tokens = {}
        if not isinstance(special_tokens, dict):
            names = list(special_tokens)
            special_tokens = {name: n + i for i, name in enumerate(names)}
            if len(special_tokens) != len(names):
                raise ValueError(f"special tokens contain duplicates: {names}")
        end = n + len(special_tokens)
        self.special_tokens: dict[str, int] = {}
        self._special_by_id: dict[int, str] = {}
        for name, i in special_tokens.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"special token {short(name)} must be a non-empty string")
            if any("\ud800" <= c <= "\udfff" for c in name):
                raise ValueError(f"special token {short(name)} is not valid Unicode (it holds a lone surrogate)")
            i = as_id(i, f"special token {short(name)}'s id")
            if i < 0:
                raise ValueError(f"special token {short(name)} has the negative id {i}, expected {n} to {end - 1}")
            if i < n:
                raise ValueError(
                    f"special token {short(name)} has id {i}, inside the merged vocabulary (ids below {n})"
                )
            if i >= end:
                raise ValueError(
                    f"special token {short(name)} has id {i}, past the vocabulary: {len(special_tokens)} special "
                    f"token(s) take the ids right after the merged vocabulary, {n} to {end - 1}"
                )
            if i in self._special_by_id:
                raise ValueError(f"special tokens {short(self._special_by_id[i])} and {short(name)} share id {i}")
            self.special_tokens[name] = i
            self._special_by_id[i] = name
        # id -> bytes for every id below vocab_size (the ids n..end-1 are all special tokens)
        self._id_to_bytes: list[bytes] = vocab + [self._special_by_id[i].encode("utf-8") for i in range(n, end)]
        self._pair_to_id = self._build_pair_table(vocab, bytes_to_id)
        self._cache: dict[str, list[int]] = {}

    @staticmethod
    def _build_pair_table(vocab: list[bytes], bytes_to_id: dict[bytes, int]) -> dict[tuple[int, int], int]:
        """(a, b) -> id of the token whose bytes are bytes(a) + bytes(b), for every such pair.

        This contains every merge (a, b) -> 256 + i, and also any other split of a
        token into two tokens; tiktoken merges by concatenated bytes, so to agree
        with it we must too. A token's id is its rank, so the table gives ranks.
        Only prefixes as long as some token can be tokens, so only those are tried.
        """
        lengths = sorted({len(token) for token in vocab})
        table = {}
        for token_id in range(256, len(vocab)):
            token = vocab[token_id]
            for k in lengths:
                if k >= len(token):
                    break
                left = bytes_to_id.get(token[:k])
                right = bytes_to_id.get(token[k:]) if left is not None else None
                if right is not None:
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
        Training stops early if no adjacent pair is left to merge. The algorithm and
        its tie rule are described in `train_bpe.py`.
        """
        special_tokens = list(special_tokens)
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(
                f"vocab_size {vocab_size} is too small: 256 byte tokens + {len(special_tokens)} special "
                f"tokens need at least {256 + len(special_tokens)}"
            )
        pattern = resolve_pattern(pattern)
        word_counts = count_pretokens(as_texts(text_or_iterable), compile_pattern(pattern), special_tokens, progress)
        merges = learn_merges(word_counts, n_merges, progress=progress)
        return cls(merges, pattern=pattern, special_tokens=special_tokens)

    # -- encoding -------------------------------------------------------------------------------

    def _encode_piece(self, piece: bytes) -> list[int]:
        """BPE on one pre-token (see the class docstring for the rule)."""
        whole = self._bytes_to_id.get(piece)
        if whole is not None:
            return [whole]
        ids = list(piece.translate(self._byte_to_id))
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
        """Encode `text`, treating special-token strings as ordinary text.

        A ValueError if the split pattern skips a character of `text` or `text` holds a lone surrogate.
        """
        pieces = split(self._regex, text)
        if sum(map(len, pieces)) != len(text):
            raise ValueError(
                f"split pattern {short(self.pattern, 200)} does not match every character of the text; "
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
            raise surrogate_error(text) from None
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
            match = special_regex(disallowed).search(text)
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
        for k, chunk in enumerate(special_regex(allowed).split(text)):
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
            raise bad_id_error(ids, self.vocab_size, lambda i: True) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Decode to text; byte sequences that are not valid UTF-8 become U+FFFD (never raises for that)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token."""
        return self.decode_bytes([token_id])

    @property
    def vocab_size(self) -> int:
        """Number of token ids: byte tokens + merges + special tokens."""
        return len(self._id_to_bytes)

    # -- files ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The JSON-ready description of this tokenizer."""
        d = {
            "type": "bpe",
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "merges": [list(m) for m in self.merges],
            "special_tokens": dict(self.special_tokens),
        }
        if self.byte_order != list(range(256)):  # only a vocabulary such as GPT-2's has one
            d["byte_order"] = list(self.byte_order)
        return d

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the tokenizer as one JSON file (one merge per line, so it diffs well), atomically.

        A split pattern that skips characters is refused (a ValueError), as `load` would refuse the file.
        """
        schema.check_pattern(self.pattern, f"cannot save to {path}")
        atomic_write(path, schema.bpe_json(self.to_dict()))

    @classmethod
    def from_dict(cls, d: dict, source: str = "BPE tokenizer dict") -> "BPETokenizer":
        """Inverse of `to_dict`. Every field is checked before any is used; a bad one is a
        TokenizerFileError that starts with `source` (the file name, when loading a file)."""
        pattern, merges, special_tokens, byte_order = schema.check_bpe_fields(d, source)
        try:
            return cls(merges, pattern=pattern, special_tokens=special_tokens, byte_order=byte_order)
        except ValueError as e:  # ids out of range, a duplicate token, a bad special token
            field = ("merges" if str(e).startswith("merge") else "byte_order" if str(e).startswith("byte_order")
                     else "special_tokens")
            raise TokenizerFileError(f"{source}: field {field!r}: {e}") from None

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "BPETokenizer":
        """Read a file written by `save`; a bad file is a TokenizerFileError naming it."""
        return cls.from_dict(schema.read_json(path), source=f"tokenizer file {path}")

    def to_tiktoken(self, path: Union[str, os.PathLike]) -> None:
        """Write tiktoken's ranks file: `base64(token bytes) rank` per line (special tokens excluded).

        Load it in tiktoken with `tiktoken.Encoding(name, pat_str=tok.pattern,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(path), special_tokens=tok.special_tokens)`.
        """
        atomic_write(path, schema.tiktoken_text(self._vocab))

    @classmethod
    def from_tiktoken(
        cls,
        path: Union[str, os.PathLike],
        pattern: str = "gpt4",
        special_tokens: Union[dict[str, int], Sequence[str], None] = None,
    ) -> "BPETokenizer":
        """Read a tiktoken ranks file (such as one written by `to_tiktoken`).

        Ranks must be 0..n-1 with ranks 0-255 the 256 single bytes, in any order (GPT-2's
        vocabulary ranks the printable bytes first: `byte_order`). The merge of each later
        token is recovered by running BPE on its bytes with the lower-ranked tokens only (it
        must end in exactly two tokens). A bad file is a TokenizerFileError naming the file
        and line.
        """
        tokens = schema.read_tiktoken_ranks(path)
        merges = schema.merges_from_ranks(tokens, path)
        return cls(merges, pattern=pattern, special_tokens=special_tokens, byte_order=[t[0] for t in tokens[:256]])

    @classmethod
    def gpt2(cls, path: Union[str, os.PathLike]) -> "BPETokenizer":
        """GPT-2's tokenizer from its tiktoken ranks file (gpt2.tiktoken, r50k_base.tiktoken): GPT-2's split
        pattern and `<|endoftext|>` right after the merged vocabulary (id 50256 for the real file)."""
        return cls.from_tiktoken(path, pattern="gpt2", special_tokens=["<|endoftext|>"])

    def __repr__(self) -> str:
        name = next((k for k, v in PATTERNS.items() if v == self.pattern), "custom")
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"pattern={name}, special_tokens={list(self.special_tokens)})"
        )
