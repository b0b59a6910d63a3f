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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .auxstore import DTYPES, AuxStore
from .buckets import GradBucket, sync_device
from .channels import AHEAD, Channel
from .config import micro_batches
from .data import epoch_batches, replica_batches
from .filters import DSFilter
from .graphs import GraphCache, SGDUpdate
from .models import smallest_map
from .stagegraphs import StageGraphs, _NoRunningStats
from .stages import stage_params
from .stats import EpochSums, PhaseStats


class PipelineEngine(StageGraphs):
    """One parallel phase (pipeline coupling) on one rank of the pipeline communicator `comm`."""

    def __init__(self, model, optimizer, comm, data, ranges, pcfg, *, method: str, batch_size: int,
                 drop_last: bool, seed: int, augment=None, replica_comm=None, shard=None, graphs: str = "off"):
        """augment: the serial phase's augmentation, applied by rank 0 when
        parallel.augment is on (the auxiliary variables live only while a micro-batch is in flight,
        so nothing ties them to the un-augmented sample). graphs: "cuda" replays each stage step
        (F, B and the optimizer step) as a CUDA graph, "emulate" runs that path uncaptured (tests);
        the AL method stays eager (its multipliers are gathered by sample id from a store)."""
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
        self.filter = DSFilter.of(pcfg)
        self.M = micro_batches(pcfg, batch_size, smallest_map(model), self.K)
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
        self.graphs = GraphCache(graphs if method == "penalty" else "off")
        # the graph path keeps gradients in a bucket always: captured kernels need fixed addresses
        self.bucket = GradBucket(self.params, self.device) if self.replicas > 1 or self.graphs.enabled else None
        self.sgd = SGDUpdate(optimizer, self.params, self.device) if self.graphs.enabled else None
        self.beta_t = torch.zeros((), dtype=torch.float32, device=self.device)  # graph path: 0.5 beta / N
        self.sums = EpochSums(self.device)  # graph path: accumulated inside the captured B steps
        # AL: per-sample multipliers of the outgoing boundary live here, on the rank they pull.
        self.store = None
        if method == "al" and not self.last:
            self.store = AuxStore(data.n_train, self.out_shape, dtype=pcfg.aux_dtype, device=self.device,
                                  location=pcfg.aux_location, multipliers=False, ids=shard)
        self.probe = None  # filled for the epoch's last global batch: see diagnostics.py
        # One channel per direction, allocated once per phase; null sides at the chain's ends.
        mk = {"rows": self.micro, "dtype": self.msg_dtype, "device": self.device, "slots": AHEAD + 2}
        self.activations = Channel(comm, "activations", recv_from=None if self.first else self.prev,
                                   send_to=None if self.last else self.next, recv_shape=self.in_shape,
                                   send_shape=self.out_shape or (), **mk)
        self.adjoints = Channel(comm, "adjoints", recv_from=None if self.last else self.next,
                                send_to=None if self.first else self.prev, recv_shape=self.out_shape or (),
                                send_shape=self.in_shape, **mk)

    # ---- helpers -------------------------------------------------------------------------
    def micro_batches(self, epoch: int) -> list:
        """The epoch's micro-batches of sample ids, M per step of this replica's (sub-)batches, in order;
        empty ones are dropped."""
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
                if self.last:
                    loss = F.cross_entropy(u, self.data.train_y[idx.to(self.device)])
                else:
                    m = self.store.gather(idx) if self.store is not None else None
                    loss, _ = self._objective(self.filter.down(u), pr["p"][i], pr["anchor"][i], pr["beta"], m)
                grads = torch.autograd.grad(loss / mb, self.params, allow_unused=True)
                for t, g in zip(total, grads):
                    if g is not None:
                        t += g
        return total

    # ---- one epoch -----------------------------------------------------------------------
    def train_epoch(self, epoch: int, lr_fn, beta: float) -> PhaseStats:
        """One epoch of ticks. beta: the penalty weight of this rank's outgoing boundary this epoch
        (after the schedule and the curvature guard)."""
        self.model.train()
        for p in self.model.parameters():
            p.grad = None
        if self.bucket is not None:
            self.bucket.attach()
            self.bucket.zero()
        mbs = self.micro_batches(epoch)
        nm = len(mbs)
        ep = _Epoch(epoch=epoch, lr_fn=lr_fn, beta=beta, mbs=mbs, nb=nm // self.M, sums=EpochSums(self.device),
                    last_group=set(range(max(nm - self.M, 0), nm)))  # the probe: the last global batch
        if self.graphs.enabled:
            # the epoch sums live in the captured B steps: the same tensors every epoch
            self.sums.reset()
            ep.sums = self.sums
            self.graphs.validate(self._state())
            self.beta_t.fill_(0.5 * beta / max(self.out_numel, 1))  # _objective's coefficient
            ep.dev = self._epoch_inputs(epoch, mbs)
        t_epoch = time.perf_counter()
        comm_before = self.comm.counters.comm_seconds
        for t in range(nm + 2 * (self.K - 1)):
            jf, jb = t - self.k, t - 2 * (self.K - 1) + self.k  # the last rank: jb == jf
            fwd = self._forward(ep, jf) if 0 <= jf < nm else None
            if 0 <= jb < nm:
                self._backward(ep, jb, fwd)
        self.activations.drain()
        self.adjoints.drain()
        sync_device(self.device)
        elapsed = time.perf_counter() - t_epoch
        self.probe = ep.probe if nm else None
        return ep.sums.stats(first=self.first, last=self.last, al=self.store is not None, steps=ep.updates,
                             compute_seconds=elapsed - (self.comm.counters.comm_seconds - comm_before))

    def _forward(self, ep: "_Epoch", j: int):
        """F(j): the auxiliary variable of micro-batch j arrives (rank 0: the images); the stage's
        output goes on to the next rank. The last rank returns its input for B, which follows at once."""
        idx = ep.mbs[j]
        n = len(idx)
        graphed = self.graphs.enabled
        a = x = None
        if self.first:
            if not graphed or j in ep.last_group:
                x = self._images(ep.epoch, j, idx)
            if j in ep.last_group:
                ep.probe["x"].append(x)
        else:
            for i in range(j, min(j + AHEAD + 1, len(ep.mbs))):
                self.activations.post(i, len(ep.mbs[i]))
            a = self.activations.recv(j, n).to(torch.float32, copy=True)
            if not graphed:
                x = self.filter.up(a)
            if j in ep.last_group:
                ep.probe["a"].append(a)
        if j in ep.last_group:
            ep.probe["idx"].append(idx)
        if self.last:
            return a, x
        if graphed:
            d = self._replay("F", ep, j, n, a=a)[0]
        else:
            with torch.no_grad():
                d = self.filter.down(self.model(x, self.start, self.end))
        self.activations.send(j, d)
        # the anchor of the penalty is the value the downstream rank received (its wire precision);
        # a replay's output is overwritten by the next one: keep a copy
        if self.msg_dtype != torch.float32:
            anchor = d.to(self.msg_dtype).float()
        else:
            anchor = d.clone() if graphed else d
        ep.inflight[j] = (a, anchor)
        return None

    def _backward(self, ep: "_Epoch", j: int, fwd) -> None:
        """B(j): the local objective of micro-batch j, back-propagated; the adjoint goes upstream."""
        idx = ep.mbs[j]
        n = len(idx)
        if self.graphs.enabled:
            return self._backward_graphed(ep, j, n, fwd)
        if self.last:
            a, x = fwd
        else:
            a, anchor = ep.inflight.pop(j)
            x = None if a is not None else self._images(ep.epoch, j, idx)
        leaf = None
        if a is not None:
            leaf = a.detach().requires_grad_(True)
            x = self.filter.up(leaf)
        if self.last:
            u = self.model(x, self.start, self.end)
            y = self.data.train_y[idx.to(self.device)]
            loss = F.cross_entropy(u, y)
            ep.sums.add_ce(loss.detach(), (u.detach().argmax(1) == y).sum(), n)
        else:
            for i in range(j, min(j + AHEAD + 1, len(ep.mbs))):
                self.adjoints.post(i, len(ep.mbs[i]))
            p = self.adjoints.recv(j, n).to(torch.float32, copy=True)
            if j in ep.last_group:
                ep.probe["p"].append(p)
                ep.probe["anchor"].append(anchor)
            with _NoRunningStats(self.stage_modules):
                d = self.filter.down(self.model(x, self.start, self.end))
            loss = self._local_loss(d, p, anchor, idx, ep.beta, ep.sums)
        (loss / self.M).backward()  # the step averages M micro-batches: a global batch's mean
        ep.sums.add_local(loss.detach(), n, j)
        if leaf is not None:
            # the per-sample adjoint p = |mu| dL/da of this micro-batch's own objective L: undo the
            # 1/M of the backward, or every boundary would scale the gradients upstream by 1/M
            self.adjoints.send(j, leaf.grad * (n * self.M))
        if (j + 1) % self.M == 0:
            self._step(ep)

    def _local_loss(self, d, p, anchor, idx, beta: float, sums):
        """(1/n) sum_i <p_i, d_i> + (beta/2N)||d_i - a_i||^2 (+ <m_i, d_i - a_i> and the multiplier
        step for AL): the penalty towards the prox-linear target a - (N/beta) p, N = numel(a_i)."""
        n = len(idx)
        m = self.store.gather(idx) if self.store is not None else None
        loss, diff = self._objective(d, p, anchor, beta, m)
        if m is not None:
            # method of multipliers on D(u') = a, damped by rho; uses this step's violation
            m_new = m + (self.al_rho * beta / self.out_numel) * diff.detach()
            self.store.scatter(idx, m_new)
            sums.add_mult(m_new.flatten(1).norm(dim=1).sum())
            sums.add_nonfinite(m_new)
        sums.add_residual(diff.detach().flatten(1).norm(dim=1).sum(), n)
        return loss

    def _objective(self, d, p, anchor, beta, m):
        """(loss, d - anchor): the stage's local objective on a micro-batch (ALGORITHM.md s.3), shared by
        training and the diagnostics probe. beta: the penalty weight (float), or on the graph path the
        device scalar holding its coefficient 0.5 beta / N."""
        n = len(d)
        diff = d - anchor
        loss = (p * d).sum() / n
        if torch.is_tensor(beta):
            # the graph path: beta's coefficient 0.5 beta / N as a device scalar (filled per epoch from
            # the same host value, so it rounds as the eager path does); beta = 0 adds nothing, as there
            loss = loss + torch.where(beta > 0, beta * diff.pow(2).sum(), 0.0) / n
        elif beta > 0:
            loss = loss + (0.5 * beta / self.out_numel) * diff.pow(2).sum() / n
        if m is not None:
            loss = loss + (m * diff).sum() / n
        return loss, diff

    def _step(self, ep: "_Epoch") -> None:
        """One optimizer step of the stage: M micro-batches, a global batch (averaged over replicas)."""
        lr = ep.lr_fn(ep.epoch + ep.updates / max(ep.nb, 1))
        if self.graphs.enabled:
            self.sgd.set_lr(lr)
            if self.replicas > 1:
                self.replica_comm.allreduce_(self.bucket.flat, key="stage-grads")
            self._replay("S", ep, None, 0)
            ep.updates += 1
            return
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.bucket is not None:
            self.replica_comm.allreduce_(self.bucket.flat, key="stage-grads")
            self.bucket.flat /= self.replicas
        self.opt.step()
        ep.updates += 1
        if self.bucket is None:
            self.opt.zero_grad(set_to_none=True)
        else:
            self.bucket.zero()


@dataclass
class _Epoch:
    """One epoch's working state on one rank."""
    epoch: int
    lr_fn: object
    beta: float
    mbs: list
    nb: int
    sums: EpochSums
    last_group: set
    updates: int = 0
    inflight: dict = field(default_factory=dict)  # j -> (auxiliary input or None, anchor)
    dev: tuple = ()  # graph path: the epoch's ids, micro-batch offsets and draws on the device
    probe: dict = field(default_factory=lambda: {"a": [], "idx": [], "x": [], "p": [], "anchor": []})

    def __post_init__(self):
        self.probe["beta"] = self.beta
