"""Flat buffers for collectives: the one flatten / unflatten helper, and the gradient bucket whose
views are the parameters' .grad, so a whole step's gradients travel in one Allreduce."""
from __future__ import annotations

import torch


def flatten(tensors, dtype=None) -> torch.Tensor:
    """One contiguous 1-D copy of the tensors, in order (dtype: of the first tensor unless given)."""
    tensors = list(tensors)
    return torch.cat([t.reshape(-1).to(dtype or tensors[0].dtype) for t in tensors]).contiguous()


def unflatten(flat: torch.Tensor, tensors) -> None:
    """Copy consecutive slices of `flat` back into `tensors` (the inverse of flatten)."""
    off = 0
    for t in tensors:
        t.copy_(flat[off:off + t.numel()].view_as(t))
        off += t.numel()


def sync_device(device: torch.device) -> None:
    """Make wall-clock timings honest on asynchronous devices."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GradBucket:
    """Every parameter's .grad is a view into one flat buffer, with two extra slots for the
    step's loss sum and correct count, so a whole step needs exactly one Allreduce and no copies."""

    EXTRA = 2

    def __init__(self, params, device):
        self.params = [p for p in params if p.requires_grad]
        n = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(n + self.EXTRA, dtype=torch.float32, device=device)
        self.extra = self.flat[n:]
        self.attach()

    def attach(self):
        """(Re)bind every parameter's .grad to its view (a phase switch may have replaced them)."""
        off = 0
        for p in self.params:
            if p.dtype != torch.float32:
                raise TypeError(f"GradBucket needs float32 parameters, got {p.dtype}")
            # the parameter's own strides (channels_last weights on GPUs get channels_last gradients)
            p.grad = self.flat.as_strided(p.shape, p.stride(), off)
            off += p.numel()

    def zero(self):
        """Zero all gradients (and the extra slots) at once."""
        self.flat.zero_()
