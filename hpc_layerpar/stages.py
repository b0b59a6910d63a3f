"""Stages of the split network: the Stage a rank owns (its elements, parameters, optimizer state and
message shapes), and gathering every stage from its owner so that every rank holds the whole
network (before evaluating it, and when a serial phase starts)."""
from __future__ import annotations

import torch

from .buckets import GradBucket, flatten, unflatten
from .graphs import SGDUpdate


def stage_params(model, start, end) -> list:
    """The parameters of elements [start, end): the stage a rank owns."""
    return [p for el in model.elements[start:end] for p in el.parameters()]


class Stage:
    """Rank k's block of the network, elements [start, end) of `ranges[k]`: its parameters and modules,
    the shapes of the (filtered) messages at its boundaries, and its optimizer state: gradients in one
    GradBucket (one Allreduce over replicas; fixed addresses for captured steps) and the one SGD
    update of the package (graphs.SGDUpdate over the optimizer's own momentum buffers)."""

    def __init__(self, model, ranges, k: int, filt, optimizer, device, replicas: int = 1):
        self.model, self.k, self.K, self.filter = model, k, len(ranges), filt
        self.start, self.end = ranges[k]
        self.first, self.last = k == 0, k == self.K - 1
        self.params = stage_params(model, self.start, self.end)
        names = {id(p): n for n, p in model.named_parameters()}
        self.param_names = [names[id(p)] for p in self.params]  # for torch.func.functional_call
        self.modules = list(model.elements[self.start:self.end].modules())
        self.in_shape = filt.coarse_shape(model.shapes[self.start])
        self.out_shape = None if self.last else filt.coarse_shape(model.shapes[self.end])
        self.out_numel = 0 if self.last else int(torch.Size(self.out_shape).numel())
        self.replicas = replicas
        self.opt = optimizer
        self.bucket = GradBucket(self.params, device)
        self.sgd = SGDUpdate(optimizer, self.params, device)

    def __call__(self, x, params=None):
        """Phi_k: the stage's elements applied to x; params: other tensors in place of the stage's own
        parameters (stashed ones, in self.params order; the buffers stay the modules' own)."""
        if params is None:
            return self.model(x, self.start, self.end)
        return torch.func.functional_call(self.model, dict(zip(self.param_names, params)),
                                          (x, self.start, self.end))

    def buffers(self) -> list:
        """The stage's own buffers (BatchNorm statistics and counts)."""
        return [b for m in self.modules for b in m.buffers(recurse=False)]

    def state(self) -> list:
        """What the stage's steps update in place: parameters, buffers, momentum, gradients."""
        return self.params + self.buffers() + self.sgd.buffers() + [self.bucket.flat]

    def message_numel(self, which: str) -> int:
        """Elements per sample of the message at the stage's input ("in") or output ("out")."""
        if which == "out":
            return self.out_numel
        return int(torch.Size(self.in_shape).numel())


def _float_state(model, start, end, optimizer=None):
    """Parameters, floating buffers and (optionally) momentum buffers of elements [start, end)."""
    out = []
    for el in model.elements[start:end]:
        for p in el.parameters():
            out.append(p.data)
            if optimizer is not None:
                out.append(optimizer.state[p]["momentum_buffer"])
        out.extend(b for b in el.buffers() if b.dtype.is_floating_point)
    return out


@torch.no_grad()
def share_stages(model, ranges, comm, optimizer=None):
    """Every rank receives every stage from its owner (one Bcast per stage), so every rank holds the
    whole network: before evaluating the true network, and (with the optimizer's momentum) when a
    serial phase follows a parallel one."""
    for k, (a, b) in enumerate(ranges):
        tensors = _float_state(model, a, b, optimizer)
        flat = (flatten(tensors, torch.float32) if comm.rank == k else
                torch.empty(sum(t.numel() for t in tensors), dtype=torch.float32, device=tensors[0].device))
        comm.bcast_(flat, root=k, key=("share", k))
        if comm.rank != k:
            unflatten(flat, tensors)
        counts = [buf for el in model.elements[a:b] for buf in el.buffers() if not buf.dtype.is_floating_point]
        values = comm.bcast_obj([int(c) for c in counts] if comm.rank == k else None, root=k)
        for c, v in zip(counts, values):
            c.fill_(v)
