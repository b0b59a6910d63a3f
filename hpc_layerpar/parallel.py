"""The parallel phase with epoch coupling (ALGORITHM.md s.4b, the v1 rule kept for comparison:
`parallel.coupling=epoch`), one epoch per call.

Rank k owns stage k. Per batch j it sends D(u) to rank k+1 and the targets of batch j+W to rank
k-1, and receives the targets of batch j from k+1 and D(u_{k-1}) of batch j from k-1; all of it
posted W batches ahead. Targets only ever hold values of earlier epochs (a sample is in one batch
per epoch, and its auxiliary variable is updated after its targets went out), so the result does
not depend on timing: it equals the single-process simulation in tests/simulate.py."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .auxstore import DTYPES, AuxStore, al_update, penalty_update
from .buckets import GradBucket, sync_device
from .channels import Channel
from .data import epoch_batches, replica_batches
from .filters import DSFilter
from .stages import stage_params
from .stats import EpochSums, PhaseStats

PARALLEL_METHODS = ("penalty", "al")


class ParallelEngine:
    """One parallel phase on one rank of the pipeline communicator `comm` (size K = stages)."""

    def __init__(self, model, optimizer, comm, data, ranges, pcfg, *, method: str, batch_size: int,
                 drop_last: bool, seed: int, replica_comm=None, shard=None):
        """comm: the pipeline (this replica's K ranks). With R > 1 replicas, replica_comm joins the
        ranks of the same stage and `shard` holds the sample ids this replica owns: it steps on
        sub-batches of batch_size / R from its shard and averages the stage's gradients over the
        replicas every step, so the R replicas together take the steps of one global batch."""
        if method not in PARALLEL_METHODS:
            raise ValueError(f"unknown parallel method {method!r}")
        if len(ranges) != comm.size:
            raise ValueError(f"{len(ranges)} stages for {comm.size} ranks")
        self.model, self.opt, self.comm, self.data = model, optimizer, comm, data
        self.method, self.batch_size, self.drop_last, self.seed = method, batch_size, drop_last, seed
        self.k, self.K = comm.rank, comm.size
        self.start, self.end = ranges[self.k]
        self.first, self.last = self.k == 0, self.k == self.K - 1
        self.prev, self.next = comm.neighbours()
        self.filter = DSFilter.of(pcfg)
        self.window = pcfg.window
        self.eta = pcfg.eta
        self.msg_dtype = DTYPES[pcfg.message_dtype]
        self.device = data.device
        self.in_shape = model.shapes[self.start]
        self.out_shape = None if self.last else model.shapes[self.end]
        self.store = None
        if not self.first:
            self.store = AuxStore(data.n_train, self.filter.coarse_shape(self.in_shape),
                                  dtype=pcfg.aux_dtype, device=self.device, location=pcfg.aux_location,
                                  multipliers=(method == "al"), ids=shard)
        self.params = stage_params(model, self.start, self.end)
        self.replica_comm, self.shard = replica_comm, shard
        self.replicas = 1 if replica_comm is None else replica_comm.size
        self.sub_batch = batch_size // self.replicas
        self.bucket = GradBucket(self.params, self.device) if self.replicas > 1 else None
        self.probe = None  # the epoch's last batch: ids and the gradient applied (diagnostics.py)
        self.open_channels()

    # ---- helpers -------------------------------------------------------------------------
    def open_channels(self) -> None:
        """The stage's two channels, W slots each, allocated once per phase (null at the ends):
        activations D(u) forward, targets (a_k, or a_k - m_k/beta for AL) backward."""
        mk = {"rows": self.sub_batch, "dtype": self.msg_dtype, "device": self.device, "slots": self.window}
        coarse_in = self.filter.coarse_shape(self.in_shape)
        coarse_out = None if self.last else self.filter.coarse_shape(self.out_shape)
        prev, nxt = (None if self.first else self.prev), (None if self.last else self.next)
        self.activations = Channel(self.comm, "activations", recv_from=prev, send_to=nxt,
                                   recv_shape=coarse_in, send_shape=coarse_out or (), **mk)
        self.targets = Channel(self.comm, "targets", recv_from=nxt, send_to=prev,
                               recv_shape=coarse_out or (), send_shape=coarse_in, **mk)

    def batches(self, epoch: int) -> list:
        """This rank's (sub-)batches of the epoch: the serial order, or this replica's shard."""
        if self.shard is None:
            return epoch_batches(self.data.n_train, self.batch_size, self.seed, epoch, self.drop_last)
        steps = (self.data.n_train // self.replicas) // self.sub_batch  # the smallest shard decides
        return replica_batches(self.shard, self.sub_batch, steps, self.seed, epoch, self.replica_comm.rank)

    def targets_for(self, idx, beta: float) -> torch.Tensor:
        """What rank k-1 aims D(u) at: a_k (penalty) or a_k - m_k/beta (AL, completed square)."""
        t = self.store.gather(idx)
        if self.method == "al":
            t = t - self.store.gather(idx, "m") / beta
        return t

    def boundary_numel(self, which: str) -> int:
        """Elements per sample of the (filtered) message at the stage's input or output."""
        shape = self.in_shape if which == "in" else self.out_shape
        c, h, w = self.filter.coarse_shape(shape)
        return c * h * w

    # ---- one epoch -----------------------------------------------------------------------
    def train_epoch(self, epoch: int, lr_fn, beta: float) -> PhaseStats:
        """One epoch: every batch trains the stage on its stored inputs and received targets, then
        the auxiliary variables of the batch are updated once D(u_{k-1}) of it has arrived."""
        self.model.train()
        for p in self.model.parameters():  # only this stage's parameters get gradients and steps
            p.grad = None
        if self.bucket is not None:
            self.bucket.attach()
        batches = self.batches(epoch)
        nb, W = len(batches), self.window
        # Epoch sums stay on the device and are read once at the end: a float() per batch would
        # synchronise a GPU every step and undo the overlap the windowed messages buy.
        ep = _Epoch(epoch=epoch, lr_fn=lr_fn, beta=beta, batches=batches, sums=EpochSums(self.device),
                    pending=[None] * W)
        t_epoch = time.perf_counter()
        comm_before = self.comm.counters.comm_seconds
        for j in range(min(W, nb)):
            self.targets.post(j, len(batches[j]))
            self.activations.post(j, len(batches[j]))
            self._send_targets(ep, j)
        for j in range(nb):
            self._train_batch(ep, j)
        for i in range(max(nb - W, 0), nb):
            if ep.pending[i % W] is not None:
                self._update_aux(ep, i % W)
        self.activations.drain()
        self.targets.drain()
        sync_device(self.device)
        elapsed = time.perf_counter() - t_epoch
        return ep.sums.stats(first=self.first, last=self.last, al=self.method == "al", steps=nb,
                             compute_seconds=elapsed - (self.comm.counters.comm_seconds - comm_before))

    def _send_targets(self, ep: "_Epoch", j: int) -> None:
        if self.targets.sends:
            self.targets.send(j, self.targets_for(ep.batches[j], ep.beta))

    def _train_batch(self, ep: "_Epoch", j: int) -> None:
        """One step of the stage on batch j (ALGORITHM.md s.4b), then its messages."""
        idx, W, nb = ep.batches[j], self.window, len(ep.batches)
        s, n = j % W, len(idx)
        lr = ep.lr_fn(ep.epoch + j / nb)
        for g in self.opt.param_groups:
            g["lr"] = lr
        if ep.pending[s] is not None:
            self._update_aux(ep, s)  # frees the slot for batch j (at most W batches in flight)
        if self.first:
            x = self.data.train_batch(idx)[0]  # no augmentation: a_k[i] is tied to sample i
            a = None
        else:
            a = self.store.gather(idx).requires_grad_(True)
            x = self.filter.up(a)
        target = None
        if self.targets.receives:
            # A real copy (.float() of a float32 tensor would alias): the slot is re-posted now.
            target = self.targets.recv(j, n).to(torch.float32, copy=True)
            if j + W < nb:
                self.targets.post(j + W, len(ep.batches[j + W]))
        u = self.model(x, self.start, self.end)
        if self.last:
            y = self.data.train_y[idx.to(self.device)]
            loss = F.cross_entropy(u, y)
            ep.sums.add_ce(loss.detach(), (u.detach().argmax(1) == y).sum(), n)
        else:
            d = self.filter.down(u)
            loss = F.mse_loss(d, target, reduction="sum") * (0.5 * ep.beta / n)
        if self.bucket is None:
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        else:
            self.bucket.zero()
            loss.backward()
            # the mean over the R sub-batches = the gradient of the global batch
            self.replica_comm.allreduce_(self.bucket.flat, key="stage-grads")
            self.bucket.flat /= self.replicas
        if j == nb - 1:
            self.probe = {"idx": [idx], "beta": ep.beta}
        self.opt.step()
        ep.sums.add_local(loss.detach(), n, j)
        if not self.last:
            self.activations.send(j, d.detach())
        if not self.first:
            ep.pending[s] = (j, idx, a.detach(), a.grad * n)  # per-sample adjoint p = |B| dL/da
            if j + W < nb:
                self._send_targets(ep, j + W)
            # Drive MPI progress and apply updates whose inputs have arrived, oldest first.
            for i in range(max(j - W + 1, 0), j + 1):
                si = i % W
                if ep.pending[si] is not None and ep.pending[si][0] == i:
                    if not self.activations.ready(i):
                        break
                    self._update_aux(ep, si)

    def _update_aux(self, ep: "_Epoch", s: int) -> None:
        """The auxiliary (and AL multiplier) update of the batch pending in slot s, with the D(u_{k-1})
        of it received from rank k-1."""
        j, idx, a_old, p = ep.pending[s]
        z = self.activations.recv(j, len(idx)).float()  # may alias the slot: it is re-posted only below
        if self.method == "penalty":
            a_new = penalty_update(a_old, z, p, ep.beta, self.eta)
        else:
            a_new, m_new = al_update(a_old, self.store.gather(idx, "m"), z, p, ep.beta, self.eta)
            self.store.scatter(idx, m_new, "m")
            ep.sums.add_mult(m_new.flatten(1).norm(dim=1).sum())
            ep.sums.add_nonfinite(m_new)
        self.store.scatter(idx, a_new)
        ep.sums.add_nonfinite(a_new)
        ep.sums.add_residual(torch.linalg.vector_norm((z - a_old).flatten(1), dim=1).sum(), len(idx))
        ep.pending[s] = None
        if j + self.window < len(ep.batches):
            self.activations.post(j + self.window, len(ep.batches[j + self.window]))

    def probe_gradient(self) -> list:
        """Collective over the pipeline: the gradient this stage would take now for the probe batch
        (the epoch's last batch) with the auxiliary inputs and targets the coupling holds for it."""
        idx, beta = self.probe["idx"][0], self.probe["beta"]
        n = len(idx)
        target = None
        if not self.last:
            target = torch.empty((n,) + self.filter.coarse_shape(self.out_shape), device=self.device)
            req = self.comm.irecv(target, self.next, tag=32003, key="probe-t")
        if not self.first:
            self.comm.isend(self.targets_for(idx, beta).contiguous(), self.prev, tag=32003, key="probe-ts").wait()
        x = self.data.train_batch(idx)[0] if self.first else self.filter.up(self.store.gather(idx))
        saved = [b.clone() for b in self.model.buffers()]
        u = self.model(x, self.start, self.end)
        if self.last:
            loss = F.cross_entropy(u, self.data.train_y[idx.to(self.device)])
        else:
            req.wait()
            loss = F.mse_loss(self.filter.down(u), target, reduction="sum") * (0.5 * beta / n)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        for b, v in zip(self.model.buffers(), saved):
            b.copy_(v)
        return [g if g is not None else torch.zeros_like(q) for g, q in zip(grads, self.params)]

    def bytes_per_epoch(self, samples: int, element_size: int) -> int:
        """The formula of ALGORITHM.md s.4 for what this rank sends in an epoch."""
        out = 0
        if not self.last:
            out += samples * self.boundary_numel("out") * element_size   # D(u) forward
        if not self.first:
            out += samples * self.boundary_numel("in") * element_size    # targets backward
        return out


@dataclass
class _Epoch:
    """One epoch's working state on one rank."""
    epoch: int
    lr_fn: object
    beta: float
    batches: list
    sums: EpochSums
    pending: list  # per slot: (batch j, idx, a_old, p) awaiting D(u_{k-1}) of batch j
