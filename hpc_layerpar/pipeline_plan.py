"""The pipeline coupling's schedule as data (ALGORITHM.md s.4): per rank and tick, the actions the
engine performs, in order. Pure: no tensors, no communicator; the engine walks it and has no tick
arithmetic of its own, and tests check it without processes at any K.

Tick t, rank k: F(t - k), then B(t - 2(K-1) + k) (the last rank: the same micro-batch, at once), with
the default schedule "tick"; with "1f1b" B(t - (K-1)): every rank back-propagates the micro-batch the
last rank finished at this tick, so the adjoint travels upstream within the tick (as in PipeDream's
one-forward-one-backward) and stage k's delay halves to K-1-k ticks.
  F j:  recv the auxiliary input of j from k-1 (rank 0: read the images), forward, send D(u) to k+1.
  B j:  recv the adjoint of j from k+1 (the last rank: cross-entropy), backward, send the adjoint to k-1.
  S g:  the optimizer step of global batch g, after the B of its last micro-batch (a partial last
        batch has fewer than M: its step follows the epoch's last B).
  C:    (every `check_every` ticks, the same ticks on every rank) the ranks agree whether to go on:
        a non-finite value anywhere halts the epoch there (run.check_every).
"tick": every message a rank receives at tick t was sent by its neighbour at tick t-1, so a rank only
waits for the previous tick of its neighbours; an epoch of n micro-batches takes n + 2(K-1) ticks.
"1f1b": activations as before, but the adjoint of tick t comes from rank k+1's B of the same tick (the
ranks settle into a stagger, each a B behind its downstream neighbour, and a message's latency lies
on the critical path twice per tick); an epoch takes n + K-1 ticks."""
from __future__ import annotations

from dataclasses import dataclass

ACTIVATIONS, ADJOINTS = "activations", "adjoints"
SCHEDULES = ("tick", "1f1b")


def _lag(schedule: str) -> int:
    """Ticks a message of the adjoint channel takes from sender to receiver: 1 ("tick"), 0 ("1f1b")."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
    return 1 if schedule == "tick" else 0


@dataclass(frozen=True)
class Action:
    """One thing a rank does at a tick. kind: "recv" or "send" (channel, peer, mb), "F" or "B" (mb),
    or "S" (step = the global batch's index, mb = its last micro-batch)."""
    kind: str
    mb: int
    channel: str | None = None
    peer: int | None = None
    step: int | None = None

    def label(self) -> str:
        """A short form for the printed grid: F3, B1, S0, C, and for messages <a3 (received), a3> (sent)."""
        if self.kind == "C":
            return "C"
        if self.kind in ("F", "B"):
            return f"{self.kind}{self.mb}"
        if self.kind == "S":
            return f"S{self.step}"
        c = self.channel[:2]
        return f"<{c}{self.mb}" if self.kind == "recv" else f"{c}{self.mb}>"


def ticks(stages: int, micro_batches: int, schedule: str = "tick") -> int:
    """Ticks of an epoch of `micro_batches` micro-batches at `stages` ranks: the fill and drain are 2(K-1)
    ("tick") or K-1 ("1f1b")."""
    return micro_batches + (1 + _lag(schedule)) * (stages - 1) if micro_batches else 0


def forward_at(rank: int, tick: int) -> int:
    """The micro-batch rank forwards at tick (may be out of range: then nothing)."""
    return tick - rank


def backward_at(rank: int, stages: int, tick: int, schedule: str = "tick") -> int:
    """The micro-batch rank back-propagates at tick (may be out of range: then nothing)."""
    return tick - (stages - 1) - _lag(schedule) * (stages - 1 - rank)


def delay(rank: int, stages: int, schedule: str = "tick") -> int:
    """Ticks from a micro-batch's F to its B on `rank`: 2(K-1-k) ("tick") or K-1-k ("1f1b"); the last
    rank: 0."""
    return forward_at(rank, 0) - backward_at(rank, stages, 0, schedule)


def sent_before(action: Action, schedule: str = "tick") -> bool:
    """Whether the message a receive `action` of tick t waits for was sent at tick t-1 (so it can be
    received at the end of tick t-1, as the in-epoch check and a resumed epoch need): activations
    always, adjoints only on the "tick" schedule (on "1f1b" they are sent at tick t itself)."""
    return action.kind == "recv" and (action.channel == ACTIVATIONS or _lag(schedule) == 1)


def decided_at(check_tick: int, stages: int, n_ticks: int) -> int:
    """The tick at whose end a 1f1b check made at check_tick is decided (and the epoch may stop): K-1
    ticks later, so that its collective does not undo the stagger, or the epoch's last tick."""
    return min(check_tick + stages - 1, n_ticks - 1)


def reuses(rank: int, stages: int, j: int, per_step: int, schedule: str = "tick") -> bool:
    """Whether `rank`'s parameters are the same at the B of micro-batch j as at its F: no optimizer step
    falls between them (a step follows the B of micro-batch i when (i + 1) % M == 0; at tick t F comes
    before B and S, so the steps between are those of i in [j - d, j - 1], d the rank's delay). Then B
    may back-propagate through F's own graph instead of recomputing the forward: the same numbers.
    Steps of an earlier epoch precede every F of this one."""
    d = delay(rank, stages, schedule)
    return not any((i + 1) % per_step == 0 for i in range(max(j - d, 0), j))


def recompute_share(rank: int, stages: int, per_step: int, schedule: str = "tick") -> float:
    """The long-run share of micro-batches whose B recomputes the forward on a non-last `rank` when F's
    graph is kept where reuses() allows: the d of every M whose window holds a step, min(1, d / M)."""
    return min(1.0, delay(rank, stages, schedule) / per_step)


def rank_tick(rank: int, stages: int, tick: int, n: int, per_step: int, schedule: str = "tick") -> list:
    """The actions of `rank` (of `stages`) at `tick` in an epoch of n micro-batches, per_step (M) of them
    per optimizer step: a step follows the B of micro-batch j when (j + 1) % M == 0, and after the
    epoch's last (a partial last batch of data.drop_last=false has fewer than M)."""
    if not 0 <= rank < stages:
        raise ValueError(f"rank {rank} is not in 0..{stages - 1}")
    first, last = rank == 0, rank == stages - 1
    out = []
    jf = forward_at(rank, tick)
    if 0 <= jf < n:
        if not first:
            out.append(Action("recv", jf, ACTIVATIONS, rank - 1))
        out.append(Action("F", jf))
        if not last:
            out.append(Action("send", jf, ACTIVATIONS, rank + 1))
    jb = backward_at(rank, stages, tick, schedule)
    if 0 <= jb < n:
        if not last:
            out.append(Action("recv", jb, ADJOINTS, rank + 1))
        out.append(Action("B", jb))
        if not first:
            out.append(Action("send", jb, ADJOINTS, rank - 1))
        if (jb + 1) % per_step == 0 or jb == n - 1:
            out.append(Action("S", jb, step=jb // per_step))
    return out


def rank_plan(rank: int, stages: int, n: int, per_step: int, check_every: int = 0, schedule: str = "tick",
              ahead: bool = False) -> list:
    """Every tick of one rank's epoch: a list (per tick) of lists of Actions. check_every > 0: a check
    C ends every tick t with (t + 1) % check_every == 0, but the last (the epoch's end checks anyway).
    ahead: run_ahead() on rank 0 of a 1f1b pipeline (the engine sets it where F's graph is kept)."""
    if per_step < 1:
        raise ValueError(f"micro-batches per step must be >= 1, got {per_step}")
    nt = ticks(stages, n, schedule)
    out = [rank_tick(rank, stages, t, n, per_step, schedule) for t in range(nt)]
    checks = range(check_every - 1, nt - 1, check_every) if check_every > 0 else ()
    for t in checks:
        out[t].append(Action("C", -1))
    if ahead and rank == 0 < stages - 1 and schedule == "1f1b":
        out = run_ahead(out, {decided_at(t, stages, nt) for t in checks})
    return out


def run_ahead(ticks_: list, fixed=()) -> list:
    """Rank 0's ticks with each F (and its send) moved to the tick before, before that tick's B, wherever
    no optimizer step ends that tick and it is not in `fixed` (the ticks a check may stop the epoch at).

    Why: on 1f1b the B of the d micro-batches forwarded before an optimizer step recomputes the
    forward (reuses()), so that tick of rank 0 runs F + 2F + B-ish while rank 1's runs F + B; with no
    slack in the 1f1b stagger, rank 1 then waits for its next input (ResNet-56, K = 2, M = 4: 0.1 s
    once per step, RESULTS.md "Rank 0 forwards ahead"). Forwarded a tick early, that input is already
    there. The numbers do not change: rank 0's parameters change only at S, and no S lies between a
    moved F's old and new place (its BatchNorm statistics see the forwards in the same order), so
    every F computes what it did, and reuses() holds for the same micro-batches. At a stop tick rank 0
    is where the plain plan has it: the check, a halt and a resumed epoch see the same state."""
    out = [list(t) for t in ticks_]

    def forward(a):  # F and its send downstream (rank 0 reads its input: no receive)
        return a.kind == "F" or (a.kind == "send" and a.channel == ACTIVATIONS)

    for t in range(len(out) - 1):
        if t in fixed or any(a.kind == "S" for a in out[t]):
            continue
        moved = [a for a in out[t + 1] if forward(a)]
        out[t + 1] = [a for a in out[t + 1] if not forward(a)]
        at = max((i + 1 for i, a in enumerate(out[t]) if forward(a)), default=0)  # after this tick's own F
        out[t][at:at] = moved
    return out


def plan(stages: int, n: int, per_step: int, check_every: int = 0, schedule: str = "tick",
         ahead: bool = False) -> list:
    """plan[k][t]: the actions of rank k at tick t, for an epoch of n micro-batches."""
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    return [rank_plan(k, stages, n, per_step, check_every, schedule, ahead) for k in range(stages)]


def render(stages: int, n: int, per_step: int, messages: bool = False, schedule: str = "tick") -> str:
    """The plan as a grid a person can read: a row per rank, a column per tick; compute actions only
    unless messages (then received <, sent >, on the activations 'ac' and adjoints 'ad' channels)."""
    grid = plan(stages, n, per_step, schedule=schedule)
    cells = [[" ".join(a.label() for a in acts if messages or a.kind in ("F", "B", "S")) or "."
              for acts in row] for row in grid]
    nt = ticks(stages, n, schedule)
    width = max([len(c) for row in cells for c in row] + [len(str(max(nt - 1, 0)))])
    head = "tick    " + " ".join(f"{t:>{width}d}" for t in range(nt))
    lines = [f"K = {stages} ranks, {n} micro-batches, M = {per_step} per optimizer step, schedule {schedule}: "
             f"{nt} ticks (fill and drain {nt - n})", head]
    for k, row in enumerate(cells):
        lines.append(f"rank {k:<3d}" + " ".join(f"{c:>{width}s}" for c in row))
    return "\n".join(lines)
