"""One pipeline stage's step, written once (ALGORITHM.md s.3, s.4): F (the forward message), B (the
local objective back-propagated, the adjoint sent upstream) and S (the optimizer step), as functions
of an explicit MicroBatch record. The eager engine (pipeline.py) calls them, the graph path
(pipeline_graphs.py) captures the same functions over static buffers, and the health probe takes
its gradient from objective(): no formula of the step exists twice."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MicroBatch:
    """What a stage's step reads for one micro-batch. ids: sample ids (rank 0 reads its images, the last
    rank its labels); off, flip: rank 0's augmentation draws (or None); a: the auxiliary input D(u_{k-1})
    (ranks k >= 1); p: the adjoint of the outgoing boundary, anchor: what the downstream rank received
    (ranks k < K-1, B only); m: the AL multipliers of the outgoing boundary (or None); scale: the global
    batch's samples over this micro-batch's (M for a full batch; None: M), so that a short
    micro-batch of a partial last batch weighs by its samples. stash: copies of the stage's parameters
    as F saw them, when B must use them although a step falls in between (parallel.stash_weights).
    kept: (D(u), leaf) with F's graph, when F kept it for B (the parameters B uses are the ones F used:
    no step in between, pipeline_plan.reuses, or stashed)."""
    ids: torch.Tensor | None = None
    off: torch.Tensor | None = None
    flip: torch.Tensor | None = None
    a: torch.Tensor | None = None
    p: torch.Tensor | None = None
    anchor: torch.Tensor | None = None
    m: torch.Tensor | None = None
    scale: float | None = None
    stash: list | None = None
    kept: tuple | None = None

    def __len__(self) -> int:
        return len(self.ids) if self.a is None else len(self.a)


class NoRunningStats:
    """Recomputing a micro-batch in train mode must not count it twice in BatchNorm's running
    statistics: momentum 0 keeps them as they are (F already counted the micro-batch)."""

    def __init__(self, modules):
        self.bns = [m for m in modules if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [(bn.momentum, bn.num_batches_tracked.clone()) for bn in self.bns]
        for bn in self.bns:
            bn.momentum = 0.0

    def __exit__(self, *exc):
        for bn, (mom, nbt) in zip(self.bns, self.saved):
            bn.momentum = mom
            bn.num_batches_tracked.copy_(nbt)


@dataclass
class Objective:
    """A micro-batch's local objective, built but not yet back-propagated. diff: D(u') - anchor (ranks
    k < K-1); correct: right predictions (the last rank); leaf: the auxiliary input whose gradient
    makes the adjoint (ranks k >= 1)."""
    loss: torch.Tensor
    diff: torch.Tensor | None
    correct: torch.Tensor | None
    leaf: torch.Tensor | None


class StageStep:
    """F, B and S of the stage `stage` (stages.Stage) over MicroBatch records. data: the DeviceDataset;
    augment: rank 0's augmentation (or None); micro: M, the micro-batches of one optimizer step;
    sums: the epoch's stats.EpochSums, accumulated on the device (so a captured B can hold them)."""

    def __init__(self, stage, data, augment, micro: int, sums):
        self.stage, self.data, self.augment, self.M, self.sums = stage, data, augment, micro, sums

    def input(self, mb: MicroBatch, grad: bool):
        """(x, leaf): the stage's input and, on ranks k >= 1, the auxiliary leaf it was upsampled from."""
        if self.stage.first:
            x = self.data.train_batch(mb.ids)[0]
            if self.augment is not None and mb.off is not None:
                x = self.augment.apply(x, mb.off, mb.flip)
            return x, None
        leaf = mb.a.detach().requires_grad_(grad)
        return self.stage.filter.up(leaf), leaf

    def forward(self, mb: MicroBatch, keep: bool = False, stash: bool = False) -> torch.Tensor:
        """F: the message D(Phi_k(U(a))) this stage sends downstream. keep: build the graph and keep it
        in mb.kept for B, which then needs no recompute (only when B uses the parameters F saw: none
        moves in between, or they are stashed); otherwise no gradients. stash: copy the parameters into
        mb.stash, for a B that comes after a step (parallel.stash_weights)."""
        if stash:  # leaves: B's gradient gathers in their .grad
            mb.stash = [p.detach().clone().requires_grad_() for p in self.stage.params]
        with torch.set_grad_enabled(keep):
            x, leaf = self.input(mb, keep)
            d = self.stage.filter.down(self.stage(x, mb.stash))
        if keep:
            mb.kept = (d, leaf)
        return d.detach()

    def objective(self, mb: MicroBatch, beta, kept: bool = False) -> Objective:
        """The local objective of s.3 on one micro-batch: cross-entropy on the last rank; elsewhere
        (1/n) sum_i <p_i, d_i> + (beta/2N) ||d_i - anchor_i||^2 (+ (1/n) <m_i, d_i - anchor_i> for AL),
        d = D(u') recomputed at the current parameters, N = numel(d_i): the penalty towards the
        prox-linear target anchor - (N/beta) p. beta: a float, or on the graph path a device scalar
        holding the coefficient 0.5 beta / N (filled per epoch from the same host value, so it rounds
        as the float does). kept: take D(u') from F's kept graph (mb.kept, used once) instead of
        recomputing it: the same value when the parameters have not moved since F."""
        if kept and mb.kept is not None:
            (d, leaf), mb.kept = mb.kept, None
        else:
            x, leaf = self.input(mb, True)
            if self.stage.last:
                u = self.stage(x)
                y = self.data.train_y[mb.ids.to(self.data.device)]
                return Objective(F.cross_entropy(u, y), None, (u.detach().argmax(1) == y).sum(), leaf)
            with NoRunningStats(self.stage.modules):
                d = self.stage.filter.down(self.stage(x, mb.stash))
        n = len(d)
        diff = d - mb.anchor
        loss = (mb.p * d).sum() / n
        if torch.is_tensor(beta):
            # beta = 0 adds nothing, as the float path's branch does
            loss = loss + torch.where(beta > 0, beta * diff.pow(2).sum(), 0.0) / n
        elif beta > 0:
            loss = loss + (0.5 * beta / self.stage.out_numel) * diff.pow(2).sum() / n
        if mb.m is not None:
            loss = loss + (mb.m * diff).sum() / n
        return Objective(loss, diff, None, leaf)

    def backward(self, mb: MicroBatch, beta, kept: bool = False):
        """B: the objective back-propagated into the stage's gradients (a global batch's mean: the step
        adds its micro-batches, each weighted by its share of the batch's samples), its figures added to
        the epoch sums. kept: through F's kept graph (see objective). Returns (the adjoint p = |mu| dL/da
        of this micro-batch's own objective L, or None on rank 0; d - anchor or None)."""
        ob = self.objective(mb, beta, kept)
        n = len(mb)
        scale = self.M if mb.scale is None else mb.scale
        (ob.loss / scale).backward()
        if mb.stash is not None:  # gradients at the stashed parameters go to the step in progress
            for p, s in zip(self.stage.params, mb.stash):
                p.grad.add_(s.grad)
            mb.stash = None
        residual = None if ob.diff is None else ob.diff.detach().flatten(1).norm(dim=1).sum()
        self.sums.add_in_graph(ob.loss.detach(), n, residual=residual, correct=ob.correct)
        # the backward carried 1/scale: undo it, or every boundary would scale the gradients upstream by 1/M
        adjoint = None if ob.leaf is None else ob.leaf.grad * (n * scale)
        return adjoint, None if ob.diff is None else ob.diff.detach()

    def update(self) -> None:
        """S: one optimizer step of the stage from its gradient bucket (summed over the replicas by the
        caller's Allreduce: divided here to their mean), then the gradients zeroed."""
        st = self.stage
        if st.replicas > 1:
            st.bucket.flat.div_(st.replicas)
        st.sgd()
        st.bucket.zero()
