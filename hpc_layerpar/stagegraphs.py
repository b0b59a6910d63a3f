"""The pipeline coupling's graph path (run.cuda_graphs, graphs.py): each stage's F, B and optimizer step
as captured CUDA graphs over static buffers, mixed into PipelineEngine. The math is the eager
path's in pipeline.py; only where inputs come from and where sums go differs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .channels import AHEAD


class _NoRunningStats:
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



class StageGraphs:
    """PipelineEngine's methods of the graph path (self is the engine)."""

    def _state(self) -> list:
        """What this stage's steps update in place (restored after the warm-up runs of a capture)."""
        bufs = [b for m in self.stage_modules for b in m.buffers(recurse=False)]
        return self.params + bufs + self.sgd.buffers() + [self.bucket.flat] + self.sums.state()

    def _epoch_inputs(self, epoch: int, mbs: list):
        """The epoch's sample ids (and rank 0's augmentation draws), on the device in one copy each,
        with each micro-batch's offset: a replay's inputs are then device-to-device slices."""
        starts = [0]
        for idx in mbs:
            starts.append(starts[-1] + len(idx))
        ids = torch.cat(mbs).to(self.device) if mbs else None
        off = flip = None
        if self.first and self.augment is not None and mbs:
            offs, flps, drawn = [], [], {}
            for j, idx in enumerate(mbs):
                g, i = divmod(j, self.M)  # as _images: the global batch's draws, this micro-batch's rows
                if g not in drawn:
                    drawn = {g: self.augment.draws(epoch, g, self.sub_batch)}
                o, f = drawn[g]
                rows = slice(i * self.micro, i * self.micro + len(idx))
                offs.append(o[rows])
                flps.append(f[rows])
            off, flip = torch.cat(offs).to(self.device), torch.cat(flps).to(self.device)
        return ids, starts, off, flip

    def _make_step(self, kind: str, n: int):
        """(static inputs, StepGraph) of F (forward, no gradients), B (local objective, backward,
        adjoint) or S (optimizer step) for micro-batches of n samples."""
        dev, f32 = self.device, torch.float32
        ins = {}
        if kind != "S":
            if self.first or self.last:
                ins["ids"] = torch.zeros(n, dtype=torch.int64, device=dev)
            if self.first and self.augment is not None:
                ins["off"] = torch.zeros(n, 2, dtype=torch.int64, device=dev)
                ins["flip"] = torch.zeros(n, dtype=torch.bool, device=dev)
            if not self.first:
                ins["a"] = torch.zeros((n,) + tuple(self.in_shape), dtype=f32, device=dev)
            if kind == "B" and not self.last:
                ins["p"] = torch.zeros((n,) + tuple(self.out_shape), dtype=f32, device=dev)
                ins["anchor"] = torch.zeros_like(ins["p"])

        def inputs(grad: bool):
            if self.first:
                x = self.data.train_batch(ins["ids"])[0]
                if self.augment is not None:
                    x = self.augment.apply(x, ins["off"], ins["flip"])
                return x, None
            leaf = ins["a"].detach().requires_grad_(grad)
            return self.filter.up(leaf), leaf

        def forward():
            x, _ = inputs(False)
            with torch.no_grad():
                return (self.filter.down(self.model(x, self.start, self.end)),)

        def backward():
            x, leaf = inputs(True)
            if self.last:
                u = self.model(x, self.start, self.end)
                y = self.data.train_y[ins["ids"]]
                loss = F.cross_entropy(u, y)
                self.sums.add_in_graph(loss.detach(), n, correct=(u.detach().argmax(1) == y).sum())
            else:
                with _NoRunningStats(self.stage_modules):
                    d = self.filter.down(self.model(x, self.start, self.end))
                loss, diff = self._objective(d, ins["p"], ins["anchor"], self.beta_t, None)
                self.sums.add_in_graph(loss.detach(), n, residual=diff.detach().flatten(1).norm(dim=1).sum())
            (loss / self.M).backward()
            return (None if leaf is None else leaf.grad * (n * self.M),)  # p = |mu| dL/da, as eager

        def step():
            if self.replicas > 1:
                self.bucket.flat.div_(self.replicas)
            self.sgd()
            self.bucket.zero()
            return ()

        return ins, self.graphs.step({"F": forward, "B": backward, "S": step}[kind], self._state)

    def _replay(self, kind: str, ep, j, n: int, **tensors):
        """Load micro-batch j's inputs into the static buffers of (kind, n) and replay its step."""
        ins, graph = self.graphs.get((kind, n), lambda: self._make_step(kind, n))
        if "ids" in ins:
            ids, starts, off, flip = ep.dev
            lo = starts[j]
            ins["ids"].copy_(ids[lo:lo + n])
            if "off" in ins:
                ins["off"].copy_(off[lo:lo + n])
                ins["flip"].copy_(flip[lo:lo + n])
        for name, t in tensors.items():
            if name in ins:
                ins[name].copy_(t)
        return graph()

    def _backward_graphed(self, ep, j: int, n: int, fwd) -> None:
        """B(j) as a replay: the same local objective, gradients and adjoint as the eager _backward."""
        if self.last:
            (adj,) = self._replay("B", ep, j, n, a=fwd[0])
        else:
            a, anchor = ep.inflight.pop(j)
            for i in range(j, min(j + AHEAD + 1, len(ep.mbs))):
                self.adjoints.post(i, len(ep.mbs[i]))
            p = self.adjoints.recv(j, n)
            if j in ep.last_group:
                ep.probe["p"].append(p.to(torch.float32, copy=True))
                ep.probe["anchor"].append(anchor)
            (adj,) = self._replay("B", ep, j, n, a=a, p=p, anchor=anchor)
        ep.sums.count(n, residual=not self.last, ce=self.last)  # the device-side sums are in the replay
        if adj is not None:
            self.adjoints.send(j, adj)
        if (j + 1) % self.M == 0:
            self._step(ep)
