"""Non-blocking messages of comm.py: Pending (wait, test, a staged receive's copy back) and the
process-wide list of staged sends whose MPI call waits for their device-to-host copy. No MPI import:
the request objects come from comm.py."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: comm.py imports this module
    from .comm import Comm

# Staged sends from CUDA tensors whose device-to-host copy runs on a side stream: their MPI send is
# posted once the copy is done. Process-wide (every Comm of this rank), because a rank must never
# block in MPI while one of its own sends is still unposted: its peer may be waiting for it.
_DEFERRED: list = []


def _flush(block: bool) -> None:
    """Post the deferred sends whose copies are done; all of them (waiting on each copy's event, not
    on the device) when `block`, which every blocking MPI call of this module does first."""
    keep = []
    for p in _DEFERRED:
        if block or p.copied.query():
            p.post()
        else:
            keep.append(p)
    _DEFERRED[:] = keep


class _Done:
    """The event of a copy that has already happened (CPU staging)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class Pending:
    """A non-blocking message. wait() completes it (and, for a staged receive, starts the copy of
    the host buffer to the device tensor); the time blocked counts as wait time. A staged send from a
    CUDA tensor starts unposted: `copied` is the event of its device-to-host copy, `post` the MPI call."""

    def __init__(self, comm: "Comm", req, keep=None, on_done=None, copied=None, post=None):
        self.comm, self.req, self.keep, self.on_done = comm, req, keep, on_done
        self.copied, self._post = copied, post
        self.done = False

    def post(self) -> None:
        """Post the MPI send of a deferred message (after its copy has finished)."""
        if self.req is None:
            self.copied.synchronize()
            self.req = self._post()
            self._post = None

    def wait(self):
        """Block until the message has completed; the time blocked counts as wait and as comm time."""
        if self.done:
            return
        t0 = time.perf_counter()
        _flush(block=True)
        self.post()
        self.req.Wait()
        dt = time.perf_counter() - t0
        self.comm.counters.wait_seconds += dt
        self.comm.counters.comm_seconds += dt
        self._finish()

    def cancel(self) -> None:
        """Withdraw a posted receive (MPI_Cancel, then the completion MPI requires)."""
        if self.done:
            return
        if self.req is not None:
            self.req.Cancel()
            self.req.Wait()
        self.done = True
        self.keep = self.on_done = None

    def test(self) -> bool:
        """Complete the message if it has arrived, without blocking; return whether it is done."""
        _flush(block=False)
        if not self.done and self.req is not None and self.req.Test():
            self._finish()
        return self.done

    def _finish(self):
        self.done = True
        if self.on_done is not None:
            self.on_done()
        self.keep = self.on_done = None
