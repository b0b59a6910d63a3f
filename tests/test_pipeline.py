"""The pipeline coupling (ALGORITHM.md s.4) against its independent one-process reference, the
one-process simulator against MPI, and the properties the coupling promises. Marked mpi: K = the
communicator size (1 under plain pytest, 2-4 under mpiexec)."""
import threading

import pytest
import torch

from hpc_layerpar import diagnostics
from hpc_layerpar.comm import Comm, Topology
from hpc_layerpar.config import OptimConfig, ParallelConfig
from hpc_layerpar.data import DeviceDataset, epoch_batches, replica_shard
from hpc_layerpar.filters import DSFilter
from hpc_layerpar.models import build_model
from hpc_layerpar.partition import balanced_partition
from hpc_layerpar.pipeline import PipelineEngine
from hpc_layerpar.pipeline_plan import reuses
from hpc_layerpar.serial import SerialEngine, make_optimizer
from hpc_layerpar.simulate import run_simulated

from conftest import DEVICE, TOL, TOL_BF16, assert_all
from reference import pipeline as reference

SEED, BATCH, LR, EPOCHS = 5, 16, 0.05, 2
OPT = OptimConfig(lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)


_LOCK = threading.Lock()  # the simulator's threads share torch's global RNG


def make_model():
    """SiLU, not ReLU: the engine and the reference sum in different orders (an Allreduce, one
    backward), and a pre-activation within rounding of 0 at a ReLU flips one gradient entry by dy:
    seen at K = 3 x R = 2 with one intra-op thread (models.ACTIVATIONS)."""
    with _LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build_model("resnet", 8, in_channels=1, image_size=8, num_classes=4, act="silu").to(DEVICE)


def betas_for(K):
    """Distinct weights per boundary, so a mix-up between boundaries shows."""
    return [0.5 + 0.25 * k for k in range(K - 1)] + [0.0]


def run_engine(comm, data, ranges, pcfg, method, epochs=EPOCHS, reps=None, shard=None):
    model = make_model()
    opt = make_optimizer(model, OPT)
    eng = PipelineEngine(model, opt, comm, data, ranges, pcfg, method=method, batch_size=BATCH,
                         drop_last=True, seed=SEED, replica_comm=reps, shard=shard)
    stats = [eng.train_epoch(e, lambda t: LR, betas_for(comm.size)[comm.rank]) for e in range(epochs)]
    return model, eng, stats


def stage_diff(model, ref_model, rng):
    a, b = rng
    mine = [p for el in model.elements[a:b] for p in el.parameters()]
    ref = [p for el in ref_model.elements[a:b] for p in el.parameters()]
    return max(float((x - y).detach().abs().max()) for x, y in zip(mine, ref))


COMBOS = [("penalty", 1, "float32", 4, "smooth", "tick"), ("al", 1, "float32", 2, "smooth", "tick"),
          ("penalty", 2, "float32", 1, "smooth", "tick"), ("al", 2, "bfloat16", 4, "smooth", "tick"),
          ("penalty", 2, "float32", 2, "nearest", "tick"), ("penalty", 1, "bfloat16", 2, "smooth", "tick"),
          ("penalty", 1, "float32", 1, "smooth", "1f1b"), ("al", 2, "bfloat16", 2, "smooth", "1f1b")]
IN_PROCESS = [2, 3, 4]  # virtual ranks: what plain pytest runs the mpi-marked checks at as well


@pytest.mark.mpi
@pytest.mark.parametrize("method,ds,wire,micro,up,sch", COMBOS)
def test_pipeline_engine_equals_reference(world, tiny_data, method, ds, wire, micro, up, sch):
    _engine_equals_reference(world, tiny_data, method, ds, wire, micro, up, sch)


@pytest.mark.parametrize("K", IN_PROCESS)
@pytest.mark.parametrize("method,ds,wire,micro,up,sch", COMBOS)
def test_pipeline_engine_equals_reference_in_process(tiny_data, K, method, ds, wire, micro, up, sch):
    """The same check at K = 2..4 as virtual ranks, so that plain pytest exercises the parallel math
    too (under plain pytest the mpi-marked tests run at K = 1, where messages do nothing)."""
    run_simulated(K, lambda comm: _engine_equals_reference(comm, tiny_data, method, ds, wire, micro, up, sch))


def _engine_equals_reference(world, tiny_data, method, ds, wire, micro, up, sch):
    data = DeviceDataset(tiny_data, DEVICE)
    ranges = balanced_partition(make_model().costs, world.size)
    pcfg = ParallelConfig(ds=ds, micro_batches=micro, message_dtype=wire, ds_up=up, schedule=sch)
    model, eng, _ = run_engine(world, data, ranges, pcfg, method)
    ref, M = reference(make_model, lambda m: make_optimizer(m, OPT), data, ranges, method=method, ds=ds,
                       epochs=EPOCHS, batch_size=BATCH, micro=micro, seed=SEED, lr=LR,
                       betas=betas_for(world.size), message_dtype=wire, ds_up=up, schedule=sch)
    k = world.rank
    dp = stage_diff(model, ref[k], ranges[k])
    moved = stage_diff(model, make_model(), ranges[k])
    dm = 0.0
    m_moved = True
    if eng.store is not None:
        dm = float((eng.store.a - M[k]).abs().max())
        m_moved = float(M[k].abs().max()) > 0
    assert_all(world, moved > 1e-3, f"parameters moved ({moved:.2e})")
    assert_all(world, m_moved, "AL multipliers moved")
    tol = 1e-5 * (TOL if wire == "float32" else TOL_BF16)
    assert_all(world, dp < tol and dm < tol, f"rank {k}: params {dp:.2e}, multipliers {dm:.2e}")


@pytest.mark.mpi
@pytest.mark.parametrize("method", ["penalty", "al"])
def test_pipeline_hybrid_stages_times_replicas_equal_reference(world, tiny_data, method):
    """World = K stages x R replicas (R = 2 on an even number of ranks)."""
    _hybrid_equals_reference(world, tiny_data, method)


@pytest.mark.parametrize("world_size", [4, 6])
@pytest.mark.parametrize("method", ["penalty", "al"])
def test_pipeline_hybrid_in_process(tiny_data, method, world_size):
    """K = 2, 3 stages x R = 2 replicas as virtual ranks."""
    run_simulated(world_size, lambda comm: _hybrid_equals_reference(comm, tiny_data, method))


def _hybrid_equals_reference(world, tiny_data, method, stash=False):
    R = 2 if world.size % 2 == 0 else 1
    topo = Topology(world, R)  # the layout the run uses
    K, replica, stage, pipe = topo.stages, topo.replica, topo.stage, topo.pipe
    reps = topo.reps
    try:
        data = DeviceDataset(tiny_data, DEVICE)
        ranges = balanced_partition(make_model().costs, K)
        shard = replica_shard(data.n_train, R, replica, SEED) if R > 1 else None
        pcfg = ParallelConfig(micro_batches=2, replicas=R, stash_weights=stash)
        model = make_model()
        eng = PipelineEngine(model, make_optimizer(model, OPT), pipe, data, ranges, pcfg, method=method,
                             batch_size=BATCH, drop_last=True, seed=SEED,
                             replica_comm=reps, shard=shard)
        for e in range(EPOCHS):
            eng.train_epoch(e, lambda t: LR, betas_for(K)[stage])
    finally:
        topo.free()
    ref, M = reference(make_model, lambda m: make_optimizer(m, OPT), data, ranges, method=method, ds=1,
                       epochs=EPOCHS, batch_size=BATCH, micro=2, seed=SEED, lr=LR, betas=betas_for(K),
                       replicas=R, schedule=pcfg.schedule, stash=stash)
    dp = stage_diff(model, ref[stage], ranges[stage])
    dm = 0.0
    if eng.store is not None:
        ids = shard if shard is not None else torch.arange(data.n_train)
        dm = float((eng.store.a - M[stage][ids]).abs().max())
    assert_all(world, dp < 1e-5 * TOL and dm < 1e-5 * TOL, f"rank {world.rank}: params {dp:.2e}, multipliers {dm:.2e}")


@pytest.mark.mpi
@pytest.mark.parametrize("method,ds,wire", [("penalty", 1, "float32"),
                                            ("al", 2, "bfloat16")])
def test_simulator_equals_mpi(world, tiny_data, method, ds, wire):
    """The one-process simulator (K threads on an in-process communicator) gives the parameters,
    auxiliary variables and multipliers the K MPI ranks give."""
    data = DeviceDataset(tiny_data, DEVICE)
    ranges = balanced_partition(make_model().costs, world.size)
    pcfg = ParallelConfig(ds=ds, message_dtype=wire, micro_batches=2, beta=1.0)

    def train(comm):
        model = make_model()
        opt = make_optimizer(model, OPT)
        eng = PipelineEngine(model, opt, comm, data, ranges, pcfg, method=method, batch_size=BATCH,
                             drop_last=True, seed=SEED)
        sent = []
        for e in range(EPOCHS):
            comm.counters.reset()
            eng.train_epoch(e, lambda t: LR, pcfg.beta)
            sent.append(comm.counters.bytes_sent)
        k = comm.rank
        params = [p.detach().clone() for p in eng.params]
        store = None if eng.store is None else eng.store.a.float().clone()
        mult = None if eng.store is None or eng.store.m is None else eng.store.m.float().clone()
        return k, params, store, mult, sent

    k, params, store, mult, sent = train(world)
    sims = run_simulated(world.size, train)
    _, sp, ss, sm, ssent = sims[k]
    dp = max(float((a - b).abs().max()) for a, b in zip(params, sp))
    ds_ = 0.0 if store is None else float((store - ss).abs().max())
    dm = 0.0 if mult is None else float((mult - sm).abs().max())
    tol = 1e-5 * (TOL if wire == "float32" else TOL_BF16)
    assert_all(world, dp < tol and ds_ < tol and dm < tol,
               f"rank {k}: params {dp:.2e}, aux {ds_:.2e}, multipliers {dm:.2e}")
    assert_all(world, sent == ssent, f"bytes per epoch: MPI {sent}, simulated {ssent}")


@pytest.mark.mpi
def test_pipeline_bytes_follow_the_formula_and_ds_divides_by_s2(world, tiny_data):
    _bytes_follow_the_formula(world, tiny_data)


@pytest.mark.parametrize("K", IN_PROCESS)
def test_pipeline_bytes_in_process(tiny_data, K):
    run_simulated(K, lambda comm: _bytes_follow_the_formula(comm, tiny_data))


def _bytes_follow_the_formula(world, tiny_data):
    data = DeviceDataset(tiny_data, DEVICE)
    ranges = balanced_partition(make_model().costs, world.size)
    got = {}
    for ds in (1, 2):
        world.counters.reset()
        _, eng, (st,) = run_engine(world, data, ranges, ParallelConfig(ds=ds), "penalty", epochs=1)
        sent = world.counters.bytes_sent
        assert_all(world, sent == eng.bytes_per_epoch(st.samples, 4),
                   f"ds={ds}: sent {sent}, formula {eng.bytes_per_epoch(st.samples, 4)}")
        got[ds] = sum(world.allgather_obj(sent))
    assert_all(world, got[1] == 4 * got[2], f"s=2 must divide by 4: {got}")


@pytest.mark.mpi
def test_frozen_parameters_keep_every_auxiliary_variable_on_the_true_state(world, tiny_data):
    """Contraction of the pipeline coupling's auxiliary dynamics, in its strongest form: with the
    parameters frozen (lr = 0) the auxiliary variable a stage trains on is the true forward state
    after one tick, the penalty residual D(u') - a is zero and AL multipliers stay zero, every epoch.
   """
    _frozen_keeps_aux_true(world, tiny_data)


@pytest.mark.parametrize("K", IN_PROCESS)
def test_frozen_parameters_keep_aux_true_in_process(tiny_data, K):
    run_simulated(K, lambda comm: _frozen_keeps_aux_true(comm, tiny_data))


def _frozen_keeps_aux_true(world, tiny_data):
    data = DeviceDataset(tiny_data, DEVICE)
    ranges = balanced_partition(make_model().costs, world.size)
    for method in ("penalty", "al"):
        model = make_model()
        opt = make_optimizer(model, OptimConfig(lr=1e-9, momentum=0.0, nesterov=False, weight_decay=0.0))
        eng = PipelineEngine(model, opt, world, data, ranges, ParallelConfig(micro_batches=2), method=method,
                             batch_size=BATCH, drop_last=True, seed=SEED)
        res = [eng.train_epoch(e, lambda t: 0.0, 1.0).residual for e in range(3)]
        k = world.rank
        zero = all(r < 1e-6 * TOL for r in res) if k < world.size - 1 else True
        mult_zero = eng.store is None or float(eng.store.a.abs().max()) < 1e-6 * TOL
        assert_all(world, zero and mult_zero, f"{method} rank {k}: residuals {res}")


def test_k1_pipeline_equals_serial_backprop_without_augmentation(tiny_data):
    """K = 1, one micro-batch per step: plain back-propagation (ALGORITHM.md s.8)."""
    data = DeviceDataset(tiny_data, DEVICE)
    solo = Comm.self_()
    try:
        for method in ("penalty", "al"):
            model, _, _ = run_engine(solo, data, [(0, 5)], ParallelConfig(micro_batches=1), method)
            ref = make_model()
            eng = SerialEngine(ref, make_optimizer(ref, OPT), solo, data, None, batch_size=BATCH,
                               drop_last=True, seed=SEED)
            for e in range(EPOCHS):
                eng.train_epoch(e, lambda t: LR)
            diff = max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), ref.parameters()))
            assert diff < 1e-5 * TOL, f"{method}: {diff}"
    finally:
        solo.free()


@pytest.mark.parametrize("method", ["penalty", "al"])
def test_stage_objective_is_the_penalty_towards_the_prox_linear_target(tiny_data, method):
    """The engine's local objective of an upstream stage (StageStep.objective), back-propagated into
    its parameters, equals plain autograd of (beta/2N) ||d - T||^2 / n towards the prox-linear target
    T = anchor - (N/beta)(p + m), d = D(Phi(x)) at the current parameters (ALGORITHM.md s.3): the
    adjoint, the penalty and the multipliers with their scales, checked away from the true state."""
    from hpc_layerpar.pipeline_step import MicroBatch, StageStep
    from hpc_layerpar.stages import Stage
    from hpc_layerpar.stats import EpochSums

    data = DeviceDataset(tiny_data, DEVICE)
    model = make_model()
    ranges = balanced_partition(model.costs, 2)
    stage = Stage(model, ranges, 0, DSFilter(2, "smooth"), make_optimizer(model, OPT), DEVICE)
    step = StageStep(stage, data, None, 1, EpochSums(DEVICE))
    ids = torch.arange(6)
    g = torch.Generator().manual_seed(3)
    shape = (6,) + tuple(stage.out_shape)
    p, anchor = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    m = torch.randn(shape, generator=g) if method == "al" else None
    beta, N, n = 0.7, stage.out_numel, len(ids)
    loss = step.objective(MicroBatch(ids=ids, p=p, anchor=anchor, m=m), beta).loss
    got = torch.autograd.grad(loss, stage.params)
    x, _ = data.train_batch(ids)
    d = torch.nn.functional.avg_pool2d(model(x, *ranges[0]), 2)
    target = anchor - (N / beta) * (p + (0 if m is None else m))
    true = torch.autograd.grad(0.5 * beta / N * (d - target).pow(2).sum() / n, stage.params)
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, true))
    assert err < 1e-4, f"{method}: the stage objective's gradient is {err:.2e} (relative) from the penalty's"


@pytest.mark.mpi
@pytest.mark.parametrize("method", ["penalty", "al"])
def test_keeping_the_forward_changes_no_number(world, tiny_data, method):
    _kept_forward_is_exact(world, tiny_data, method)


@pytest.mark.parametrize("K", IN_PROCESS)
@pytest.mark.parametrize("method", ["penalty", "al"])
def test_keeping_the_forward_changes_no_number_in_process(tiny_data, K, method):
    run_simulated(K, lambda comm: _kept_forward_is_exact(comm, tiny_data, method))


def _kept_forward_is_exact(world, tiny_data, method):
    """parallel.keep_forward: where no optimizer step falls between a micro-batch's F and B, B goes
    through F's graph instead of recomputing the forward. The parameters are the ones F used, so
    every number is the recompute's: the stages and AL multipliers after two epochs are bitwise those
    of keep_forward=false, and the micro-batches that skipped the recompute are the plan's."""
    data = DeviceDataset(tiny_data, DEVICE)
    ranges = balanced_partition(make_model().costs, world.size)
    runs = {}
    for keep in (True, False):
        model, eng, _ = run_engine(world, data, ranges, ParallelConfig(micro_batches=4, keep_forward=keep), method)
        runs[keep] = (model, eng)
    (m1, e1), (m0, e0) = runs[True], runs[False]
    a, b = ranges[world.rank]
    same = all(torch.equal(p, q) for el1, el0 in zip(m1.elements[a:b], m0.elements[a:b])
               for p, q in zip(el1.parameters(), el0.parameters()))
    same = same and (e1.store is None or torch.equal(e1.store.a, e0.store.a))
    n = len(e1.micro_batches(EPOCHS - 1))
    want = 0 if e1.last else sum(reuses(world.rank, world.size, j, 4, e1.schedule) for j in range(n))
    assert_all(world, same, f"rank {world.rank}: keeping the forward changed the stage")
    assert_all(world, e1.kept == want and e0.kept == 0, f"rank {world.rank}: kept {e1.kept}, plan {want}")
    assert_all(world, world.rank != world.size - 2 or e1.kept > 0, "the rank before the last keeps forwards")


@pytest.mark.mpi
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_frozen_pipeline_gradient_is_back_propagation(world, tiny_data, micro):
    _frozen_gradient_is_backprop(world, tiny_data, micro)


@pytest.mark.parametrize("K", IN_PROCESS)
@pytest.mark.parametrize("micro", [1, 4])
def test_frozen_pipeline_gradient_in_process(tiny_data, K, micro):
    run_simulated(K, lambda comm: _frozen_gradient_is_backprop(comm, tiny_data, micro))


def _frozen_gradient_is_backprop(world, tiny_data, micro):
    """At learning rate 0 nothing moves between a micro-batch's F and B, so a global batch's stage
    gradients must be back-propagation's, at any K and M: the adjoints carry each micro-batch's own
    gradient upstream, and M micro-batches add up to the batch mean. Without BatchNorm, whose
    statistics are per micro-batch. SGD's first step leaves the gradient in its momentum buffer.
    (The equality with the reference cannot show a scale error both share; this can.)"""
    data = DeviceDataset(tiny_data, DEVICE, subset=BATCH)  # one global batch: one step

    def plain():
        with _LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return build_model("resnet", 8, in_channels=1, image_size=8, num_classes=4, norm="none").to(DEVICE)

    ranges = balanced_partition(plain().costs, world.size)
    model = plain()
    opt = make_optimizer(model, OptimConfig(lr=0.0, momentum=0.9, nesterov=False, weight_decay=0.0))
    eng = PipelineEngine(model, opt, world, data, ranges, ParallelConfig(micro_batches=micro, augment=False),
                         method="penalty", batch_size=BATCH, drop_last=True, seed=SEED)
    eng.train_epoch(0, lambda t: 0.0, 1.0)
    ref = plain()
    (ids,) = epoch_batches(data.n_train, BATCH, SEED, 0, True)
    x, y = data.train_batch(ids.to(DEVICE))
    torch.nn.functional.cross_entropy(ref(x, 0, len(ref)), y).backward()
    a, b = ranges[world.rank]
    mine = [opt.state[p]["momentum_buffer"] for el in model.elements[a:b] for p in el.parameters()]
    true = [p.grad for el in ref.elements[a:b] for p in el.parameters()]
    err = max(float((g - t).abs().max() / t.abs().max().clamp_min(1e-12)) for g, t in zip(mine, true))
    assert_all(world, err < 1e-4 * TOL, f"stage {world.rank} of {world.size}, M = {micro}: gradient "
               f"{err:.2e} (relative) from back-propagation's")
    # the health probe sees the same: cosine 1 and norm ratio 1 (rank 0 has no incoming boundary)
    cons, cos, ratio = diagnostics.probe(model, ranges, world, data, eng.filter, eng)
    assert_all(world, abs(cos - 1) < 1e-4 * TOL and abs(ratio - 1) < 1e-4 * TOL and (world.rank == 0 or cons < 1e-5),
               f"probe of stage {world.rank}: consistency {cons:.2e}, cosine {cos:.6f}, norm ratio {ratio:.6f}")


def test_replicas_draw_their_own_rows_of_the_global_batch_augmentation(tiny_data):
    """With R = 2 replicas of one stage, replica r augments micro-batch j with rows r * sub_batch + ...
    of the global batch's draws (as a serial shard does); before, every replica drew the same ones."""
    from hpc_layerpar.data import Augment

    aug = Augment(pad=1, flip=True, seed=SEED)
    data = DeviceDataset(tiny_data, DEVICE)

    def draws(comm):
        topo = Topology(comm, 2)
        try:
            shard = replica_shard(data.n_train, 2, topo.replica, SEED)
            model = make_model()
            eng = PipelineEngine(model, make_optimizer(model, OPT), topo.pipe, data, [(0, len(model.elements))],
                                 ParallelConfig(micro_batches=2, replicas=2), method="penalty", batch_size=BATCH,
                                 drop_last=True, seed=SEED, augment=aug, replica_comm=topo.reps, shard=shard)
            return topo.replica, [eng.draws(1, j, eng.micro) for j in range(4)]
        finally:
            topo.free()

    out = dict(run_simulated(2, draws))
    sub, micro = BATCH // 2, BATCH // 4
    for j in range(4):
        g, i = divmod(j, 2)
        off, flip = aug.draws(1, g, BATCH)
        for r in (0, 1):
            rows = slice(r * sub + i * micro, r * sub + (i + 1) * micro)
            assert torch.equal(out[r][j][0], off[rows]) and torch.equal(out[r][j][1], flip[rows]), (r, j)
    assert not torch.equal(out[0][0][0], out[1][0][0]), "the replicas augment differently"
