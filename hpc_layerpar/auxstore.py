"""Per-sample auxiliary variables a_k (and AL multipliers m_k) of the boundary a rank owns, and the
prox-linear update rules of ALGORITHM.md s.4; no MPI."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def penalty_update(a, z, p, beta: float, eta: float):
    """A <- (1-eta) A + eta (z - p/beta). (Fused: this runs on whole batches of activations.)"""
    step = torch.add(z, p, alpha=-1.0 / beta)
    return step if eta == 1.0 else torch.lerp(a, step, eta)


def al_update(a, m, z, p, beta: float, eta: float):
    """A <- (1-eta) A + eta (z + (M - p)/beta), then M <- M + beta (z - A_new)."""
    step = torch.add(z, m - p, alpha=1.0 / beta)
    a_new = step if eta == 1.0 else torch.lerp(a, step, eta)
    return a_new, torch.add(m, z - a_new, alpha=beta)


class AuxStore:
    """A (N, *coarse_shape) table on the compute device, or in (pinned) host memory, in float32 or
    bfloat16; rows are gathered and scattered by training-sample id. Arithmetic is float32."""

    def __init__(self, n: int, shape: tuple, *, dtype: str, device: torch.device, location: str,
                 multipliers: bool, ids: torch.Tensor | None = None):
        """ids: the sample ids this store holds (a replica's shard); None: all n samples."""
        self.shape, self.dtype = tuple(shape), DTYPES[dtype]
        self.device = device
        if location == "device":
            self.home, pin = device, False
        else:  # host: keeps accelerator memory free; pinned so copies to the GPU are asynchronous
            self.home, pin = torch.device("cpu"), device.type == "cuda"
        self.row_of = None
        if ids is not None:  # sample id -> row of this (smaller) table
            self.row_of = torch.full((n,), -1, dtype=torch.long, device=self.home)
            self.row_of[ids.to(self.home)] = torch.arange(len(ids), device=self.home)
            n = len(ids)
        self.a = torch.zeros((n,) + self.shape, dtype=self.dtype, device=self.home, pin_memory=pin)
        self.m = (torch.zeros_like(self.a, pin_memory=pin) if pin else torch.zeros_like(self.a)) \
            if multipliers else None

    @property
    def nbytes(self) -> int:
        """Bytes the table occupies, multipliers included."""
        one = self.a.numel() * self.a.element_size()
        return one * (2 if self.m is not None else 1)

    def _idx(self, idx):
        idx = idx.to(self.home)
        return idx if self.row_of is None else self.row_of[idx]

    def gather(self, idx, which="a") -> torch.Tensor:
        """Rows of the sample ids idx of `a` (which="m": the multipliers), as float32 on the compute device."""
        t = self.a if which == "a" else self.m
        return t[self._idx(idx)].to(self.device, torch.float32, non_blocking=True)

    def scatter(self, idx, values, which="a") -> None:
        """Write values into the rows of the sample ids idx of `a` (or `m`), in the store's dtype and location."""
        t = self.a if which == "a" else self.m
        t[self._idx(idx)] = values.to(self.home, self.dtype)

    def set_rows(self, lo: int, hi: int, values) -> None:
        """Rows lo:hi of the table (in the store's own row order, i.e. its ids in order)."""
        self.a[lo:hi] = values.to(self.home, self.dtype)

    def reset_multipliers(self) -> None:
        """Zero the AL multipliers; nothing to do for a store without them."""
        if self.m is not None:
            self.m.zero_()
