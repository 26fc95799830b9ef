"""Learning BPE merges from text: count pre-tokens once, then merge the most frequent pair, repeatedly.

Algorithm: pre-tokenize once into unique words with counts (special-token strings are
cut out of the text first and never learned). Keep the count of every adjacent pair
over all words and an index pair -> words that contain it. Each step takes the best
pair from a heap, rewrites only the words that contain it, and updates the counts of
the pairs that changed, pushing their new counts; stale heap entries are skipped when
popped.

Tie rule: the pair with the highest count wins; among equal counts, the smallest pair
(a, b) in lexicographic id order.

Defensive case: should the best pair's bytes already be a token (the same bytes reached
by a second split, e.g. ("ab", "c") after ("a", "bc"); we have not seen it happen, but
nothing here rules it out), the words are rewritten to that existing token and no new
token is made, so token bytes stay unique, as the tiktoken format needs. A pair whose
token would be longer than MAX_TOKEN_BYTES is never merged, and training stops before the
tokens together would hold more than MAX_VOCAB_BYTES (the limits a loaded file is held to).
"""
from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Iterable, Sequence

from tinygrad_lm.progress import progress as progress_bar
if TYPE_CHECKING:
    import regex

from tinygrad_lm.tokenizer.base import MAX_TOKEN_BYTES, MAX_VOCAB_BYTES, special_regex, split, utf8


def merge_pair(ids: list[int], a: int, b: int, new: int) -> list[int]:
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


def count_pretokens(
    texts: Iterable[str], compiled: regex.Pattern, special_tokens: Sequence[str], progress: bool = False
) -> Counter:
    """Count each distinct pre-token over all texts; special-token strings are cut out first."""
    counts: Counter = Counter()
    special = special_regex(frozenset(special_tokens)) if special_tokens else None
    bar = progress_bar(texts, desc="pre-tokenizing", enabled=progress)
    for text in bar:
        chunks = special.split(text)[::2] if special else [text]  # even entries: the text between
        for chunk in chunks:
            counts.update(split(compiled, chunk))
    bar.close()
    return counts


def learn_merges(word_counts: dict[str, int], n_merges: int, progress: bool = False) -> list[tuple[int, int]]:
    """The BPE training loop (see the module docstring); returns at most `n_merges` merges in rank order."""
    words = [list(utf8(w)) for w in word_counts]
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
    total_bytes = 256  # bytes of all tokens, kept below MAX_VOCAB_BYTES
    bar = progress_bar(total=n_merges, desc="merging", enabled=progress)
    while len(merges) < n_merges and heap:
        neg_count, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b)) != -neg_count:
            continue  # stale entry: this pair's count changed after the push
        pair = (a, b)
        if len(vocab[a]) + len(vocab[b]) > MAX_TOKEN_BYTES:
            del pair_counts[pair]  # never merged; a later count change may push it again, to be skipped again
            where.pop(pair, None)
            continue
        token = vocab[a] + vocab[b]
        new_id = bytes_to_id.get(token)
        if new_id is None and total_bytes + len(token) > MAX_VOCAB_BYTES:
            break  # the vocabulary is full (a loaded file could not hold more)
        if new_id is None:  # a genuinely new token (the usual case)
            total_bytes += len(token)
            new_id = len(vocab)
            vocab.append(token)
            bytes_to_id[token] = new_id
            merges.append(pair)
            bar.update(1)

        # rewrite the words that contain the pair, collecting pair count changes
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for w in where.pop(pair):
            old = words[w]
            new = merge_pair(old, a, b, new_id)
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
