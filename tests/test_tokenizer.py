"""Tests for tinygrad_lm.tokenizer: BPE training, encode/decode, special tokens, files, tiktoken, CLI."""
from __future__ import annotations

import argparse
import json
import os
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinygrad_lm import cli
from tinygrad_lm.tokenizer import (
    GPT2_PATTERN,
    GPT4_PATTERN,
    BPETokenizer,
    CharTokenizer,
    add_cli,
    load_tokenizer,
)
from tinygrad_lm.tokenizer.train_bpe import merge_pair as _merge_pair

# Deterministic hypothesis runs, no per-example deadline (first encodes fill caches). These
# properties are cheap, so they draw 3x the active profile's examples (300 under the default).
N_EXAMPLES = settings.default.max_examples
SETTINGS = settings(
    derandomize=True, deadline=None, max_examples=3 * N_EXAMPLES, suppress_health_check=[HealthCheck.too_slow]
)
EOT = "<|endoftext|>"
PAD = "<|pad|>"

WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an each "
    "she which do their time if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over know "
    "water than call first who may down side been now find don't it's we're I'll you've they'd 1234 2024 "
    "3.14159 hello, world! (parenthesis) [brackets] {braces} #hash @at $dollar 100% a+b=c x*y<z"
).split()
EXTRA = [
    "Ünïcödé façade naïve café résumé — “quotes” ‘single’ … ",
    "日本語のテキストと中文文本，还有한국어 텍스트. ",
    "emoji: 😀😃😄 👩‍👩‍👧‍👦 🇺🇸 ✨ ",
    "combining: e\u0301 a\u0308 n\u0303 ",
    "tabs\tand\nnew\nlines\r\n  indented    spaces   \n\n\n",
    "aaaaaaaaaaaaaaaa                                        ----------------- ",
]


def make_corpus(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    parts = []
    for i in range(n_words):
        parts.append(rng.choice(WORDS))
        parts.append("\n" if rng.random() < 0.08 else " ")
        if i % 97 == 0:
            parts.append(rng.choice(EXTRA))
    return "".join(parts)


CORPUS = make_corpus(6000, seed=0)
HELD_OUT = make_corpus(1500, seed=1) + "".join(EXTRA)


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=256 + 400 + 2, pattern="gpt4", special_tokens=[EOT, PAD])


@pytest.fixture(scope="module")
def tok_gpt2() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=256 + 300 + 1, pattern="gpt2", special_tokens=[EOT])


# ---------------------------------------------------------------------------------------------
# reference implementations, written for obviousness rather than speed


def naive_train(text: str, vocab_size: int, pattern: str) -> list[tuple[int, int]]:
    """Full recount every merge; ties: highest count, then smallest pair."""
    import regex

    counts = Counter(regex.findall(pattern, text))
    words = [list(w.encode()) for w in counts]
    freq = list(counts.values())
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    while len(vocab) < vocab_size:
        stats: Counter = Counter()
        for ids, c in zip(words, freq):
            for pair in zip(ids, ids[1:]):
                stats[pair] += c
        if not stats:
            break
        a, b = min(stats, key=lambda p: (-stats[p], p))
        token = vocab[a] + vocab[b]
        new = vocab.index(token) if token in vocab else len(vocab)
        if new == len(vocab):
            vocab.append(token)
            merges.append((a, b))
        words = [_merge_pair(ids, a, b, new) for ids in words]
    return merges


def tiktoken_rule(piece: bytes, tok: BPETokenizer) -> list[int]:
    """tiktoken's byte_pair_merge, on bytes: merge the leftmost lowest-rank pair, one at a time."""
    ranks = {tok.token_bytes(i): i for i in range(256 + len(tok.merges))}
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        scored = [(ranks.get(a + b, float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(scored)
        if rank == float("inf"):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


# ---------------------------------------------------------------------------------------------
# training


def test_merges_hand_worked_single_word():
    # "aaabdaaabac": (a,a)=4 -> 256; then (256,a)=2 and (a,b)=2 tie -> smaller pair (97,98) -> 257;
    # "256 257 d 256 257 a c": (256,257)=2 -> 258; then all count 1: (97,99) < (100,258) < (258,97)...
    tok = BPETokenizer.train("aaabdaaabac", 256 + 5)
    assert tok.merges == [(97, 97), (97, 98), (256, 257), (97, 99), (100, 258)]
    assert tok.encode("aaabdaaabac") == [258, 260, 259]  # 258, (100, 258) -> 260, (97, 99) -> 259


def test_merges_hand_worked_words_with_counts():
    # pre-tokens: "hug", " hug", " pug", " pun", " bun" (each once)
    # pairs: ug=3 -> 256 "ug"; then " p"=2, "hug"=(h,256)=2, "un"=2 tie -> smallest (32,112) " p"
    # then (104,256)=2 vs (117,110)=2 -> (104,256) "hug"; then (117,110) "un";
    # then all 1: (32,98) " b" is the smallest pair.
    tok = BPETokenizer.train("hug hug pug pun bun", 256 + 5)
    assert tok.merges == [(117, 103), (32, 112), (104, 256), (117, 110), (32, 98)]
    assert [tok.token_bytes(i) for i in range(256, 261)] == [b"ug", b" p", b"hug", b"un", b" b"]


@SETTINGS
@given(
    st.text(alphabet="ab c\n", min_size=1, max_size=120),
    st.integers(0, 30),
    st.sampled_from([GPT2_PATTERN, GPT4_PATTERN, r"\S+|\s+"]),
)
def test_training_matches_full_recount(text, n_merges, pattern):
    tok = BPETokenizer.train(text, 256 + n_merges, pattern=pattern)
    assert tok.merges == naive_train(text, 256 + n_merges, pattern)


def test_training_on_an_iterable_equals_training_on_the_joined_text():
    # pre-tokens never span documents; split where the pattern would cut anyway
    text = "one line\ntwo line\nred line\nblue line\n" * 50
    docs = [line + "\n" for line in text.splitlines()]
    assert BPETokenizer.train(iter(docs), 300).merges == BPETokenizer.train(text, 300).merges


def test_vocab_size_counts_everything_and_specials_come_last(tok):
    assert tok.vocab_size == 256 + 400 + 2
    assert len(tok.merges) == 400
    assert tok.special_tokens == {EOT: 656, PAD: 657}
    # special tokens are never produced by merges
    assert 656 not in tok.encode_ordinary(EOT * 3) and 657 not in tok.encode_ordinary(CORPUS + PAD)


def test_special_token_text_is_not_learned():
    text = (EOT + "xy") * 100
    tok = BPETokenizer.train(text, 256 + 10, special_tokens=[EOT])
    learned = {tok.token_bytes(256 + i) for i in range(len(tok.merges))}
    assert learned == {b"xy"}  # only "xy" is left once the special strings are cut out


def test_training_stops_when_nothing_left_to_merge():
    tok = BPETokenizer.train("abab", 1000)
    assert tok.merges == [(97, 98), (256, 256)]
    assert tok.vocab_size == 258


def test_train_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="too small"):
        BPETokenizer.train("abc", 256, special_tokens=[EOT])


def test_token_bytes_are_unique(tok):
    assert len({tok.token_bytes(i) for i in range(tok.vocab_size)}) == tok.vocab_size


# ---------------------------------------------------------------------------------------------
# encode / decode

any_text = st.text(max_size=300)
whitespace_runs = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2028\u3000\u200b", max_size=200)
runs_of_one_char = st.builds(lambda c, n: c * n, st.characters(exclude_categories=["Cs"]), st.integers(1, 2000))
tricky_alphabet = st.text(
    alphabet=list("aé\u0301ñ中文日本😀👩\u200d👦'sSt 1234.,!?\t\n\r\x00\x07\x1b\x7f\ufeff\U0010ffff"), max_size=300
)
texts = st.one_of(
    any_text,
    whitespace_runs,
    runs_of_one_char,
    tricky_alphabet,
    st.lists(st.one_of(any_text, whitespace_runs, runs_of_one_char), max_size=4).map("".join),
)


@SETTINGS
@given(texts)
def test_roundtrip_gpt4(tok, s):
    assert tok.decode(tok.encode(s)) == s
    assert tok.decode_bytes(tok.encode_ordinary(s)) == s.encode("utf-8")


@SETTINGS
@given(texts)
def test_roundtrip_gpt2(tok_gpt2, s):
    assert tok_gpt2.decode(tok_gpt2.encode(s)) == s


@settings(derandomize=True, deadline=None, max_examples=N_EXAMPLES)
@given(st.lists(texts, max_size=6))
def test_encode_batch_equals_map_encode(tok, batch):
    assert tok.encode_batch(batch) == [tok.encode(s) for s in batch]
    assert tok.encode_batch(batch, allowed_special="all") == [tok.encode(s, "all") for s in batch]


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from([b"ab", b"a ", b"the ", b"\xf0\x9f\x98"]))
def test_piece_encoding_follows_tiktoken_rule(tok, data, motif):
    # both code paths (short: rescan loop, long: heap) against the reference rule
    piece = data + motif * (len(data) % 50)
    assert tok._encode_piece(piece) == tiktoken_rule(piece, tok)
    assert tok._encode_long_piece(list(piece)) == tiktoken_rule(piece, tok)


def test_long_runs_are_fast_and_exact():
    tok = BPETokenizer.train(["a" * 5000, " " * 3000 + "b"], 256 + 20)
    s = "a" * 200_000 + " " * 100_000 + "b"
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert len(ids) < 20_000  # runs compress through the learned power-of-two merges


def test_encode_uses_learned_merges(tok):
    ids = tok.encode("the the the")
    assert len(ids) == 3
    assert tok.decode([ids[1]]) == " the"


def test_decode_invalid_utf8_is_replaced_not_raised(tok):
    assert tok.decode([0xFF]) == "\ufffd"
    emoji = tok.encode("😀")
    assert tok.decode(emoji[:-1] if len(emoji) > 1 else list(b"\xf0\x9f")) .startswith("\ufffd")
    assert tok.decode_bytes([0xFF, 0x61]) == b"\xffa"


def test_decode_rejects_ids_outside_vocab(tok):
    with pytest.raises(ValueError, match=r"token id 9999 at position 1"):
        tok.decode([1, 9999])
    with pytest.raises(ValueError, match=r"token id -1"):
        tok.decode([-1])


def test_lone_surrogate_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="surrogate U\\+D800 at index 1"):
        tok.encode("a\ud800")


def test_custom_pattern_must_cover_text():
    tok = BPETokenizer.train("abc abc", 260, pattern=r"\w+")
    with pytest.raises(ValueError, match="does not match every character"):
        tok.encode("abc abc")
    tok = BPETokenizer.train("abc abc", 260, pattern=r"(\w+)|(\W+)")  # groups are fine
    assert tok.decode(tok.encode("abc, abc")) == "abc, abc"


# ---------------------------------------------------------------------------------------------
# special tokens (tiktoken's rule)


def test_special_tokens_raise_unless_allowed(tok):
    text = f"hello{EOT}world{PAD}"
    with pytest.raises(ValueError, match=r"special token '<\|endoftext\|>' at index 5"):
        tok.encode(text)
    ids = tok.encode(text, allowed_special="all")
    assert ids == tok.encode("hello") + [656] + tok.encode("world") + [657]
    with pytest.raises(ValueError, match=r"<\|pad\|>"):
        tok.encode(text, allowed_special={EOT})
    assert tok.encode(text, allowed_special={EOT, PAD}) == ids
    assert tok.encode(text, allowed_special="none") == tok.encode_ordinary(text)
    assert tok.decode(ids) == text
    assert tok.token_bytes(656) == EOT.encode()


def test_allowed_special_argument_errors(tok):
    with pytest.raises(ValueError, match="unknown special tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="must be 'all'"):
        tok.encode("x", allowed_special="some")


@SETTINGS
@given(st.lists(st.one_of(any_text, st.sampled_from([EOT, PAD])), max_size=8).map("".join))
def test_roundtrip_with_specials(tok, s):
    assert tok.decode(tok.encode(s, allowed_special="all")) == s
    assert tok.decode(tok.encode(s, allowed_special="none")) == s


def test_specials_must_follow_merged_vocab():
    with pytest.raises(ValueError, match="inside the merged vocabulary"):
        BPETokenizer([(97, 98)], special_tokens={EOT: 100})


# ---------------------------------------------------------------------------------------------
# files


def test_save_load_roundtrip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    d = json.loads(path.read_text())
    assert d["type"] == "bpe" and d["version"] == 1 and d["pattern"] == GPT4_PATTERN
    assert d["merges"][:2] == [list(m) for m in tok.merges[:2]]
    assert d["special_tokens"] == {EOT: 656, PAD: 657}
    for loaded in (BPETokenizer.load(path), load_tokenizer(path)):
        assert isinstance(loaded, BPETokenizer)
        assert loaded.merges == tok.merges and loaded.special_tokens == tok.special_tokens
        assert loaded.encode(HELD_OUT) == tok.encode(HELD_OUT)


def test_load_errors_name_the_problem(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"type": "bpe", "version": 1, "pattern": "gpt4", "merges": [[97, 300]]}))
    with pytest.raises(ValueError, match=r"merge 0 \(97, 300\)"):
        load_tokenizer(path)
    path.write_text(json.dumps({"type": "wordpiece", "version": 1}))
    with pytest.raises(ValueError, match="unknown tokenizer type 'wordpiece'"):
        load_tokenizer(path)
    path.write_text(json.dumps({"type": "char", "version": 7, "chars": "ab"}))
    with pytest.raises(ValueError, match="version 7"):
        load_tokenizer(path)


def test_pattern_names_resolve():
    assert BPETokenizer([], pattern="gpt2").pattern == GPT2_PATTERN
    assert BPETokenizer([], pattern=r"\S+|\s+").pattern == r"\S+|\s+"
    with pytest.raises(ValueError, match="invalid split pattern"):
        BPETokenizer([], pattern="(unclosed")


def test_tiktoken_file_roundtrip_without_tiktoken(tok, tmp_path):
    path = tmp_path / "tok.tiktoken"
    tok.to_tiktoken(path)
    lines = path.read_text().splitlines()
    assert len(lines) == 256 + len(tok.merges)
    assert lines[97] == "YQ== 97"
    back = BPETokenizer.from_tiktoken(path, pattern="gpt4", special_tokens=tok.special_tokens)
    assert back.merges == tok.merges and back.special_tokens == tok.special_tokens


def test_from_tiktoken_rejects_a_longer_token_among_the_first_256_ranks(tmp_path):
    import base64

    path = tmp_path / "perm.tiktoken"
    tokens = [b"ab"] + [bytes([b]) for b in range(256)]  # permuted single bytes are fine (GPT-2's are)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    with pytest.raises(ValueError, match="rank 0 is b'ab'; ranks 0-255 must be the 256 single bytes"):
        BPETokenizer.from_tiktoken(path)


# ---------------------------------------------------------------------------------------------
# interchange with the real tiktoken (test-only dependency)


def _tiktoken_encoding(tok: BPETokenizer, path, monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken caches files by path otherwise
    tok.to_tiktoken(path)
    return tiktoken.Encoding(
        "tinygrad-lm-test",
        pat_str=tok.pattern,
        mergeable_ranks=load_tiktoken_bpe(str(path)),
        special_tokens=tok.special_tokens,
    )


@pytest.mark.parametrize("which", ["tok", "tok_gpt2"])
def test_tiktoken_encodes_held_out_text_like_us(which, request, tmp_path, monkeypatch):
    tok = request.getfixturevalue(which)
    enc = _tiktoken_encoding(tok, tmp_path / "tok.tiktoken", monkeypatch)
    assert enc.n_vocab == tok.vocab_size
    assert enc.encode(HELD_OUT) == tok.encode(HELD_OUT)
    with_special = HELD_OUT[:500] + EOT + HELD_OUT[500:1000]
    assert enc.encode(with_special, allowed_special="all") == tok.encode(with_special, allowed_special="all")
    assert enc.decode(tok.encode(HELD_OUT)) == HELD_OUT


def test_tiktoken_agrees_on_arbitrary_text(tok, tmp_path, monkeypatch):
    enc = _tiktoken_encoding(tok, tmp_path / "tok.tiktoken", monkeypatch)

    @SETTINGS
    @given(texts)
    def check(s):
        assert tok.encode_ordinary(s) == enc.encode_ordinary(s)

    check()


# ---------------------------------------------------------------------------------------------
# character tokenizer


def test_char_tokenizer_roundtrip_and_interface(tmp_path):
    tok = CharTokenizer.train(["hello ", "world\n"])
    assert tok.chars == "\n dehlorw" and tok.vocab_size == 9
    ids = tok.encode("hello world")
    assert tok.decode(ids) == "hello world"
    assert tok.encode_batch(["he", "low"]) == [tok.encode("he"), tok.encode("low")]
    assert tok.decode_bytes(ids) == b"hello world" and tok.token_bytes(1) == b" "
    path = tmp_path / "char.json"
    tok.save(path)
    assert json.loads(path.read_text()) == {"type": "char", "version": 1, "chars": "\n dehlorw"}
    loaded = load_tokenizer(path)
    assert isinstance(loaded, CharTokenizer) and loaded.chars == tok.chars
    assert CharTokenizer.load(path).encode("world") == tok.encode("world")


def test_char_tokenizer_unknown_characters_are_named():
    tok = CharTokenizer.train("abc")
    with pytest.raises(ValueError, match=r"'x' \(U\+0078\), 'é' \(U\+00E9\)"):
        tok.encode("abxcé")
    with pytest.raises(ValueError, match="token id 3"):
        tok.decode([0, 3])


@SETTINGS
@given(st.text(max_size=200))
def test_char_roundtrip(s):
    tok = CharTokenizer.train(s)
    assert tok.decode(tok.encode(s)) == s


# ---------------------------------------------------------------------------------------------
# command line


def run_cli(*argv: str) -> int:
    """Run `python -m tinygrad_lm tokenizer ...` through our add_cli alone (other commands may be in flux)."""
    parser = argparse.ArgumentParser(prog="tinygrad-lm")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_dispatcher_has_tokenizer_command():
    try:
        parser = cli.build_parser()
    except ImportError as e:  # another command module not written yet
        pytest.skip(f"dispatcher cannot import every command module yet: {e}")
    args = parser.parse_args(["tokenizer", "decode", "-t", "x.json", "--ids", "1"])
    assert args.func is not None and args.tokenizer == "x.json"


def test_cli_train_encode_decode(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(CORPUS[: len(CORPUS) // 2], encoding="utf-8")
    (data / "b.txt").write_text(CORPUS[len(CORPUS) // 2 :], encoding="utf-8")
    (data / "skip.md").write_text("not used")
    out = tmp_path / "tok.json"
    assert run_cli("tokenizer", "train", "--data", str(data), "--vocab-size", "400",
                   "--special-token", EOT, "--out", str(out)) == 0
    tok = load_tokenizer(out)
    assert tok.vocab_size == 400 and tok.special_tokens == {EOT: 399}
    assert tok.merges == BPETokenizer.train([CORPUS[: len(CORPUS) // 2], CORPUS[len(CORPUS) // 2 :]], 400,
                                            special_tokens=[EOT]).merges
    capsys.readouterr()

    assert run_cli("tokenizer", "encode", "-t", str(out), "--text", "the word" + EOT,
                   "--allowed-special", "all") == 0
    ids = [int(t) for t in capsys.readouterr().out.split()]
    assert ids == tok.encode("the word" + EOT, allowed_special="all")
    assert run_cli("tokenizer", "decode", "-t", str(out), "--ids", " ".join(map(str, ids))) == 0
    assert capsys.readouterr().out == "the word" + EOT

    npy = tmp_path / "ids.npy"
    text_file = tmp_path / "in.txt"
    text_file.write_bytes(HELD_OUT.encode())
    assert run_cli("tokenizer", "encode", "-t", str(out), "-i", str(text_file), "-o", str(npy)) == 0
    assert run_cli("tokenizer", "decode", "-t", str(out), "-i", str(npy), "-o", str(tmp_path / "back.txt")) == 0
    assert (tmp_path / "back.txt").read_bytes() == HELD_OUT.encode()  # "\r\n" kept as is

    ids_txt = tmp_path / "ids.txt"
    assert run_cli("tokenizer", "encode", "-t", str(out), "-i", str(text_file), "-o", str(ids_txt)) == 0
    assert [int(t) for t in ids_txt.read_text().split()] == tok.encode(HELD_OUT)
    assert run_cli("tokenizer", "decode", "-t", str(out), "-i", str(ids_txt)) == 0
    assert capsys.readouterr().out == HELD_OUT

    # a special token in the text without --allowed-special is a one-line error
    assert run_cli("tokenizer", "encode", "-t", str(out), "--text", EOT) == 2
    assert "special token" in capsys.readouterr().err


def test_cli_char_and_glob(tmp_path):
    (tmp_path / "x1.txt").write_text("abc")
    (tmp_path / "x2.txt").write_text("cde")
    out = tmp_path / "char.json"
    assert run_cli("tokenizer", "train", "--type", "char", "--data", str(tmp_path / "x*.txt"),
                   "--out", str(out)) == 0
    assert load_tokenizer(out).chars == "abcde"
    assert run_cli("tokenizer", "train", "--data", str(tmp_path / "nothing*"), "--out", str(out)) == 2


# ---------------------------------------------------------------------------------------------
# bad tokenizer files: every field checked before use, one clear TokenizerFileError

GOOD_BPE = {"type": "bpe", "version": 1, "pattern": "gpt4", "merges": [[97, 98], [256, 99]],
            "special_tokens": {EOT: 258}}


_DROP = object()


def _with(**changes) -> dict:
    """GOOD_BPE with some fields changed (or dropped, for the value _DROP)."""
    d = dict(GOOD_BPE)
    for key, value in changes.items():
        if value is _DROP:
            del d[key]
        else:
            d[key] = value
    return d


_DOUBLING = [[97, 97]] + [[256 + i, 256 + i] for i in range(40)]  # would describe 2**41 bytes

BAD_BPE = [
    (_with(type="wordpiece"), r"unknown tokenizer type 'wordpiece' in field 'type'"),
    (_with(type=_DROP), r"no 'type' field"),
    (_with(version=2), r"field 'version'.*reads version 1"),
    (_with(version=True), r"version True"),
    (_with(version=1.0), r"version 1.0"),
    (_with(pattern=123), r"field 'pattern' is the integer 123, expected a string"),
    (_with(pattern=None), r"field 'pattern' is null"),
    (_with(pattern="(unclosed"), r"field 'pattern': invalid split pattern"),
    (_with(pattern=r"\w+"), r"field 'pattern' .* skips the character"),
    (_with(pattern=_DROP), r"no 'pattern' field"),
    (_with(merges=5), r"field 'merges' is the integer 5, expected a list"),
    (_with(merges={"a": 1}), r"field 'merges' is an object"),
    (_with(merges=[[97]]), r"merge 0 is \[the integer 97\], expected a pair"),
    (_with(merges=[[97, 98, 99]]), r"merge 0 is .*expected a pair"),
    (_with(merges=[[97, None]]), r"merge 0 is \[the integer 97, null\]"),
    (_with(merges=[[97, 98.0]]), r"merge 0 is .*the number 98.0"),
    (_with(merges=[[97, True]]), r"merge 0 is .*the boolean true"),
    (_with(merges=["ab"]), r"merge 0 is the string 'ab'"),
    (_with(merges=[[97, 300]]), r"field 'merges': merge 0 \(97, 300\) uses an id that is not yet defined"),
    (_with(merges=[[-1, 97]]), r"merge 0 \(-1, 97\) uses an id that is not yet defined"),
    (_with(merges=[[97, 98], [97, 98]]), r"merge 1 \(97, 98\) makes b'ab', which is already token 256"),
    (_with(merges=[[97, 98], [256, 99], [97, 98]]), r"merge 2 \(97, 98\).*already token 256"),
    (_with(merges=_DOUBLING, special_tokens={}), r"merge 16 .* 131072 bytes, longer than the limit of 65536"),
    (_with(special_tokens=[EOT]), r"field 'special_tokens' is a list of 1 entries, expected an object"),
    (_with(special_tokens={EOT: None}), r"'<\|endoftext\|>' has id null, expected an integer"),
    (_with(special_tokens={EOT: "258"}), r"has id the string '258'"),
    (_with(special_tokens={EOT: -1}), r"negative id -1"),
    (_with(special_tokens={EOT: 100}), r"id 100, inside the merged vocabulary \(ids below 258\)"),
    (_with(special_tokens={EOT: 10**9}), r"id 1000000000, past the vocabulary: .* 258 to 258"),
    (_with(special_tokens={EOT: 259}), r"id 259, past the vocabulary"),
    (_with(special_tokens={EOT: 258, PAD: 258}), r"share id 258"),
    (_with(special_tokens={"": 258}), r"special token '' must be a non-empty string"),
    (_with(special_tokens={"\ud800": 258}), r"lone surrogate"),
    (_with(extra=1), r"unknown field 'extra'"),
    ({"type": "char", "version": 1, "chars": ""}, r"field 'chars' is empty"),
    ({"type": "char", "version": 1, "chars": "abca"}, r"field 'chars': chars contain duplicates: \['a'\]"),
    ({"type": "char", "version": 1, "chars": 5}, r"field 'chars' is the integer 5, expected a string"),
    ({"type": "char", "version": 1, "chars": ["a"]}, r"field 'chars' is a list"),
    ({"type": "char", "version": 1, "chars": "a\ud800"}, r"lone surrogate"),
    ({"type": "char", "version": 1}, r"no 'chars' field"),
    ({"type": "char", "version": 0, "chars": "ab"}, r"version 0"),
    ({"type": "char", "version": 1, "chars": "ab", "merges": []}, r"unknown field 'merges'"),
]


@pytest.mark.parametrize("d, message", BAD_BPE, ids=range(len(BAD_BPE)))
def test_bad_tokenizer_files_are_named_errors(tmp_path, d, message):
    from tinygrad_lm.errors import UserError
    from tinygrad_lm.tokenizer import TokenizerFileError, tokenizer_from_dict

    path = tmp_path / "tok.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=message) as info:
        load_tokenizer(path)
    assert str(info.value).startswith(f"tokenizer file {path}: ")
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    with pytest.raises(TokenizerFileError, match=message):  # the same checks without a file
        tokenizer_from_dict(d)
    if d.get("type") in ("bpe", "char"):
        cls = BPETokenizer if d["type"] == "bpe" else CharTokenizer
        with pytest.raises(TokenizerFileError, match=message):
            cls.from_dict(d)


def test_the_good_file_of_the_bad_file_table_loads(tmp_path):
    path = tmp_path / "tok.json"
    path.write_text(json.dumps(GOOD_BPE))
    tok = load_tokenizer(path)
    assert tok.vocab_size == 259 and tok.token_bytes(257) == b"abc" and tok.special_tokens == {EOT: 258}


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{}", r"is not UTF-8 text \(byte 0xff at offset 0\)"),
    (b"{\"type\": ", r"is not valid JSON: Expecting value \(line 1, column 10\)"),
    (b"[" * 100_000 + b"]" * 100_000, r"nested too deeply"),
    (b"[1, 2]", r"holds a list of 2 entries, expected a JSON object"),
    (b"null", r"holds null, expected a JSON object"),
    (b'{"type": "bpe", "type": "char"}', r"the key 'type' appears twice"),
    (b'{"type": ' + b"1" * 5000 + b"}", r"not a valid tokenizer JSON|unknown tokenizer type"),  # 3.10: no limit
    (b"", r"is not valid JSON"),
])
def test_files_that_are_not_tokenizer_json(tmp_path, content, message):
    from tinygrad_lm.tokenizer import TokenizerFileError

    path = tmp_path / "tok.json"
    path.write_bytes(content)
    with pytest.raises(TokenizerFileError, match=message):
        load_tokenizer(path)
    with pytest.raises(TokenizerFileError, match=message):
        BPETokenizer.load(path)


def test_unreadable_tokenizer_paths(tmp_path, monkeypatch):
    from tinygrad_lm.tokenizer import TokenizerFileError, schema

    with pytest.raises(TokenizerFileError, match=r"cannot read tokenizer file .*missing.json: No such file"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(TokenizerFileError, match=r"cannot read tokenizer file .*: Is a directory"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerFileError, match=r"cannot read tokenizer file .*: embedded null byte"):
        load_tokenizer("tok\0.json")
    if os.path.exists("/dev/zero"):  # endless: reading stops past the limit
        monkeypatch.setattr(schema, "MAX_FILE_BYTES", 1000)
        with pytest.raises(TokenizerFileError, match=r"/dev/zero is larger than 1000 bytes"):
            load_tokenizer("/dev/zero")


def test_constructor_checks_special_ids_and_merges():
    with pytest.raises(ValueError, match=r"unknown tokenizer type (an integer too long to show|1+\.\.\.) "):
        from tinygrad_lm.tokenizer import tokenizer_from_dict

        tokenizer_from_dict({"type": 10**5000})
    with pytest.raises(ValueError, match=r"id 10000000000, past the vocabulary"):
        BPETokenizer([], special_tokens={EOT: 10**10})  # never allocates up to the id
    with pytest.raises(ValueError, match=r"merge 0's second id is 'b', not an integer"):
        BPETokenizer([(97, "b")])
    with pytest.raises(ValueError, match=r"merge 0 is 'ab', not a pair"):
        BPETokenizer(["ab"])
    tok = BPETokenizer([(97, 98)], special_tokens={PAD: 258, EOT: 257})  # any order of the next ids
    assert tok.vocab_size == 259 and tok.decode([257, 258]) == EOT + PAD


def test_split_patterns_that_would_expand_in_memory_are_refused(tmp_path):
    # the regex engine expands counted repeats when compiling: a{100000000} alone takes gigabytes
    for pattern in [r"a{100000000}|\s|.", r"(?:(?:a{100}){100}){100}|.", r"\S{20000,}|\s|.", "x" * 200_000]:
        with pytest.raises(ValueError, match=r"repeat counts .* exceeds 10000|more than the limit of 100000"):
            BPETokenizer([], pattern=pattern)
        with pytest.raises(ValueError, match=r"repeat counts|limit"):
            BPETokenizer.train("abc", 300, pattern=pattern)
        path = tmp_path / "tok.json"
        path.write_text(json.dumps({"type": "bpe", "version": 1, "pattern": pattern, "merges": []}))
        with pytest.raises(ValueError, match=r"field 'pattern': split pattern .*(repeat counts|limit)"):
            load_tokenizer(path)
    assert BPETokenizer([], pattern=r"\p{N}{1,3}|\S{2,99}|\s|.").vocab_size == 256  # small counts are fine


def test_all_tokens_together_are_limited(monkeypatch):
    import tinygrad_lm.tokenizer.bpe as bpe
    import tinygrad_lm.tokenizer.train_bpe as train_bpe

    text = "ab " * 10 + "abababab " * 20 + "abcdefghijklmnop " * 3
    unlimited = BPETokenizer.train(text, 300, pattern="gpt2")
    monkeypatch.setattr(bpe, "MAX_VOCAB_BYTES", 300)
    # token lengths 2, 3, 4, ...: 256 + 2 + (3 + ... + 9) = 300, and merge 8's 10 bytes pass the limit
    with pytest.raises(ValueError, match=r"merge 8 \(263, 97\) brings the tokens to 310 bytes in all"):
        BPETokenizer([(97, 98)] + [(256 + i, 97) for i in range(30)])
    monkeypatch.setattr(train_bpe, "MAX_VOCAB_BYTES", 300)  # training stops before the limit
    tok = BPETokenizer.train(text, 300, pattern="gpt2")
    assert 0 < len(tok.merges) < len(unlimited.merges) and tok.merges == unlimited.merges[: len(tok.merges)]
    assert sum(len(tok.token_bytes(i)) for i in range(tok.vocab_size)) <= 300


def test_save_refuses_what_load_would_refuse(tmp_path):
    tok = BPETokenizer.train("abc abc", 260, pattern=r"\w+")
    with pytest.raises(ValueError, match=r"skips the character"):
        tok.save(tmp_path / "tok.json")
    with pytest.raises(ValueError, match="no characters"):
        CharTokenizer.train("").save(tmp_path / "char.json")
    assert not list(tmp_path.iterdir())


def _ranks_file(path, lines: list[str]) -> None:
    import base64

    singles = [f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)]
    path.write_text("".join(singles + lines))


@pytest.mark.parametrize("lines, message", [
    (["!!!! 256\n"], r"line 257: '!!!!' is not valid base64|line 257: b'!!!!' is not valid base64"),
    (["YWI= x\n"], r"line 257: rank b'x' is not a non-negative integer"),
    (["YWI= -3\n"], r"rank b'-3' is not a non-negative integer"),
    (["YWI= 256 7\n"], r"line 257: expected 'base64 rank'"),
    (["YWI= 256\n", "YWM= 256\n"], r"line 258: rank 256 appears a second time"),
    (["YWI= 256\n", "YWI= 257\n"], r"line 258: token b'ab' appears a second time \(first as rank 256\)"),
    (["YWI= 257\n"], r"rank 256 is missing"),
    (["YWJj 256\n"], r"token 256 \(b'abc'\) is not a merge of two lower-ranked tokens"),
    (["= 256\n"], r"is 0 bytes long|not valid base64"),
])
def test_bad_tiktoken_files(tmp_path, lines, message):
    from tinygrad_lm.tokenizer import TokenizerFileError

    path = tmp_path / "tok.tiktoken"
    _ranks_file(path, lines)
    with pytest.raises(TokenizerFileError, match=message):
        BPETokenizer.from_tiktoken(path)


def test_tiktoken_file_short_or_missing(tmp_path):
    from tinygrad_lm.tokenizer import TokenizerFileError

    path = tmp_path / "short.tiktoken"
    path.write_text("YQ== 0\n")
    with pytest.raises(TokenizerFileError, match="has 1 ranks; the 256 single bytes must come first"):
        BPETokenizer.from_tiktoken(path)
    with pytest.raises(TokenizerFileError, match="cannot read tiktoken file"):
        BPETokenizer.from_tiktoken(tmp_path / "missing.tiktoken")


def test_decode_names_bad_ids_and_vocab_size(tok):
    with pytest.raises(ValueError, match=r"token id 658 at position 2 is not in the vocabulary \(size 658\)"):
        tok.decode([1, 2, 658])
    with pytest.raises(ValueError, match=r"token id 'x' at position 0 is not an integer"):
        tok.decode(["x"])
    with pytest.raises(ValueError, match=r"token id 1.5 at position 1 is not an integer"):
        CharTokenizer("ab").decode([0, 1.5])


# ---------------------------------------------------------------------------------------------
# command line: every bad input is one `error: ...` line and exit status 2


@pytest.fixture()
def cli_files(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS[:3000], encoding="utf-8")
    tok = BPETokenizer.train(CORPUS[:3000], 300, special_tokens=[EOT])
    tok.save(tmp_path / "tok.json")
    return tmp_path


def _fails(capsys, *argv: str, match: str) -> None:
    import re

    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert re.search(match, lines[-1]), lines[-1]


def test_cli_bad_tokenizer_and_input_files(cli_files, capsys):
    d = cli_files
    tok = str(d / "tok.json")
    (d / "latin1.txt").write_bytes("café".encode("latin-1"))
    (d / "bad.json").write_text('{"type": "bpe", "version": 1, "pattern": 123, "merges": []}')
    _fails(capsys, "tokenizer", "encode", "-t", str(d / "nope.json"), "--text", "x", match="No such file")
    _fails(capsys, "tokenizer", "encode", "-t", str(d), "--text", "x", match="Is a directory")
    _fails(capsys, "tokenizer", "encode", "-t", str(d / "corpus.txt"), "--text", "x", match="not valid JSON")
    _fails(capsys, "tokenizer", "decode", "-t", str(d / "bad.json"), "--ids", "1", match=r"field 'pattern'")
    _fails(capsys, "tokenizer", "encode", "-t", tok, "-i", str(d / "nope.txt"), match=r"--input .*No such file")
    _fails(capsys, "tokenizer", "encode", "-t", tok, "-i", str(d), match=r"--input .*Is a directory")
    _fails(capsys, "tokenizer", "encode", "-t", tok, "-i", str(d / "latin1.txt"),
           match=r"--input .*latin1.txt is not UTF-8 text: byte 0xe9 at offset 3")
    _fails(capsys, "tokenizer", "encode", "-t", tok, "--text", "a" + EOT,
           match=r"--text: text contains the special token '<\|endoftext\|>' at index 1; pass --allowed-special")
    _fails(capsys, "tokenizer", "encode", "-t", tok, "--text", "x", "--allowed-special", "<|nope|>",
           match=r"--allowed-special names unknown special tokens \['<\|nope\|>'\]")
    _fails(capsys, "tokenizer", "encode", "-t", tok, "--text", "a\udcff", match=r"--text: .*lone surrogate U\+DCFF")
    _fails(capsys, "tokenizer", "encode", "-t", tok, "--text", "x", "-o", str(d / "no" / "ids.txt"),
           match=r"--out .*no does not exist")
    _fails(capsys, "tokenizer", "encode", "-t", tok, "--text", "x", "-o", str(d / "corpus.txt" / "ids.txt"),
           match=r"--out .*corpus.txt is not a folder")
    _fails(capsys, "tokenizer", "encode", "-t", tok, "--text", "x", "-o", str(d), match=r"--out .* is a folder")


def test_cli_decode_bad_ids(cli_files, capsys):
    import numpy as np

    d = cli_files
    tok = str(d / "tok.json")
    _fails(capsys, "tokenizer", "decode", "-t", tok, "--ids", "1 2 x3", match=r"--ids: 'x3' at position 2 is not an")
    _fails(capsys, "tokenizer", "decode", "-t", tok, "--ids", "1,300",
           match=r"--ids: token id 300 at position 1 is not in the vocabulary \(size 300\)")
    _fails(capsys, "tokenizer", "decode", "-t", tok, "--ids", "-1", match=r"token id -1 at position 0")
    np.save(d / "f.npy", np.array([1.5, 2.0]))
    _fails(capsys, "tokenizer", "decode", "-t", tok, "-i", str(d / "f.npy"), match=r"holds float64 values")
    (d / "junk.npy").write_bytes(b"not numpy")
    _fails(capsys, "tokenizer", "decode", "-t", tok, "-i", str(d / "junk.npy"), match=r"is not a .npy array")
    (d / "ids.txt").write_text("1 2 99999\n")
    _fails(capsys, "tokenizer", "decode", "-t", tok, "-i", str(d / "ids.txt"),
           match=r"--input .*ids.txt: token id 99999 at position 2")


def test_cli_train_bad_flags_fail_before_training(cli_files, capsys):
    d = cli_files
    data = str(d / "corpus.txt")
    out = str(d / "new.json")
    _fails(capsys, "tokenizer", "train", "--data", data, "--vocab-size", "100", "--out", out,
           match=r"--vocab-size 100 is out of range: expected 256 to")
    _fails(capsys, "tokenizer", "train", "--data", data, "--vocab-size", "256", "--special-token", EOT,
           "--out", out, match=r"--vocab-size 256 is out of range: expected 257")
    _fails(capsys, "tokenizer", "train", "--data", data, "--vocab-size", str(10**12), "--out", out,
           match=r"--vocab-size 1000000000000 is out of range")
    _fails(capsys, "tokenizer", "train", "--data", data, "--pattern", "(oops", "--out", out,
           match=r"--pattern: invalid split pattern '\(oops'")
    _fails(capsys, "tokenizer", "train", "--data", data, "--pattern", r"\w+", "--out", out,
           match=r"--pattern '\\\\w\+' skips the character")
    _fails(capsys, "tokenizer", "train", "--data", data, "--special-token", "", "--out", out, match="is empty")
    _fails(capsys, "tokenizer", "train", "--data", data, "--special-token", "<|\udcff|>", "--out", out,
           match="is not valid UTF-8")
    _fails(capsys, "tokenizer", "train", "--data", str(d / "none*.txt"), "--out", out, match=r"--data .* not a file")
    _fails(capsys, "tokenizer", "train", "--data", data, "--out", str(d / "missing" / "t.json"),
           match=r"--out .*does not exist")
    _fails(capsys, "tokenizer", "train", "--data", data, "--out", out, "--tiktoken", str(d),
           match=r"--tiktoken .* is a folder")
    _fails(capsys, "tokenizer", "train", "--type", "char", "--data", data, "--special-token", EOT, "--out", out,
           match=r"--special-token needs --type bpe")
    (d / "latin1.txt").write_bytes(b"caf\xe9")
    _fails(capsys, "tokenizer", "train", "--data", str(d / "latin1.txt"), "--out", out,
           match=r"--data .*latin1.txt is not UTF-8 text")
    (d / "empty.txt").write_text("")
    _fails(capsys, "tokenizer", "train", "--type", "char", "--data", str(d / "empty.txt"), "--out", out,
           match=r"hold no text")
    assert not (d / "new.json").exists()


def test_cli_unwritable_output_keeps_old_file(cli_files, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root can write into a read-only folder")
    d = cli_files / "ro"
    d.mkdir()
    (d / "ids.txt").write_text("old")
    d.chmod(0o500)
    try:
        _fails(capsys, "tokenizer", "encode", "-t", str(cli_files / "tok.json"), "--text", "x",
               "-o", str(d / "ids.txt"), match=r"--out .*permission denied")
        assert (d / "ids.txt").read_text() == "old"
    finally:
        d.chmod(0o700)


def test_cli_main_exits_2_with_one_line(cli_files, capsys):
    try:
        cli.build_parser()
    except ImportError as e:
        pytest.skip(f"dispatcher cannot import every command module yet: {e}")
    with pytest.raises(SystemExit) as info:
        cli.main(["tokenizer", "decode", "-t", str(cli_files / "tok.json"), "--ids", "100000"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ids: token id 100000") and err.count("\n") == 1
