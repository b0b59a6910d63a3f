"""The collective-driven serial phase: back-propagation of the whole network on every rank, the
global batch split over the ranks, one bucketed Allreduce of gradients per step (ALGORITHM.md s.5).

With one rank it is the serial baseline, with K ranks and a single-phase schedule the
data-parallel baseline."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .buckets import GradBucket, flatten, sync_device, unflatten
from .data import epoch_batches, shard_range
from .stats import FIRST_BAD_NONE, PhaseStats


class SerialEngine:
    """Owns the whole network on this rank; `comm` of size 1 gives plain back-propagation."""

    def __init__(self, model, optimizer, comm, data, augment, *, batch_size: int, drop_last: bool,
                 seed: int):
        self.model, self.opt, self.comm, self.data, self.augment = model, optimizer, comm, data, augment
        self.batch_size, self.drop_last, self.seed = batch_size, drop_last, seed
        self.device = data.device
        self.bucket = GradBucket(model.parameters(), self.device)

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: full batches only with drop_last, else a final partial batch too."""
        n = self.data.n_train
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def train_epoch(self, epoch: int, lr_fn, on_step=None) -> PhaseStats:
        """lr_fn(t) gives the learning rate at fractional global epoch t."""
        self.model.train()
        self.bucket.attach()  # a phase switch may have replaced .grad; re-bind the views
        batches = epoch_batches(self.data.n_train, self.batch_size, self.seed, epoch, self.drop_last)
        totals = torch.zeros(GradBucket.EXTRA, dtype=torch.float64, device=self.device)
        bad = torch.full((), FIRST_BAD_NONE, dtype=torch.int64, device=self.device)
        samples = 0
        compute = 0.0
        for step, idx in enumerate(batches):
            lr = lr_fn(epoch + step / len(batches))
            for g in self.opt.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            gb = len(idx)
            lo, hi = shard_range(gb, self.comm.size, self.comm.rank)
            self.bucket.zero()
            if hi > lo:
                x, y = self.data.train_batch(idx[lo:hi])
                if self.augment is not None:
                    offsets, flips = self.augment.draws(epoch, step, gb)
                    x = self.augment.apply(x, offsets[lo:hi], flips[lo:hi])
                out = self.model(x)
                loss = F.cross_entropy(out, y, reduction="sum")
                # Dividing by the *global* batch makes the summed gradients the exact gradient of
                # the global mean loss, even when shards differ in size.
                (loss / gb).backward()
                self.bucket.extra[0] = loss.detach()
                self.bucket.extra[1] = (out.detach().argmax(1) == y).sum()
            sync_device(self.device)
            compute += time.perf_counter() - t0
            if self.comm.size > 1:
                self.comm.allreduce_(self.bucket.flat, key="grads")
            t0 = time.perf_counter()
            self.opt.step()
            totals += self.bucket.extra  # stays on the device: no per-step host sync
            bad = torch.where(torch.isfinite(self.bucket.extra[0]), bad, torch.clamp(bad, max=step))
            samples += gb
            sync_device(self.device)
            compute += time.perf_counter() - t0
            if on_step is not None:
                on_step(step + 1, len(batches), float(totals[0]) / max(samples, 1))
        self.sync_buffers()
        loss_sum, correct = totals.tolist()
        first_bad = int(bad)
        nan = float("nan")
        return PhaseStats(local_loss=nan, train_loss=loss_sum / max(samples, 1),
                          train_acc=correct / max(samples, 1), residual=nan, multiplier_norm=nan,
                          steps=len(batches), samples=samples, compute_seconds=compute,
                          first_bad_step=None if first_bad >= FIRST_BAD_NONE else first_bad)

    def sync_buffers(self):
        """Average BatchNorm running statistics over ranks once per epoch, so every rank holds the
        same network (each rank saw only its shard, as in DDP without buffer broadcasts)."""
        if self.comm.size == 1:
            return
        bufs = [b for b in self.model.buffers() if b.dtype.is_floating_point]
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
