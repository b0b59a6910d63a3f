"""Run pytest on every rank of an MPI job: rank 0 reports, the other ranks' output goes to a log
that is shown only when that rank failed; the job fails when any rank failed."""
import os
import sys

import pytest
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
log_path = None
if rank > 0:
    os.makedirs("build", exist_ok=True)
    log_path = os.path.join("build", f"mpi-pytest-n{comm.Get_size()}-rank{rank}.log")
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
code = int(pytest.main(sys.argv[1:] + ["-p", "no:cacheprovider"]))
codes = comm.gather(code, root=0)
own_log = None
if log_path and code not in (0, 5):
    with open(log_path) as fh:
        own_log = fh.read()
logs = comm.gather(own_log, root=0)
if rank == 0:
    for r, (c, text) in enumerate(zip(codes, logs)):
        if r > 0 and text:
            print(f"\n===== rank {r} failed (exit {c}); its pytest output:\n{text}")
    if any(c not in (0,) for c in codes):
        print(f"pytest exit codes by rank: {codes}")
worst = max(codes) if rank == 0 else 0
worst = comm.bcast(worst, root=0)
sys.exit(worst)
