"""The parallel phase with pipeline coupling (ALGORITHM.md s.4, the default): every rank steps its own
stage on its own local objective at once, the auxiliary variables of a micro-batch are set by the
forward message and the penalty targets of its upstream rank follow a few ticks later.

The engine walks the tick plan of pipeline_plan.py (what each rank does at each tick: receive, F,
send, receive, B, send, step) and has no tick arithmetic of its own; the math of F, B and the step
is pipeline_step.StageStep's, run eagerly here or replayed as captured graphs (pipeline_graphs.py).

All messages are non-blocking; a rank only waits for the previous tick of its neighbours, so the
result is a pure function of (seed, epoch) and equals the one-process simulation."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import guard as G
from . import watchdog
from .auxstore import DTYPES, AuxStore
from .buckets import sync_device
from .channels import AHEAD, Channel
from .data import epoch_batches, replica_batches
from .filters import DSFilter
from .graphs import GraphCache
from .models import smallest_map
from .pipeline_graphs import PipelineGraphs
from .pipeline_plan import ACTIVATIONS, decided_at, rank_plan, reuses, sent_before
from .pipeline_state import freeze, thaw
from .pipeline_step import MicroBatch, NoRunningStats, StageStep
from .schedule import micro_batches
from .stages import Stage
from .stats import FIRST_BAD_NONE, EpochSums, PhaseStats
from .stop import requested as stop_requested


class PipelineEngine:
    """One parallel phase (pipeline coupling) on one rank of the pipeline communicator `comm`."""

    def __init__(self, model, optimizer, comm, data, ranges, pcfg, *, method: str, batch_size: int,
                 drop_last: bool, seed: int, augment=None, replica_comm=None, shard=None, graphs: str = "off",
                 check_every: int = 0):
        """augment: the serial phase's augmentation, applied by rank 0 when parallel.augment is on (the
        auxiliary variables live only while a micro-batch is in flight, so nothing ties them to the
        un-augmented sample). With R > 1 replicas, replica_comm joins the ranks of the same stage and
        `shard` holds this replica's sample ids. graphs: "cuda" replays each stage step as a CUDA
        graph, "emulate" runs that path uncaptured (tests); the AL method stays eager (its
        multipliers are gathered by sample id from a store). check_every: optimizer steps between the
        ranks' in-epoch checks for non-finite values (0: none; the epoch's end is checked by the run)."""
        if method not in ("penalty", "al"):
            raise ValueError(f"unknown parallel method {method!r}")
        if len(ranges) != comm.size:
            raise ValueError(f"{len(ranges)} stages for {comm.size} ranks")
        self.comm, self.data, self.method = comm, data, method
        self.batch_size, self.drop_last, self.seed = batch_size, drop_last, seed
        self.device = data.device
        self.replica_comm, self.shard = replica_comm, shard
        replicas = 1 if replica_comm is None else replica_comm.size
        self.stage = Stage(model, ranges, comm.rank, DSFilter.of(pcfg), optimizer, self.device, replicas)
        self.M = micro_batches(pcfg, batch_size, smallest_map(model), comm.size)
        self.check_ticks = check_every * self.M
        self.schedule = pcfg.schedule
        self.sub_batch = batch_size // replicas
        self.micro = self.sub_batch // self.M
        self.msg_dtype = DTYPES[pcfg.message_dtype]
        self.al_rho = pcfg.al_rho
        self.augment = augment if pcfg.augment else None
        self._drawn = (None, None, None, None)  # (epoch, global batch, offsets, flips) last drawn
        self.sums = EpochSums(self.device)  # the same tensors every epoch: captured B steps add to them
        self.step = StageStep(self.stage, data, self.augment, self.M, self.sums)
        self.graphs = PipelineGraphs(self.step, GraphCache(graphs if method == "penalty" else "off"), self.device)
        # B goes through F's graph where no step falls between them (eager path; captured steps recompute)
        self.keep = pcfg.keep_forward and not self.graphs.enabled and not self.stage.last
        # B at the parameters F saw, also across a step (weight stashing; eager steps: config refuses graphs)
        self.stash = pcfg.stash_weights and not self.graphs.enabled and not self.stage.last
        self.kept = 0  # micro-batches of the last epoch whose B used F's graph
        # AL: per-sample multipliers of the outgoing boundary live here, on the rank they pull.
        self.store = None
        if method == "al" and not self.stage.last:
            self.store = AuxStore(data.n_train, self.stage.out_shape, dtype=pcfg.aux_dtype, device=self.device,
                                  location=pcfg.aux_location, multipliers=False, ids=shard)
        self.probe = None  # filled for the epoch's last global batch: see diagnostics.py
        self.channels = self._open_channels(comm)

    def _open_channels(self, comm) -> dict:
        """One channel per direction, allocated once per phase; null sides at the chain's ends."""
        st = self.stage
        prev, nxt = comm.neighbours()
        prev, nxt = (None if st.first else prev), (None if st.last else nxt)
        mk = {"rows": self.micro, "dtype": self.msg_dtype, "device": self.device, "slots": AHEAD + 2}
        out = st.out_shape or ()
        return {ACTIVATIONS: Channel(comm, ACTIVATIONS, recv_from=prev, send_to=nxt, recv_shape=st.in_shape,
                                     send_shape=out, **mk),
                "adjoints": Channel(comm, "adjoints", recv_from=nxt, send_to=prev, recv_shape=out,
                                    send_shape=st.in_shape, **mk)}

    # the stage's facts, as the run and the benchmarks read them
    filter = property(lambda self: self.stage.filter, doc="The DS filter pair of the stage's messages.")
    params = property(lambda self: self.stage.params, doc="The stage's parameters.")
    stage_modules = property(lambda self: self.stage.modules, doc="The stage's modules.")
    first = property(lambda self: self.stage.first, doc="Whether this is the first stage.")
    last = property(lambda self: self.stage.last, doc="Whether this is the last stage.")
    in_shape = property(lambda self: self.stage.in_shape, doc="Per-sample shape of the incoming message.")
    out_shape = property(lambda self: self.stage.out_shape, doc="Per-sample shape of the outgoing message.")

    def micro_batches(self, epoch: int) -> list:
        """The epoch's micro-batches of sample ids, M per step of this replica's (sub-)batches, in order;
        empty ones are dropped."""
        if self.shard is None:
            big = epoch_batches(self.data.n_train, self.batch_size, self.seed, epoch, self.drop_last)
        else:
            R = self.stage.replicas
            steps = (self.data.n_train // R) // self.sub_batch  # the smallest shard decides
            big = replica_batches(self.shard, self.sub_batch, steps, self.seed, epoch, self.replica_comm.rank)
        return [b[i * self.micro:(i + 1) * self.micro] for b in big for i in range(self.M)
                if len(b[i * self.micro:(i + 1) * self.micro])]

    def _scales(self, mbs: list) -> list:
        """Per micro-batch: its global batch's samples over its own (M for a full batch; a partial last
        batch of data.drop_last=false has fewer or shorter micro-batches, each weighted by its samples)."""
        sizes = [len(b) for b in mbs]
        batch = [sum(sizes[g * self.M:(g + 1) * self.M]) for g in range(-(-len(mbs) // self.M))]
        return [batch[j // self.M] / n for j, n in enumerate(sizes)]

    def draws(self, epoch: int, j: int, n: int):
        """Rank 0's augmentation of micro-batch j (n samples): the draws of its whole global batch, as the
        serial phase draws them, then this micro-batch's rows (the same images at any M and rank count);
        replica r's sub-batch takes rows r * sub_batch onwards, as a serial shard does, so replicas do
        not repeat each other's draws. None without augmentation or off rank 0."""
        if self.augment is None or not self.stage.first:
            return None
        g, i = divmod(j, self.M)
        if self._drawn[:2] != (epoch, g):  # one draw per global batch, not per micro-batch
            self._drawn = (epoch, g, *self.augment.draws(epoch, g, self.batch_size))
        offsets, flips = self._drawn[2:]
        lo = (0 if self.replica_comm is None else self.replica_comm.rank * self.sub_batch) + i * self.micro
        rows = slice(lo, lo + n)
        return offsets[rows], flips[rows]

    def bytes_per_epoch(self, samples: int, element_size: int) -> int:
        """What this rank sends in an epoch: D(u) forward and the adjoint backward, one row each per
        sample and boundary (ALGORITHM.md s.4)."""
        st = self.stage
        return samples * element_size * ((0 if st.last else st.message_numel("out"))
                                         + (0 if st.first else st.message_numel("in")))

    def probe_gradient(self) -> list:
        """The gradient this stage would take now (current parameters) for the probe batch with the
        coupling information it received for it: StageStep.objective of each of its micro-batches,
        back-propagated. Diagnostics only: no step, BatchNorm's running statistics untouched."""
        pr = self.probe
        total = [torch.zeros_like(q) for q in self.params]
        with NoRunningStats(self.stage_modules):
            for mb in pr["mbs"]:
                if self.store is not None:
                    mb.m = self.store.gather(mb.ids)
                loss = self.step.objective(mb, pr["beta"]).loss
                share = mb.scale or len(pr["mbs"])  # a micro-batch's weight: its share of the batch's samples
                grads = torch.autograd.grad(loss / share, self.params, allow_unused=True)
                for t, g in zip(total, grads):
                    if g is not None:
                        t += g
        return total

    # ---- one epoch -----------------------------------------------------------------------
    def begin_epoch(self, epoch: int, beta: float, mbs: list) -> tuple:
        """Train mode, gradients rebound to the stage's bucket and zeroed, sums reset; on the graph path
        the captures validated and the epoch's inputs put on the device (returned; () when eager)."""
        self.stage.model.train()
        for p in self.stage.model.parameters():
            p.grad = None
        self.stage.bucket.attach()
        self.stage.bucket.zero()
        self.sums.reset()
        if not self.graphs.enabled:
            return ()
        self.graphs.begin_epoch(beta)
        return self.graphs.epoch_inputs(mbs, lambda j, n: self.draws(epoch, j, n))

    def train_epoch(self, epoch: int, lr_fn, beta: float, resume: dict | None = None) -> PhaseStats:
        """One epoch: the tick plan of this rank, walked. beta: the penalty weight of this rank's
        outgoing boundary this epoch (after the schedule and the curvature guard). resume: the state
        of this epoch frozen by a stop request (pipeline_state.py): continue at its tick. The stats'
        extra holds "halted" (a non-finite value stopped the epoch) or "preempted" (a stop request:
        {"where": ..., "state": the frozen state}) when the in-epoch check ended it early."""
        mbs = self.micro_batches(epoch)
        nm = len(mbs)
        self.kept = 0
        ep = _Epoch(epoch=epoch, lr_fn=lr_fn, beta=beta, mbs=mbs, nb=-(-nm // self.M),
                    last_group=set(range((max(nm - 1, 0) // self.M) * self.M, nm)),  # the probe: the last batch
                    scales=self._scales(mbs))
        ep.probe["beta"] = beta
        ep.dev = self.begin_epoch(epoch, beta, mbs)
        start = 0 if resume is None else thaw(self, ep, resume)
        t_epoch = time.perf_counter()
        comm_before = self.comm.counters.comm_seconds
        do = {"recv": self._recv, "send": self._send, "F": self._forward, "B": self._backward, "S": self._step}
        ticks = rank_plan(self.stage.k, self.stage.K, nm, self.M, self.check_ticks, self.schedule, ahead=self.keep)
        halted = pending = None  # pending: 1f1b's check in flight, (the tick it is decided at, its reduction)
        last = len(ticks) - 1
        for t in range(start, len(ticks)):
            check = False
            for a in ticks[t]:
                if a.kind == "C":
                    check = True
                elif not (t == start and resume is not None and sent_before(a, self.schedule)):  # received at the stop
                    do[a.kind](ep, a)
            if self.schedule == "tick" and check:
                halted = self._decide(ep, ticks, t, *G.agree((self.comm, self.replica_comm), *self._flags()))
            elif pending is not None and (t >= pending[0] or t == last):  # (K = 1: the tick after)
                flags = pending[1].wait()  # posted K-1 ticks ago: every rank has long reached it
                pending = None
                if t < last:  # (at the epoch's last tick its end's check follows anyway)
                    halted = self._decide(ep, ticks, t, *G.agree((self.replica_comm,), *flags))
            if check and pending is None and halted is None and self.schedule != "tick":
                pending = (decided_at(t, self.stage.K, len(ticks)), self.comm.iallreduce_array(self._flags(), "max"))
            watchdog.beat()
            if halted is not None:
                break
        for ch in self.channels.values():
            ch.drain()
        sync_device(self.device)
        elapsed = time.perf_counter() - t_epoch
        self.probe = ep.probe if nm and halted is None else None
        st = self.sums.stats(first=self.first, last=self.last, al=self.store is not None, steps=ep.updates,
                             compute_seconds=elapsed - (self.comm.counters.comm_seconds - comm_before))
        if halted is not None:
            st.extra.update(halted)
        return st

    def _flags(self) -> list:
        """This rank's part of the in-epoch check C: [whether it holds a non-finite loss, multiplier,
        parameter or BatchNorm statistic, whether a stop was requested]."""
        st = self.stage
        local = (self.sums.bad < FIRST_BAD_NONE) | (self.sums.acc[self.sums.BAD] > 0) \
            | G.nonfinite(st.params + [b for b in st.buffers() if b.dtype.is_floating_point])
        return [float(local), float(stop_requested())]

    def _decide(self, ep: "_Epoch", ticks: list, t: int, bad: bool, stop: bool):
        """After the check C, at the end of tick t, all ranks alike: if any rank is bad or was asked to
        stop, the epoch ends here on every rank: the messages sent at tick t (for tick t+1) are received
        (no send is left unmatched), the receives posted ahead are withdrawn. On the "tick" schedule C
        is decided at the tick it is made; on "1f1b" K-1 ticks later (a blocking collective would undo
        the ranks' stagger: a refill of K-1 backward steps at every check), its reduction in flight
        meanwhile. Returns None to go on, else {"halted": where} or {"preempted": {"where": where,
        "state": the frozen state}}, where = (micro-batches rank 0 has forwarded, the epoch's, unit)."""
        if not (bad or stop):
            return None
        for a in ticks[t + 1] if t + 1 < len(ticks) else ():
            if sent_before(a, self.schedule):
                self._recv(ep, a)
        for ch in self.channels.values():
            ch.cancel()
        where = (min(t + 1, len(ep.mbs)), len(ep.mbs), "micro-batches")
        if bad:
            return {"halted": where}
        return {"preempted": {"where": where, "state": freeze(self, ep, t + 1)}}

    def _recv(self, ep: "_Epoch", a) -> None:
        """A message of micro-batch a.mb arrives (receives of the next AHEAD are posted first); a real
        copy: the slot is re-posted soon."""
        ch = self.channels[a.channel]
        for i in range(a.mb, min(a.mb + AHEAD + 1, len(ep.mbs))):
            ch.post(i, len(ep.mbs[i]))
        ep.inbox[(a.channel, a.mb)] = ch.recv(a.mb, len(ep.mbs[a.mb])).to(torch.float32, copy=True)

    def _send(self, ep: "_Epoch", a) -> None:
        self.channels[a.channel].send(a.mb, ep.outbox.pop((a.channel, a.mb)))

    def _record(self, ep: "_Epoch", j: int, a=None) -> MicroBatch:
        """Micro-batch j as the eager step reads it: ids (and rank 0's draws), its auxiliary input."""
        idx = ep.mbs[j]
        d = self.draws(ep.epoch, j, len(idx))
        return MicroBatch(ids=idx, off=None if d is None else d[0], flip=None if d is None else d[1], a=a,
                          scale=ep.scales[j])

    def _forward(self, ep: "_Epoch", a) -> None:
        """F(j): the stage's output D(u) on its way downstream; the last rank keeps its input for B."""
        j = a.mb
        n = len(ep.mbs[j])
        aux = None if self.first else ep.inbox.pop((ACTIVATIONS, j))
        mb = self._record(ep, j, aux)
        if j in ep.last_group:
            ep.probe["mbs"].append(mb)
            ep.probe["idx"].append(mb.ids)
            if self.first:
                ep.probe["x"].append(self.step.input(mb, False)[0])
            else:
                ep.probe["a"].append(aux)
        if self.last:
            ep.inflight[j] = mb
            return
        if self.graphs.enabled:
            d = self.graphs.replay("F", ep.dev, j, n, a=aux)[0]
        else:
            same = reuses(self.stage.k, self.stage.K, j, self.M, self.schedule)
            keep = self.keep and (same or self.stash)
            d = self.step.forward(mb, keep=keep, stash=self.stash and not same)
            if keep:
                ep.kept_at[j] = ep.updates
        ep.outbox[(ACTIVATIONS, j)] = d
        # the anchor of the penalty is the value the downstream rank received (its wire precision); a
        # replay's output is overwritten by the next one: keep a copy
        if self.msg_dtype != torch.float32:
            mb.anchor = d.to(self.msg_dtype).float()
        else:
            mb.anchor = d.clone() if self.graphs.enabled else d
        ep.inflight[j] = mb

    def _backward(self, ep: "_Epoch", a) -> None:
        """B(j): the local objective of micro-batch j, back-propagated; the adjoint goes upstream."""
        j = a.mb
        mb = ep.inflight.pop(j)
        if not self.last:
            mb.p = ep.inbox.pop(("adjoints", j))
        if self.store is not None:
            mb.m = self.store.gather(mb.ids)
        if self.graphs.enabled:
            adj = self.graphs.replay("B", ep.dev, j, len(mb), a=mb.a, p=mb.p, anchor=mb.anchor, scale=mb.scale)[0]
        else:
            # F's graph only if the parameters are still those F used (else, or after a resume: recompute)
            kept = mb.kept is not None and (ep.kept_at.pop(j, None) == ep.updates or mb.stash is not None)
            self.kept += kept
            adj, diff = self.step.backward(mb, ep.beta, kept=kept)
            mb.kept = None
            if mb.m is not None:
                self._multiplier_step(mb, diff, ep.beta)
        self.sums.count(len(mb), residual=not self.last, ce=self.last)
        if adj is not None:
            ep.outbox[("adjoints", j)] = adj

    def _multiplier_step(self, mb: MicroBatch, diff, beta: float) -> None:
        """AL: the method of multipliers on D(u') = a, damped by rho, with this step's violation."""
        m_new = mb.m + (self.al_rho * beta / self.stage.out_numel) * diff
        self.store.scatter(mb.ids, m_new)
        self.sums.add_mult(m_new.flatten(1).norm(dim=1).sum())
        self.sums.add_nonfinite(m_new)

    def _step(self, ep: "_Epoch", a) -> None:
        """S: one optimizer step of the stage: M micro-batches, a global batch (averaged over replicas)."""
        lr = ep.lr_fn(ep.epoch + ep.updates / max(ep.nb, 1))
        self.stage.sgd.set_lr(lr)
        if self.stage.replicas > 1:
            self.replica_comm.allreduce_(self.stage.bucket.flat, key="stage-grads")
        if self.graphs.enabled:
            self.graphs.replay("S", ep.dev, None, 0)
        else:
            self.step.update()
        ep.updates += 1


@dataclass
class _Epoch:
    """One epoch's working state on one rank."""
    epoch: int
    lr_fn: object
    beta: float
    mbs: list
    nb: int
    last_group: set
    scales: list
    updates: int = 0
    inbox: dict = field(default_factory=dict)     # (channel, j) -> what arrived
    outbox: dict = field(default_factory=dict)    # (channel, j) -> what goes out at the plan's send
    inflight: dict = field(default_factory=dict)  # j -> its MicroBatch, from F to B
    kept_at: dict = field(default_factory=dict)   # j -> optimizer steps taken when F kept its graph
    dev: tuple = ()  # graph path: the epoch's ids, micro-batch offsets and draws on the device
    probe: dict = field(default_factory=lambda: {"a": [], "idx": [], "x": [], "mbs": []})
