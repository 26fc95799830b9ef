"""Fuzzing tokenizer files: mutate real saved files and require a clean outcome for every mutant.

A small BPE tokenizer (~300 ids, with special tokens) and a char tokenizer are trained and saved
once. Each mutant of one of those files (bytes flipped, inserted, deleted or cut off; JSON values
replaced by wrong types, null, NaN, huge or negative numbers, deep nesting; keys dropped, added or
renamed; list entries duplicated, dropped or swapped; strings edited) must either

- be refused by `load_tokenizer` with a TokenizerFileError (any other exception is a bug), or
- load and then work: every id below vocab_size decodes, encode gives ids below vocab_size,
  decode(encode(s)) == s on sample strings, and save + load gives the same tokenizer back.

A mutant that loads but fails these checks is a "silent accept". The CLI, run on mutants, must
exit with status 2 and one `error:` line for the refused ones, and work for the others.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import random
import re
import resource
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygrad_lm.tokenizer import BPETokenizer, CharTokenizer, TokenizerFileError, add_cli, load_tokenizer

EOT, PAD = "<|endoftext|>", "<|pad|>"
CORPUS = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
    "You are all resolved rather to die than to famish? 1234 5678 it's we're they'll\n"
    "naïve café — “quotes” 日本語 😀 \t tabs\r\n  spaces    end. "
) * 8
SAMPLES = [
    "hello world",
    "First Citizen: speak, speak!\n",
    "naïve café 日本語 😀 — “x”",
    "  \t\r\n   \n",
    "1234567 it's",
    "",
    "x" * 300,
    f"before{EOT}after{PAD}",
]


@functools.lru_cache(maxsize=None)
def originals() -> dict[str, tuple[bytes, dict]]:
    """kind -> (the saved file's bytes, its JSON), trained once per test session."""
    folder = Path(tempfile.mkdtemp(prefix="tok-fuzz-"))
    bpe = BPETokenizer.train(CORPUS, vocab_size=300, special_tokens=[EOT, PAD])
    char = CharTokenizer.train(CORPUS)
    out = {}
    for kind, tok in (("bpe", bpe), ("char", char)):
        path = folder / f"{kind}.json"
        tok.save(path)
        raw = path.read_bytes()
        out[kind] = (raw, json.loads(raw))
    return out


# ---------------------------------------------------------------------------------------------
# mutations, driven by a random.Random (hypothesis supplies one it controls)

DEEP = "\x00deep\x00"  # placeholder, serialized as thousands of nested lists
WEIRD = [None, math.nan, math.inf, -math.inf, -1, 0, 1, 255, 256, 299, 300, 10**9, 2**63, 10**100, 1.5, True,
         False, "", "x", "gpt2", "(", [], {}, [0], [[97, 98]], {"a": 1}, DEEP]
INSERTS = [b"0", b"9", b"-", b",", b"[", b"]", b"{", b"}", b'"', b"\\", b"\xff", b"\xc3", b"NaN", b"1e999",
           b"[" * 5000, b" ", b"\n", b'"x": 1,', b"99999999", b"{99999999}"]
CHARS = ["a", "(", ")", "*", "+", "?", "\\", "[", "|", "\ud800", "\x00", "é", "<", "{", "1", " ", "{99999999}",
         "{999}"]


def _nodes(doc, path=()):
    """(path, value) for every value inside `doc` (not the root)."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield path + (key,), value
        yield from _nodes(value, path + (key,))


def _parent(doc, path):
    for key in path[:-1]:
        doc = doc[key]
    return doc


def _dumps(doc, rng: random.Random) -> bytes:
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.5)
    text = text.replace(json.dumps(DEEP), "[" * 3000 + "]" * 3000)
    return text.encode("utf-8", errors="surrogatepass")  # a lone surrogate stays as invalid UTF-8


def _edit_string(s: str, rng: random.Random) -> str:
    i = rng.randrange(len(s) + 1)
    op = rng.randrange(3)
    if op == 0 and s:
        return s[:i] + s[i + 1:]
    if op == 1:
        return s[:i] + rng.choice(CHARS) + s[i:]
    return s[:i] + s[i - 1: i + 1] + s[i + 1:] if s else rng.choice(CHARS)


def mutate(kind: str, rng: random.Random) -> bytes:
    """A mutant of the saved `kind` tokenizer file: one to three mutations, one after the other."""
    raw, doc = originals()[kind]
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        raw = _mutate_once(raw, doc, rng)
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            doc = None  # no longer JSON: only byte mutations from here on
    return raw


def _mutate_once(raw: bytes, original, rng: random.Random) -> bytes:
    byte_ops = ["flip", "insert", "delete", "truncate"]
    json_ops = ["replace", "replace", "small_int", "drop_key", "add_key", "rename_key", "list_edit",
                "swap_values", "edit_string"]
    usable = isinstance(original, dict) and any(isinstance(v, str) for _, v in _nodes(original))
    op = rng.choice(byte_ops + json_ops if usable else byte_ops)
    if not raw:
        return rng.choice(INSERTS)
    if op == "flip":
        b = bytearray(raw)
        b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
        return bytes(b)
    if op == "insert":
        i = rng.randrange(len(raw) + 1)
        return raw[:i] + rng.choice(INSERTS) + raw[i:]
    if op == "delete":
        i = rng.randrange(len(raw))
        return raw[:i] + raw[i + rng.choice([1, 1, 2, 5, 20, 200]):]
    if op == "truncate":
        return raw[: rng.randrange(len(raw))]

    doc = copy.deepcopy(original)
    nodes = list(_nodes(doc))
    if op in ("replace", "small_int"):
        path, _ = rng.choice(nodes)
        value = rng.choice(WEIRD) if op == "replace" else rng.randrange(-2, 303)
        _parent(doc, path)[path[-1]] = value
    elif op == "drop_key":
        path, _ = rng.choice([(p, v) for p, v in nodes if isinstance(p[-1], str)])
        del _parent(doc, path)[path[-1]]
    elif op == "add_key":
        target = rng.choice([doc] + [v for _, v in nodes if isinstance(v, dict)])
        target[rng.choice(["extra", "Type", "<|new|>", "merges"])] = rng.choice(WEIRD[:12] + [302])
    elif op == "rename_key":
        dicts = [doc] + [v for _, v in nodes if isinstance(v, dict) and v]
        target = rng.choice(dicts)
        key = rng.choice(list(target))
        target[_edit_string(key, rng)] = target.pop(key)
    elif op == "list_edit":
        lists = [v for _, v in nodes if isinstance(v, list) and v]
        if not lists:
            doc["merges"] = lists = [[0]]
        target = rng.choice(lists)
        i, j = rng.randrange(len(target)), rng.randrange(len(target))
        edit = rng.randrange(4)
        if edit == 0:
            target.insert(j, copy.deepcopy(target[i]))
        elif edit == 1:
            del target[i]
        elif edit == 2:
            target[i], target[j] = target[j], target[i]
        else:
            target.append(rng.choice(WEIRD))
    elif op == "swap_values":
        (p, v), (q, w) = rng.choice(nodes), rng.choice(nodes)
        if not (p[: len(q)] == q or q[: len(p)] == p):  # neither inside the other
            _parent(doc, p)[p[-1]], _parent(doc, q)[q[-1]] = w, v
    elif op == "edit_string":
        strings = [(p, v) for p, v in nodes if isinstance(v, str)]
        path, value = rng.choice(strings)
        _parent(doc, path)[path[-1]] = _edit_string(value, rng)
    return _dumps(doc, rng)


# ---------------------------------------------------------------------------------------------
# what a mutant must do


def _samples(tok) -> list[str]:
    if isinstance(tok, CharTokenizer):
        known = set(tok.chars)
        return [tok.chars, tok.chars[::-1] * 3] + ["".join(c for c in s if c in known) for s in SAMPLES]
    return SAMPLES + list(tok.special_tokens)


def check_mutant(path: Path) -> str:
    """'refused' or 'loaded'; a loaded mutant that misbehaves fails an assertion (a silent accept)."""
    try:
        tok = load_tokenizer(path)
    except TokenizerFileError as e:
        message = str(e)
        assert message.startswith(f"tokenizer file {path}") and "\n" not in message and len(message) < 800, message
        return "refused"
    n = tok.vocab_size
    assert n > 0, f"{path}: loaded with an empty vocabulary"
    assert isinstance(tok.decode_bytes(list(range(n))), bytes)  # every id decodes
    with pytest.raises(ValueError, match=f"not in the vocabulary \\(size {n}\\)"):
        tok.decode([n])
    for s in _samples(tok):
        for allowed in ("all", "none"):
            ids = tok.encode(s, allowed_special=allowed)
            assert all(0 <= i < n for i in ids), f"{path}: ids {ids} outside vocab_size {n}"
            assert tok.decode(ids) == s, f"{path}: round trip broke on {s!r}"
    again_path = path.with_suffix(".again.json")
    tok.save(again_path)
    assert load_tokenizer(again_path).to_dict() == tok.to_dict(), f"{path}: save + load changed it"
    return "loaded"


@contextlib.contextmanager
def memory_cap(extra: int = 2 << 30):
    """On Linux, cap the address space at its present size + `extra`: a mutant that makes the loader
    allocate gigabytes then fails the test with a MemoryError instead of exhausting the machine."""
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        size = None
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = None if size is None else size + extra
    if cap is not None and (hard == resource.RLIM_INFINITY or cap <= hard):
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@settings(max_examples=3 * settings.default.max_examples // 2, deadline=None, derandomize=True)
@given(st.sampled_from(["bpe", "char"]), st.randoms(use_true_random=False))
def test_mutants_are_refused_or_work(kind, rng):
    with tempfile.TemporaryDirectory() as folder, memory_cap():
        path = Path(folder) / "mutant.json"
        path.write_bytes(mutate(kind, rng))
        check_mutant(path)


def test_mutant_tally(capsys):
    """A fixed set of 400 mutants: none raises anything but TokenizerFileError, none is a silent accept,
    none allocates gigabytes, and both outcomes occur (the mutations reach past the JSON parser)."""
    tally: Counter = Counter()
    with tempfile.TemporaryDirectory() as folder, memory_cap():
        for seed in range(400):
            kind = ("bpe", "char")[seed % 4 == 3]
            path = Path(folder) / f"mutant-{seed}.json"
            path.write_bytes(mutate(kind, random.Random(seed)))
            tally[kind, check_mutant(path)] += 1
    with capsys.disabled():
        print(f"\ntokenizer file mutants: {dict(tally)}")
    assert tally["bpe", "refused"] > 50 and tally["bpe", "loaded"] > 20
    assert tally["char", "refused"] > 10 and tally["char", "loaded"] > 5


# ---------------------------------------------------------------------------------------------
# the command line on mutants


def _run_cli(argv: list[str]) -> int:
    """`python -m tinygrad_lm ...` in-process: through tinygrad_lm.cli.main when every command module
    imports, else through our add_cli alone."""
    from tinygrad_lm import cli

    try:
        cli.build_parser()
    except ImportError:
        import argparse

        parser = argparse.ArgumentParser(prog="tinygrad-lm")
        add_cli(parser.add_subparsers(dest="command"))
        args = parser.parse_args(argv)
        return args.func(args)
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("seed", range(12))
def test_cli_on_mutants(tmp_path, capsys, seed):
    rng = random.Random(1000 + seed)
    kind = "char" if seed % 3 == 2 else "bpe"
    path = tmp_path / "mutant.json"
    path.write_bytes(mutate(kind, rng))
    outcome = check_mutant(path)
    capsys.readouterr()
    text = "speak, speak" if kind == "bpe" else originals()["char"][1]["chars"][:5]
    rc = _run_cli(["tokenizer", "encode", "-t", str(path), "--text", text])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if outcome == "refused":
        assert rc == 2 and re.fullmatch(r"error: tokenizer file .*\n", err), err
    else:
        assert rc == 2 and err.startswith("error: --text: characters not in the vocabulary") or rc in (0, None), err
        if rc in (0, None):
            assert _run_cli(["tokenizer", "decode", "-t", str(path), "--ids", out]) in (0, None)
            assert capsys.readouterr().out == text
    assert _run_cli(["tokenizer", "decode", "-t", str(path), "--ids", "1 x"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
