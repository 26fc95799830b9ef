"""The collective watchdog: end the whole job when a collective never finishes.

A rank that dies or stalls (a hung data loader, a dead node, a deadlocked GPU) leaves the
other ranks waiting in their next collective for ever. With a timeout of S seconds, every
collective registers its deadline (now + S) here before it starts and marks itself done
when it returns. One daemon thread, started at the first watched collective, sleeps until
the oldest deadline; if that collective is still running then, it prints

    [rank R] error: collective <name> did not finish within S s (another rank may have died
    or stalled); aborting the job

to stderr and calls MPI Abort, which ends every rank of the job.

The cost of a collective that finishes is one lock and a list append: no thread is created
per collective, and the thread wakes at most about once per deadline, not once per
collective. An asynchronous device collective (NCCL) is done when its CUDA event has
completed: `end(entry, event)` hands the event over and the thread asks it at the deadline.
Its deadline counts from when it was queued, so the device work queued before it counts too.

MPI Abort is called from the watchdog's thread while the main thread waits inside MPI; mpi4py
initialises MPI with MPI_THREAD_MULTIPLE by default, which makes that legal.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time
from typing import Any, Callable


class Watchdog:
    """Deadlines of the collectives in flight, checked by one daemon thread.

    rank: printed in the message (the rank in COMM_WORLD). abort(code) must end every rank
    (MPI Abort). timeout: seconds; 0 or less turns the watchdog off (begin returns None).
    """

    def __init__(self, rank: int, abort: Callable[[int], Any], timeout: float = 0.0) -> None:
        self.rank = rank
        self.abort = abort
        self.timeout = float(timeout)
        self._cond = threading.Condition()
        self._pending: collections.deque = collections.deque()  # [name, deadline, done], oldest first
        self._thread: threading.Thread | None = None
        self._idle = True  # the thread waits without a deadline: the next begin() must wake it

    def begin(self, name: str) -> list | None:
        """Register a collective about to start; returns its entry for end() (None when off)."""
        if self.timeout <= 0:
            return None
        entry = [name, time.monotonic() + self.timeout, None]
        with self._cond:
            q = self._pending
            while q and _finished(q[0]):
                q.popleft()
            q.append(entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="collective-watchdog", daemon=True)
                self._thread.start()
            elif self._idle:
                self._cond.notify()
        return entry

    def end(self, entry: list | None, event: Any = None) -> None:
        """Mark the collective done, or (event given: a CUDA event recorded after an
        asynchronous collective) done once the event has completed."""
        if entry is not None:
            entry[2] = event if event is not None else True

    def _watch(self) -> None:
        with self._cond:
            while True:
                q = self._pending
                while q and _finished(q[0]):
                    q.popleft()
                if not q:
                    self._idle = True
                    self._cond.wait()
                    continue
                self._idle = False
                name, deadline, _ = q[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                break
        self._fire(name)

    def _fire(self, name: str) -> None:
        sys.stdout.flush()
        sys.stderr.write(f"[rank {self.rank}] error: collective {name} did not finish within {self.timeout:g} s "
                         "(another rank may have died or stalled); aborting the job\n")
        sys.stderr.flush()
        time.sleep(0.5)  # let the launcher forward the message before the job is torn down
        try:
            self.abort(1)
        finally:
            os._exit(1)  # abort() does not return; if it did, this rank still must not hang


def _finished(entry: list) -> bool:
    done = entry[2]
    return done is True or (done is not None and bool(done.done))
