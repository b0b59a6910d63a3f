"""Pure schedules: the SPH phase list and the learning rate by (fractional) epoch."""
from __future__ import annotations

import math
from dataclasses import dataclass

# skip: epochs that train nothing but keep their place in the learning-rate schedule (the serial-only
# control of an SPH schedule is its phase list with the parallel methods replaced by skip).
METHODS = ("serial", "penalty", "al", "skip")
PARALLEL = ("penalty", "al")


@dataclass(frozen=True)
class Phase:
    method: str
    epochs: int


def _error(msg):
    from .config import ConfigError
    return ConfigError(msg)


def parse_phases(text: str) -> list[Phase]:
    """'serial:30' or 'penalty:4,serial:1' or '(penalty:4,serial:1)x3' -> phases in order."""
    spec = text.replace(" ", "")
    if not spec:
        raise _error("train.phases is empty; give e.g. 'serial:30'.")
    repeat = 1
    if spec.startswith("("):
        close = spec.find(")")
        tail = spec[close + 1:] if close > 0 else ""
        if close < 0 or not tail.startswith("x") or not tail[1:].isdigit() or int(tail[1:]) < 1:
            raise _error(f"train.phases={text!r}: a repeated list is written '(method:epochs,...)xN', "
                         "e.g. '(penalty:4,serial:1)x3'.")
        repeat, spec = int(tail[1:]), spec[1:close]
    phases = []
    for part in spec.split(","):
        method, sep, epochs = part.partition(":")
        if not sep or not epochs.isdigit() or int(epochs) < 1:
            raise _error(f"train.phases={text!r}: '{part}' must be method:epochs with epochs >= 1, "
                         "e.g. 'serial:30'.")
        if method not in METHODS:
            raise _error(f"train.phases={text!r}: method '{method}' is not one of {', '.join(METHODS)}.")
        phases.append(Phase(method, int(epochs)))
    return phases * repeat


def phase_of_epoch(phases: list[Phase], epoch: int) -> tuple[int, Phase]:
    """(index of the phase, the phase) that global epoch `epoch` (0-based) belongs to."""
    start = 0
    for i, p in enumerate(phases):
        if epoch < start + p.epochs:
            return i, p
        start += p.epochs
    raise IndexError(f"epoch {epoch} lies beyond the schedule of {start} epochs")


def parallel_epochs_before(phases: list[Phase], epoch: int) -> int:
    """How many epochs of parallel phases come before global epoch `epoch` (drives beta growth)."""
    count, start = 0, 0
    for p in phases:
        if p.method in PARALLEL:
            count += max(0, min(epoch, start + p.epochs) - start)
        start += p.epochs
    return count


def total_epochs(phases: list[Phase]) -> int:
    return sum(p.epochs for p in phases)


def lr_at(t: float, *, base: float, total: float, schedule: str, warmup: float = 0.0,
          milestones=(), gamma: float = 0.1) -> float:
    """Learning rate at fractional epoch t in [0, total): linear warm-up, then the schedule.

    Warm-up rises linearly from base/10 (so the first step is not wasted at lr 0) to base.
    The schedule is global, indexed by epoch across all phases of an SPH run."""
    if warmup > 0 and t < warmup:
        return base * (0.1 + 0.9 * t / warmup)
    if schedule == "constant":
        return base
    if schedule == "step":
        return base * gamma ** sum(1 for m in milestones if t >= m)
    if schedule == "cosine":
        span = max(total - warmup, 1e-12)
        return 0.5 * base * (1.0 + math.cos(math.pi * min(max(t - warmup, 0.0), span) / span))
    raise ValueError(f"unknown lr schedule {schedule!r}")
