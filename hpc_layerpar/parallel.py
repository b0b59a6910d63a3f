"""The parallel phase with epoch coupling (ALGORITHM.md s.4b, the v1 rule kept for comparison:
`parallel.coupling=epoch`), one epoch per call.

Rank k owns stage k. Per batch j it sends D(u) to rank k+1 and the targets of batch j+W to rank
k-1, and receives the targets of batch j from k+1 and D(u_{k-1}) of batch j from k-1; all of it
posted W batches ahead. Targets only ever hold values of earlier epochs (a sample is in one batch
per epoch, and its auxiliary variable is updated after its targets went out), so the result does
not depend on timing: it equals the single-process simulation in tests/simulate.py."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .auxstore import DTYPES, AuxStore, al_update, penalty_update
from .buckets import GradBucket, sync_device
from .data import epoch_batches, replica_batches
from .filters import DSFilter
from .stages import stage_params
from .stats import FIRST_BAD_NONE, PhaseStats

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
        self.filter = DSFilter(pcfg.ds)
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

    # ---- helpers -------------------------------------------------------------------------
    def _slots(self, shape):
        return [torch.empty((self.sub_batch,) + tuple(shape), dtype=self.msg_dtype, device=self.device)
                for _ in range(self.window)]

    def batches(self, epoch: int) -> list:
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
        shape = self.in_shape if which == "in" else self.out_shape
        c, h, w = self.filter.coarse_shape(shape)
        return c * h * w

    # ---- one epoch -----------------------------------------------------------------------
    def train_epoch(self, epoch: int, lr_fn, beta: float) -> PhaseStats:  # noqa: C901
        model, comm, W = self.model, self.comm, self.window
        model.train()
        for p in model.parameters():  # only this stage's parameters get gradients and steps
            p.grad = None
        if self.bucket is not None:
            self.bucket.attach()
        batches = self.batches(epoch)
        nb = len(batches)
        t_epoch = time.perf_counter()
        comm_before = comm.counters.comm_seconds

        tgt_buf = self._slots(self.filter.coarse_shape(self.out_shape)) if not self.last else None
        zsend_buf = self._slots(self.filter.coarse_shape(self.out_shape)) if not self.last else None
        zrecv_buf = self._slots(self.store.shape) if not self.first else None
        tsend_buf = self._slots(self.store.shape) if not self.first else None
        tgt_req, zsend_req, zrecv_req, tsend_req = ([None] * W for _ in range(4))
        pending = [None] * W  # per slot: (batch j, idx, a_old, p) awaiting D(u_{k-1}) of batch j
        # Epoch sums stay on the device (float64) and are read once at the end: a float() per batch
        # would synchronise a GPU every step and undo the overlap the windowed messages buy.
        LOCAL, CE, CORRECT, RES, MULT, BAD_AUX = range(6)
        acc = torch.zeros(6, dtype=torch.float64, device=self.device)
        first_bad = torch.full((), FIRST_BAD_NONE, dtype=torch.int64, device=self.device)
        counts = {"n": 0, "nupd": 0}

        def post_target_recv(j):
            s, n = j % W, len(batches[j])
            tgt_req[s] = comm.irecv(tgt_buf[s][:n], self.next, tag=j, key=("tgt", s))

        def post_z_recv(j):
            s, n = j % W, len(batches[j])
            zrecv_req[s] = comm.irecv(zrecv_buf[s][:n], self.prev, tag=j, key=("z", s))

        def send_targets(j):
            s, n = j % W, len(batches[j])
            if tsend_req[s] is not None:
                tsend_req[s].wait()
            tsend_buf[s][:n].copy_(self.targets_for(batches[j], beta))
            tsend_req[s] = comm.isend(tsend_buf[s][:n], self.prev, tag=j, key=("tsend", s))

        def complete_update(s):
            j, idx, a_old, p = pending[s]
            zrecv_req[s].wait()
            z = zrecv_buf[s][:len(idx)].float()  # may alias the slot: it is re-posted only below
            if self.method == "penalty":
                a_new = penalty_update(a_old, z, p, beta, self.eta)
            else:
                a_new, m_new = al_update(a_old, self.store.gather(idx, "m"), z, p, beta, self.eta)
                self.store.scatter(idx, m_new, "m")
                acc[MULT] += m_new.flatten(1).norm(dim=1).sum()
                acc[BAD_AUX] += (~torch.isfinite(m_new)).sum()
            self.store.scatter(idx, a_new)
            acc[BAD_AUX] += (~torch.isfinite(a_new)).sum()
            acc[RES] += torch.linalg.vector_norm((z - a_old).flatten(1), dim=1).sum()
            counts["nupd"] += len(idx)
            pending[s] = None
            if j + W < nb:
                post_z_recv(j + W)

        for j in range(min(W, nb)):
            if not self.last:
                post_target_recv(j)
            if not self.first:
                post_z_recv(j)
                send_targets(j)

        for j, idx in enumerate(batches):
            s, n = j % W, len(idx)
            lr = lr_fn(epoch + j / nb)
            for g in self.opt.param_groups:
                g["lr"] = lr
            if not self.first and pending[s] is not None:
                complete_update(s)  # frees the slot for batch j (at most W batches in flight)
            if self.first:
                x = self.data.train_batch(idx)[0]  # no augmentation: a_k[i] is tied to sample i
                a = None
            else:
                a = self.store.gather(idx).requires_grad_(True)
                x = self.filter.up(a)
            target = None
            if not self.last:
                tgt_req[s].wait()
                # A real copy (.float() of a float32 tensor would alias): the slot is re-posted now.
                target = tgt_buf[s][:n].to(torch.float32, copy=True)
                if j + W < nb:
                    post_target_recv(j + W)
            u = model(x, self.start, self.end)
            if self.last:
                y = self.data.train_y[idx.to(self.device)]
                loss = F.cross_entropy(u, y)
                acc[CE] += loss.detach() * n
                acc[CORRECT] += (u.detach().argmax(1) == y).sum()
            else:
                d = self.filter.down(u)
                loss = F.mse_loss(d, target, reduction="sum") * (0.5 * beta / n)
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
                self.probe = {"idx": [idx], "beta": beta}
            self.opt.step()
            first_bad = torch.where(torch.isfinite(loss.detach()), first_bad, torch.clamp(first_bad, max=j))
            acc[LOCAL] += loss.detach() * n
            counts["n"] += n
            if not self.last:
                if zsend_req[s] is not None:
                    zsend_req[s].wait()
                zsend_buf[s][:n].copy_(d.detach())
                zsend_req[s] = comm.isend(zsend_buf[s][:n], self.next, tag=j, key=("zsend", s))
            if not self.first:
                pending[s] = (j, idx, a.detach(), a.grad * n)  # per-sample adjoint p = |B| dL/da
                if j + W < nb:
                    send_targets(j + W)
                # Drive MPI progress and apply updates whose inputs have arrived, oldest first.
                for i in range(j - W + 1, j + 1):
                    si = i % W
                    if i >= 0 and pending[si] is not None and pending[si][0] == i:
                        if not zrecv_req[si].test():
                            break
                        complete_update(si)

        if not self.first:
            for i in range(max(nb - W, 0), nb):
                if pending[i % W] is not None:
                    complete_update(i % W)
        for req in (zsend_req + tsend_req):
            if req is not None:
                req.wait()
        sync_device(self.device)
        elapsed = time.perf_counter() - t_epoch
        nan = float("nan")
        sums = acc.tolist()  # the one host read of the epoch
        ns, nu = max(counts["n"], 1), max(counts["nupd"], 1)
        bad = int(first_bad)
        return PhaseStats(
            local_loss=sums[LOCAL] / ns,
            train_loss=sums[CE] / ns if self.last else nan,
            train_acc=sums[CORRECT] / ns if self.last else nan,
            residual=sums[RES] / nu if not self.first else nan,
            multiplier_norm=sums[MULT] / nu if (self.method == "al" and not self.first) else nan,
            steps=nb, samples=counts["n"],
            compute_seconds=elapsed - (comm.counters.comm_seconds - comm_before),
            first_bad_step=None if bad >= FIRST_BAD_NONE else bad,
            extra={"nonfinite_aux": int(sums[BAD_AUX])})

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
