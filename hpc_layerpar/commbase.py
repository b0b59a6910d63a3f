"""The communicator interface (Communicator, Request) and the byte accounting (Counters) shared by its two
implementations: comm.Comm (MPI) and simulate.ThreadComm (virtual ranks as threads). No MPI import: the
engines, the simulator and the tests type against this module, and only comm.py knows mpi4py."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: keeps this module free of heavy imports
    import numpy as np
    import torch


def tensor_bytes(t) -> int:
    """The bytes of a tensor's elements (what one message or one copy of it moves)."""
    return t.numel() * t.element_size()


def ring_allreduce_bytes(nbytes: int, size: int) -> int:
    """Bytes one rank sends (and as many it receives) in a ring allreduce of nbytes over size ranks:
    2 (size - 1) / size of the buffer, reduce-scatter then allgather; 0 on one rank."""
    if size <= 1:
        return 0
    return int(2 * (size - 1) * nbytes // size)


class Counters:
    """Per-rank communication accounting, reset by the caller at epoch start.

    The count_* methods are the one definition of what a communicator operation counts; comm.Comm and
    simulate.ThreadComm both call them, so an MPI job and its simulation report the same bytes. Callers
    skip them for PROC_NULL peers (nothing moves). Time (comm_seconds, wait_seconds) is measured by each
    implementation, since only it knows where it blocks."""

    def __init__(self):
        self.reset()

    def reset(self):
        """Zero the byte and time counters."""
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.comm_seconds = 0.0   # all time inside communication calls (posting, waiting, collectives)
        self.wait_seconds = 0.0   # the part spent blocked on point-to-point messages

    def as_tuple(self):
        """(comm_seconds, wait_seconds, bytes_sent, bytes_recv), all as floats."""
        return (self.comm_seconds, self.wait_seconds, float(self.bytes_sent), float(self.bytes_recv))

    def count_send(self, t) -> None:
        """A point-to-point send of tensor t to a real peer: its bytes as sent."""
        self.bytes_sent += tensor_bytes(t)

    def count_recv(self, t) -> None:
        """A point-to-point receive into tensor t from a real peer: its bytes as received."""
        self.bytes_recv += tensor_bytes(t)

    def count_allreduce(self, t, size: int) -> None:
        """An allreduce of t over size ranks. MPI hides its algorithm, so both implementations count what
        a ring allreduce would move per rank, in each direction (ring_allreduce_bytes)."""
        vol = ring_allreduce_bytes(tensor_bytes(t), size)
        self.bytes_sent += vol
        self.bytes_recv += vol

    def count_bcast(self, t, rank: int, root: int, size: int) -> None:
        """A broadcast of t from root: its bytes count as sent on root and received on every other rank;
        nothing on one rank (no peer)."""
        if size <= 1:
            return
        if rank == root:
            self.bytes_sent += tensor_bytes(t)
        else:
            self.bytes_recv += tensor_bytes(t)


@runtime_checkable
class Request(Protocol):
    """A non-blocking message returned by isend / irecv."""

    def wait(self) -> None:
        """Block until the message has completed (a receive's tensor then holds the data); again: no-op."""

    def test(self) -> bool:
        """Complete the message if it can without blocking; return whether it is done."""

    def cancel(self) -> None:
        """Withdraw a posted receive that will never be matched (an epoch halted early); its tensor is
        left as it is. A receive that has already completed stays completed."""


@runtime_checkable
class Communicator(Protocol):
    """What the engines use on a communicator: comm.Comm (MPI) and simulate.ThreadComm implement it.

    Messages and collectives follow MPI's rules: every rank of the communicator calls the collectives
    in the same order; point-to-point messages match on (source, tag) in posting order and never
    overtake each other between two ranks. The byte counters follow Counters.count_*; the object
    collectives, allreduce_array and barrier are control traffic and are not counted. tests/test_commbase.py
    checks that both classes have these members with these parameter names."""

    rank: int          # this rank in the communicator, 0 .. size - 1
    size: int          # the number of ranks
    local_rank: int    # this rank among those on its node (device choice)
    local_size: int    # the ranks on this node (threads per rank)
    cuda_aware: bool   # CUDA tensors go to the library directly (else staged via host); set by context.py
    counters: Counters  # this rank's traffic; shared with communicators made by split()

    def isend(self, t: torch.Tensor, dest: int, tag: int, key: Any) -> Request:
        """Start sending the contiguous tensor t to dest with tag; return a Request (wait()/test()).
        t must not change, and the staging `key` must not be reused, until the request completes (key
        names the host staging buffer, so concurrent messages need distinct keys). A send to PROC_NULL
        is a completed no-op; otherwise count_send(t)."""

    def irecv(self, t: torch.Tensor, source: int, tag: int, key: Any) -> Request:
        """Post a receive into the contiguous tensor t from source with tag; return a Request; t holds the
        message after wait() (or a True test()). Receives with the same (source, tag) match in posting
        order. From PROC_NULL: a completed no-op, t untouched; otherwise count_recv(t)."""

    def neighbours(self) -> tuple[int, int]:
        """(previous, next) rank in the chain 0 .. size - 1; PROC_NULL at the ends."""

    def split(self, color: int, key: int) -> Communicator:
        """Collective: a new communicator of the ranks with this color, ranked by key (MPI_Comm_split).
        It shares this one's counters (one account of the rank's traffic); free() it when done."""

    def allreduce_(self, t: torch.Tensor, key: Any = "allreduce") -> torch.Tensor:
        """Collective: sum the contiguous tensor t over the ranks in place and return it; key names the
        staging buffer; count_allreduce(t, size)."""

    def allreduce_array(self, values, op: str = "sum") -> np.ndarray:
        """Collective: element-wise sum (op "max", "min") of values over the ranks, a new float64 array;
        not counted."""

    def iallreduce_array(self, values, op: str = "sum") -> Any:
        """Collective, non-blocking: allreduce_array started now; returns a request whose wait() returns
        the array; every rank must wait() it (collectives started in between are allowed, as in MPI)."""

    def bcast_(self, t: torch.Tensor, root: int, key: Any = "bcast") -> torch.Tensor:
        """Collective: copy root's contiguous tensor t into t on every rank and return it; key names the
        staging buffer; count_bcast(t, rank, root, size)."""

    def bcast_obj(self, obj, root: int = 0) -> Any:
        """Collective: root's picklable obj, returned on every rank; not counted."""

    def allgather_obj(self, obj) -> list:
        """Collective: every rank's picklable obj, in rank order, on every rank; not counted."""

    def gather_obj(self, obj, root: int = 0) -> list | None:
        """Collective: every rank's picklable obj in rank order on root, None elsewhere; not counted."""

    def barrier(self) -> None:
        """Collective: return once every rank has entered it; not counted."""

    def free(self) -> None:
        """Release the communicator's resources (not the counters); a second call does nothing."""
