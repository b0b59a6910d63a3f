"""The forward sweep that enters a parallel phase of the epoch coupling (ALGORITHM.md s.4b): the
auxiliary variables of every training sample are set to the true forward states of the network."""
from __future__ import annotations

import torch


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
