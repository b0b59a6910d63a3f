"""Accuracy of SPH layer-parallel training against serial back-propagation on digits, same epoch
budget, several seeds; prints a Markdown table (mean and spread of final test accuracy, wall time).

    python benchmarks/sph_accuracy.py [--seeds 0,1,2] [--ranks 2] [--set key=value ...]

Every run is a real `mpiexec ... python -m mpi4py -m hpc_layerpar train` job with 1 thread per rank;
metrics files go to benchmarks/out/sph-<date>/."""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from hpc_layerpar.metrics import read_metrics  # noqa: E402

CONFIGS = [  # (label, preset, ranks or None for --ranks, DS factor)
    ("serial back-propagation", "digits-resnet-serial", 1, 1),
    ("data-parallel back-propagation", "digits-resnet-serial", None, 1),
    ("SPH penalty", "digits-resnet-penalty", None, 1),
    ("SPH penalty", "digits-resnet-penalty-ds2", None, 2),
    ("SPH augmented Lagrangian", "digits-resnet-al", None, 1),
    ("SPH augmented Lagrangian", "digits-resnet-al-ds2", None, 2),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated preset names to run (default: all)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra override for every run")
    a = ap.parse_args()
    out = os.path.join(HERE, "out", "sph-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    data = os.path.join(ROOT, "data", "digits.h5")
    if not os.path.exists(data):
        subprocess.run([sys.executable, "-m", "data_prep", "digits", "--out", data], check=True, cwd=ROOT)
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = mpiexec if os.path.exists(mpiexec) else os.environ.get("MPIEXEC", "mpiexec")
    seeds = [int(s) for s in a.seeds.split(",")]
    only = set(filter(None, a.only.split(",")))
    rows = []
    for label, preset, ranks, ds in CONFIGS:
        if only and preset not in only:
            continue
        k = ranks or a.ranks
        accs, walls, phases = [], [], ""
        for seed in seeds:
            name = f"{preset}-k{k}-s{seed}"
            cmd = [mpiexec, "-n", str(k), sys.executable, "-m", "mpi4py", "-m", "hpc_layerpar", "train",
                   "--preset", preset, "--set", f"train.seed={seed}", "--set", f"run.name={name}",
                   "--set", f"run.out_dir={out}", "--set", "run.threads=1", "--set", "run.progress=off",
                   "--set", f"data.path={data}"] + [x for s in a.sets for x in ("--set", s)]
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
            if p.returncode != 0:
                raise SystemExit(f"run failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
            (path,) = [os.path.join(out, f) for f in os.listdir(out) if f.startswith(name + "-")]
            m = read_metrics(path)
            accs.append(100 * m["attrs"]["final_test_acc"])
            walls.append(m["attrs"]["wall_seconds"])
            phases = m["config"]["train"]["phases"]
            print(f"  {name}: {accs[-1]:.2f}% in {walls[-1]:.1f}s", flush=True)
        rows.append((label, k, ds, phases, statistics.mean(accs), statistics.pstdev(accs), min(accs),
                     max(accs), statistics.mean(walls)))
    print(f"\ndigits, ResNet-20 (9 blocks), seeds {seeds}, 1 thread per rank; metrics in {out}\n")
    print("| method | ranks | DS s | phases | test acc. mean | std | min - max | wall s (mean) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, k, ds, phases, mean, sd, lo, hi, wall in rows:
        print(f"| {label} | {k} | {ds} | {phases} | {mean:.2f}% | {sd:.2f} | {lo:.2f} - {hi:.2f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
