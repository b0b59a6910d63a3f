"""Passes of the true network over data without training: evaluation (sharded over ranks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import shard_range


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
