"""All MPI in one place: a communicator wrapper with tensor collectives, host staging and counters."""
from __future__ import annotations

import socket
import sys
import time
import traceback

import numpy as np
import torch
from mpi4py import MPI


class Counters:
    """Per-rank communication accounting, reset by the caller at epoch start."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.comm_seconds = 0.0

    def as_tuple(self):
        return (self.comm_seconds, float(self.bytes_sent), float(self.bytes_recv))


class Comm:
    """A duplicated communicator (our traffic never mixes with a library's) plus helpers.

    Tensors on CUDA devices are staged through pinned host buffers unless `cuda_aware` is set,
    so the same code is correct on any MPI; CPU tensors go to MPI as zero-copy numpy views."""

    def __init__(self, mpi_comm=None, cuda_aware: bool = False):
        base = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.mpi = base.Dup()
        self.rank = self.mpi.Get_rank()
        self.size = self.mpi.Get_size()
        self.cuda_aware = cuda_aware
        self.counters = Counters()
        self._staging: dict = {}
        node = self.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()

    @classmethod
    def world(cls, **kw) -> "Comm":
        return cls(MPI.COMM_WORLD, **kw)

    @classmethod
    def self_(cls, **kw) -> "Comm":
        return cls(MPI.COMM_SELF, **kw)

    # ---- buffers -------------------------------------------------------------------------
    def _host(self, t: torch.Tensor, key) -> tuple[np.ndarray, torch.Tensor | None]:
        """A numpy view of `t`'s memory (CPU) or of a cached pinned host copy (CUDA)."""
        if t.device.type == "cpu" or self.cuda_aware:
            if t.device.type != "cpu":  # CUDA-aware path: hand the device buffer to MPI directly
                return t, None
            return t.numpy(), None
        buf = self._staging.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
            self._staging[key] = buf
        buf.copy_(t)
        return buf.numpy(), buf

    # ---- collectives ---------------------------------------------------------------------
    def allreduce_(self, t: torch.Tensor, key="allreduce") -> torch.Tensor:
        """In-place sum over ranks of a contiguous float tensor; counts ring-allreduce bytes."""
        assert t.is_contiguous()
        t0 = time.perf_counter()
        arr, staged = self._host(t, key)
        self.mpi.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
        if staged is not None:
            t.copy_(staged)
        self.counters.comm_seconds += time.perf_counter() - t0
        if self.size > 1:
            # MPI hides its algorithm; we count what a ring allreduce moves per rank.
            vol = int(2 * (self.size - 1) * t.numel() * t.element_size() // self.size)
            self.counters.bytes_sent += vol
            self.counters.bytes_recv += vol
        return t

    def allreduce_array(self, values, op="sum") -> np.ndarray:
        arr = np.ascontiguousarray(np.asarray(values, dtype=np.float64)).copy()
        self.mpi.Allreduce(MPI.IN_PLACE, arr, op={"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op])
        return arr

    def bcast_(self, t: torch.Tensor, root: int, key="bcast") -> torch.Tensor:
        assert t.is_contiguous()
        t0 = time.perf_counter()
        arr, staged = self._host(t, key)
        self.mpi.Bcast(arr, root=root)
        if staged is not None:
            t.copy_(staged)
        self.counters.comm_seconds += time.perf_counter() - t0
        nbytes = t.numel() * t.element_size()
        if self.size > 1:
            if self.rank == root:
                self.counters.bytes_sent += nbytes
            else:
                self.counters.bytes_recv += nbytes
        return t

    def bcast_obj(self, obj, root: int = 0):
        return self.mpi.bcast(obj, root=root)

    def allgather_obj(self, obj) -> list:
        return self.mpi.allgather(obj)

    def gather_obj(self, obj, root: int = 0):
        return self.mpi.gather(obj, root=root)

    def barrier(self):
        self.mpi.Barrier()

    def free(self):
        if self.mpi != MPI.COMM_NULL:
            self.mpi.Free()


def world_rank() -> int:
    return MPI.COMM_WORLD.Get_rank()


def world_size() -> int:
    return MPI.COMM_WORLD.Get_size()


def library_version() -> str:
    return MPI.Get_library_version().replace("\x00", "").strip()


def hostname() -> str:
    return socket.gethostname()


def abort_job(exc: BaseException, code: int = 1) -> None:
    """Print the failure with its rank, then take every rank down: never leave peers hanging."""
    rank = MPI.COMM_WORLD.Get_rank()
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(f"[rank {rank}] aborting the job after an error:\n{tb}")
    sys.stderr.flush()
    MPI.COMM_WORLD.Abort(code)
