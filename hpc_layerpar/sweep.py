"""Passes of the true network over data without training: evaluation (sharded over ranks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import calibration_order, shard_range


@torch.no_grad()
def evaluate(model, data, comm, batch_size: int) -> tuple[float, float]:
    """Test loss and accuracy of the whole network G; the test set is sharded over the ranks and
    the sums are reduced, so every rank returns the same figures."""
    was_training = model.training
    model.eval()
    lo, hi = shard_range(data.n_test, comm.size, comm.rank)
    sums = torch.zeros(3, dtype=torch.float64, device=data.device)
    for a in range(lo, hi, batch_size):
        x, y = data.test_batch(a, min(a + batch_size, hi))
        out = model(x)
        sums[0] += F.cross_entropy(out, y, reduction="sum")
        sums[1] += (out.argmax(1) == y).sum()
        sums[2] += len(y)
    model.train(was_training)
    loss, correct, n = comm.allreduce_array(sums.cpu().numpy())
    return loss / max(n, 1), correct / max(n, 1)


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
        flat = (torch.cat([t.reshape(-1) for t in tensors]) if comm.rank == k else
                torch.empty(sum(t.numel() for t in tensors), dtype=torch.float32, device=tensors[0].device))
        comm.bcast_(flat, root=k, key=("share", k))
        if comm.rank != k:
            off = 0
            for t in tensors:
                t.copy_(flat[off:off + t.numel()].view_as(t))
                off += t.numel()
        counts = [buf for el in model.elements[a:b] for buf in el.buffers() if not buf.dtype.is_floating_point]
        values = comm.bcast_obj([int(c) for c in counts] if comm.rank == k else None, root=k)
        for c, v in zip(counts, values):
            c.fill_(v)


class _KeepRunningStats:
    """Train-mode forwards that use batch statistics but leave BatchNorm's running statistics as
    they were (the forward sweep must not disturb the network it initialises from)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.saved = [b.clone() for b in self.model.buffers()]

    def __exit__(self, *exc):
        for b, s in zip(self.model.buffers(), self.saved):
            b.copy_(s)


@torch.no_grad()
def forward_sweep(model, ranges, comm, data, store, filt, batch_size: int, ids=None) -> None:
    """Initialise a_k = D(x_k) for every training sample by a pipelined forward pass of the current
    network over the un-augmented training set: rank k-1 sends the full-resolution x_k to rank k,
    which stores D(x_k) and carries on (ALGORITHM.md s.4). ids: the samples to sweep, in the
    store's row order (a replica's shard); None: all of them."""
    k, last = comm.rank, comm.rank == comm.size - 1
    start, end = ranges[k]
    prev, nxt = comm.neighbours()
    model.train()
    ids = torch.arange(data.n_train) if ids is None else ids
    n = len(ids)
    out_shape = None if last else model.shapes[end]
    bufs, reqs = [], [None, None]
    if not last:
        bufs = [torch.empty((batch_size,) + tuple(out_shape), device=data.device) for _ in range(2)]
    with _KeepRunningStats(model):
        for b, lo in enumerate(range(0, n, batch_size)):
            hi = min(lo + batch_size, n)
            if k == 0:
                x = data.normalise(data.train_x[ids[lo:hi].to(data.device)])
            else:
                x = torch.empty((hi - lo,) + tuple(model.shapes[start]), device=data.device)
                comm.irecv(x, prev, tag=b, key="sweep").wait()
                store.set_rows(lo, hi, filt.down(x))
            if not last:
                s = b % 2
                if reqs[s] is not None:
                    reqs[s].wait()
                bufs[s][:hi - lo].copy_(model(x, start, end))
                reqs[s] = comm.isend(bufs[s][:hi - lo], nxt, tag=b, key=("sweep", s))
        for r in reqs:
            if r is not None:
                r.wait()
    store_m = getattr(store, "reset_multipliers", None)
    if store_m is not None:
        store_m()


@torch.no_grad()
def recalibrate_bn(model, data, comm, batches: int, batch_size: int, seed: int) -> None:
    """Re-estimate BatchNorm running statistics of the whole network: train-mode forwards without
    gradients over `batches` un-augmented training batches, cumulative average, batches dealt out
    to the ranks round-robin, per-rank averages combined by one Allreduce (ALGORITHM.md s.7)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not bns:
        return
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    model.train()
    perm = calibration_order(data.n_train, seed)  # the same batches at any rank count
    nb = min(batches, max(data.n_train // batch_size, 1))
    mine = [i for i in range(nb) if i % comm.size == comm.rank]
    for i in mine:
        model(data.train_batch(perm[i * batch_size:(i + 1) * batch_size])[0])
    w = float(len(mine))
    flat = torch.cat([torch.cat([bn.running_mean * w, bn.running_var * w]) for bn in bns]
                     + [torch.tensor([w], device=data.device)]).contiguous()
    comm.allreduce_(flat, key="bn")
    total = float(flat[-1])
    off = 0
    for bn, mom in zip(bns, momenta):
        c = bn.num_features
        bn.running_mean.copy_(flat[off:off + c] / total)
        bn.running_var.copy_(flat[off + c:off + 2 * c] / total)
        bn.num_batches_tracked.fill_(nb)
        bn.momentum = mom
        off += 2 * c
    model.train(was_training)
