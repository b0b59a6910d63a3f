"""Weight stashing (parallel.stash_weights, ALGORITHM.md s.4): every B of a non-last stage uses the
parameters its F used, also where an optimizer step falls in between, so B always goes through F's
kept graph. Checked against the one-process reference, which stashes by copying the parameters at F
and differentiating a functional call at those copies (no kept graphs). Marked mpi: K = the
communicator size; the in-process variants run K = 2..4 as virtual ranks under plain pytest."""
import pytest
from test_pipeline import (
    BATCH,
    EPOCHS,
    LR,
    OPT,
    SEED,
    _hybrid_equals_reference,
    betas_for,
    make_model,
    run_engine,
    stage_diff,
)

from hpc_layerpar.config import ParallelConfig
from hpc_layerpar.data import DeviceDataset
from hpc_layerpar.partition import balanced_partition
from hpc_layerpar.serial import make_optimizer
from hpc_layerpar.simulate import run_simulated

from conftest import DEVICE, TOL, TOL_BF16, assert_all
from reference import pipeline as reference

# (method, M, schedule, message dtype, keep_forward): at M = 2 stage 0 crosses a step on every other
# micro-batch at K = 2 (1f1b) and on every one at K >= 3; keep_forward=false recomputes at the stash
COMBOS = [("penalty", 2, "1f1b", "float32", True), ("al", 2, "tick", "float32", True),
          ("penalty", 4, "tick", "bfloat16", True), ("penalty", 2, "1f1b", "float32", False)]


def _stash_equals_reference(world, tiny_data, method, micro, sch, wire, keep):
    data = DeviceDataset(tiny_data, DEVICE)
    ranges = balanced_partition(make_model().costs, world.size)
    pcfg = ParallelConfig(micro_batches=micro, schedule=sch, message_dtype=wire, keep_forward=keep,
                          stash_weights=True)
    model, eng, _ = run_engine(world, data, ranges, pcfg, method)
    kw = {"method": method, "ds": 1, "epochs": EPOCHS, "batch_size": BATCH, "micro": micro, "seed": SEED, "lr": LR,
          "betas": betas_for(world.size), "message_dtype": wire, "schedule": sch}
    make_opt = lambda m: make_optimizer(m, OPT)  # noqa: E731
    ref, _ = reference(make_model, make_opt, data, ranges, stash=True, **kw)
    k = world.rank
    dp = stage_diff(model, ref[k], ranges[k])
    tol = 1e-5 * (TOL if wire == "float32" else TOL_BF16)
    assert_all(world, dp < tol, f"rank {k}: stashed engine against the stashing reference, params {dp:.2e}")
    if world.size > 1 and k == 0:
        # the option changes the math where a step falls between F and B (stage 0 here): without the
        # stash the reference lands elsewhere, so the check above cannot pass by doing nothing
        plain, _ = reference(make_model, make_opt, data, ranges, stash=False, **kw)
        assert stage_diff(model, plain[0], ranges[0]) > 100 * tol
    # every B of a non-last stage goes through its F's graph (with keep_forward) or recomputes at the stash
    want = len(eng.micro_batches(EPOCHS - 1)) if keep and k < world.size - 1 else 0
    assert_all(world, eng.kept == want, f"rank {k}: {eng.kept} B through F's graph, want {want}")


@pytest.mark.mpi
@pytest.mark.parametrize("method,micro,sch,wire,keep", COMBOS)
def test_stashed_weights_equal_reference(world, tiny_data, method, micro, sch, wire, keep):
    _stash_equals_reference(world, tiny_data, method, micro, sch, wire, keep)


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("method,micro,sch,wire,keep", COMBOS)
def test_stashed_weights_equal_reference_in_process(tiny_data, K, method, micro, sch, wire, keep):
    run_simulated(K, lambda comm: _stash_equals_reference(comm, tiny_data, method, micro, sch, wire, keep))


@pytest.mark.parametrize("method", ["penalty", "al"])
def test_stashed_weights_with_replicas_in_process(tiny_data, method):
    """K = 2 stages x R = 2 replicas: a stashed B's gradient joins the next step's Allreduce."""
    run_simulated(4, lambda comm: _hybrid_equals_reference(comm, tiny_data, method, stash=True))
