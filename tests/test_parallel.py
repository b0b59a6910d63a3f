"""The layer-parallel engine against the single-process simulation and the invariants of
ALGORITHM.md s.8. Marked mpi: K = the communicator size (1 under plain pytest, 2-4 under mpiexec)."""
import hashlib

import pytest
import torch

from hpc_layerpar.auxstore import al_update, penalty_update
from hpc_layerpar.comm import Comm, Topology
from hpc_layerpar.config import OptimConfig, ParallelConfig
from hpc_layerpar.data import DeviceDataset, replica_shard
from hpc_layerpar.models import build_model
from hpc_layerpar.parallel import ParallelEngine
from hpc_layerpar.partition import balanced_partition
from hpc_layerpar.serial import SerialEngine, make_optimizer
from hpc_layerpar.stages import share_stages
from hpc_layerpar.sweep import forward_sweep

from conftest import assert_all
from reference import simulate

SEED, BATCH, LR, EPOCHS, BETA = 5, 16, 0.02, 2, 0.02
OPT = OptimConfig(lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)


def make_model():
    torch.manual_seed(SEED)
    return build_model("resnet", 8, in_channels=1, image_size=8, num_classes=4)


def run_engine(comm, data, ranges, pcfg, method, beta, epochs=EPOCHS):
    model = make_model()
    opt = make_optimizer(model, OPT)
    eng = ParallelEngine(model, opt, comm, data, ranges, pcfg, method=method, batch_size=BATCH,
                         drop_last=True, seed=SEED)
    forward_sweep(model, ranges, comm, data, eng.store, eng.filter, BATCH)
    sent = []
    for e in range(epochs):
        comm.counters.reset()
        st = eng.train_epoch(e, lambda t: LR, beta)
        sent.append((comm.counters.bytes_sent, st.samples))
    return model, eng, sent


@pytest.mark.mpi
@pytest.mark.parametrize("method,ds,wire,aux", [("penalty", 1, "float32", "float32"),
                                                ("al", 1, "float32", "float32"),
                                                ("penalty", 2, "float32", "float32"),
                                                ("al", 2, "bfloat16", "float32"),
                                                ("penalty", 1, "bfloat16", "bfloat16")])
def test_mpi_engine_equals_single_process_simulation(world, tiny_data, method, ds, wire, aux):
    data = DeviceDataset(tiny_data, torch.device("cpu"))
    ranges = balanced_partition(make_model().costs, world.size)
    pcfg = ParallelConfig(ds=ds, window=2, message_dtype=wire, beta=BETA, aux_dtype=aux,
                          aux_location="host" if aux == "bfloat16" else "device")
    model, eng, _ = run_engine(world, data, ranges, pcfg, method, beta=BETA)
    sim_models, A, M = simulate(make_model, lambda m: make_optimizer(m, OPT), data, ranges, method=method,
                                ds=ds, epochs=EPOCHS, batch_size=BATCH, seed=SEED, lr=LR, beta=BETA,
                                message_dtype=wire, aux_dtype=aux)
    k = world.rank
    a, b = ranges[k]
    mine = [p for el in model.elements[a:b] for p in el.parameters()]
    ref = [p for el in sim_models[k].elements[a:b] for p in el.parameters()]
    dp = max(float((x - y).detach().abs().max()) for x, y in zip(mine, ref))
    init = [p for el in make_model().elements[a:b] for p in el.parameters()]
    moved = max(float((x - y).detach().abs().max()) for x, y in zip(mine, init))
    da = dm = 0.0
    m_moved = True
    if k > 0:
        da = float((eng.store.a.float() - A[k]).abs().max())
        if method == "al":
            dm = float((eng.store.m.float() - M[k]).abs().max())
            m_moved = float(M[k].abs().max()) > 0
    assert_all(world, m_moved, "multipliers moved")
    assert_all(world, moved > 1e-3, f"parameters moved ({moved:.2e})")
    assert_all(world, dp < 1e-5 and da < 1e-5 and dm < 1e-5,
               f"rank {k}: params {dp:.2e}, aux {da:.2e}, multipliers {dm:.2e}")


@pytest.mark.mpi
@pytest.mark.parametrize("method", ["penalty", "al"])
def test_hybrid_stages_times_replicas_equal_simulation(world, tiny_data, method):
    """World = K stages x R replicas (R = 2 on an even number of ranks: K = 2, R = 2 at 4 ranks),
    laid out by comm.Topology as the run does; every rank's stage, shard of auxiliary variables and multipliers match
    the single-process simulation."""
    R = 2 if world.size % 2 == 0 else 1
    topo = Topology(world, R)  # the layout the run uses
    K, replica, stage, pipe = topo.stages, topo.replica, topo.stage, topo.pipe
    reps = topo.reps
    try:
        data = DeviceDataset(tiny_data, torch.device("cpu"))
        ranges = balanced_partition(make_model().costs, K)
        shard = replica_shard(data.n_train, R, replica, SEED) if R > 1 else None
        pcfg = ParallelConfig(window=2, beta=BETA, replicas=R)
        model = make_model()
        opt = make_optimizer(model, OPT)
        eng = ParallelEngine(model, opt, pipe, data, ranges, pcfg, method=method, batch_size=BATCH,
                             drop_last=True, seed=SEED, replica_comm=reps, shard=shard)
        forward_sweep(model, ranges, pipe, data, eng.store, eng.filter, BATCH // R, ids=shard)
        for e in range(EPOCHS):
            eng.train_epoch(e, lambda t: LR, BETA)
    finally:
        topo.free()
    sim_models, A, M = simulate(make_model, lambda m: make_optimizer(m, OPT), data, ranges, method=method,
                                ds=1, epochs=EPOCHS, batch_size=BATCH, seed=SEED, lr=LR, beta=BETA,
                                replicas=R)
    a, b = ranges[stage]
    mine = [p for el in model.elements[a:b] for p in el.parameters()]
    ref = [p for el in sim_models[stage].elements[a:b] for p in el.parameters()]
    dp = max(float((x - y).detach().abs().max()) for x, y in zip(mine, ref))
    da = dm = 0.0
    rows_ok = True
    if stage > 0:
        ids = shard if shard is not None else torch.arange(data.n_train)
        rows_ok = eng.store.a.shape[0] == len(ids) and (R == 1 or len(ids) < data.n_train)
        da = float((eng.store.a - A[stage][ids]).abs().max())
        if method == "al":
            dm = float((eng.store.m - M[stage][ids]).abs().max())
    assert_all(world, rows_ok, "each replica stores only its shard")
    assert_all(world, dp < 1e-5 and da < 1e-5 and dm < 1e-5,
               f"rank {world.rank} (stage {stage}, replica {replica}): params {dp:.2e}, aux {da:.2e}, "
               f"multipliers {dm:.2e}")


@pytest.mark.mpi
def test_host_staged_messages_give_the_same_result(world, tiny_data):
    """The staging path (device -> pinned host buffer -> MPI -> device) that GPU runs without
    CUDA-aware MPI take, exercised on CPU tensors: results equal the zero-copy path bitwise."""
    data = DeviceDataset(tiny_data, torch.device("cpu"))
    ranges = balanced_partition(make_model().costs, world.size)
    pcfg = ParallelConfig(window=2, beta=BETA, message_dtype="bfloat16")
    staged = Comm.world(stage_all=True)
    try:
        a, ea, sa = run_engine(staged, data, ranges, pcfg, "al", BETA)
    finally:
        staged.free()
    b, eb, sb = run_engine(world, data, ranges, pcfg, "al", BETA)
    same = all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    if ea.store is not None:
        same = same and torch.equal(ea.store.a, eb.store.a) and torch.equal(ea.store.m, eb.store.m)
    assert_all(world, same and sa == sb, "staged and direct messages differ")


@pytest.mark.mpi
def test_bytes_per_epoch_follow_the_formula_and_ds_divides_by_s2(world, tiny_data):
    data = DeviceDataset(tiny_data, torch.device("cpu"))
    ranges = balanced_partition(make_model().costs, world.size)
    got = {}
    for ds in (1, 2):
        _, eng, sent = run_engine(world, data, ranges, ParallelConfig(ds=ds, window=3), "penalty", BETA, 1)
        (nbytes, samples), = sent
        assert_all(world, nbytes == eng.bytes_per_epoch(samples, 4),
                   f"ds={ds}: sent {nbytes}, formula {eng.bytes_per_epoch(samples, 4)}")
        got[ds] = nbytes
    # per boundary 2 * M * numel(a_k) * 4 bytes over the pair of ranks; s=2 divides it by 4 exactly
    totals = {ds: sum(world.allgather_obj(v)) for ds, v in got.items()}
    if world.size > 1:
        model = make_model()
        want = sum(2 * (data.n_train // BATCH * BATCH) * torch.Size(model.shapes[a]).numel() * 4
                   for a, _ in ranges[1:])
        assert_all(world, totals[1] == want, f"{totals[1]} != {want}")
    assert_all(world, totals[1] == 4 * totals[2], f"s=2 must divide by 4: {totals}")


@pytest.mark.mpi
def test_phase_switch_carries_stages_and_momentum_to_every_rank(world, tiny_data):
    data = DeviceDataset(tiny_data, torch.device("cpu"))
    ranges = balanced_partition(make_model().costs, world.size)
    model, eng, _ = run_engine(world, data, ranges, ParallelConfig(window=2), "penalty", BETA, 1)
    k = world.rank
    a, b = ranges[k]
    own = [t.clone() for el in model.elements[a:b] for p in el.parameters()
           for t in (p.data, eng.opt.state[p]["momentum_buffer"])]
    share_stages(model, ranges, world, eng.opt)
    mine = torch.cat([t.reshape(-1) for p in model.parameters()
                      for t in (p.data, eng.opt.state[p]["momentum_buffer"])]).numpy().tobytes()
    digests = world.allgather_obj(hashlib.sha256(mine).hexdigest())
    assert_all(world, len(set(digests)) == 1, "every rank holds the same network and momentum")
    after = [t for el in model.elements[a:b] for p in el.parameters()
             for t in (p.data, eng.opt.state[p]["momentum_buffer"])]
    assert_all(world, all(torch.equal(x, y) for x, y in zip(own, after)), "owners keep their stage")


def test_k1_parallel_equals_serial_backprop_without_augmentation(tiny_data):
    data = DeviceDataset(tiny_data, torch.device("cpu"))
    solo = Comm.self_()
    try:
        for method in ("penalty", "al"):
            model, _, _ = run_engine(solo, data, [(0, 5)], ParallelConfig(), method, beta=BETA)
            ref = make_model()
            eng = SerialEngine(ref, make_optimizer(ref, OPT), solo, data, None, batch_size=BATCH,
                               drop_last=True, seed=SEED)
            for e in range(EPOCHS):
                eng.train_epoch(e, lambda t: LR)
            diff = max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), ref.parameters()))
            assert diff < 1e-5, f"{method}: {diff}"
    finally:
        solo.free()


def test_update_rules_on_a_hand_computed_case():
    a, m, z, p = (torch.tensor([v]) for v in (1.0, 0.5, 2.0, 0.3))
    assert torch.allclose(penalty_update(a, z, p, beta=2.0, eta=1.0), torch.tensor([1.85]))
    assert torch.allclose(penalty_update(a, z, p, beta=2.0, eta=0.5), torch.tensor([1.425]))
    an, mn = al_update(a, m, z, p, beta=2.0, eta=1.0)
    assert torch.allclose(an, torch.tensor([2.1])) and torch.allclose(mn, torch.tensor([0.3]))
    an, mn = al_update(a, m, z, p, beta=2.0, eta=0.5)
    assert torch.allclose(an, torch.tensor([1.55])) and torch.allclose(mn, torch.tensor([1.4]))


def test_al_shifted_target_gives_the_augmented_lagrangian_gradient():
    """(beta/2)||d - (a - m/beta)||^2 and (beta/2)||d - a||^2 + <m, d - a> differ by a constant in d."""
    torch.manual_seed(0)
    a, m = torch.randn(3, 4), torch.randn(3, 4)
    beta = 0.7
    d1 = torch.randn(3, 4, requires_grad=True)
    (0.5 * beta * (d1 - (a - m / beta)).pow(2).sum()).backward()
    d2 = d1.detach().clone().requires_grad_(True)
    (0.5 * beta * (d2 - a).pow(2).sum() + (m * (d2 - a)).sum()).backward()
    assert torch.allclose(d1.grad, d2.grad, atol=1e-6)


def test_eta_one_penalty_gradient_equals_the_backpropagated_one():
    """With eta = 1 the next target makes rank k-1's penalty gradient (at unchanged parameters)
    equal the adjoint p: the penalty term is a synthetic gradient with a stored target."""
    torch.manual_seed(1)
    z, p, a = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    beta = 3.0
    target = penalty_update(a, z, p, beta, eta=1.0)
    d = z.clone().requires_grad_(True)
    (0.5 * beta * (d - target).pow(2).sum()).backward()
    assert torch.allclose(d.grad, p, atol=1e-5)


@pytest.mark.mpi
@pytest.mark.parametrize("method", ["penalty", "al"])
def test_epoch_coupling_contracts_only_when_beta_exceeds_the_curvature(world, tiny_data, method):
    """Version 1's rule with frozen parameters (no BatchNorm, so the true states are fixed): at the
    boundary next to the cross-entropy the update a <- z - p(a)/beta contracts when beta exceeds
    the loss's curvature, successive changes of a shrink every epoch, and does not when beta is
    small (the step p/beta overshoots), which is one of the failures that made the pipeline
    coupling the default (ALGORITHM.md s.10). With K >= 3 a middle boundary's update
    a <- z - J^T (Phi(a) - a_next) has a gain sigma(J)^2 that beta cancels out of: it expands
    even at a large beta (the other failure); the test checks that too."""
    if world.size < 2:
        pytest.skip("needs a boundary: run under mpiexec -n >= 2")
    data = DeviceDataset(tiny_data, torch.device("cpu"))

    def frozen():
        torch.manual_seed(SEED)
        return build_model("resnet", 8, in_channels=1, image_size=8, num_classes=4, norm="none")

    ranges = balanced_partition(frozen().costs, world.size)
    steps = {}
    for beta in (50.0, 1e-3):
        model = frozen()
        opt = make_optimizer(model, OptimConfig(lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0))
        eng = ParallelEngine(model, opt, world, data, ranges, ParallelConfig(coupling="epoch", window=2),
                             method=method, batch_size=BATCH, drop_last=True, seed=SEED)
        forward_sweep(model, ranges, world, data, eng.store, eng.filter, BATCH)
        prev = None if eng.store is None else eng.store.a.clone()
        out = []
        for e in range(5):
            eng.train_epoch(e, lambda t: 0.0, beta)
            if eng.store is not None:
                out.append(float((eng.store.a - prev).norm()))
                prev = eng.store.a.clone()
        steps[beta] = out
    if world.size >= 3 and world.rank == 1:  # a middle boundary
        big = steps[50.0]
        ok = big[-1] > 10 * max(big[1], 1e-12)
    elif world.size == 2 and world.rank == 1:
        big, small = steps[50.0], steps[1e-3]
        # AL with eta = 1 keeps no memory (m = p) and settles in pairs of epochs: non-expansive, then small
        ok = all(b <= 1.001 * a for a, b in zip(big, big[1:])) and big[-1] < 0.05 * big[0] \
            and small[-1] > 0.5 * small[0]
    else:
        ok = True
    assert_all(world, ok, f"rank {world.rank}: changes of a by epoch {steps}")
