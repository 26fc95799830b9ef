"""The one progress display of the project: a tqdm bar on a terminal, plain lines elsewhere.

On a terminal (stderr is a TTY) the user sees a live tqdm bar; `write` prints above it. Under
`mpiexec`, in CI or piped to a file, a redrawn bar is noise (a 10-character bar with evaluation
lines glued to it), so the same object then prints one readable line every `every` updates and
each `write` on its own line.

    bar = progress(total=2000, initial=0, desc="train", enabled=True)
    bar.update(1); bar.set_postfix(loss="1.23"); bar.write("step 250: val 1.9"); bar.close()
    for piece in progress(pieces, desc="merges", enabled=True): ...
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TextIO


class LineProgress:
    """A progress display that prints whole lines: `desc: n/total (pct) k=v ... elapsed`."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, initial: int = 0,
                 desc: str = "", every: int | None = None, file: TextIO | None = None, quiet: bool = False) -> None:
        self.iterable, self.total, self.n, self.desc = iterable, total, initial, desc
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)  # type: ignore[arg-type]
        # about 20 lines over the whole run unless told otherwise
        self.every = every or max(1, (self.total or 200) // 20)
        self.file, self.quiet = file, quiet
        self.postfix: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self._last_printed = initial

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.quiet and self.n - self._last_printed >= self.every:
            self._line()

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = kw

    def write(self, s: str) -> None:
        print(s, file=self.file or sys.stdout, flush=True)

    def _line(self) -> None:
        self._last_printed = self.n
        total = f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}{total}{extra} [{time.perf_counter() - self.t0:.0f}s]",
              file=self.file or sys.stderr, flush=True)

    def close(self) -> None:
        if not self.quiet and self.n != self._last_printed:
            self._line()


def progress(iterable: Iterable | None = None, *, total: int | None = None, initial: int = 0, desc: str = "",
             enabled: bool = True) -> Any:
    """A progress display: tqdm on a terminal, `LineProgress` lines otherwise, silent when not `enabled`
    (other MPI ranks, `--progress false`). All three have update/set_postfix/write/close and iterate."""
    if not enabled:
        return LineProgress(iterable, total, initial, desc, quiet=True)
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is optional: plain lines still show progress
            pass
        else:
            return tqdm(iterable, total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
    return LineProgress(iterable, total, initial, desc)
