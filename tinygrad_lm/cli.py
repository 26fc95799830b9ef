"""Command line: `python -m tinygrad_lm <command> ...` (also the `tinygrad-lm` console script).

Each command lives in its own module, which exposes `add_cli(subparsers)`; that
function registers a sub-parser and sets `func` to the callable that runs it.

Errors: bad input (a flag, a file, a checkpoint) raises `tinygrad_lm.errors.UserError`
anywhere below; `main` prints it as one line `error: <message>` and exits with status 2.
Anything else is a bug and keeps its traceback. Flags are never abbreviated (`--max-iter`
is an error, not `--max-iters`), and a wrong flag prints the usage of its own sub-command.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, NoReturn

from tensor.backend import MissingExtra
from tinygrad_lm.errors import UserError

# command modules, in the order shown by --help
COMMAND_MODULES = ["tinygrad_lm.train", "tinygrad_lm.sample", "tinygrad_lm.export", "tinygrad_lm.tokenizer"]


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that never expands abbreviated flags; its sub-parsers are Parsers too,
    so an error prints the usage of the (sub-)command it belongs to, then exits with status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", Parser)
        return super().add_subparsers(**kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tinygrad-lm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # an unknown flag: the usage of the sub-command it was given to
        sub = _subparser(parser, args)
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        sys.exit(2)
    try:
        rc = args.func(args)
    except (UserError, MissingExtra) as e:  # bad input, or an optional package not installed
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(rc or 0)


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser | None:
    """The innermost (sub-)sub-parser that `args` went through (e.g. `tokenizer encode`)."""
    found = None
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, actions[0].dest, None) if actions and actions[0].dest else None
        if not actions or name not in actions[0].choices:
            return found
        parser = found = actions[0].choices[name]
