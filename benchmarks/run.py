"""One command, one run: per-epoch time of one-rank back-propagation, data-parallel on 2 ranks and
the penalty and AL parallel phases at K = 1 and 2 (K = 2: with and without DS s=2, float32 and
bfloat16 messages), 1 thread per rank, ResNets on CIFAR-10-shaped inputs, the ratio
rho = T(one-rank back-propagation) / T(method), and the bytes.

    python benchmarks/run.py [--depths 20,56] [--samples 2560] [--epochs 3]

Uses data/cifar10.h5 when present, otherwise generates 3x32x32 inputs (10 classes) once.
An "epoch" is --samples training images (the ratio is per step, so a short epoch suffices)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from hpc_layerpar.dataformat import write_dataset  # noqa: E402


def synthetic(path, n):
    if os.path.exists(path):
        return path
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    return write_dataset(path, name="synthetic-cifar10-shape", train=(x, y), test=(x[:256], y[:256]),
                         num_classes=10, source="benchmarks/run.py random uint8", hflip=True)


def dataset(samples):
    real = os.path.join(ROOT, "data", "cifar10.h5")
    if os.path.exists(real):
        return real, "CIFAR-10 (data/cifar10.h5), first epochs of the real set"
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    return synthetic(os.path.join(HERE, "out", f"synthetic-{samples}.h5"), samples), \
        f"synthetic 3x32x32, {samples} images (no data/cifar10.h5 here)"


def launch(ranks, args):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        mpiexec = os.environ.get("MPIEXEC", "mpiexec")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py",
           os.path.join(HERE, "epoch_time.py")] + args
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"benchmark run failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="20,56", help="comma-separated ResNet depths")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--methods", default="penalty,al", help="parallel methods to measure")
    ap.add_argument("--json", help="also write every measurement (with its rho) to this file")
    ap.add_argument("--samples", type=int, default=2560)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    a = ap.parse_args()
    path, what = dataset(a.samples)
    print(f"data: {what}; batch {a.batch}; 1 thread per rank; best of {a.epochs} timed epochs "
          "after one warm-up; evaluation excluded")
    print(f"{'model':10s} {'method':26s} {'ranks':>5s} {'s/epoch':>8s} {'rho':>6s} "
          f"{'MB sent/epoch (max rank)':>24s} {'wait s':>7s} {'sweep s':>8s}", flush=True)
    results = []
    for depth in [int(d) for d in a.depths.split(",")]:
        common = ["--data", path, "--depth", str(depth), "--batch", str(a.batch), "--epochs", str(a.epochs)]
        base = launch(1, common + ["--method", "serial"])
        runs = [("back-propagation", 1, []), ("data-parallel", a.ranks, [])]
        for method in a.methods.split(","):
            runs += [(f"{method} K=1", 1, ["--method", method]),
                     (method, a.ranks, ["--method", method, "--ds", "1"]),
                     (f"{method} DS s=2", a.ranks, ["--method", method, "--ds", "2"]),
                     (f"{method} bf16 messages", a.ranks, ["--method", method, "--message-dtype", "bfloat16"])]
        for name, ranks, extra in runs:
            r = base if not extra and ranks == 1 else launch(ranks, common + (extra or ["--method", "serial"]))
            rho = base["epoch_seconds"] / r["epoch_seconds"]
            results.append({**r, "rho": rho, "label": name})
            print(f"resnet{depth:<4d} {name:26s} {r['ranks']:5d} {r['epoch_seconds']:8.3f} {rho:6.2f} "
                  f"{r['bytes_sent_per_rank'] / 1e6:24.2f} {r.get('wait_seconds_max', 0):7.3f} "
                  f"{r.get('sweep_seconds', 0):8.3f}", flush=True)

    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
