import math

import pytest

from hpc_layerpar.config import ConfigError
from hpc_layerpar.schedule import Phase, lr_at, parallel_epochs_before, parse_phases, phase_of_epoch, total_epochs


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
    kw = dict(base=0.1, total=10)
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
