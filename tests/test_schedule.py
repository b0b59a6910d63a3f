import math

import pytest

from hpc_layerpar.config import ConfigError, ParallelConfig
from hpc_layerpar.schedule import (
    Phase,
    base_beta,
    beta_for_epoch,
    lr_at,
    parallel_epochs_before,
    parse_phases,
    phase_of_epoch,
    total_epochs,
)


def test_parse_simple_and_repeated():
    assert parse_phases("serial:30") == [Phase("serial", 30)]
    ph = parse_phases("(serial:2,serial:1)x3")
    assert len(ph) == 6 and total_epochs(ph) == 9
    assert phase_of_epoch(ph, 0) == (0, Phase("serial", 2))
    assert phase_of_epoch(ph, 2) == (1, Phase("serial", 1))
    assert phase_of_epoch(ph, 8) == (5, Phase("serial", 1))
    with pytest.raises(IndexError):
        phase_of_epoch(ph, 9)


@pytest.mark.parametrize("bad", ["", "serial", "serial:0", "serial:x", "bogus:3", "(serial:2)", "(serial:2)x0"])
def test_bad_phase_lists(bad):
    with pytest.raises(ConfigError):
        parse_phases(bad)


def test_lr_schedules():
    kw = {"base": 0.1, "total": 10}
    assert lr_at(0, schedule="constant", **kw) == 0.1
    assert math.isclose(lr_at(0, schedule="cosine", **kw), 0.1)
    assert math.isclose(lr_at(5, schedule="cosine", **kw), 0.05)
    assert lr_at(9.99, schedule="cosine", **kw) < 1e-4
    assert math.isclose(lr_at(0, schedule="cosine", warmup=2, **kw), 0.01)
    assert math.isclose(lr_at(1, schedule="cosine", warmup=2, **kw), 0.055)
    assert math.isclose(lr_at(2, schedule="cosine", warmup=2, **kw), 0.1)
    step = dict(schedule="step", milestones=(3, 6), gamma=0.1, **kw)
    assert [round(lr_at(t, **step), 6) for t in (0, 2.9, 3, 6.5)] == [0.1, 0.1, 0.01, 0.001]


def test_skip_epochs_keep_their_place_in_the_schedule():
    """The serial-only control of penalty:3,serial:2 is skip:3,serial:2: same lr at the serial epochs."""
    phases = parse_phases("skip:3,serial:2")
    assert [p.method for p in phases] == ["skip", "serial"] and total_epochs(phases) == 5
    assert phase_of_epoch(phases, 3)[1].method == "serial"
    assert parallel_epochs_before(phases, 4) == 0


def _plan(text, **kw):
    from hpc_layerpar.schedule import epoch_plan
    return [(s.epoch, s.method, s.enter, s.parallel_before, s.evaluate, s.checkpoint, s.stop)
            for s in epoch_plan(parse_phases(text), **kw)]


def test_epoch_plan_of_an_sph_run():
    assert _plan("penalty:2,serial:1,al:2", eval_every=2, checkpoint_every=2) == [
        (0, "penalty", "phase", 0, False, False, False),
        (1, "penalty", "", 1, True, True, False),
        (2, "serial", "share", 2, False, False, False),
        (3, "al", "phase", 2, True, True, False),
        (4, "al", "", 3, True, True, False),        # the last epoch is always evaluated and saved
    ]


def test_epoch_plan_resumed_inside_a_parallel_phase_and_into_a_serial_phase():
    # after a checkpoint at epoch 0: the launch starts inside the penalty phase
    assert _plan("penalty:2,serial:2", start_epoch=1) == [
        (1, "penalty", "resume", 1, True, False, False),
        (2, "serial", "share", 2, True, False, False),
        (3, "serial", "", 2, True, False, False)]
    # after a checkpoint at epoch 1, the last parallel one: the serial phase still gathers the stages
    assert _plan("penalty:2,serial:2", start_epoch=2)[0][:3] == (2, "serial", "share")
    # after a checkpoint inside the serial phase: nothing to enter
    assert _plan("penalty:2,serial:2", start_epoch=3)[0][:3] == (3, "serial", "")


def test_epoch_plan_stop_and_skip():
    plan = _plan("penalty:5", stop_after=3)
    assert [p[2] for p in plan] == ["phase", "", "", "", ""], "a phase is entered once"
    assert [p[6] for p in plan] == [False, False, True, False, False]
    assert plan[2][5], "a stop checkpoints"
    assert [(p[1], p[2], p[4]) for p in _plan("skip:2,serial:1")] == [
        ("skip", "", False), ("skip", "", False), ("serial", "", True)]
    assert _plan("penalty:1,skip:1,serial:1")[2][2] == "share", "the stages are still apart after a skip"


def test_auto_beta_follows_the_pipeline_length_and_a_number_is_kept():
    """parallel.beta=auto (the default): 3 up to 4 stages, 10 beyond (RESULTS.md, "The penalty weight
    at K = 8"); a number, as a config file or --set gives it, is used at every K; growth and the cap
    apply to either, and AL keeps its beta_0."""
    auto = ParallelConfig()
    assert auto.beta == "auto"
    assert [base_beta(auto, k) for k in (1, 2, 4, 5, 8, 16)] == [3.0, 3.0, 3.0, 10.0, 10.0, 10.0]
    for given in ("5", 5, 5.0, " 5 "):
        assert [base_beta(ParallelConfig(beta=given), k) for k in (2, 8)] == [5.0, 5.0]
    grow = ParallelConfig(beta_growth=2.0, beta_max=30.0)
    assert [beta_for_epoch(grow, "penalty", e, 8) for e in range(3)] == [10.0, 20.0, 30.0]
    assert [beta_for_epoch(grow, "penalty", e, 2) for e in range(3)] == [3.0, 6.0, 12.0]
    assert beta_for_epoch(grow, "al", 2, 8) == 10.0 and beta_for_epoch(ParallelConfig(beta="AUTO"), "al", 0, 4) == 3.0
