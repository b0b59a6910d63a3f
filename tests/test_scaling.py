"""The scaling model against what a GPU measured: the pipeline's stages timed alone on an H100
(benchmarks/gpu.py, docs/gpu-h100/), ResNet-56 at batch 128, projected on NVLink."""
import json
import os

import pytest

from hpc_layerpar import scaling as S

from conftest import ROOT

H100 = os.path.join(ROOT, "docs", "gpu-h100")


def _load(name):
    with open(os.path.join(H100, name)) as f:
        return json.load(f)


def _h100():
    rec = _load("gpu-role.json")["models"]["resnet56"]
    costs = _load("costs-resnet56.json")["models"]["resnet56"]
    split = _load("split-costs.json")["resnet56"]
    model = S.Model("resnet56", costs["element_seconds"], costs["boundary_numel"], costs["parameters"], 128,
                    t1_seconds=rec["graph_bf16"] / 1e3)  # the captured bf16 loop: gpu.py's T1
    return rec, model, split


# (K, M, the label of gpu.py's row); the automatic M was 4 at K = 2 and 4 (micro-batches of 32).
# At K = 8 it was 8, whose element costs (micro-batches of 16) the log does not hold.
AUTO = [(2, 4, "auto"), (4, 4, "auto")]
ONE = [(2, 1, "1"), (4, 1, "1"), (8, 1, "1")]


def _predicted(model, split, k, micro):
    c = split[str(128 // micro)]
    return S.rho_parallel(model, k, S.PRESETS["nvlink"], micro=micro,
                          micro_seconds=[t / 1e6 for t in c["forward_backward_us"]],
                          micro_forward=[t / 1e6 for t in c["forward_us"]])


@pytest.mark.parametrize("k, micro, label", AUTO)
def test_the_model_predicts_the_automatic_micro_batches_rho_within_15_percent(k, micro, label):
    """The auto M's parallel phase measured 0.60 / 0.94 of one GPU at K = 2 / 4: four micro-batches of
    32 cost 2.4 x one batch of 128 there. The model fed the micro-batch's measured element costs
    predicts 0.58 / 1.02; the batch-linear model (element costs at 128, divided by M) 1.38 / 2.36."""
    rec, model, split = _h100()
    measured = rec["stages"][f"{k}/{label}"]["projected"]["nvlink"][0]
    predicted = _predicted(model, split, k, micro)
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)
    linear = S.rho_parallel(model, k, S.PRESETS["nvlink"], micro=micro)
    assert linear / measured > 2, "the batch-linear model is the one these figures contradict"


@pytest.mark.parametrize("k, micro, label", ONE)
def test_the_model_at_one_micro_batch_per_step(k, micro, label):
    """At M = 1 the micro-batch is the batch: measured 1.67 / 2.64 / 4.04, predicted 1.37 / 2.41 / 3.99.
    The K = 2 row is 18% low: the element timings of the first 9 blocks sum to 1.14 x what the captured
    stage took (3.60 ms); the one figure here outside 15%, held at 20%."""
    rec, model, split = _h100()
    measured = rec["stages"][f"{k}/{label}"]["projected"]["nvlink"][0]
    assert abs(_predicted(model, split, k, micro) / measured - 1) < 0.20


def test_kept_forwards_lighten_the_stages_that_keep_them():
    """With parallel.keep_forward (eager steps) stage k recomputes min(1, 2(K-1-k)/M) of its forwards:
    at K = 2, M = 4 stage 0 half of them, so the model's rho rises, and at M = 1 (no micro-batch keeps
    its forward upstream) it is unchanged. The H100 rows above ran captured graphs: keep=False."""
    _, model, _ = _h100()
    net = S.PRESETS["nvlink"]
    assert S.rho_parallel(model, 2, net, micro=4, keep=True) > 1.04 * S.rho_parallel(model, 2, net, micro=4)
    assert S.rho_parallel(model, 2, net, micro=1, keep=True) == S.rho_parallel(model, 2, net, micro=1)
    assert S.rho_parallel(model, 4, net, micro=4, keep=True) >= S.rho_parallel(model, 4, net, micro=4)


def test_the_1f1b_schedule_pays_its_message_hops_and_drains_faster():
    """parallel.schedule=1f1b: each micro-batch's activation and adjoint hops lie on the critical path,
    so on a slow network rho falls well below the tick schedule's (25 Gb Ethernet at K = 4: messages of
    ResNet-56's 16x32x32 boundaries, 8 MB per batch each way), on NVLink by under 10% (two hops of 58 us
    against stage steps of 3.5 / 1.9 / 1.1 ms at K = 2 / 4 / 8); with free messages it is ahead by the
    half-length fill and drain."""
    _, model, _ = _h100()
    nv, eth = S.PRESETS["nvlink"], S.PRESETS["eth25"]
    for k in (2, 4, 8):
        tick, f1b = (S.rho_parallel(model, k, nv, micro=1, schedule=s) for s in ("tick", "1f1b"))
        assert 0.9 * tick < f1b < tick, (k, tick, f1b)
    assert S.rho_parallel(model, 4, eth, micro=1, schedule="1f1b") < 0.8 * S.rho_parallel(model, 4, eth, micro=1)
    free = S.Network("free", 0.0, float("inf"), float("inf"))
    tick, f1b = (S.rho_parallel(model, 4, free, micro=1, steps_per_epoch=10, schedule=s) for s in ("tick", "1f1b"))
    assert f1b == pytest.approx(tick * (1 + 6 / 10) / (1 + 3 / 10))
