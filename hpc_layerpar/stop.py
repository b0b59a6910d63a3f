"""Stop requests: SIGUSR1 / SIGTERM (SLURM --signal, preemption, a time limit) set a process-wide flag;
the ranks agree on it at the next in-epoch check (run.check_every) or at the epoch's end, checkpoint,
and leave with exit code 75. The engines read the flag through requested()."""
from __future__ import annotations

import signal


def requested() -> bool:
    """Whether SIGUSR1 or SIGTERM has arrived since the run installed its handlers (or request() ran)."""
    return StopRequest._signalled


def request() -> None:
    """What the signal handler does; tests call it to stop a run at a chosen step."""
    StopRequest._signalled = True


class StopRequest:
    """SIGUSR1 / SIGTERM (SLURM --signal, preemption, time limit) only set a flag; the ranks agree
    on it at the next check (inside the epoch or at its end), checkpoint, and leave. The flag is
    process-wide, so the virtual ranks of a simulated run (threads, which cannot install handlers)
    see the main thread's signal."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
    _signalled = False

    def __init__(self):
        self.saved = {}

    @property
    def requested(self) -> bool:
        """Whether SIGUSR1 or SIGTERM has arrived since the handlers were installed."""
        return StopRequest._signalled

    def __enter__(self):
        try:
            for s in self.SIGNALS:
                self.saved[s] = signal.signal(s, self._handler)
            StopRequest._signalled = False  # a new run in this process starts unsignalled
        except ValueError:  # not the main thread: leave signals to the host program
            self.saved = {}
        return self

    def _handler(self, signum, frame):
        StopRequest._signalled = True

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            signal.signal(s, h)
