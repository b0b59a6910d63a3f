"""Stages of the split network: a stage's parameters, and gathering every stage from its owner so
that every rank holds the whole network (before evaluating it, and when a serial phase starts)."""
from __future__ import annotations

import torch

from .buckets import flatten, unflatten


def stage_params(model, start, end) -> list:
    """The parameters of elements [start, end): the stage a rank owns."""
    return [p for el in model.elements[start:end] for p in el.parameters()]


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
