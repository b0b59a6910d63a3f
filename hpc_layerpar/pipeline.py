"""The parallel phase with pipeline coupling (ALGORITHM.md s.4, the default): every rank steps its own
stage on its own local objective at once, the auxiliary variables of a micro-batch are set by the
forward message and the penalty targets of its upstream rank follow a few ticks later.

Tick t, rank k: F(t - k) then B(t - 2(K-1) + k).
  F(j): the auxiliary variable a = D(u_{k-1}) of micro-batch j arrives from rank k-1 (rank 0 reads
        the images); u = Phi_k(U(a)) without gradients; rank k < K-1 sends D(u) on.
  B(j): rank K-1 does it with F (cross-entropy); rank k < K-1 receives the adjoint p of micro-batch j
        from rank k+1, recomputes u' = Phi_k(U(a)) at its current parameters and back-propagates its
        local loss (1/|mu|) sum_i <p_i, D(u'_i)> + (beta/2n) ||D(u'_i) - a_i||^2  (+ <m_i, D(u'_i) - a_i>
        for AL), i.e. the penalty towards the prox-linear target a - (n/beta) p; rank k >= 1 sends its
        own adjoint p = |mu| dL/da to rank k-1.
  Every M = parallel.micro_batches B's, the stage takes one optimizer step (a global batch).

All messages are non-blocking; a rank only waits for the previous tick of its neighbours, so the
schedule is a pure function of (seed, epoch) and the result equals the one-process simulation."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .auxstore import DTYPES, AuxStore
from .config import micro_batches
from .models import smallest_map
from .data import epoch_batches, replica_batches
from .filters import DSFilter
from .serial import GradBucket, sync_device
from .stats import EpochSums, PhaseStats


# MPI guarantees only tags below 32768; receives are posted a few micro-batches ahead and messages
# between two ranks do not overtake each other, so reusing tags modulo this cannot mismatch.
TAGS = 32768


def stage_params(model, start, end):
    return [p for el in model.elements[start:end] for p in el.parameters()]


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


class PipelineEngine:
    """One parallel phase (pipeline coupling) on one rank of the pipeline communicator `comm`."""

    def __init__(self, model, optimizer, comm, data, ranges, pcfg, *, method: str, batch_size: int,
                 drop_last: bool, seed: int, augment=None, replica_comm=None, shard=None):
        """augment: the serial phase's augmentation, applied by rank 0 when
        parallel.augment is on (the auxiliary variables live only while a micro-batch is in flight,
        so nothing ties them to the un-augmented sample)."""
        if method not in ("penalty", "al"):
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
        self.M = micro_batches(pcfg, batch_size, smallest_map(model))
        self.msg_dtype = DTYPES[pcfg.message_dtype]
        self.device = data.device
        self.replica_comm, self.shard = replica_comm, shard
        self.replicas = 1 if replica_comm is None else replica_comm.size
        self.sub_batch = batch_size // self.replicas
        self.micro = self.sub_batch // self.M
        self.augment = augment if pcfg.augment else None
        self.in_shape = self.filter.coarse_shape(model.shapes[self.start])
        self.out_shape = None if self.last else self.filter.coarse_shape(model.shapes[self.end])
        self.out_numel = 0 if self.last else int(torch.Size(self.out_shape).numel())
        self.al_rho = pcfg.al_rho
        self.params = stage_params(model, self.start, self.end)
        self.stage_modules = list(model.elements[self.start:self.end].modules())
        self.bucket = GradBucket(self.params, self.device) if self.replicas > 1 else None
        # AL: per-sample multipliers of the outgoing boundary live here, on the rank they pull.
        self.store = None
        if method == "al" and not self.last:
            self.store = AuxStore(data.n_train, self.out_shape, dtype=pcfg.aux_dtype, device=self.device,
                                  location=pcfg.aux_location, multipliers=False, ids=shard)
        self.probe = None  # filled for the epoch's last global batch: see diagnostics.py

    # ---- helpers -------------------------------------------------------------------------
    def micro_batches(self, epoch: int) -> list:
        if self.shard is None:
            big = epoch_batches(self.data.n_train, self.batch_size, self.seed, epoch, self.drop_last)
        else:
            steps = (self.data.n_train // self.replicas) // self.sub_batch  # the smallest shard decides
            big = replica_batches(self.shard, self.sub_batch, steps, self.seed, epoch, self.replica_comm.rank)
        return [b[i * self.micro:(i + 1) * self.micro] for b in big for i in range(self.M)
                if len(b[i * self.micro:(i + 1) * self.micro])]

    def _images(self, epoch, j, idx):
        x = self.data.train_batch(idx)[0]
        if self.augment is not None:
            # Draw for the whole global batch as the serial phase does, then take this micro-batch's
            # rows: the same augmentation at any M and any rank count.
            g, i = divmod(j, self.M)
            offsets, flips = self.augment.draws(epoch, g, self.sub_batch)
            rows = slice(i * self.micro, i * self.micro + len(idx))
            x = self.augment.apply(x, offsets[rows], flips[rows])
        return x

    def bytes_per_epoch(self, samples: int, element_size: int) -> int:
        """What this rank sends in an epoch: D(u) forward and the adjoint backward, one row each per
        sample and boundary (ALGORITHM.md s.4)."""
        out = 0
        if not self.last:
            out += samples * self.out_numel * element_size
        if not self.first:
            out += samples * int(torch.Size(self.in_shape).numel()) * element_size
        return out

    def probe_gradient(self) -> list:
        """The gradient this stage would take now (current parameters) for the probe batch with the
        coupling information it received for it: its auxiliary inputs, the adjoints and anchors of
        its outgoing boundary (and the multipliers). Diagnostics only: no step, BatchNorm's running
        statistics untouched."""
        pr, model = self.probe, self.model
        total = [torch.zeros_like(q) for q in self.params]
        mb = len(pr["idx"])
        with _NoRunningStats(self.stage_modules):
            for i, idx in enumerate(pr["idx"]):
                x = pr["x"][i] if self.first else self.filter.up(pr["a"][i])
                u = model(x, self.start, self.end)
                n = len(idx)
                if self.last:
                    loss = F.cross_entropy(u, self.data.train_y[idx.to(self.device)])
                else:
                    d = self.filter.down(u)
                    diff = d - pr["anchor"][i]
                    loss = (pr["p"][i] * d).sum() / n
                    if pr["beta"] > 0:
                        loss = loss + (0.5 * pr["beta"] / self.out_numel) * diff.pow(2).sum() / n
                    if self.store is not None:
                        loss = loss + (self.store.gather(idx) * diff).sum() / n
                grads = torch.autograd.grad(loss / mb, self.params, allow_unused=True)
                for t, g in zip(total, grads):
                    if g is not None:
                        t += g
        return total

    # ---- one epoch -----------------------------------------------------------------------
    def train_epoch(self, epoch: int, lr_fn, beta: float) -> PhaseStats:  # noqa: C901
        """beta: the penalty weight of this rank's outgoing boundary this epoch (after the schedule
        and the curvature guard)."""
        model, comm, K, k, M = self.model, self.comm, self.K, self.k, self.M
        model.train()
        for p in model.parameters():
            p.grad = None
        if self.bucket is not None:
            self.bucket.attach()
            self.bucket.zero()
        mbs = self.micro_batches(epoch)
        nm = len(mbs)
        nb = nm // M  # global batches (drop_last keeps every global batch whole)
        t_epoch = time.perf_counter()
        comm_before = comm.counters.comm_seconds
        sums = EpochSums(self.device)
        inflight = {}        # j -> (input a or None, z sent or None)
        z_req, p_req = {}, {}          # receives posted ahead: j -> (buffer, Pending)
        zs_req, ps_req = {}, {}        # sends in flight: j -> Pending (their buffers stay alive in it)
        ahead = 2                      # micro-batches of receives posted ahead
        last_group = set(range(max(nm - M, 0), nm))  # the probe: the epoch's last global batch
        probe = {"a": [], "idx": [], "x": [], "p": [], "anchor": [], "beta": beta} if nm else None
        updates = 0

        def post_z(j):
            if not self.first and j < nm and j not in z_req:
                buf = torch.empty((len(mbs[j]),) + self.in_shape, dtype=self.msg_dtype, device=self.device)
                z_req[j] = (buf, comm.irecv(buf, self.prev, tag=j % TAGS, key=("z", j % (ahead + 1))))

        def post_p(j):
            if not self.last and 0 <= j < nm and j not in p_req:
                buf = torch.empty((len(mbs[j]),) + self.out_shape, dtype=self.msg_dtype, device=self.device)
                p_req[j] = (buf, comm.irecv(buf, self.next, tag=j % TAGS, key=("p", j % (ahead + 1))))

        def retire(reqs, upto):
            for j in [j for j in reqs if j <= upto]:
                reqs.pop(j).wait()

        def forward(j):
            idx = mbs[j]
            if self.first:
                a = None
                x = self._images(epoch, j, idx)
                if j in last_group:
                    probe["x"].append(x)
            else:
                for i in range(j, j + ahead + 1):
                    post_z(i)
                buf, req = z_req.pop(j)
                req.wait()
                a = buf.to(torch.float32, copy=True)  # the auxiliary variable of this micro-batch
                x = self.filter.up(a)
                if j in last_group:
                    probe["a"].append(a)
            if j in last_group:
                probe["idx"].append(idx)
            if self.last:
                return a, x
            with torch.no_grad():
                d = self.filter.down(model(x, self.start, self.end))
            z = d.to(self.msg_dtype)
            zs_req[j] = comm.isend(z.contiguous(), self.next, tag=j % TAGS, key=("zs", j % (ahead + 2)))
            retire(zs_req, j - ahead - 1)
            # the anchor of the penalty is the value the downstream rank received
            inflight[j] = (a, z.to(torch.float32) if z.dtype != torch.float32 else d)
            return None

        def backward(j, fwd=None):
            nonlocal updates
            idx = mbs[j]
            n = len(idx)
            if self.last:
                a, x = fwd
            else:
                a, anchor = inflight.pop(j)
                x = None if a is not None else self._images(epoch, j, idx)
            leaf = None
            if a is not None:
                leaf = a.detach().requires_grad_(True)
                x = self.filter.up(leaf)
            if self.last:
                u = model(x, self.start, self.end)
                y = self.data.train_y[idx.to(self.device)]
                loss = F.cross_entropy(u, y)
                sums.add_ce(loss.detach(), (u.detach().argmax(1) == y).sum(), n)
            else:
                for i in range(j, j + ahead + 1):
                    post_p(i)
                buf, req = p_req.pop(j)
                req.wait()
                p = buf.to(torch.float32, copy=True)
                if j in last_group:
                    probe["p"].append(p)
                    probe["anchor"].append(anchor)
                with _NoRunningStats(self.stage_modules):
                    u = model(x, self.start, self.end)
                d = self.filter.down(u)
                diff = d - anchor
                loss = (p * d).sum() / n
                if beta > 0:
                    loss = loss + (0.5 * beta / self.out_numel) * diff.pow(2).sum() / n
                if self.store is not None:
                    m = self.store.gather(idx)
                    loss = loss + (m * diff).sum() / n
                    # method of multipliers on D(u') = a, damped by rho; uses this step's violation
                    m_new = m + (self.al_rho * beta / self.out_numel) * diff.detach()
                    self.store.scatter(idx, m_new)
                    sums.add_mult(m_new.flatten(1).norm(dim=1).sum())
                    sums.add_nonfinite(m_new)
                sums.add_residual(diff.detach().flatten(1).norm(dim=1).sum(), n)
            (loss / M).backward()
            sums.add_local(loss.detach(), n, j)
            if leaf is not None:
                adj = (leaf.grad * n).to(self.msg_dtype).contiguous()
                ps_req[j] = comm.isend(adj, self.prev, tag=j % TAGS, key=("ps", j % (ahead + 2)))
                retire(ps_req, j - ahead - 1)
            if (j + 1) % M == 0:
                lr = lr_fn(epoch + updates / max(nb, 1))
                for g in self.opt.param_groups:
                    g["lr"] = lr
                if self.bucket is not None:
                    self.replica_comm.allreduce_(self.bucket.flat, key="stage-grads")
                    self.bucket.flat /= self.replicas
                self.opt.step()
                updates += 1
                if self.bucket is None:
                    self.opt.zero_grad(set_to_none=True)
                else:
                    self.bucket.zero()

        lag = 2 * (K - 1 - k)
        for t in range(nm + 2 * (K - 1)):
            jf, jb = t - k, t - 2 * (K - 1) + k
            fwd = forward(jf) if 0 <= jf < nm else None
            if 0 <= jb < nm:
                backward(jb, fwd if lag == 0 else None)
        for reqs in (zs_req, ps_req):
            retire(reqs, nm)
        sync_device(self.device)
        elapsed = time.perf_counter() - t_epoch
        self.probe = probe
        return sums.stats(
            first=self.first, last=self.last, al=self.store is not None, steps=updates,
            compute_seconds=elapsed - (comm.counters.comm_seconds - comm_before))
