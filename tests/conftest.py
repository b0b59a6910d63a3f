"""Shared fixtures. Tests marked `mpi` pass at any communicator size: under plain pytest they run
on one rank, and `make test` runs them again under mpiexec -n 1, 2 and 3."""
import contextlib
import faulthandler
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hpc_layerpar.comm import Comm
from hpc_layerpar.dataformat import write_dataset

# HPL_TEST_DEVICE=cuda runs the equality tests (engine vs reference, simulator vs MPI, graphs vs eager)
# on the GPU; CPU is the default. On a GPU the references and the engines meet up to summation order
# (atomics in cuDNN's backward kernels): TOL scales the CPU tolerances. TF32 is off so that float32
# means float32 on both sides.
DEVICE = torch.device(os.environ.get("HPL_TEST_DEVICE", "cpu"))
TOL = 1.0 if DEVICE.type == "cpu" else 20.0
# bfloat16 messages round to 8 bits: a last-bit difference upstream flips roundings downstream, so on a
# GPU (summation order differs from the reference's) those comparisons meet only to bfloat16 precision.
TOL_BF16 = 1.0 if DEVICE.type == "cpu" else 500.0
if DEVICE.type == "cuda":
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # for the tests that ask for determinism
    if not torch.cuda.is_available():
        raise RuntimeError("HPL_TEST_DEVICE=cuda but this torch sees no CUDA device; unset it to test on CPU.")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def mpiexec_cmd(n: int) -> list:
    """The mpiexec next to this Python (the venv's MPICH) or the one on PATH."""
    exe = os.environ.get("MPIEXEC") or (os.path.join(BIN, "mpiexec")
                                        if os.path.exists(os.path.join(BIN, "mpiexec")) else "mpiexec")
    return [exe, "-n", str(n)]


def run_cli(args, n=1, timeout=180, env=None, cwd=None):
    """Run `python -m mpi4py -m hpc_layerpar ARGS` on n ranks; returns the CompletedProcess."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    e.update(env or {})
    cmd = mpiexec_cmd(n) + [sys.executable, "-m", "mpi4py", "-m", "hpc_layerpar"] + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd or ROOT)


def make_dataset(path, n_train=64, n_test=32, channels=1, size=8, classes=4, seed=0, hflip=False):
    """A small learnable dataset: each class has its own mean image, plus noise."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(classes, channels, size, size))

    def split(n):
        y = rng.integers(0, classes, size=n)
        x = np.clip(protos[y] + rng.normal(0, 40, size=(n, channels, size, size)), 0, 255)
        return x.astype(np.uint8), y.astype(np.int64)

    return write_dataset(str(path), name="synthetic", train=split(n_train), test=split(n_test),
                         num_classes=classes, source="tests", hflip=hflip)


WATCHDOG_S = 180


@pytest.fixture(autouse=True)
def _mpi_watchdog():
    """Under mpiexec, a test that raises on one rank can leave its peers waiting in a collective.
    Rather than hang until CI's limit, dump every thread's stack and exit: the job then aborts."""
    from hpc_layerpar.comm import world_size

    if world_size() > 1:
        faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
        yield
        faulthandler.cancel_dump_traceback_later()
    else:
        yield


@pytest.fixture(scope="session")
def world():
    comm = Comm.world()
    yield comm
    comm.free()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, world):
    """Written once by rank 0 and shared (the ranks of these tests run on one machine), so every
    rank resolves the same configuration."""
    path = make_dataset(tmp_path_factory.mktemp("data") / "tiny.h5") if world.rank == 0 else None
    path = world.bcast_obj(path)
    world.barrier()
    return path


@contextlib.contextmanager
def deterministic():
    """Bitwise-reproducible kernels for a test on a GPU (as run.deterministic sets them), undone after."""
    if DEVICE.type != "cuda":
        yield
        return
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, bench = True, torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, bench


def assert_all(comm, ok: bool, msg: str):
    """Collective assert: every rank fails together (a lone failing rank would leave its peers
    waiting in the next test's collective)."""
    oks = comm.allgather_obj(bool(ok))
    assert all(oks), f"{msg} (ok by rank: {oks})"
