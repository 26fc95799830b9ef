"""Tests for tinygrad_lm.tokenizer: BPE training, encode/decode, special tokens, files, tiktoken, CLI."""
from __future__ import annotations

import argparse
import json
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


def test_from_tiktoken_rejects_permuted_bytes(tmp_path):
    import base64

    path = tmp_path / "perm.tiktoken"
    order = [1, 0] + list(range(2, 256))
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {r}\n" for r, b in enumerate(order)))
    with pytest.raises(ValueError, match="rank 0 is"):
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
