"""The communicator interface (commbase.Communicator) and its shared byte accounting: comm.Comm and
simulate.ThreadComm have the Protocol's members with its parameter names, and ThreadComm counts the bytes
the formulas below give at 1..4 virtual ranks. tests/test_comm.py runs the same sequence on Comm under
MPI and checks the same numbers. The formulas are written out here on purpose, not taken from commbase:
a change to commbase's accounting must fail these tests."""
import inspect

import pytest
import torch

from hpc_layerpar.comm import Comm
from hpc_layerpar.commbase import Communicator, Request, ring_allreduce_bytes
from hpc_layerpar.simulate import ThreadComm, run_simulated

# what hpc_layerpar/*.py use on a communicator (grep): adding to or dropping from the Protocol is a
# decision, so it has to change this list too
ENGINE_MEMBERS = {
    "rank", "size", "local_rank", "local_size", "cuda_aware", "counters",
    "isend", "irecv", "neighbours", "split", "allreduce_", "allreduce_array", "iallreduce_array", "bcast_", "bcast_obj",
    "allgather_obj", "gather_obj", "barrier", "free",
}
PROTOCOL_METHODS = sorted(n for n, v in vars(Communicator).items()
                          if inspect.isfunction(v) and not n.startswith("_"))
PROTOCOL_ATTRS = sorted(Communicator.__annotations__)

# the accounting sequence: a bfloat16 ring message (30 bytes), a float64 allreduce (56 bytes: at 3
# ranks the ring volume 4 * 56 / 3 is not whole, so the rounding is tested), an int64 bcast (80 bytes)
P2P_BYTES, ALLREDUCE_BYTES, BCAST_BYTES = 3 * 5 * 2, 7 * 8, 10 * 8


def accounting_sequence(comm, device="cpu"):
    """Ring exchange with the chain neighbours, an allreduce_, a bcast_ from root 0 on a communicator;
    returns (bytes_sent, bytes_recv, whether both requests are commbase.Request)."""
    comm.counters.reset()
    prev, nxt = comm.neighbours()
    got = torch.zeros(3, 5, dtype=torch.bfloat16, device=device)
    r = comm.irecv(got, prev, tag=11, key="acct")
    s = comm.isend(torch.full((3, 5), float(comm.rank), dtype=torch.bfloat16, device=device), nxt,
                   tag=11, key="acct")
    r.wait()
    s.wait()
    comm.allreduce_(torch.ones(7, dtype=torch.float64, device=device))
    comm.bcast_(torch.arange(10, device=device), root=0)
    requests_ok = isinstance(r, Request) and isinstance(s, Request)
    return comm.counters.bytes_sent, comm.counters.bytes_recv, requests_ok


def expected_bytes(rank: int, size: int):
    """(bytes_sent, bytes_recv, True) that accounting_sequence must count on `rank` of `size`: nothing
    to or from PROC_NULL at the chain ends, 2 (p - 1) / p of the buffer each way for a ring allreduce,
    a bcast as sent on the root and received elsewhere (nothing at all on one rank)."""
    ring = 2 * (size - 1) * ALLREDUCE_BYTES // size
    bcast = BCAST_BYTES if size > 1 else 0
    sent = (P2P_BYTES if rank < size - 1 else 0) + ring + (bcast if rank == 0 else 0)
    recv = (P2P_BYTES if rank > 0 else 0) + ring + (bcast if rank != 0 else 0)
    return sent, recv, True


def test_the_protocol_lists_what_the_engines_use():
    assert set(PROTOCOL_METHODS) | set(PROTOCOL_ATTRS) == ENGINE_MEMBERS


def test_both_implementations_are_communicators(world):
    assert isinstance(world, Communicator)
    assert run_simulated(2, lambda c: isinstance(c, Communicator)) == [True, True]


def _names(fn) -> list:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("impl", [Comm, ThreadComm], ids=["Comm", "ThreadComm"])
@pytest.mark.parametrize("name", PROTOCOL_METHODS)
def test_method_parameters_match_the_protocol(impl, name):
    """Same parameter names, in the same order: callers pass tag=, key=, root= by name."""
    assert _names(getattr(impl, name)) == _names(getattr(Communicator, name)), f"{impl.__name__}.{name}"


def test_ring_allreduce_volume_formula():
    for size in range(1, 9):
        for nbytes in (0, 1, 7, 56, 1000):
            assert ring_allreduce_bytes(nbytes, size) == 2 * (size - 1) * nbytes // size, (nbytes, size)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_thread_comm_counts_the_formulas(size):
    got = run_simulated(size, accounting_sequence)
    assert got == [expected_bytes(r, size) for r in range(size)]


def test_counters_are_still_importable_from_comm():
    from hpc_layerpar import comm, commbase, simulate

    assert comm.Counters is commbase.Counters and simulate.Counters is commbase.Counters


def _nonblocking_reduction(comm):
    """Two reductions in flight at once, a blocking collective between their start and their wait (the
    deferred in-epoch check of the 1f1b schedule does this): each returns the max, sum or min of its
    own values, and a second wait() returns the same array."""
    r = comm.rank
    first = comm.iallreduce_array([r, -r], "max")
    second = comm.iallreduce_array([1.0, r], "sum")
    total = comm.allreduce_array([2.0], "sum")
    a, b = second.wait(), first.wait()
    low = comm.iallreduce_array([r + 3.0], "min").wait()
    n = comm.size
    return (list(b) == [n - 1, 0] and list(a) == [n, n * (n - 1) / 2] and list(total) == [2.0 * n]
            and list(low) == [3.0] and first.wait() is b)


@pytest.mark.mpi
def test_nonblocking_reduction(world):
    from conftest import assert_all

    assert_all(world, _nonblocking_reduction(world), "iallreduce_array")


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_nonblocking_reduction_in_process(size):
    assert run_simulated(size, _nonblocking_reduction) == [True] * size
