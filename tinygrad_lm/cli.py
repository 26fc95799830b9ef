"""Command line: `python -m tinygrad_lm <command> ...` (also the `tinygrad-lm` console script).

Each command lives in its own module, which exposes `add_cli(subparsers)`; that
function registers a sub-parser and sets `func` to the callable that runs it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command modules, in the order shown by --help
COMMAND_MODULES = ["tinygrad_lm.train", "tinygrad_lm.sample", "tinygrad_lm.tokenizer"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinygrad-lm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    rc = args.func(args)
    sys.exit(rc or 0)
