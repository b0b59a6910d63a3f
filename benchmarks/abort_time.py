"""How long a job takes to end after one rank raises: rank 1 of 3 fails at the start of epoch 1
(debug.fail_rank) in a serial phase and in a parallel phase; prints seconds from the raise (the
time stamped in the error) to the exit of mpiexec, with the exit code.

    python benchmarks/abort_time.py"""
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import make_dataset  # noqa: E402


def main():
    tmp = tempfile.mkdtemp()
    data = make_dataset(os.path.join(tmp, "d.h5"), n_train=256)
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    for phases in ("serial:4", "penalty:4"):
        cmd = [mpiexec, "-n", "3", sys.executable, "-m", "mpi4py", "-m", "hpc_layerpar", "train",
               "--preset", "digits-resnet-penalty"] + [x for s in (
                   f"data.path={data}", "data.batch_size=16", "model.depth=8", f"train.phases={phases}",
                   "parallel.beta=0.02", f"run.out_dir={tmp}", "debug.fail_rank=1", "debug.fail_epoch=1")
                   for x in ("--set", s)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        end = time.time()
        m = re.search(r"at unix time ([0-9.]+)", p.stderr)
        if not m:
            print(f"{phases}: exit code {p.returncode}, no failure message found:\n{p.stderr[-2000:]}")
            continue
        print(f"{phases:10s} rank 1 of 3 raised; job ended {end - float(m.group(1)):.2f} s later with exit "
              f"code {p.returncode}; message in the log: {'[rank 1] aborting' in p.stderr}")


if __name__ == "__main__":
    main()
