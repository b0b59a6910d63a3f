"""The collective-driven serial phase: back-propagation of the whole network on every rank, the
global batch split over the ranks, one bucketed Allreduce of gradients per step (ALGORITHM.md s.5).

With one rank it is the serial baseline, with K ranks and a single-phase schedule the
data-parallel baseline."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import guard as G
from . import watchdog
from .buckets import GradBucket, flatten, sync_device, unflatten
from .data import epoch_batches, shard_range
from .graphs import GraphCache, SGDUpdate
from .stats import FIRST_BAD_NONE, PhaseStats
from .stop import requested as stop_requested


class SerialEngine:
    """Owns the whole network on this rank; `comm` of size 1 gives plain back-propagation."""

    def __init__(self, model, optimizer, comm, data, augment, *, batch_size: int, drop_last: bool,
                 seed: int, graphs: str = "off", check_every: int = 0):
        """graphs: "cuda" captures each step as a CUDA graph, "emulate" runs the graph path without
        capturing (tests), "off" is the eager loop (graphs.py). check_every: steps between the ranks'
        in-epoch checks for non-finite values (0: none; the run checks every epoch's end)."""
        self.check_every = check_every
        self.model, self.opt, self.comm, self.data, self.augment = model, optimizer, comm, data, augment
        self.batch_size, self.drop_last, self.seed = batch_size, drop_last, seed
        self.device = data.device
        self.bucket = GradBucket(model.parameters(), self.device)
        self.graphs = GraphCache(graphs)
        # the one SGD update of the package, eager or captured: both paths round alike
        self.sgd = SGDUpdate(optimizer, model.parameters(), self.device)

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: full batches only with drop_last, else a final partial batch too."""
        n = self.data.n_train
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def train_epoch(self, epoch: int, lr_fn, on_step=None, resume: dict | None = None) -> PhaseStats:
        """lr_fn(t) gives the learning rate at fractional global epoch t. on_step(step, steps, loss)
        gets the running mean loss as a callable: reading it synchronises a GPU, so only a live
        progress bar calls it. resume: the state of this epoch saved by a stop request (continue after
        its step); the stats' extra holds "halted" or "preempted" when the in-epoch check ended it."""
        self.model.train()
        self.bucket.attach()  # a phase switch may have replaced .grad; re-bind the views
        if self.graphs.enabled:
            return self._train_epoch_graphed(epoch, lr_fn, on_step, resume)
        batches = epoch_batches(self.data.n_train, self.batch_size, self.seed, epoch, self.drop_last)
        totals = torch.zeros(GradBucket.EXTRA, dtype=torch.float64, device=self.device)
        bad = torch.full((), FIRST_BAD_NONE, dtype=torch.int64, device=self.device)
        start, samples = self._thaw(resume, epoch, len(batches), totals, bad)
        compute = 0.0
        for step, idx in enumerate(batches):
            if step < start:
                continue
            watchdog.beat()
            self.sgd.set_lr(lr_fn(epoch + step / len(batches)))
            t0 = time.perf_counter()
            gb = len(idx)
            lo, hi = shard_range(gb, self.comm.size, self.comm.rank)
            self.bucket.zero()
            if hi > lo:
                offsets = flips = None
                if self.augment is not None:
                    offsets, flips = self.augment.draws(epoch, step, gb)
                    offsets, flips = offsets[lo:hi], flips[lo:hi]
                self._shard_gradient(idx[lo:hi], offsets, flips, gb)
            sync_device(self.device)
            compute += time.perf_counter() - t0
            if self.comm.size > 1:
                self.comm.allreduce_(self.bucket.flat, key="grads")
            t0 = time.perf_counter()
            self.sgd()
            totals += self.bucket.extra  # stays on the device: no per-step host sync
            bad = torch.where(torch.isfinite(self.bucket.extra[0]), bad, torch.clamp(bad, max=step))
            samples += gb
            sync_device(self.device)
            compute += time.perf_counter() - t0
            if on_step is not None:
                on_step(step + 1, len(batches), lambda s=samples, t=totals: float(t[0]) / max(s, 1))
            end = self._check(epoch, step, len(batches), totals, bad, samples)
            if end is not None:
                return self._finish(totals, bad, step + 1, samples, compute, end=end)
        return self._finish(totals, bad, len(batches), samples, compute)

    def _check(self, epoch: int, step: int, steps: int, totals, bad, samples: int):
        """Every check_every steps (not at the epoch's end, which the run checks): whether any rank holds a
        non-finite loss, parameter or BatchNorm statistic, or was asked to stop (one small allreduce).
        None to go on, else {"halted": where} or {"preempted": {"where": where, "state": ...}}."""
        if not self.check_every or (step + 1) % self.check_every or step + 1 >= steps:
            return None
        bufs = self.float_buffers()
        local = (bad < FIRST_BAD_NONE) | G.nonfinite(list(self.model.parameters()) + bufs)
        halt, stop = G.agree((self.comm,), local, stop_requested())
        where = (step + 1, steps, "steps")
        if halt:
            return {"halted": where}
        if stop:  # each rank's own BatchNorm statistics: the ranks average them only at the epoch's end
            state = {"where": [epoch, self.comm.rank, self.comm.size, steps], "step": step + 1,
                     "totals": totals.clone(), "bad": bad.clone(), "samples": samples,
                     "buffers": [b.clone() for b in bufs]}
            return {"preempted": {"where": where, "state": state}}
        return None

    def _thaw(self, state, epoch: int, steps: int, totals, bad) -> tuple:
        """(first step, samples so far) of an epoch resumed from `state` (or (0, 0)); restores its sums
        and this rank's BatchNorm statistics."""
        if state is None:
            return 0, 0
        want = [epoch, self.comm.rank, self.comm.size, steps]
        if list(state["where"]) != want:
            raise ValueError(f"a serial epoch state of (epoch, rank, ranks, steps) {state['where']} cannot "
                             f"continue {want}")
        totals.copy_(state["totals"])
        bad.copy_(state["bad"])
        bufs = self.float_buffers()
        for b, saved in zip(bufs, state["buffers"]):
            b.copy_(saved)
        return int(state["step"]), int(state["samples"])

    def _shard_gradient(self, ids, offsets, flips, gb: int) -> None:
        """This rank's shard of a global batch of gb samples: its summed loss / gb back-propagated
        into the bucket, the loss sum and correct count into the bucket's extra slots. Dividing by
        the *global* batch makes the summed gradients the exact gradient of the global mean loss,
        even when shards differ in size. (The eager loop and the captured step share it.)"""
        x, y = self.data.train_batch(ids)
        if self.augment is not None:
            x = self.augment.apply(x, offsets, flips)
        out = self.model(x)
        loss = F.cross_entropy(out, y, reduction="sum")
        (loss / gb).backward()
        self.bucket.extra[0] = loss.detach()
        self.bucket.extra[1] = (out.detach().argmax(1) == y).sum()

    def _finish(self, totals, bad, steps: int, samples: int, compute: float, end=None) -> PhaseStats:
        """The epoch's PhaseStats (BatchNorm statistics averaged over the ranks first, unless a stop
        request saved each rank's own); end: what the in-epoch check returned when it stopped the epoch."""
        if end is None or "preempted" not in end:
            self.sync_buffers()
        loss_sum, correct = totals.tolist()
        first_bad = int(bad)
        nan = float("nan")
        return PhaseStats(local_loss=nan, train_loss=loss_sum / max(samples, 1),
                          train_acc=correct / max(samples, 1), residual=nan, multiplier_norm=nan,
                          steps=steps, samples=samples, compute_seconds=compute,
                          first_bad_step=None if first_bad >= FIRST_BAD_NONE else first_bad,
                          extra=dict(end or {}))

    # ---- the graph path (run.cuda_graphs) ---------------------------------------------------------
    def _epoch_inputs(self, epoch: int, batches: list):
        """The epoch's sample ids and augmentation draws of this rank's shards, moved to the device in
        one copy each: a step then only slices device memory (no host-to-device copy per step)."""
        gb = [len(b) for b in batches]
        shards = [shard_range(n, self.comm.size, self.comm.rank) for n in gb]
        ids = torch.cat([b[lo:hi] for b, (lo, hi) in zip(batches, shards)]).to(self.device)
        off = flip = None
        if self.augment is not None:
            draws = [self.augment.draws(epoch, s, n) for s, n in enumerate(gb)]
            off = torch.cat([o[lo:hi] for (o, _), (lo, hi) in zip(draws, shards)]).to(self.device)
            flip = torch.cat([f[lo:hi] for (_, f), (lo, hi) in zip(draws, shards)]).to(self.device)
        return gb, shards, ids, off, flip

    def _state(self, acc):
        """What a step updates in place (restored after the warm-up runs before a capture)."""
        return (list(self.model.parameters()) + list(self.model.buffers()) + self.sgd.buffers()
                + [self.bucket.flat] + list(acc))

    def _make_step(self, rows: int, gb: int, acc):
        """The captured step of `rows` local samples out of a global batch of gb: (inputs, step(s))."""
        dev = self.device
        ins = {"ids": torch.zeros(rows, dtype=torch.int64, device=dev)}
        if self.augment is not None:
            ins["off"] = torch.zeros(rows, 2, dtype=torch.int64, device=dev)
            ins["flip"] = torch.zeros(rows, dtype=torch.bool, device=dev)
        totals, bad, count = acc
        single = self.comm.size == 1

        def fwd_bwd():
            self.bucket.zero()
            if rows == 0:  # more ranks than samples in a last partial batch: a zero contribution
                return update() if single else ()
            self._shard_gradient(ins["ids"], ins.get("off"), ins.get("flip"), gb)
            if single:
                update()
            return ()

        def update():
            self.sgd()
            totals.add_(self.bucket.extra)
            bad.copy_(torch.where(torch.isfinite(self.bucket.extra[0]), bad, torch.minimum(bad, count)))
            count.add_(1)
            return ()

        state = lambda: self._state(acc)  # noqa: E731
        return ins, self.graphs.step(fwd_bwd, state), None if single else self.graphs.step(update, state)

    def _train_epoch_graphed(self, epoch: int, lr_fn, on_step, resume=None) -> PhaseStats:
        """The same step as the eager loop, each one a replay: inputs are sliced from device buffers
        made once per epoch, the learning rate is a device scalar, and nothing reads the device until
        the epoch ends (one host sync per step remains where the gradients go to MPI by host staging)."""
        batches = epoch_batches(self.data.n_train, self.batch_size, self.seed, epoch, self.drop_last)
        self.graphs.validate(self._state(()))
        if not hasattr(self, "_acc"):
            self._acc = (torch.zeros(GradBucket.EXTRA, dtype=torch.float64, device=self.device),
                         torch.zeros((), dtype=torch.int64, device=self.device),
                         torch.zeros((), dtype=torch.int64, device=self.device))
        totals, bad, count = self._acc
        totals.zero_()
        bad.fill_(FIRST_BAD_NONE)
        count.zero_()
        gb, shards, ids, off, flip = self._epoch_inputs(epoch, batches)
        start, samples = self._thaw(resume, epoch, len(batches), totals, bad)
        count.fill_(start)
        pos = sum(hi - lo for lo, hi in shards[:start])
        t0 = time.perf_counter()
        comm0 = self.comm.counters.comm_seconds
        for step, (n, (lo, hi)) in enumerate(zip(gb, shards)):
            if step < start:
                continue
            watchdog.beat()
            rows = hi - lo
            ins, first, second = self.graphs.get((rows, n), lambda r=rows, g=n: self._make_step(r, g, self._acc))
            self.sgd.set_lr(lr_fn(epoch + step / len(batches)))
            ins["ids"].copy_(ids[pos:pos + rows])
            if off is not None:
                ins["off"].copy_(off[pos:pos + rows])
                ins["flip"].copy_(flip[pos:pos + rows])
            pos += rows
            first()
            if second is not None:
                self.comm.allreduce_(self.bucket.flat, key="grads")
                second()
            samples += n
            if on_step is not None:
                on_step(step + 1, len(batches), lambda s=samples: float(totals[0]) / max(s, 1))
            end = self._check(epoch, step, len(batches), totals, bad, samples)
            if end is not None:
                compute = time.perf_counter() - t0 - (self.comm.counters.comm_seconds - comm0)
                return self._finish(totals, bad, step + 1, samples, compute, end=end)
        sync_device(self.device)
        compute = time.perf_counter() - t0 - (self.comm.counters.comm_seconds - comm0)
        return self._finish(totals, bad, len(batches), samples, compute)

    def float_buffers(self) -> list:
        """The network's floating buffers (BatchNorm running statistics), in module order."""
        return [b for b in self.model.buffers() if b.dtype.is_floating_point]

    def sync_buffers(self):
        """Average BatchNorm running statistics over ranks once per epoch, so every rank holds the
        same network (each rank saw only its shard, as in DDP without buffer broadcasts)."""
        if self.comm.size == 1:
            return
        bufs = self.float_buffers()
        if not bufs:
            return
        flat = flatten(bufs)
        self.comm.allreduce_(flat, key="buffers")
        flat /= self.comm.size
        unflatten(flat, bufs)


def make_optimizer(model, ocfg) -> torch.optim.SGD:
    """SGD as `optim` configures it, with zero momentum buffers created up front for every parameter."""
    opt = torch.optim.SGD(model.parameters(), lr=ocfg.lr, momentum=ocfg.momentum,
                          nesterov=ocfg.nesterov, weight_decay=ocfg.weight_decay)
    # Zero momentum buffers behave exactly like absent ones (buf = 0.9 * 0 + g on the first step),
    # and having them everywhere lets a phase switch ship every stage's optimizer state as is.
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return opt
