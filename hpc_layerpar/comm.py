"""All MPI in one place: Comm, the MPI implementation of commbase.Communicator (tensor messages and
collectives with host staging; bytes counted by commbase.Counters, re-exported here), and Topology."""
from __future__ import annotations

import socket
import sys
import time
import traceback

import numpy as np
import torch
from mpi4py import MPI

from .commbase import Counters  # also re-exported: `from hpc_layerpar.comm import Counters` keeps working
from .pending import _DEFERRED, Pending, _Done, _flush


def _numpy(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor; bfloat16 travels as raw 16-bit words."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


class Comm:
    """A duplicated communicator (our traffic never mixes with a library's) plus helpers: the MPI
    implementation of commbase.Communicator.

    Tensors on CUDA devices are staged through pinned host buffers unless `cuda_aware` is set,
    so the same code is correct on any MPI; CPU tensors go to MPI as zero-copy numpy views."""

    def __init__(self, mpi_comm=None, cuda_aware: bool = False, stage_all: bool = False):
        base = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        _flush(block=True)  # Dup and Split_type are collective: no send of ours may be left unposted
        self.mpi = base.Dup()
        self.rank = self.mpi.Get_rank()
        self.size = self.mpi.Get_size()
        self.cuda_aware = cuda_aware
        # stage_all: CPU tensors take the host-staging path too (copy in, MPI, copy out), which is
        # how the staging code of GPU runs without CUDA-aware MPI is tested on machines without GPUs.
        self.stage_all = stage_all
        self.counters = Counters()
        self._staging: dict = {}
        self._copy_stream = None   # CUDA: the side stream of staged sends' device-to-host copies
        self._recv_copied: dict = {}  # staging key -> event of the last host-to-device copy out of it
        node = self.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()

    @classmethod
    def world(cls, **kw) -> "Comm":
        """A Comm on a duplicate of MPI.COMM_WORLD."""
        return cls(MPI.COMM_WORLD, **kw)

    @classmethod
    def self_(cls, **kw) -> "Comm":
        """A one-rank Comm on a duplicate of MPI.COMM_SELF."""
        return cls(MPI.COMM_SELF, **kw)

    # ---- buffers -------------------------------------------------------------------------
    def _host(self, t: torch.Tensor, key, copy_in: bool = True):
        """(buffer for MPI, staging tensor or None): a numpy view of `t` (CPU), the device tensor
        itself (CUDA-aware MPI), or a cached pinned host copy (CUDA without CUDA-aware MPI)."""
        if t.device.type == "cpu" and not self.stage_all:
            return _numpy(t), None
        if t.device.type == "cuda" and self.cuda_aware:
            # MPI reads device memory outside CUDA's stream order: the kernels (or graph replays)
            # queued so far must have written t first (a stream sync, not a device-wide one).
            # mpi4py takes CUDA buffers through DLPack / __cuda_array_interface__; bfloat16 goes
            # as raw 16-bit words, which every MPI datatype table knows.
            torch.cuda.current_stream(t.device).synchronize()
            return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t), None
        buf = self._staging.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
            self._staging[key] = buf
        if copy_in:
            buf.copy_(t)
        return _numpy(buf), buf

    # ---- point to point ------------------------------------------------------------------
    def isend(self, t: torch.Tensor, dest: int, tag: int, key) -> Pending:
        """Non-blocking send of a contiguous tensor. The caller must not modify `t` (or reuse the
        staging `key`) before the returned Pending completes."""
        assert t.is_contiguous()
        t0 = time.perf_counter()
        if dest != MPI.PROC_NULL:
            self.counters.count_send(t)
        if (t.device.type == "cuda" and not self.cuda_aware) or (t.device.type == "cpu" and self.stage_all):
            pending = self._isend_staged(t, dest, tag, key)
        else:
            # messages between two ranks must not overtake each other: post the deferred ones first
            _flush(block=True)
            arr, staged = self._host(t, ("send", key))
            pending = Pending(self, self.mpi.Isend(arr, dest=dest, tag=tag), keep=(t, arr, staged))
        self.counters.comm_seconds += time.perf_counter() - t0
        return pending

    def _isend_staged(self, t: torch.Tensor, dest: int, tag: int, key) -> Pending:
        """The copy of t to its pinned staging buffer goes on a side stream after the work queued so
        far (an event orders it), so the host does not wait for the device; the MPI send is posted
        when the copy is done (_flush). CPU tensors under stage_all take the same deferred path with
        a copy that is done at once, which is how tests without a GPU exercise it."""
        arr, buf = self._host(t, ("send", key), copy_in=False)
        if t.device.type == "cpu":
            buf.copy_(t)
            pending = Pending(self, None, keep=(t, arr, buf), copied=_Done(),
                              post=lambda: self.mpi.Isend(arr, dest=dest, tag=tag))
            _DEFERRED.append(pending)
            return pending
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=t.device)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(t.device))
        self._copy_stream.wait_event(ready)
        with torch.cuda.stream(self._copy_stream):
            buf.copy_(t, non_blocking=True)
        t.record_stream(self._copy_stream)  # t's memory is not reused before the copy has read it
        copied = torch.cuda.Event()
        copied.record(self._copy_stream)
        pending = Pending(self, None, keep=(t, arr, buf), copied=copied,
                          post=lambda: self.mpi.Isend(arr, dest=dest, tag=tag))
        _DEFERRED.append(pending)
        return pending

    def irecv(self, t: torch.Tensor, source: int, tag: int, key) -> Pending:
        """Non-blocking receive into a contiguous tensor (valid after wait())."""
        assert t.is_contiguous()
        t0 = time.perf_counter()
        skey = ("recv", key)
        arr, staged = self._host(t, skey, copy_in=False)
        if skey in self._recv_copied:  # MPI must not overwrite the buffer an earlier copy still reads
            self._recv_copied.pop(skey).synchronize()
        req = self.mpi.Irecv(arr, source=source, tag=tag)
        self.counters.comm_seconds += time.perf_counter() - t0
        if source != MPI.PROC_NULL:
            self.counters.count_recv(t)
        on_done = None
        # nothing arrives from PROC_NULL: the staging buffer holds garbage then, leave t as it is
        if staged is not None and source != MPI.PROC_NULL:
            def on_done():
                if t.device.type == "cuda":  # queued on the stream that will read t: no host wait
                    t.copy_(staged, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(torch.cuda.current_stream(t.device))
                    self._recv_copied[skey] = ev
                else:
                    t.copy_(staged)
        return Pending(self, req, keep=(t, arr), on_done=on_done)

    def neighbours(self) -> tuple[int, int]:
        """(previous, next) rank in the chain; PROC_NULL at the ends (messages to it are no-ops)."""
        prev = self.rank - 1 if self.rank > 0 else MPI.PROC_NULL
        nxt = self.rank + 1 if self.rank < self.size - 1 else MPI.PROC_NULL
        return prev, nxt

    def split(self, color: int, key: int) -> "Comm":
        """Collective: the ranks of the same color form a new communicator, ordered by key. It keeps
        this one's staging flags and shares its counters (one account of this rank's traffic)."""
        _flush(block=True)
        part = self.mpi.Split(color, key)
        try:
            child = Comm(part, cuda_aware=self.cuda_aware, stage_all=self.stage_all)
        finally:
            part.Free()
        child.counters = self.counters
        return child

    # ---- collectives ---------------------------------------------------------------------
    def allreduce_(self, t: torch.Tensor, key="allreduce") -> torch.Tensor:
        """In-place sum over ranks of a contiguous float tensor; counts ring-allreduce bytes."""
        _flush(block=True)
        assert t.is_contiguous()
        t0 = time.perf_counter()
        arr, staged = self._host(t, key)
        self.mpi.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
        if staged is not None:
            # non-blocking: the buffer's next use is a device-to-host copy queued behind this one
            t.copy_(staged, non_blocking=t.device.type == "cuda")
        self.counters.comm_seconds += time.perf_counter() - t0
        self.counters.count_allreduce(t, self.size)
        return t

    def allreduce_array(self, values, op="sum") -> np.ndarray:
        """Element-wise sum (or max, min) over the ranks of values, as a float64 array; not counted in the counters."""
        _flush(block=True)
        arr = np.ascontiguousarray(np.asarray(values, dtype=np.float64)).copy()
        self.mpi.Allreduce(MPI.IN_PLACE, arr, op={"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op])
        return arr

    def iallreduce_array(self, values, op="sum"):
        """allreduce_array without waiting (MPI_Iallreduce): a request whose wait() returns the array."""
        arr = np.ascontiguousarray(np.asarray(values, dtype=np.float64)).copy()
        req = self.mpi.Iallreduce(MPI.IN_PLACE, arr, op={"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op])
        return _Reduction(req, arr)

    def bcast_(self, t: torch.Tensor, root: int, key="bcast") -> torch.Tensor:
        """Broadcast the contiguous tensor t from root in place; its bytes count as sent on root, received elsewhere."""
        _flush(block=True)
        assert t.is_contiguous()
        t0 = time.perf_counter()
        arr, staged = self._host(t, key)
        self.mpi.Bcast(arr, root=root)
        if staged is not None:
            t.copy_(staged, non_blocking=t.device.type == "cuda")
        self.counters.comm_seconds += time.perf_counter() - t0
        self.counters.count_bcast(t, self.rank, root, self.size)
        return t

    def bcast_obj(self, obj, root: int = 0):
        """root's picklable obj, returned on every rank."""
        _flush(block=True)
        return self.mpi.bcast(obj, root=root)

    def allgather_obj(self, obj) -> list:
        """Every rank's picklable obj, in rank order, on every rank."""
        _flush(block=True)
        return self.mpi.allgather(obj)

    def gather_obj(self, obj, root: int = 0):
        """Every rank's picklable obj in rank order on root; None on the other ranks."""
        _flush(block=True)
        return self.mpi.gather(obj, root=root)

    def barrier(self):
        """Block until every rank of the communicator has reached the barrier."""
        _flush(block=True)
        self.mpi.Barrier()

    def free(self):
        """Free the duplicated MPI communicator; a second call does nothing."""
        if self.mpi != MPI.COMM_NULL:
            _flush(block=True)
            self.mpi.Free()


class Topology:
    """The layout of a layer-parallel job: K stages x R replicas over `world` (world rank w is stage
    w % K of replica w // K, so a pipeline's ranks are consecutive, usually on one node). `pipe` joins
    the K ranks of this replica's pipeline, `reps` the R ranks holding the same stage (None at R = 1).
    Works on any communicator with split(): MPI's or the simulator's."""

    def __init__(self, world, replicas: int = 1):
        if world.size % replicas:
            from .errors import ConfigError
            raise ConfigError(f"{world.size} ranks cannot form parallel.replicas={replicas} pipelines of equal "
                              f"length; run a multiple of {replicas} ranks or change parallel.replicas.")
        self.world, self.replicas = world, replicas
        self.stages = world.size // replicas
        self.replica, self.stage = divmod(world.rank, self.stages)
        if replicas == 1:
            self.pipe, self.reps = world, None
        else:
            self.pipe, self.reps = world.split(self.replica, self.stage), world.split(self.stage, self.replica)

    def free(self) -> None:
        """Release the split communicators (not the world)."""
        for c in (self.pipe, self.reps):
            if c is not None and c is not self.world:
                c.free()


class _Reduction:
    """An MPI_Iallreduce in flight: wait() completes it and returns its array."""

    def __init__(self, req, arr):
        self.req, self.arr = req, arr

    def wait(self):
        if self.req is not None:
            _flush(block=True)  # never block in MPI with a staged send of this rank unposted
            self.req.Wait()
            self.req = None
        return self.arr


def detect_cuda_aware() -> bool:
    """Ask the MPI library (MPIX_Query_cuda_support: Open MPI with CUDA, MPICH >= 4 with
    MPIR_CVAR_ENABLE_GPU=1) whether it takes device buffers; False when it cannot be asked."""
    import ctypes

    try:
        with open("/proc/self/maps") as fh:
            libs = sorted({ln.split()[-1] for ln in fh if "libmpi" in ln and ln.split()[-1].startswith("/")})
        for path in libs:
            fn = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
            if fn is not None:
                fn.restype = ctypes.c_int
                return bool(fn())
    except OSError:
        pass
    return False


def world_rank() -> int:
    """This process's rank in MPI.COMM_WORLD."""
    return MPI.COMM_WORLD.Get_rank()


def world_size() -> int:
    """The number of processes in MPI.COMM_WORLD."""
    return MPI.COMM_WORLD.Get_size()


def mpi4py_version() -> str:
    """The installed mpi4py version (recorded in the metrics file's provenance)."""
    import mpi4py

    return mpi4py.__version__


def library_version() -> str:
    """The MPI library's version string, without NUL bytes and surrounding whitespace."""
    return MPI.Get_library_version().replace("\x00", "").strip()


def hostname() -> str:
    """This machine's host name."""
    return socket.gethostname()


def finalize_and_exit(code: int) -> None:
    """A controlled non-zero exit taken by every rank alike (bad config, stop after a checkpoint):
    finalize MPI properly, so no shared-memory segment outlives the job (a requeued job step with
    the same id would trip over it), then exit with `code` without mpi4py's abort-at-exit."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.COMM_WORLD.Barrier()
        MPI.Finalize()
    os._exit(code)


def abort_job(exc: BaseException, code: int = 1) -> None:
    """Print the failure with its rank, then take every rank down: never leave peers hanging."""
    rank = MPI.COMM_WORLD.Get_rank()
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(f"[rank {rank}] aborting the job after an error:\n{tb}")
    sys.stderr.flush()
    sys.stdout.flush()
    # The launcher forwards our output asynchronously and stops forwarding once the abort tears
    # the job down: give it a moment, or the one message that explains the failure can be lost.
    time.sleep(1.0)
    MPI.COMM_WORLD.Abort(code)
