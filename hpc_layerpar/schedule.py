"""Pure schedules: the SPH phase list and the learning rate by (fractional) epoch."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

# skip: epochs that train nothing but keep their place in the learning-rate schedule (the serial-only
# control of an SPH schedule is its phase list with the parallel methods replaced by skip).
METHODS = ("serial", "penalty", "al", "skip")
PARALLEL = ("penalty", "al")


@dataclass(frozen=True)
class Phase:
    """One entry of train.phases: a method (serial, penalty, al or skip) for a number of epochs."""
    method: str
    epochs: int


def _error(msg):
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
    """Number of epochs in the whole schedule."""
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


@dataclass(frozen=True)
class EpochStep:
    """What the training loop does for one epoch; a pure function of the schedule and the settings.

    enter: the work before the epoch trains
      ""         nothing (an epoch inside a phase, or a serial phase after a serial or skip one)
      "share"    a serial phase after a parallel one: every rank gathers the stages and momentum
      "phase"    a parallel phase starts: a new engine
      "resume"   this launch starts inside a parallel phase: a new engine that reuses the saved
                 AL multipliers when the split is the same (else: as "phase")"""
    epoch: int
    phase_index: int
    method: str
    enter: str
    parallel_before: int   # parallel epochs before this one, across phases (the penalty beta schedule)
    evaluate: bool
    checkpoint: bool
    stop: bool             # run.stop_after: checkpoint and stop after this epoch
    last: bool


def epoch_plan(phases: list[Phase], *, start_epoch: int = 0, eval_every: int = 1, checkpoint_every: int = 0,
               stop_after: int = 0) -> list[EpochStep]:
    """The steps from start_epoch (0, or the epoch after a checkpoint) to the end of the run."""
    n = total_epochs(phases)
    starts = [sum(p.epochs for p in phases[:i]) for i in range(len(phases))]
    out = []
    for epoch in range(start_epoch, n):
        pidx, phase = phase_of_epoch(phases, epoch)
        new_phase = epoch == starts[pidx]
        trained = [p.method for p in phases[:pidx] if p.method != "skip"]  # skip epochs change nothing
        prev_parallel = bool(trained) and trained[-1] in PARALLEL
        enter = ""
        if phase.method == "serial" and new_phase and prev_parallel:
            enter = "share"
        elif phase.method in PARALLEL:
            if new_phase:
                enter = "phase"
            elif epoch == start_epoch:
                enter = "resume"
        last = epoch == n - 1
        stop = bool(stop_after) and epoch + 1 == stop_after and not last
        out.append(EpochStep(
            epoch=epoch, phase_index=pidx, method=phase.method, enter=enter,
            parallel_before=parallel_epochs_before(phases, epoch),
            evaluate=phase.method != "skip" and ((epoch + 1) % eval_every == 0 or last),
            checkpoint=stop or (bool(checkpoint_every) and ((epoch + 1) % checkpoint_every == 0 or last)),
            stop=stop, last=last))
    return out


# parallel.beta=auto: the penalty weight by pipeline length. Every added boundary anchors a target that
# is a few steps stale, and the drift adds up down the pipeline: on the Fashion-MNIST subset 3 was best
# of 1 / 3 / 10 at K = 4 (M = 1) and 10 at K = 8 (M = 2), where 3 lost 1.7 points (RESULTS.md).
BETA_AUTO = ((4, 3.0), (None, 10.0))  # (up to this K, beta); None: every larger K


def beta_is_auto(value) -> bool:
    """Whether a parallel.beta value asks for the auto rule (text from a config file or --set)."""
    return str(value).strip().lower() == "auto"


def base_beta(pcfg, stages: int) -> float:
    """beta_0 of a run with `stages` pipeline stages: parallel.beta as given, or the auto rule."""
    if not beta_is_auto(pcfg.beta):
        return float(pcfg.beta)
    return next(b for k, b in BETA_AUTO if k is None or stages <= k)


def beta_for_epoch(pcfg, method: str, parallel_epochs_before: int, stages: int) -> float:
    """Penalty: beta_0 * growth^e capped at beta_max, e counting the parallel epochs run before
    this one (across phases); AL keeps beta fixed."""
    beta = base_beta(pcfg, stages)
    if method == "al":
        return beta
    return min(beta * pcfg.beta_growth ** parallel_epochs_before, pcfg.beta_max)


def micro_candidates(pcfg, batch_size: int, min_pixels: int, stages: int) -> list:
    """The micro-batch counts the automatic M may take, ascending: M <= max(4, K) dividing the
    per-replica batch whose micro-batches keep >= 768 values in every BatchNorm statistic
    (micro-batch x the smallest feature map, min_pixels = H x W there); [1] when none does."""
    sub = batch_size // pcfg.replicas
    cap = max(4, stages)
    return [m for m in range(1, cap + 1) if sub % m == 0 and (sub // m) * min_pixels >= 768] or [1]


def micro_batches(pcfg, batch_size: int, min_pixels: int, stages: int) -> int:
    """The pipeline's M: as configured, or (0, auto) the largest of micro_candidates. More
    micro-batches shorten the upstream stages' delay, (K-1-k)/M steps (2(K-1-k)/M on tick), which grows with K
    (ALGORITHM.md s.4); on a device that loses throughput on small batches runsetup.device_micro
    keeps only the candidates whose M micro-batches cost at most 1 + parallel.micro_overhead of one."""
    if pcfg.micro_batches:
        return pcfg.micro_batches
    return max(micro_candidates(pcfg, batch_size, min_pixels, stages))


def timed_micro(seconds: dict, overhead: float, least: int = 1) -> int:
    """Of the timed candidates {M: seconds of forward + backward of one batch as M micro-batches}
    (1 among them), the largest M costing at most (1 + overhead) x M = 1's, but at least `least`."""
    return max(least, max(m for m, t in seconds.items() if t <= (1 + overhead) * seconds[1]))


def least_micro(candidates: list, stages: int, max_delay: float, schedule: str = "tick") -> int:
    """The smallest candidate M that leaves stage 0 at most max_delay optimizer steps behind
    (2(K-1)/M on the "tick" schedule, (K-1)/M on "1f1b": ALGORITHM.md s.4), or the largest candidate
    if none does."""
    d = (2 if schedule == "tick" else 1) * (stages - 1)
    return min((m for m in candidates if d <= max_delay * m), default=max(candidates))
