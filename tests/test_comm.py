"""The communicator itself: point-to-point in a ring (direct and host-staged), the collectives, the
byte counters (the same as the simulator's), split() and the K x R topology. Marked `mpi`: they pass at
any size, 1..4 ranks."""
import pytest
import torch
from test_commbase import accounting_sequence, expected_bytes

from hpc_layerpar.comm import Comm, Topology
from hpc_layerpar.commbase import Communicator
from hpc_layerpar.errors import ConfigError
from hpc_layerpar.simulate import run_simulated

from conftest import DEVICE, assert_all

pytestmark = pytest.mark.mpi


@pytest.fixture(params=[False, True], ids=["direct", "staged"])
def comm(request, world):
    """A fresh communicator per test (own counters); `staged` sends CPU tensors through the host
    staging buffers that GPU runs without CUDA-aware MPI use."""
    c = Comm.world(stage_all=request.param)
    yield c
    c.barrier()
    c.free()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_ring_exchange_delivers_each_neighbours_tensor_and_counts_bytes(comm, dtype):
    """Every rank sends its rank-stamped tensor to the next and receives the previous one's
    (PROC_NULL at the chain ends: nothing arrives, nothing is counted)."""
    prev, nxt = comm.neighbours()
    # on a GPU (HPL_TEST_DEVICE=cuda) the tensors live there: the staged path copies on a side stream
    mine = (torch.arange(12) + 100 * comm.rank).to(dtype).reshape(3, 4).to(DEVICE)
    got = torch.full((3, 4), -1).to(dtype).to(DEVICE)
    r = comm.irecv(got, prev, tag=7, key="t")
    s = comm.isend(mine, nxt, tag=7, key="t")
    r.wait()
    s.wait()
    got = got.cpu()
    first, last = comm.rank == 0, comm.rank == comm.size - 1
    expect = torch.full((3, 4), -1).to(dtype) if first \
        else (torch.arange(12) + 100 * (comm.rank - 1)).to(dtype).reshape(3, 4)
    nbytes = 12 * mine.element_size()
    ok = torch.equal(got, expect) and comm.counters.bytes_sent == (0 if last else nbytes) \
        and comm.counters.bytes_recv == (0 if first else nbytes)
    assert_all(comm, ok, f"rank {comm.rank}: got {got.flatten()[:3]}, counters {comm.counters.as_tuple()}")


def test_messages_between_two_ranks_arrive_in_order_on_reused_tags(comm):
    """The channels reuse tags modulo a range: MPI's non-overtaking rule keeps them matched."""
    prev, nxt = comm.neighbours()
    n = 6
    outs = [torch.full((5,), float(comm.rank * 10 + i), device=DEVICE) for i in range(n)]
    ins = [torch.zeros(5, device=DEVICE) for _ in range(n)]
    reqs = [comm.irecv(ins[i], prev, tag=i % 2, key=("in", i)) for i in range(n)]
    reqs += [comm.isend(outs[i], nxt, tag=i % 2, key=("out", i)) for i in range(n)]
    for q in reqs:
        q.wait()
    ins = [t.cpu() for t in ins]
    ok = comm.rank == 0 or all(torch.equal(ins[i], torch.full((5,), float((comm.rank - 1) * 10 + i)))
                               for i in range(n))
    assert_all(comm, ok, f"rank {comm.rank}: {[float(t[0]) for t in ins]}")


def test_test_completes_a_receive_and_wait_after_it_is_a_no_op(comm):
    prev, nxt = comm.neighbours()
    got = torch.zeros(4)
    r = comm.irecv(got, prev, tag=3, key="p")
    s = comm.isend(torch.full((4,), float(comm.rank)), nxt, tag=3, key="p")
    s.wait()
    while not r.test():
        pass
    r.wait()
    ok = comm.rank == 0 or torch.equal(got, torch.full((4,), float(comm.rank - 1)))
    assert_all(comm, ok, f"rank {comm.rank}: {got}")


def test_allreduce_sums_in_place_and_counts_ring_volume(comm):
    t = torch.full((8,), float(comm.rank + 1))
    comm.allreduce_(t)
    p = comm.size
    vol = 2 * (p - 1) * 8 * 4 // p if p > 1 else 0
    ok = torch.equal(t, torch.full((8,), float(p * (p + 1) // 2))) and comm.counters.bytes_sent == vol
    assert_all(comm, ok, f"rank {comm.rank}: {t}, {comm.counters.as_tuple()}")


def test_bcast_copies_the_roots_tensor_and_counts_one_direction(comm):
    root = comm.size - 1
    t = torch.arange(6, dtype=torch.float32) * (comm.rank + 1)
    comm.bcast_(t, root=root)
    nbytes = 24 if comm.size > 1 else 0
    sent, recv = comm.counters.bytes_sent, comm.counters.bytes_recv
    ok = torch.equal(t, torch.arange(6, dtype=torch.float32) * comm.size) and \
        (sent, recv) == ((nbytes, 0) if comm.rank == root else (0, nbytes))
    assert_all(comm, ok, f"rank {comm.rank}: {t}, {(sent, recv)}")


def test_byte_accounting_matches_the_formulas_and_the_simulator(comm):
    """The sequence of test_commbase counts on Comm what its formulas say, and what ThreadComm counts
    for the same rank at this size (an MPI job and its simulation report the same traffic)."""
    mine = accounting_sequence(comm, DEVICE)
    simulated = run_simulated(comm.size, lambda c: accounting_sequence(c, DEVICE))[comm.rank]
    ok = isinstance(comm, Communicator) and mine == expected_bytes(comm.rank, comm.size) == simulated
    assert_all(comm, ok, f"rank {comm.rank}: Comm {mine}, ThreadComm {simulated}, "
                         f"formulas {expected_bytes(comm.rank, comm.size)}")


def test_object_collectives_and_array_allreduce(comm):
    ranks = comm.allgather_obj(comm.rank)
    gathered = comm.gather_obj({"r": comm.rank})
    b = comm.bcast_obj("hello" if comm.rank == 0 else None)
    mx = comm.allreduce_array([comm.rank, -comm.rank], op="max")
    ok = ranks == list(range(comm.size)) and b == "hello" and list(mx) == [comm.size - 1, 0] and \
        (gathered == [{"r": r} for r in range(comm.size)] if comm.rank == 0 else gathered is None)
    assert_all(comm, ok, f"rank {comm.rank}: {ranks} {gathered} {b} {mx}")


def test_counters_reset_and_split_shares_them_and_keeps_staging(comm):
    child = comm.split(comm.rank % 2, comm.rank)
    try:
        comm.counters.reset()
        child.allreduce_(torch.ones(4))
        ok = child.counters is comm.counters and child.stage_all == comm.stage_all and \
            child.size == len([r for r in range(comm.size) if r % 2 == comm.rank % 2]) and \
            comm.counters.bytes_sent == (2 * (child.size - 1) * 16 // child.size if child.size > 1 else 0)
        comm.counters.reset()
        ok = ok and comm.counters.as_tuple() == (0.0, 0.0, 0.0, 0.0)
    finally:
        child.free()
    assert_all(comm, ok, f"rank {comm.rank}: {comm.counters.as_tuple()}")


@pytest.mark.parametrize("replicas", [1, 2])
def test_topology_lays_out_k_stages_by_r_replicas(comm, replicas):
    if comm.size % replicas:
        with pytest.raises(ConfigError, match="parallel.replicas=2"):
            Topology(comm, replicas)
        return
    topo = Topology(comm, replicas)
    try:
        K = comm.size // replicas
        stages = topo.pipe.allgather_obj(topo.stage)
        members = topo.pipe.allgather_obj(comm.rank)
        ok = topo.stages == K and stages == list(range(K)) and \
            members == [topo.replica * K + s for s in range(K)] and topo.pipe.counters is comm.counters
        if replicas > 1:
            same = topo.reps.allgather_obj(topo.stage)
            ok = ok and same == [topo.stage] * replicas and topo.reps.size == replicas
        else:
            ok = ok and topo.reps is None and topo.pipe is comm
    finally:
        topo.free()
    assert_all(comm, ok, f"rank {comm.rank}: stage {topo.stage} replica {topo.replica}")
