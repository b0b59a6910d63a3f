"""What the parallel phase moves between ranks, with the pipeline engine as the vehicle: the host-staged
message path, the bytes against the per-boundary formula, and the stage exchange at a phase switch.
Marked mpi: K = the communicator size (1 under plain pytest, 2-4 under mpiexec)."""
import hashlib

import pytest
import torch

from hpc_layerpar.comm import Comm
from hpc_layerpar.config import OptimConfig, ParallelConfig
from hpc_layerpar.data import DeviceDataset
from hpc_layerpar.filters import DSFilter
from hpc_layerpar.models import build_model
from hpc_layerpar.partition import balanced_partition
from hpc_layerpar.pipeline import PipelineEngine
from hpc_layerpar.serial import make_optimizer
from hpc_layerpar.stages import share_stages

from conftest import assert_all

SEED, BATCH, LR, EPOCHS, BETA = 5, 16, 0.02, 2, 0.5
OPT = OptimConfig(lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)


def make_model():
    torch.manual_seed(SEED)
    return build_model("resnet", 8, in_channels=1, image_size=8, num_classes=4)


def run_engine(comm, data, ranges, pcfg, method, epochs=EPOCHS):
    """(model, optimizer, engine, per epoch (bytes this rank sent, samples))."""
    model = make_model()
    opt = make_optimizer(model, OPT)
    eng = PipelineEngine(model, opt, comm, data, ranges, pcfg, method=method, batch_size=BATCH,
                         drop_last=True, seed=SEED)
    sent = []
    for e in range(epochs):
        comm.counters.reset()
        st = eng.train_epoch(e, lambda t: LR, BETA)
        sent.append((comm.counters.bytes_sent, st.samples))
    return model, opt, eng, sent


@pytest.mark.mpi
def test_host_staged_messages_give_the_same_result(world, tiny_data):
    """The staging path (device -> pinned host buffer -> MPI -> device) that GPU runs without
    CUDA-aware MPI take, exercised on CPU tensors: results equal the zero-copy path bitwise."""
    data = DeviceDataset(tiny_data, torch.device("cpu"))
    ranges = balanced_partition(make_model().costs, world.size)
    pcfg = ParallelConfig(micro_batches=2, message_dtype="bfloat16")
    staged = Comm.world(stage_all=True)
    try:
        a, _, ea, sa = run_engine(staged, data, ranges, pcfg, "al")
    finally:
        staged.free()
    b, _, eb, sb = run_engine(world, data, ranges, pcfg, "al")
    same = all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    if ea.store is not None:  # the AL multipliers of the outgoing boundary
        same = same and torch.equal(ea.store.a, eb.store.a)
    assert_all(world, same and sa == sb, "staged and direct messages differ")


@pytest.mark.mpi
@pytest.mark.parametrize("ds", [1, 2])
def test_bytes_per_epoch_follow_the_boundary_formula(world, tiny_data, ds):
    """All ranks together send, per boundary and trained sample, D(u) forward and the adjoint
    backward: 2 x numel of the (DS-coarsened) boundary x 4 bytes, counted independently of the
    engine's own bytes_per_epoch."""
    data = DeviceDataset(tiny_data, torch.device("cpu"))
    ranges = balanced_partition(make_model().costs, world.size)
    _, _, _, sent = run_engine(world, data, ranges, ParallelConfig(ds=ds, micro_batches=2), "penalty", 1)
    (nbytes, _), = sent
    total = sum(world.allgather_obj(nbytes))
    model, filt = make_model(), DSFilter(ds)
    samples = data.n_train // BATCH * BATCH
    want = sum(2 * samples * torch.Size(filt.coarse_shape(model.shapes[a])).numel() * 4 for a, _ in ranges[1:])
    assert_all(world, total == want, f"ds={ds}: all ranks sent {total}, the formula gives {want}")


@pytest.mark.mpi
def test_phase_switch_carries_stages_and_momentum_to_every_rank(world, tiny_data):
    data = DeviceDataset(tiny_data, torch.device("cpu"))
    ranges = balanced_partition(make_model().costs, world.size)
    model, opt, _, _ = run_engine(world, data, ranges, ParallelConfig(micro_batches=2), "penalty", 1)
    k = world.rank
    a, b = ranges[k]
    own = [t.clone() for el in model.elements[a:b] for p in el.parameters()
           for t in (p.data, opt.state[p]["momentum_buffer"])]
    share_stages(model, ranges, world, opt)
    mine = torch.cat([t.reshape(-1) for p in model.parameters()
                      for t in (p.data, opt.state[p]["momentum_buffer"])]).numpy().tobytes()
    digests = world.allgather_obj(hashlib.sha256(mine).hexdigest())
    assert_all(world, len(set(digests)) == 1, "every rank holds the same network and momentum")
    after = [t for el in model.elements[a:b] for p in el.parameters()
             for t in (p.data, opt.state[p]["momentum_buffer"])]
    assert_all(world, all(torch.equal(x, y) for x, y in zip(own, after)), "owners keep their stage")
