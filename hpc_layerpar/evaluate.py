"""The true network G on data without training: test evaluation and BatchNorm re-estimation, both
sharded over the ranks and combined with one reduction (ALGORITHM.md s.7)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import watchdog
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
        watchdog.beat()
        x, y = data.test_batch(a, min(a + batch_size, hi))
        out = model(x)
        sums[0] += F.cross_entropy(out, y, reduction="sum")
        sums[1] += (out.argmax(1) == y).sum()
        sums[2] += len(y)
    model.train(was_training)
    loss, correct, n = comm.allreduce_array(sums.cpu().numpy())
    return loss / max(n, 1), correct / max(n, 1)


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
        watchdog.beat()
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
