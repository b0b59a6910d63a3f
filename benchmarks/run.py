"""One command, one run: per-epoch time of one-rank back-propagation, data-parallel on 2 ranks and
the penalty and AL parallel phases (pipeline coupling) at K = 1 and 2 (K = 2: with and without DS
s=2, float32 and bfloat16 messages), 1 thread per rank, ResNets on CIFAR-10-shaped inputs, the ratio
rho = T(one-rank back-propagation) / T(method), and the bytes.

    python benchmarks/run.py [--depths 20,56] [--samples 2560] [--epochs 3]

Every configuration is a training run through the CLI (`hpc_layerpar train`, as a user launches it):
one warm-up epoch, then --epochs timed ones, no augmentation, constant lr; the figures come from its
metrics file (epoch_seconds: barriers around each epoch, evaluation excluded).

Uses data/cifar10.h5 when present, otherwise generates 3x32x32 inputs (10 classes) once.
An "epoch" is --samples training images (data.subset; the ratio is per step, so a short epoch suffices)."""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from hpc_layerpar.dataformat import write_dataset  # noqa: E402
from hpc_layerpar.metrics import read_metrics  # noqa: E402


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


def launch(ranks, *, data, depth, batch, epochs, samples, method="serial", ds=1, message_dtype="float32"):
    """One configuration as a training run on `ranks` ranks through the CLI; its figures, from the
    metrics file: best timed epoch (epoch 0 is the warm-up), bytes and waiting of the busiest rank."""
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        mpiexec = os.environ.get("MPIEXEC", "mpiexec")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.join(HERE, "out")) as out:
        name = f"bench-{method}-{ranks}"
        sets = [f"data.path={data}", f"data.subset={samples}", f"data.batch_size={batch}", "data.augment=false",
                f"model.depth={depth}", f"train.phases={method}:{epochs + 1}", f"train.eval_every={epochs + 1}",
                "optim.lr=0.05", "optim.schedule=constant", f"parallel.ds={ds}",
                f"parallel.message_dtype={message_dtype}", "run.device=cpu", "run.threads=1", "run.progress=off",
                f"run.out_dir={out}", f"run.name={name}"]
        cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "hpc_layerpar", "train"] + \
            [x for s in sets for x in ("--set", s)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
        if p.returncode != 0:
            raise SystemExit(f"benchmark run failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
        (path,) = glob.glob(os.path.join(out, f"{name}*.h5"))
        m = read_metrics(path)
    c, a = m["columns"], m["attrs"]
    timed = c["epoch_seconds"][1:]
    sent = c["bytes_sent"][-1]  # per rank, the last timed epoch
    parallel = method != "serial"
    return {"ranks": ranks, "method": method, "ds": ds, "message_dtype": message_dtype, "depth": depth,
            "batch": batch, "epoch_seconds": float(timed.min()), "epoch_seconds_all": [float(t) for t in timed],
            "bytes_sent_per_rank": float(sent.max()), "bytes_sent_total": float(sent.sum()),
            "wait_seconds_max": float(c["wait_seconds"][1:].min(axis=0).max()),
            "switch_seconds": float(c["switch_seconds"][0]),
            "samples": int(a["n_train"]) // batch * batch,
            "micro_batches": int(a["micro_batches"]) if parallel else None,
            "ranges": _json(a["stage_ranges"]) if parallel else None}


def _json(v):
    """A list attribute of a metrics file (stored as JSON text)."""
    return json.loads(v) if isinstance(v, str) else v


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
          f"{'MB sent/epoch (max rank)':>24s} {'wait s':>7s} {'switch s':>8s}", flush=True)
    results = []
    for depth in [int(d) for d in a.depths.split(",")]:
        common = {"data": path, "depth": depth, "batch": a.batch, "epochs": a.epochs, "samples": a.samples}
        base = launch(1, **common)
        runs = [("back-propagation", 1, {}), ("data-parallel", a.ranks, {})]
        for method in a.methods.split(","):
            runs += [(f"{method} K=1", 1, {"method": method}),
                     (method, a.ranks, {"method": method, "ds": 1}),
                     (f"{method} DS s=2", a.ranks, {"method": method, "ds": 2}),
                     (f"{method} bf16 messages", a.ranks, {"method": method, "message_dtype": "bfloat16"})]
        for name, ranks, extra in runs:
            r = base if not extra and ranks == 1 else launch(ranks, **common, **extra)
            rho = base["epoch_seconds"] / r["epoch_seconds"]
            results.append({**r, "rho": rho, "label": name})
            print(f"resnet{depth:<4d} {name:26s} {r['ranks']:5d} {r['epoch_seconds']:8.3f} {rho:6.2f} "
                  f"{r['bytes_sent_per_rank'] / 1e6:24.2f} {r.get('wait_seconds_max', 0):7.3f} "
                  f"{r.get('switch_seconds', 0):8.3f}", flush=True)

    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
