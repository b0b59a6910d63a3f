"""Health of the parallel phase, measured after every parallel epoch on a probe batch: the epoch's
last global batch (the pipeline keeps coupling state only for micro-batches in flight, so the
freshest batch is the one it can be measured on).

- consistency at boundary k: mean over the probe samples of ||a_k - D(x_k)|| / ||D(x_k)||, where a_k
  is the auxiliary variable stage k trains on and x_k the true forward state of the current network;
- gradient fidelity of stage k: the cosine between the gradient the stage would take for the probe
  batch with the coupling information it holds for it (its auxiliary inputs, the adjoints of its
  outgoing boundary) and the gradient true back-propagation gives on the same samples, both at
  the parameters of the end of the epoch: how well the coupling stands in for back-propagation;
  and the ratio of their norms, which the cosine cannot see (a gradient scaled by 1/M per boundary
  once went unnoticed behind cosines of 0.9).

One synchronous forward and backward pass of the probe batch through the pipeline (collective)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TAG_FWD, TAG_BWD = 32001, 32002


def _cosine(a: list, b: list) -> float:
    x = torch.cat([t.reshape(-1).double() for t in a])
    y = torch.cat([t.reshape(-1).double() for t in b])
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else math.nan


def _norm_ratio(a: list, b: list) -> float:
    x = float(torch.cat([t.reshape(-1).double() for t in a]).norm())
    y = float(torch.cat([t.reshape(-1).double() for t in b]).norm())
    return x / y if y > 0 else math.nan


def probe(model, ranges, comm, data, filt, engine) -> tuple[float, float, float]:
    """(consistency of this rank's incoming boundary or NaN on rank 0, gradient cosine of this rank's
    stage, its gradient's norm / back-propagation's). Every rank of the pipeline communicator calls it
    after the epoch. The true pass goes micro-batch by micro-batch, so BatchNorm sees the same
    batches as the engine's gradients did."""
    pr = engine.probe
    local = engine.probe_gradient()
    k, K = comm.rank, comm.size
    start, end = ranges[k]
    prev, nxt = comm.neighbours()
    params = [p for el in model.elements[start:end] for p in el.parameters()]
    saved = [b.clone() for el in model.elements[start:end] for b in el.buffers()]
    was = model.training
    model.train()
    true = [torch.zeros_like(p) for p in params]
    ratios = []
    parts = pr["idx"]
    for i, idx in enumerate(parts):
        n = len(idx)
        if k == 0:
            x = pr["x"][i] if pr.get("x") else data.train_batch(idx)[0]
        else:
            x = torch.empty((n,) + tuple(model.shapes[start]), device=data.device)
            comm.irecv(x, prev, tag=TAG_FWD, key="probe-x").wait()
        leaf = x.detach().requires_grad_(k > 0)
        u = model(leaf, start, end)
        if k < K - 1:
            comm.isend(u.detach().contiguous(), nxt, tag=TAG_FWD, key="probe-u").wait()
            g = torch.empty(u.shape, dtype=u.dtype, device=u.device)  # contiguous (u may be channels_last)
            comm.irecv(g, nxt, tag=TAG_BWD, key="probe-g").wait()
            outs, grad_out = u, g
        else:
            outs = F.cross_entropy(u, data.train_y[idx.to(data.device)]) / len(parts)
            grad_out = None
        wrt = params + ([leaf] if k > 0 else [])
        grads = torch.autograd.grad(outs, wrt, grad_outputs=grad_out, allow_unused=True)
        if k > 0:
            comm.isend(grads[-1].contiguous(), prev, tag=TAG_BWD, key="probe-gin").wait()
        for t, g in zip(true, grads[:len(params)]):
            if g is not None:
                t += g
        if k > 0:
            a = pr["a"][i] if pr.get("a") else engine.store.gather(idx)
            d = filt.down(x.detach())
            ratios.append((a - d).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp_min(1e-12))
    for b, s in zip((b for el in model.elements[start:end] for b in el.buffers()), saved):
        b.copy_(s)  # the probe must not move BatchNorm's running statistics
    model.train(was)
    cons = float(torch.cat(ratios).mean()) if ratios else math.nan
    return cons, _cosine(local, true), _norm_ratio(local, true)
