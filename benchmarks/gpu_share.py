"""benchmarks/gpu.py --share: K ranks sharing one GPU against one rank, through the CLI."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def share(k: int, path: str, out: str, micro: int = 0) -> dict:
    """One epoch of `path`: one rank serial against k ranks (penalty) on this one GPU, through the CLI."""
    from hpc_layerpar.metrics import read_metrics

    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = mpiexec if os.path.exists(mpiexec) else os.environ.get("MPIEXEC", "mpiexec")
    secs = {}
    for label, n, preset, phases in (("serial", 1, "mnist-resnet-serial", "serial:2"),
                                     ("penalty", k, "mnist-resnet-penalty", "penalty:2")):
        name = f"share-{label}-{n}"
        cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "hpc_layerpar", "train",
               "--preset", preset, "--set", f"data.path={path}", "--set", f"train.phases={phases}",
               "--set", "train.eval_every=100", "--set", "optim.warmup_epochs=0", "--set", f"run.out_dir={out}",
               "--set", f"run.name={name}", "--set", "run.device=cuda", "--set", "run.precision=bf16",
               "--set", f"parallel.micro_batches={micro}"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
        if p.returncode != 0:
            raise SystemExit(f"--share: {' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        files = sorted(f for f in os.listdir(out) if f.startswith(name) and f.endswith(".h5"))
        cols = read_metrics(os.path.join(out, files[-1]))["columns"]
        secs[label] = float(np.min(cols["epoch_seconds"]))  # the second epoch: no capture in it
    return {"ranks": k, "micro_batches": micro, "serial_epoch_s": secs["serial"], "penalty_epoch_s": secs["penalty"],
            "rho": secs["serial"] / secs["penalty"]}
