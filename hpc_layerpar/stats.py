"""Per-epoch sums of a phase, kept on the device and read once at the end of the epoch (a float()
per step would synchronise a GPU every step), and the stats record both phases return."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FIRST_BAD_NONE = 2**62  # "no non-finite value seen" for the first-bad-step tracker


@dataclass
class PhaseStats:
    """What one rank reports after an epoch of either phase. NaN where a value does not apply."""
    local_loss: float        # this rank's local objective, mean over the epoch's samples (parallel)
    train_loss: float        # cross-entropy: the whole network (serial) or the last stage (parallel)
    train_acc: float
    residual: float          # parallel: mean per-sample boundary residual (see metrics.py)
    multiplier_norm: float   # AL: mean per-sample ||m|| after the update
    steps: int
    samples: int
    compute_seconds: float
    first_bad_step: int | None = None   # the first step (micro-batch) whose loss was not finite
    extra: dict = field(default_factory=dict)


class EpochSums:
    """float64 accumulators on the device: local loss, CE, correct, residual, multiplier norm, and
    the count of non-finite auxiliary values (multipliers) written."""
    LOCAL, CE, CORRECT, RES, MULT, BAD = range(6)

    def __init__(self, device):
        self.acc = torch.zeros(6, dtype=torch.float64, device=device)
        self.bad = torch.full((), FIRST_BAD_NONE, dtype=torch.int64, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)  # for add_in_graph
        self.n = self.n_ce = self.n_res = 0

    def reset(self) -> None:
        """Start a new epoch in the same tensors (a captured CUDA graph keeps their addresses)."""
        self.acc.zero_()
        self.bad.fill_(FIRST_BAD_NONE)
        self.step.zero_()
        self.n = self.n_ce = self.n_res = 0

    def state(self) -> list:
        """The tensors add_in_graph updates in place."""
        return [self.acc, self.bad, self.step]

    def add_in_graph(self, loss, n: int, *, residual=None, correct=None) -> None:
        """Device-side part of add_local plus add_residual or add_ce, written in place with the step
        counted on the device, so it can live inside a captured step (the host counts go through
        count())."""
        self.acc[self.LOCAL] += loss * n
        if residual is not None:
            self.acc[self.RES] += residual
        if correct is not None:
            self.acc[self.CE] += loss * n
            self.acc[self.CORRECT] += correct
        self.bad.copy_(torch.where(torch.isfinite(loss), self.bad, torch.minimum(self.bad, self.step)))
        self.step += 1

    def count(self, n: int, *, residual: bool = False, ce: bool = False) -> None:
        """The host-side sample counts of one add_in_graph."""
        self.n += n
        self.n_res += n if residual else 0
        self.n_ce += n if ce else 0

    def add_local(self, loss, n: int, step: int) -> None:
        """Add a step's local loss (mean over n samples); a non-finite loss records `step` as the first bad one."""
        self.acc[self.LOCAL] += loss * n
        self.n += n
        # where() keeps the check on the device: no host sync per step
        self.bad = torch.where(torch.isfinite(loss), self.bad, torch.clamp(self.bad, max=step))

    def add_ce(self, loss, correct, n: int) -> None:
        """Add a step's cross-entropy (mean over n samples) and its number of correct predictions."""
        self.acc[self.CE] += loss * n
        self.acc[self.CORRECT] += correct
        self.n_ce += n

    def add_residual(self, norm_sum, n: int) -> None:
        """Add the sum of n per-sample residual norms."""
        self.acc[self.RES] += norm_sum
        self.n_res += n

    def add_mult(self, norm_sum) -> None:
        """Add the sum of per-sample multiplier norms (averaged over the residual's sample count)."""
        self.acc[self.MULT] += norm_sum

    def add_nonfinite(self, values) -> None:
        """Count the non-finite entries of values."""
        self.acc[self.BAD] += (~torch.isfinite(values)).sum()

    def stats(self, *, first: bool, last: bool, al: bool, steps: int, compute_seconds: float,
              residual_here: bool | None = None) -> PhaseStats:
        """The epoch's PhaseStats from the sums, read to the host once; NaN where a figure does not apply
        (train loss and accuracy only on the last stage)."""
        s = self.acc.tolist()  # the one host read of the epoch
        bad = int(self.bad)
        nan = math.nan
        n, nce, nres = max(self.n, 1), max(self.n_ce, 1), max(self.n_res, 1)
        return PhaseStats(
            local_loss=s[self.LOCAL] / n,
            train_loss=s[self.CE] / nce if last else nan,
            train_acc=s[self.CORRECT] / nce if last else nan,
            residual=s[self.RES] / nres if self.n_res else nan,
            multiplier_norm=s[self.MULT] / nres if (al and self.n_res) else nan,
            steps=steps, samples=self.n, compute_seconds=compute_seconds,
            first_bad_step=None if bad >= FIRST_BAD_NONE else bad,
            extra={"nonfinite_aux": int(s[self.BAD])})
