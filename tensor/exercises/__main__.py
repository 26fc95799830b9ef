"""Command line of the exercise checker: `python -m tensor.exercises {list,show,check}`."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from tensor.exercises.checker import (DEFAULT_EXAMPLES, ENV_DIR, ExerciseSetupError, check, exercise_names,
                                      find_exercise_dir, statement)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tensor.exercises",
                                description="Derive backward passes; the checker grades them with gradcheck.")
    p.add_argument("--dir", default=None,
                   help=f"folder of exercise files (default: examples/exercises/ of the checkout, or ${ENV_DIR})")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="every exercise with its progress (solved / not yet)")
    s = sub.add_parser("show", help="print what an exercise asks you to derive")
    s.add_argument("name")
    c = sub.add_parser("check", help="grade your backward (NAME, or 'all')")
    c.add_argument("name")
    c.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES, help="Hypothesis examples per exercise")
    for q in (s, c):  # --dir is accepted after the subcommand too
        q.add_argument("--dir", dest="dir_sub", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    directory = getattr(args, "dir_sub", None) or args.dir
    try:
        folder = find_exercise_dir(directory)
        if args.cmd == "list":
            return cmd_list(str(folder))
        if args.cmd == "show":
            print(statement(args.name, folder))
            return 0
        names = exercise_names(folder) if args.name == "all" else [args.name]
        ok = True
        for name in names:
            t0 = time.perf_counter()
            r = check(name, folder, examples=args.examples)
            print(r.message + (f"  ({time.perf_counter() - t0:.1f} s)" if r.solved else ""))
            ok &= r.solved
        return 0 if ok else 1
    except ExerciseSetupError as e:
        print(f"error: {e}", file=sys.stderr)
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
        note = "" if r.solved or r.status == "not started" else f"  ({r.status}: python -m tensor.exercises check {name})"
        print(f"  {i:2d}. {mark}  {name}{note}")
    print(f"{done}/{len(names)} solved. Next: python -m tensor.exercises check NAME")
    return 0


if __name__ == "__main__":
    sys.exit(main())
