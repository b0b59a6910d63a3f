"""Per-sample tables of the boundary a rank owns (the pipeline's AL multipliers, ALGORITHM.md s.4),
gathered and scattered by sample id; no MPI."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
