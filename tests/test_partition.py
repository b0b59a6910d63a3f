import itertools
import json

import pytest

from hpc_layerpar.models import build_model
from hpc_layerpar.partition import PartitionError, balanced_partition, role_costs, stage_costs, upstream_costs


def brute_force_best(costs, k):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        b = (0,) + cuts + (n,)
        worst = max(sum(costs[b[i]:b[i + 1]]) for i in range(k))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("costs", [[5, 1, 1, 1, 9, 2, 2, 7], [1] * 9, [10, 1, 1, 1, 1, 1, 1, 30],
                                   [3, 8, 2, 2, 8, 1, 6], [0, 0, 5, 0, 0], [7]])
def test_optimal_against_brute_force(costs):
    for k in range(1, len(costs) + 1):
        ranges = balanced_partition(costs, k)
        assert len(ranges) == k
        assert ranges[0][0] == 0 and ranges[-1][1] == len(costs)
        assert all(a < b for a, b in ranges), "every stage non-empty"
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(k - 1)), "contiguous"
        assert max(stage_costs(costs, ranges)) == brute_force_best(costs, k)


def test_resnet_stages_hold_stem_and_head():
    m = build_model("resnet", 56, in_channels=3, image_size=32, num_classes=10)
    for k in (2, 3, 4, 8, 29):
        ranges = balanced_partition(m.costs, k)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(m)
    # two equal halves of ResNet-56's 29 elements: the split is close to even in cost
    sc = stage_costs(m.costs, balanced_partition(m.costs, 2))
    assert max(sc) / sum(sc) < 0.55


def test_too_many_stages_is_a_clear_error():
    with pytest.raises(PartitionError, match="at most 5 ranks"):
        balanced_partition([1, 2, 3, 4, 5], 6)
    with pytest.raises(PartitionError, match=">= 1"):
        balanced_partition([1, 2], 0)


def brute_force_roles(costs, last, k):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        b = (0,) + cuts + (n,)
        worst = max([sum(costs[b[i]:b[i + 1]]) for i in range(k - 1)] + [sum(last[b[k - 1]:])])
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("costs", [[5, 1, 1, 1, 9, 2, 2, 7], [1] * 9, [10, 1, 1, 1, 1, 1, 1, 30],
                                   [3, 8, 2, 2, 8, 1, 6], [0, 0, 5, 0, 0]])
def test_role_costs_optimal_against_brute_force(costs):
    """The pipeline weighs an element by its stage's role: upstream it runs its forward twice."""
    up, last = role_costs(costs, None)
    assert up == [round(c * 4 / 3) for c in costs] and last == costs
    for k in range(1, len(costs) + 1):
        ranges = balanced_partition(up, k, last)
        assert [r[0] for r in ranges[1:]] == [r[1] for r in ranges[:-1]] and all(a < b for a, b in ranges)
        assert max(stage_costs(up, ranges, last)) == brute_force_roles(up, last, k)


def test_role_split_gives_the_last_stage_more():
    """Equal elements: the last stage, which does not recompute, takes more of them (8 = 4/3 x 6
    upstream elements' cost); measured forward costs replace the 1/3 estimate."""
    up, last = role_costs([3] * 20, [1] * 20)
    assert up == [4] * 20
    assert balanced_partition(up, 2, last) == [(0, 9), (9, 20)]  # 36 upstream, 33 at the end


def brute_force_best_with_starts(costs, k, starts, last):
    best = None
    for cuts in itertools.combinations(sorted(starts), k - 1):
        b = (0,) + cuts + (len(costs),)
        worst = max([sum(costs[b[i]:b[i + 1]]) for i in range(k - 1)] + [sum(last[b[k - 1]:])])
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("costs", [[5, 1, 1, 1, 9, 2, 2, 7], [1] * 9, [10, 1, 1, 1, 1, 1, 1, 30],
                                   [3, 8, 2, 2, 8, 1, 6]])
def test_split_with_allowed_starts_is_optimal_over_them(costs):
    n = len(costs)
    last = [2 * c for c in costs]
    for starts in ([2, 5], [1, 3, 4, 6], list(range(1, n)), [n - 1]):
        for k in range(1, len(starts) + 2):
            ranges = balanced_partition(costs, k, last, starts)
            assert len(ranges) == k and ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a < b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(k - 1))
            assert {a for a, _ in ranges[1:]} <= set(starts), "stages start only where allowed"
            assert max(stage_costs(costs, ranges, last)) == brute_force_best_with_starts(costs, k, starts, last)
        with pytest.raises(PartitionError, match=f"at most {len(starts) + 1} ranks"):
            balanced_partition(costs, len(starts) + 2, last, starts)


def test_ds2_split_avoids_7x7_boundaries_on_28x28_images():
    """MNIST at K = 4 with DS s = 2: the time split may put a cut among the 7x7 blocks, which the
    filter cannot halve; the split then moves to the cuts it can (it used to stop the run)."""
    from hpc_layerpar.config import ParallelConfig
    from hpc_layerpar.runsetup import ds_starts, stage_ranges

    m = build_model("resnet", 20, in_channels=1, image_size=28, num_classes=10)
    costs = [1] * len(m)  # even costs put the last cuts among the 7x7 blocks
    free = stage_ranges(m, 4, ParallelConfig(partition="time"), costs)
    assert any(m.shapes[a][1] == 7 for a, _ in free[1:])
    assert ds_starts(m, 1) is None
    ranges = stage_ranges(m, 4, ParallelConfig(partition="time", ds=2), costs)
    assert all(m.shapes[a][1] % 2 == 0 for a, _ in ranges[1:])
    assert ranges[0][0] == 0 and ranges[-1][1] == len(m)


def brute_force_per_stage(per, last, k, starts):
    """The smallest largest stage cost over all cuts at `starts`, stage s < k-1 costed by per[s]."""
    best = None
    for cuts in itertools.combinations(sorted(starts), k - 1):
        b = (0,) + cuts + (len(last),)
        worst = max([sum(per[i][b[i]:b[i + 1]]) for i in range(k - 1)] + [sum(last[b[k - 1]:])])
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("costs", [[5, 1, 1, 1, 9, 2, 2, 7], [1] * 9, [10, 1, 1, 1, 1, 1, 1, 30],
                                   [3, 8, 2, 2, 8, 1, 6], [0, 0, 5, 0, 0]])
def test_per_stage_costs_optimal_against_brute_force(costs):
    """A stage that keeps F's graph for part of its micro-batches recomputes fewer forwards: its
    elements cost less than another non-last stage's. The split is still the optimum, free or over
    allowed starts, and the stage costs are each stage's own."""
    n = len(costs)
    fb = [3 * c for c in costs]
    for k in range(2, min(n, 5) + 1):
        shares = [1.0 - s / (k - 1) for s in range(k - 1)]  # 1, ..., decreasing towards the end
        per = upstream_costs(fb, costs, shares)
        last = role_costs(fb, costs)[1]
        assert per[0] == role_costs(fb, costs)[0]  # share 1: F's forward on top of B's
        for starts in (list(range(1, n)), sorted({1, 3, 4, n - 1})):
            if len(starts) < k - 1:
                continue
            ranges = balanced_partition(last, k, last, starts, upstream=per)
            assert {a for a, _ in ranges[1:]} <= set(starts)
            assert max(stage_costs(last, ranges, last, per)) == brute_force_per_stage(per, last, k, starts)
        free = balanced_partition(last, k, last, upstream=per)
        assert max(stage_costs(last, free, last, per)) == brute_force_per_stage(per, last, k, range(1, n))
    with pytest.raises(PartitionError, match="upstream costs"):
        balanced_partition(fb, 3, fb, upstream=[fb])


def test_a_lighter_stage_0_takes_more_elements():
    """K = 2, M = 4 (stage 0 recomputes half its micro-batches): equal elements of forward 1 and
    forward + backward 3 cost 3.5 on stage 0 instead of 4, and 3 on the last: 8 of 17 upstream, not 7."""
    fb, fwd = [3] * 17, [1] * 17
    up, last = role_costs(fb, fwd)
    assert balanced_partition(up, 2, last) == [(0, 7), (7, 17)]  # 28 against 30 (8: 32 against 27)
    per = upstream_costs([6] * 17, [2] * 17, [0.5])  # integer costs: doubled
    assert per == [[7] * 17]
    assert balanced_partition([6] * 17, 2, [6] * 17, upstream=per) == [(0, 8), (8, 17)]  # 56 against 54


def test_a_run_splits_by_the_forwards_its_stages_recompute(tmp_path):
    """The run's split and its recorded stage costs count, per stage, the forwards B recomputes: at
    K = 2 and M = 4 stage 0 keeps F's graph for three quarters of its micro-batches on the default
    1f1b schedule (half on tick), so its elements cost forward + backward + a quarter of a forward
    (parallel.keep_forward=false: a whole forward)."""
    from hpc_layerpar.config import resolve
    from hpc_layerpar.metrics import read_metrics
    from hpc_layerpar.runsetup import recompute_shares
    from hpc_layerpar.train import run

    from conftest import make_dataset

    data = make_dataset(tmp_path / "d.h5", n_train=128, n_test=32, size=28, classes=4)
    assert recompute_shares(resolve("mnist-resnet-penalty").parallel, 2, 4, captured=False) == [0.25]
    tick = resolve("mnist-resnet-penalty", sets=["parallel.schedule=tick"]).parallel
    assert recompute_shares(tick, 2, 4, captured=False) == [0.5]
    assert recompute_shares(resolve("mnist-resnet-penalty").parallel, 2, 4, captured=True) is None
    assert recompute_shares(resolve("mnist-resnet-penalty").parallel, 4, 1, captured=False) is None
    attrs = {}
    for keep in ("true", "false"):
        cfg = resolve("mnist-resnet-penalty", sets=[
            f"data.path={data}", "data.batch_size=64", "model.depth=8", "model.base_width=4", "train.phases=penalty:1",
            "optim.warmup_epochs=0", "parallel.partition=macs", "parallel.simulate=2", "parallel.micro_batches=4",
            "run.threads=1", "run.device=cpu", f"run.out_dir={tmp_path}/runs", f"run.name={keep}",
            f"parallel.keep_forward={keep}"])
        attrs[keep] = read_metrics(run(cfg, quiet=True).metrics_path)["attrs"]
    for keep, share in (("true", 0.25), ("false", 1.0)):
        fb, fwd = json.loads(attrs[keep]["element_costs"]), json.loads(attrs[keep]["element_forward_costs"])
        assert fb == [3 * c for c in fwd]  # partition=macs
        ranges = [tuple(r) for r in json.loads(attrs[keep]["stage_ranges"])]
        per = upstream_costs(fb, fwd, [share])
        assert ranges == balanced_partition(fb, 2, fb, upstream=per), keep
        assert json.loads(attrs[keep]["stage_costs"]) == stage_costs(fb, ranges, fb, per), keep


def test_measured_costs_attribute_each_backward_to_its_element():
    """The chained probe (one forward through the network, one backward back) gives each element its
    own backward: the blocks' forward + backward is well above their forward alone, and the head
    (pooling and a linear layer) stays far below a block. Handing element i's backward to a neighbour,
    or timing the reverse pass without the upstream gradient, breaks one of the two. Margins are 3x and
    more on any machine; the probe leaves the model's weights and BatchNorm statistics untouched."""
    torch = pytest.importorskip("torch")
    from hpc_layerpar.costs import measure_costs
    m = build_model("resnet", 20, in_channels=3, image_size=32, num_classes=10)
    before = [t.clone() for t in m.state_dict().values()]
    fb = measure_costs(m, 32, torch.device("cpu"), reps=2)
    fwd = measure_costs(m, 32, torch.device("cpu"), reps=2, forward=True)
    assert len(fb) == len(fwd) == len(m) and min(fb) > 0 and min(fwd) > 0
    blocks = slice(1, len(m) - 1)
    assert sum(fb[blocks]) > 1.5 * sum(fwd[blocks]), (fb, fwd)
    assert fb[-1] < 0.25 * sorted(fb[blocks])[len(fb[blocks]) // 2], fb
    assert all(torch.equal(a, b) for a, b in zip(before, m.state_dict().values()))
