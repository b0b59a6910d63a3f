"""The hang watchdog (run.watchdog_s): a rank whose peer is lost without an abort, or whose device is
stuck, blocks in MPI forever. A thread on every rank watches a heartbeat that the training and
evaluation loops beat once per step; when no beat came for the limit, max(run.watchdog_s, 3 x the
longest epoch so far), it writes why, dumps the stack of every thread of this rank and aborts the
whole job. Every rank stops making progress when one hangs, so every rank's watchdog fires and
dumps its stacks within seconds of the others.

No MPI here: the abort is a callable the run passes in (comm.abort_job)."""
from __future__ import annotations

import faulthandler
import sys
import threading
import time

EPOCH_FACTOR = 3.0
_current = None


def beat() -> None:
    """Progress: a step, a batch evaluated, a checkpoint written (no-op when no watchdog runs)."""
    w = _current
    if w is not None:
        w.last = time.monotonic()


def epoch_done(seconds: float) -> None:
    """An epoch took `seconds`: the limit grows to EPOCH_FACTOR times the longest epoch."""
    w = _current
    if w is not None:
        w.longest = max(w.longest, seconds)
        w.last = time.monotonic()


class Watchdog:
    """floor_s: the limit before the first epoch ends and its lower bound after; abort(message) takes
    the job down (it does not return). Use as a context manager around a run."""

    def __init__(self, floor_s: float, abort, rank: int = 0, poll_s: float | None = None):
        self.floor, self.abort, self.rank = float(floor_s), abort, rank
        self.longest = 0.0
        self.last = time.monotonic()
        self.poll = poll_s if poll_s is not None else min(5.0, max(self.floor / 10, 0.1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hpl-watchdog", daemon=True)

    def limit(self) -> float:
        """Seconds without a beat after which the job is aborted."""
        return max(self.floor, EPOCH_FACTOR * self.longest)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            idle = time.monotonic() - self.last
            if idle > self.limit():
                msg = (f"[rank {self.rank}] watchdog: no progress for {idle:.0f} s (limit {self.limit():.0f} s "
                       f"= max(run.watchdog_s={self.floor:g}, {EPOCH_FACTOR:g} x the longest epoch "
                       f"{self.longest:.1f} s)). A rank is hung (a lost peer, a stuck device, a deadlock); "
                       "this rank's threads follow, then the whole job is aborted. Raise run.watchdog_s if "
                       "a step can legitimately take this long.")
                sys.stderr.write(msg + "\n")
                sys.stderr.flush()
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                self.abort(msg)
                return

    def __enter__(self) -> "Watchdog":
        global _current
        if self.floor > 0:
            _current = self
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        global _current
        self._stop.set()
        if _current is self:
            _current = None
