"""Command line: `python -m tinygrad_lm tokenizer train|encode|decode`.

    python -m tinygrad_lm tokenizer train --data corpus/ --vocab-size 4096 --out tok.json \\
        --special-token '<|endoftext|>'
    python -m tinygrad_lm tokenizer encode -t tok.json --text "some text"      # ids on stdout
    python -m tinygrad_lm tokenizer decode -t tok.json --ids "83 1024 290"     # text on stdout

Every bad input (a missing or unreadable file, a bad tokenizer file, text that is not
UTF-8, a flag out of range, an id outside the vocabulary, an output that cannot be
written) is a `UserError`: the command prints one line `error: <message>` and exits with
status 2. Flags are checked and output paths probed before any long work starts, and
outputs are written atomically, so a failed command never leaves half a file.
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

from nn.serialization import atomic_write
from tinygrad_lm.errors import UserError
from tinygrad_lm.tokenizer import schema
from tinygrad_lm.tokenizer.base import TokenizerFileError
from tinygrad_lm.tokenizer.bpe import BPETokenizer
from tinygrad_lm.tokenizer.char import CharTokenizer
from tinygrad_lm.tokenizer.load import load_tokenizer

# The largest --vocab-size accepted: far beyond any real vocabulary, still a uint32 id.
MAX_VOCAB_SIZE = 1 << 24


# ---------------------------------------------------------------------------------------------
# reading and writing files, with errors that name the flag


def data_files(spec: str) -> list[Path]:
    """A file, a folder (all *.txt inside, sorted) or a glob pattern -> list of files."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.txt") if f.is_file())
        if not files:
            raise UserError(f"--data {spec}: the folder contains no *.txt files")
        return files
    if p.is_file():
        return [p]
    files = sorted(Path(f) for f in glob.glob(spec) if Path(f).is_file())
    if not files:
        raise UserError(f"--data {spec!r} is not a file, a folder or a glob matching any file")
    return files


def read_text_file(path: str | os.PathLike, flag: str) -> str:
    """The UTF-8 text of a file, line endings kept as they are ("\\r\\n" stays)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot read the file: {e.strerror or e}") from None
    return _decode_utf8(data, f"{flag} {path}")


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{where} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} ({e.reason})"
        ) from None


def _read_files(files: Sequence[Path]) -> Iterable[str]:
    for f in files:
        yield read_text_file(f, "--data")


def check_writable(path: str, flag: str) -> None:
    """Fail now, before any work, if `path` cannot be written (a folder, a missing or read-only folder)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {path} is a folder, expected a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        problem = "is not a folder" if parent.exists() else "does not exist"
        raise UserError(f"{flag} {path}: {parent} {problem}")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UserError(f"{flag} {path}: permission denied, cannot write there")


def write_output(path: str, data: bytes | str | Callable[[str], None], flag: str) -> None:
    """`atomic_write(path, data)`, or `data(path)` for a save method, with an OSError turned into a
    UserError naming the flag."""
    try:
        data(path) if callable(data) else atomic_write(path, data)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write the file: {e.strerror or e}") from None


def _read_input(args: argparse.Namespace) -> tuple[str, str]:
    """(text, where it came from) from --text, --input or stdin."""
    if getattr(args, "text", None) is not None:
        return args.text, "--text"
    if args.input and args.input != "-":
        return read_text_file(args.input, "--input"), f"--input {args.input}"
    buffer = getattr(sys.stdin, "buffer", None)
    return (_decode_utf8(buffer.read(), "stdin") if buffer is not None else sys.stdin.read()), "stdin"


def parse_ids(text: str, where: str) -> list[int]:
    """Whitespace- or comma-separated integers; anything else is a UserError naming it and its position."""
    ids = []
    for position, word in enumerate(text.replace(",", " ").split()):
        try:
            ids.append(int(word))
        except ValueError:
            raise UserError(f"{where}: {word[:40]!r} at position {position} is not an integer token id") from None
    return ids


def _load_npy_ids(path: str) -> list[int]:
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except OSError as e:
        raise UserError(f"--input {path}: cannot read the file: {e.strerror or e}") from None
    except (ValueError, EOFError) as e:
        raise UserError(f"--input {path} is not a .npy array of token ids: {e}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu":
        found = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise UserError(f"--input {path} holds {found} values, expected an integer array of token ids")
    return arr.ravel().tolist()


# ---------------------------------------------------------------------------------------------
# the three commands


def _cli_train(args: argparse.Namespace) -> int:
    specials = args.special_token or []
    if args.type == "bpe":
        lowest = 256 + len(specials)
        if not lowest <= args.vocab_size <= MAX_VOCAB_SIZE:
            raise UserError(
                f"--vocab-size {args.vocab_size} is out of range: expected {lowest} to {MAX_VOCAB_SIZE} "
                f"(256 byte tokens + merges + {len(specials)} special tokens)"
            )
        for name in specials:
            if not name:
                raise UserError("--special-token '' is empty; a special token needs at least one character")
            if any("\ud800" <= c <= "\udfff" for c in name):
                raise UserError(f"--special-token {name!r} is not valid UTF-8 text")
        if len(set(specials)) != len(specials):
            raise UserError(f"--special-token: the same token is given twice: {specials}")
        try:
            pattern = schema.check_pattern(args.pattern, "--pattern")
        except TokenizerFileError as e:
            raise UserError(str(e).replace("--pattern: field 'pattern'", "--pattern")) from None
    else:
        if specials:
            raise UserError("--special-token needs --type bpe: a char tokenizer has no special tokens")
        if args.tiktoken:
            raise UserError("--tiktoken needs --type bpe: a char tokenizer has no tiktoken form")
    files = [f for spec in args.data for f in data_files(spec)]
    check_writable(args.out, "--out")
    if args.tiktoken:
        check_writable(args.tiktoken, "--tiktoken")

    print(f"training a {args.type} tokenizer on {len(files)} file(s)", file=sys.stderr)
    if args.type == "char":
        tok = CharTokenizer.train(_read_files(files), progress=True)
        if tok.vocab_size == 0:
            raise UserError(f"--data: the {len(files)} file(s) hold no text to learn characters from")
    else:
        tok = BPETokenizer.train(_read_files(files), args.vocab_size, pattern=pattern,
                                 special_tokens=specials, progress=True)
    write_output(args.out, tok.save, "--out")
    print(f"wrote {tok!r} to {args.out}", file=sys.stderr)
    if args.tiktoken:
        write_output(args.tiktoken, tok.to_tiktoken, "--tiktoken")
        print(f"wrote tiktoken ranks to {args.tiktoken}", file=sys.stderr)
    return 0


def _allowed_special(spec: str, tok: BPETokenizer | CharTokenizer) -> str | set[str]:
    if spec in ("all", "none", "none_raise"):
        return spec
    names = {name for name in spec.split(",") if name}
    unknown = sorted(names - tok.special_tokens.keys())
    if unknown:
        raise UserError(
            f"--allowed-special names unknown special tokens {unknown}; this tokenizer has "
            f"{sorted(tok.special_tokens)} (or use all, none, none_raise)"
        )
    return names


def _cli_encode(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    allowed = _allowed_special(args.allowed_special, tok)
    if args.out:
        check_writable(args.out, "--out")
    text, where = _read_input(args)
    try:
        ids = tok.encode(text, allowed_special=allowed)
    except ValueError as e:  # a special token not allowed, a character not in the vocabulary, a lone surrogate
        message = str(e)
        if "; pass allowed_special=" in message:  # say it with the flag instead of the Python argument
            message = message.split("; pass allowed_special=")[0] + (
                "; pass --allowed-special all (or the token's name) to encode it as a special token, "
                "or --allowed-special none to encode it as ordinary text"
            )
        raise UserError(f"{where}: {message}") from None
    if args.out and args.out.endswith(".npy"):
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, np.asarray(ids, dtype=np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32))
        write_output(args.out, buf.getvalue(), "--out")
    elif args.out:
        write_output(args.out, " ".join(map(str, ids)) + "\n", "--out")
    else:
        sys.stdout.write(" ".join(map(str, ids)) + "\n")
    print(f"{len(ids)} tokens", file=sys.stderr)
    return 0


def _cli_decode(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    if args.out:
        check_writable(args.out, "--out")
    if args.ids is not None:
        where, ids = "--ids", parse_ids(args.ids, "--ids")
    elif args.input and args.input.endswith(".npy"):
        where, ids = f"--input {args.input}", _load_npy_ids(args.input)
    else:
        source, where = _read_input(args)
        ids = parse_ids(source, where)
    try:
        text = tok.decode(ids)
    except ValueError as e:  # an id outside the vocabulary
        raise UserError(f"{where}: {e}") from None
    if args.out:
        write_output(args.out, text, "--out")
    else:
        sys.stdout.write(text)
    return 0


def _command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print a UserError (or an OSError, e.g. a closed stdout) as `error: ...` and return status 2.

    `tinygrad_lm.cli.main` does the same for every command; doing it here too keeps these
    commands right when they are called on their own (tests, other drivers).
    """

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (UserError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def add_cli(subparsers) -> None:
    """Register `tokenizer train|encode|decode` on an argparse subparsers object."""
    parser = subparsers.add_parser("tokenizer", help="train a tokenizer, encode or decode text")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    p = sub.add_parser("train", help="learn a tokenizer from text files")
    p.add_argument("--data", required=True, action="append",
                   help="a text file, a folder (its *.txt files) or a glob; repeatable")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help=f"total vocabulary size incl. special tokens, 256 to {MAX_VOCAB_SIZE} (default 4096)")
    p.add_argument("--pattern", default="gpt4", help="split pattern: gpt2, gpt4 or a regex (default gpt4)")
    p.add_argument("--special-token", action="append", metavar="TOKEN",
                   help="a special token such as '<|endoftext|>'; repeatable")
    p.add_argument("--type", choices=["bpe", "char"], default="bpe")
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--tiktoken", metavar="PATH", help="also write tiktoken's ranks file here")
    p.set_defaults(func=_command(_cli_train))

    p = sub.add_parser("encode", help="text -> token ids")
    p.add_argument("--tokenizer", "-t", required=True, help="tokenizer JSON file")
    p.add_argument("--text", help="text to encode (default: --input or stdin)")
    p.add_argument("--input", "-i", help="UTF-8 text file to encode ('-' for stdin)")
    p.add_argument("--out", "-o", help="write ids here: .npy for a uint16/uint32 array, else space-separated")
    p.add_argument("--allowed-special", default="none_raise",
                   help="all, none, none_raise (default) or comma-separated special tokens")
    p.set_defaults(func=_command(_cli_encode))

    p = sub.add_parser("decode", help="token ids -> text")
    p.add_argument("--tokenizer", "-t", required=True, help="tokenizer JSON file")
    p.add_argument("--ids", help="space- or comma-separated ids (default: --input or stdin)")
    p.add_argument("--input", "-i", help="file of ids: .npy, or whitespace-separated text")
    p.add_argument("--out", "-o", help="write the text here (default stdout)")
    p.set_defaults(func=_command(_cli_decode))
