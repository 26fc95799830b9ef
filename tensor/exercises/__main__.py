"""Command line of the exercise checker: `python -m tensor.exercises {list,show,check}`.

Exit status: 0 all checked exercises solved (or list/show done), 1 some not solved yet,
2 bad input (unknown exercise or flag, a folder or file that is missing or does not
import): one line `error: ...` on stderr, no traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import NoReturn, Sequence

from tensor.exercises.checker import (DEFAULT_EXAMPLES, ENV_DIR, ExerciseSetupError, check, exercise_names,
                                      find_exercise_dir, load_op, statement)

PROG = "python -m tensor.exercises"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line `error: ...` (exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {PROG} --help)\n")


def _examples(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False,
                description="Derive backward passes; the checker grades them with gradcheck.")
    dir_help = f"folder of exercise files (default: examples/exercises/ of the checkout, or ${ENV_DIR})"
    p.add_argument("--dir", default=None, help=dir_help)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{list,show,check}")
    ls = sub.add_parser("list", allow_abbrev=False, help="every exercise with its progress (solved / not yet)")
    s = sub.add_parser("show", allow_abbrev=False, help="print what an exercise asks you to derive")
    s.add_argument("name")
    c = sub.add_parser("check", allow_abbrev=False, help="grade your backward (NAME, or 'all')")
    c.add_argument("name")
    c.add_argument("--examples", type=_examples, default=DEFAULT_EXAMPLES, help="Hypothesis examples per exercise")
    for q in (ls, s, c):  # --dir is accepted after the subcommand too
        q.add_argument("--dir", dest="dir_sub", default=None, help=dir_help)
    return p


def _known(name: str, names: list[str], folder: object) -> None:
    if name not in names:
        raise ExerciseSetupError(f"no exercise {name!r} in {folder} (exercises: {', '.join(names) or 'none'})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on argv (default sys.argv[1:]); returns the exit status."""
    args = build_parser().parse_args(argv)
    directory = args.dir_sub or args.dir
    try:
        folder = find_exercise_dir(directory)
        names = exercise_names(folder)
        if args.cmd == "list":
            return cmd_list(str(folder))
        if args.cmd == "show":
            _known(args.name, names, folder)
            print(statement(args.name, folder))
            return 0
        todo = names if args.name == "all" else [args.name]
        if args.name != "all":
            _known(args.name, names, folder)
        ok, broken = True, False
        for name in todo:
            try:
                load_op(name, folder)  # a file that is missing or does not import is bad input, not a grade
            except ExerciseSetupError as e:
                print(f"error: {e}", file=sys.stderr)
                broken = True
                continue
            t0 = time.perf_counter()
            r = check(name, folder, examples=args.examples)
            print(r.message + (f"  ({time.perf_counter() - t0:.1f} s)" if r.solved else ""))
            ok &= r.solved
        return 2 if broken else 0 if ok else 1
    except ExerciseSetupError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


def cmd_list(folder: str) -> int:
    """Run each exercise's check (fewer examples: a quick progress view)."""
    names = exercise_names(find_exercise_dir(folder))
    print(f"exercises in {folder}:")
    done = 0
    for i, name in enumerate(names, 1):
        r = check(name, folder, examples=10)
        done += r.solved
        mark = "[x] solved " if r.solved else "[ ] not yet"
        note = "" if r.solved or r.status == "not started" else f"  ({r.status}: {PROG} check {name})"
        print(f"  {i:2d}. {mark}  {name}{note}")
    print(f"{done}/{len(names)} solved. Next: {PROG} check NAME")
    return 0


def run() -> NoReturn:
    """The program: main() with a closed pipe (`... list | head -1`) and Ctrl-C ending quietly."""
    try:
        code = main()
        sys.stdout.flush()  # a closed pipe shows up here when the output was buffered
    except BrokenPipeError:
        # the reader went away: send what Python still wants to flush to /dev/null, exit as SIGPIPE would
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 128 + 13
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    run()
