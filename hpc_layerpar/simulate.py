"""The exact one-process simulator (`--set parallel.simulate=N`): N virtual ranks as N threads of one
process, each running the very same training code (train.run) on ThreadComm, an in-process implementation
of commbase.Communicator (the interface comm.Comm implements with MPI) with Comm's message matching and
byte accounting (both count through commbase.Counters). The parameters, auxiliary variables, multipliers
and metrics equal those of an N-rank MPI job (the tests check it); the timings do not (the threads share
this process's cores), so reports give no speed-up for simulated runs.

Use it to study K = 8 or 16 stages on one GPU or a laptop."""
from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

import numpy as np
import torch

from .commbase import Counters

PROC_NULL = -32766  # sends to and receives from it are no-ops, as MPI.PROC_NULL
POLL_S = 0.2        # how often a blocked thread looks whether the simulation was aborted


class SimulationAborted(RuntimeError):
    """Raised in every virtual rank once one of them failed (the others must not wait forever)."""


class _Hub:
    """State shared by the members of one communicator: mailboxes, collective slots, sub-hubs."""

    def __init__(self, size: int, abort: threading.Event):
        self.size, self.abort = size, abort
        self.cond = threading.Condition()
        self.messages = defaultdict(deque)   # (dst, src, tag) -> payloads not yet matched
        self.receivers = defaultdict(deque)  # (dst, src, tag) -> posted receives not yet matched
        self.slots: dict = {}
        self.children: dict = {}

    def wait(self):
        """cond.wait, but give up when the simulation was aborted (the caller holds cond and
        re-checks what it waits for after every wake-up, so a completed exchange still completes)."""
        if self.abort.is_set():
            raise SimulationAborted("another virtual rank failed")
        self.cond.wait(POLL_S)


class _Done:
    """A completed request (sends are buffered at once; PROC_NULL is a no-op)."""

    def wait(self):
        return None

    def test(self) -> bool:
        return True

    def cancel(self) -> None:
        pass


class _Reduction:
    """A non-blocking reduction of small arrays: wait() returns its result (computed once)."""

    def __init__(self, finish):
        self.finish, self.result = finish, None

    def wait(self):
        if self.result is None:
            self.result = self.finish()
        return self.result


class _Recv:
    """A posted receive, matched in posting order as MPI does."""

    def __init__(self, comm: "ThreadComm", t: torch.Tensor, key=None):
        self.comm, self.t, self.key = comm, t, key
        self.payload = None
        self.done = False

    def cancel(self) -> None:
        """Withdraw the receive: unmatched, it leaves the hub's queue; matched, its payload is dropped."""
        hub = self.comm.hub
        with hub.cond:
            if self.payload is None and self in hub.receivers[self.key]:
                hub.receivers[self.key].remove(self)
        self.payload, self.done = None, True

    def _finish(self):
        self.t.copy_(self.payload)
        self.payload = None
        self.done = True

    def wait(self):
        if self.done:
            return
        hub = self.comm.hub
        t0 = time.perf_counter()
        with hub.cond:
            while self.payload is None:
                hub.wait()
        dt = time.perf_counter() - t0
        self.comm.counters.wait_seconds += dt
        self.comm.counters.comm_seconds += dt
        self._finish()

    def test(self) -> bool:
        if not self.done and self.payload is not None:
            self._finish()
        return self.done


class ThreadComm:
    """commbase.Communicator for one virtual rank of a simulated job (as comm.Comm is for an MPI rank)."""

    def __init__(self, hub: _Hub, rank: int):
        self.hub, self.rank, self.size = hub, rank, hub.size
        self.local_rank, self.local_size = rank, hub.size  # one node
        self.cuda_aware, self.stage_all = False, False
        self.counters = Counters()
        self._seq = 0

    # ---- point to point ------------------------------------------------------------------
    def isend(self, t: torch.Tensor, dest: int, tag: int, key=None):
        """Hand a copy of t to the matching posted receive, or queue it; done at once (buffered). Counts the bytes."""
        if dest == PROC_NULL:
            return _Done()
        payload = t.detach().clone()
        self.counters.count_send(t)
        hub, k = self.hub, (dest, self.rank, tag)
        with hub.cond:
            if hub.receivers[k]:
                hub.receivers[k].popleft().payload = payload
            else:
                hub.messages[k].append(payload)
            hub.cond.notify_all()
        return _Done()

    def irecv(self, t: torch.Tensor, source: int, tag: int, key=None):
        """Post a receive into t from `source` with `tag`, matched in posting order; return the request to wait on."""
        if source == PROC_NULL:
            return _Done()
        self.counters.count_recv(t)
        hub, k = self.hub, (self.rank, source, tag)
        req = _Recv(self, t, k)
        with hub.cond:
            if hub.messages[k]:
                req.payload = hub.messages[k].popleft()
            else:
                hub.receivers[k].append(req)
        return req

    def neighbours(self) -> tuple[int, int]:
        """(previous, next) rank of the chain; PROC_NULL at its ends."""
        prev = self.rank - 1 if self.rank > 0 else PROC_NULL
        nxt = self.rank + 1 if self.rank < self.size - 1 else PROC_NULL
        return prev, nxt

    # ---- collectives ---------------------------------------------------------------------
    def _exchange(self, value) -> list:
        """Every member contributes a value and gets all of them, in rank order."""
        return self._collect(self._deposit(value))

    def _deposit(self, value) -> int:
        """Contribute value to the next collective without waiting; its sequence number for _collect."""
        hub = self.hub
        seq = self._seq
        self._seq += 1
        with hub.cond:
            slot = hub.slots.setdefault(seq, {"values": [None] * self.size, "in": 0, "out": 0})
            slot["values"][self.rank] = value
            slot["in"] += 1
            hub.cond.notify_all()
        return seq

    def _collect(self, seq: int) -> list:
        """Every member's value of collective seq, in rank order, once all have contributed."""
        hub = self.hub
        with hub.cond:
            slot = hub.slots[seq]
            while slot["in"] < self.size:
                hub.wait()
            out = list(slot["values"])
            slot["out"] += 1
            if slot["out"] == self.size:
                del hub.slots[seq]
        return out

    def allreduce_(self, t: torch.Tensor, key="allreduce") -> torch.Tensor:
        """In-place sum of t over the virtual ranks; counts ring-allreduce bytes (Counters.count_allreduce)."""
        t0 = time.perf_counter()
        parts = self._exchange(t.detach().clone())
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        t.copy_(total)
        self.counters.comm_seconds += time.perf_counter() - t0
        self.counters.count_allreduce(t, self.size)
        return t

    def allreduce_array(self, values, op="sum") -> np.ndarray:
        """Element-wise sum (or max, min) over the virtual ranks of values, as a float64 array."""
        parts = self._exchange(np.asarray(values, dtype=np.float64).copy())
        fn = {"sum": np.sum, "max": np.max, "min": np.min}[op]
        return fn(np.stack(parts), axis=0)

    def iallreduce_array(self, values, op="sum"):
        """allreduce_array without waiting: a request whose wait() returns the array."""
        seq = self._deposit(np.asarray(values, dtype=np.float64).copy())
        fn = {"sum": np.sum, "max": np.max, "min": np.min}[op]
        return _Reduction(lambda: fn(np.stack(self._collect(seq)), axis=0))

    def bcast_(self, t: torch.Tensor, root: int, key="bcast") -> torch.Tensor:
        """Copy root's t into every virtual rank's t; bytes count as sent on root, received elsewhere."""
        t0 = time.perf_counter()
        parts = self._exchange(t.detach().clone() if self.rank == root else None)
        if self.rank != root:
            t.copy_(parts[root])
        self.counters.comm_seconds += time.perf_counter() - t0
        self.counters.count_bcast(t, self.rank, root, self.size)
        return t

    def bcast_obj(self, obj, root: int = 0):
        """root's obj, returned on every virtual rank."""
        return self._exchange(obj if self.rank == root else None)[root]

    def allgather_obj(self, obj) -> list:
        """Every virtual rank's obj, in rank order."""
        return self._exchange(obj)

    def gather_obj(self, obj, root: int = 0):
        """Every virtual rank's obj in rank order on root; None on the other ranks."""
        out = self._exchange(obj)
        return out if self.rank == root else None

    def barrier(self):
        """Block until every virtual rank of the communicator has reached the barrier."""
        self._exchange(None)

    def split(self, color: int, key: int) -> "ThreadComm":
        """The sub-communicator of the ranks with this color, ranked by key (as MPI_Comm_split); it shares
        this rank's counters."""
        seq = self._seq
        pairs = self._exchange((color, key))
        members = sorted((k, r) for r, (c, k) in enumerate(pairs) if c == color)
        new_rank = [r for _, r in members].index(self.rank)
        with self.hub.cond:
            hub = self.hub.children.setdefault((seq, color), _Hub(len(members), self.hub.abort))
        child = ThreadComm(hub, new_rank)
        child.counters = self.counters  # one account of this rank's traffic, as comm.Comm.split
        return child

    def free(self):
        """Nothing to release; part of the commbase.Communicator interface."""


def run_simulated(n: int, fn, poll_s: float = POLL_S):
    """Run fn(comm) on n threads with one ThreadComm each; return the list of results. If any
    thread raises, the others are aborted and the first real error (lowest rank) is raised."""
    abort = threading.Event()
    hub = _Hub(n, abort)
    results, errors = [None] * n, [None] * n

    def target(r):
        try:
            results[r] = fn(ThreadComm(hub, r))
        except BaseException as exc:  # noqa: BLE001 - reported by the driver below
            errors[r] = exc
            abort.set()

    threads = [threading.Thread(target=target, args=(r,), name=f"virtual-rank-{r}", daemon=True)
               for r in range(n)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(poll_s)  # short joins keep the main thread responsive to signals
    except BaseException:
        abort.set()
        raise
    real = [e for e in errors if e is not None and not isinstance(e, SimulationAborted)]
    if real:
        raise real[0]
    if any(e is not None for e in errors):
        raise next(e for e in errors if e is not None)
    return results
