"""The accuracy protocol: layer-parallel training against its controls, on real data, at several K,
over several seeds. One command:

    python benchmarks/sph_accuracy.py [--datasets digits,mnist,fashion] [--ks 2,4,8] [--seeds 0,1,2]
                                      [--subset 15000] [--epochs mnist=10,fashion=20,digits=30]
                                      [--jobs 2] [--out DIR] [--ds-all-seeds] [--simulate]

Per dataset (ResNet-20, the shipped presets and their defaults):
- serial back-propagation for the whole budget (1 rank), every seed;
- the serial-only control: the SPH schedule with its parallel epochs replaced by `skip` (the same
  serial epochs at the same places in the learning-rate schedule, nothing else), every seed;
- SPH penalty and SPH AL (the presets' schedule) at every K, every seed;
- one seed each: a pure-parallel run (penalty, no serial epoch) at every K, and DS s = 2 at K = 4
  (`--ds-all-seeds`: DS for every seed; on Fashion-MNIST its seeds spread over 1.4 points);
- on the whole of MNIST (no subset), the first two epochs of pure-parallel runs (penalty and AL) at
  K = 2 and 4 with the preset's schedule (`run.stop_after=2`): the early-epoch check.

Runs with more ranks than this machine has cores use the one-process simulator
(`parallel.simulate=K`, the same results as K MPI ranks, no timings); the others run under mpiexec
(`--simulate`: every run simulated, one slot each: many runs at once on one GPU).
Every run is a real `python -m hpc_layerpar train` job with 1 thread per rank; metrics files go to
DIR (default benchmarks/out/protocol-<date>), then the report (tables and plots) to DIR/report and a
Markdown table with the protocol's checks to DIR/protocol.md.

Data: digits are made offline; MNIST from ../shared/data/mnist or data/mnist.h5 (elsewhere:
`python -m data_prep mnist --download DIR`); Fashion-MNIST from the Debian package
(`apt-get install dataset-fashion-mnist`) or `python -m data_prep fashion --download DIR`.
`--subset N` trains MNIST and Fashion-MNIST on a fixed class-balanced subset of N images
(`data.subset`), always with the full test set; digits are always whole."""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from hpc_layerpar.metrics import read_metrics  # noqa: E402

DATA = {"digits": "data/digits.h5", "mnist": "data/mnist.h5", "fashion": "data/fashion.h5"}
RAW = {"mnist": os.path.join(ROOT, "..", "shared", "data", "mnist"), "fashion": None}


def prepare(name: str) -> str:
    path = os.path.join(ROOT, DATA[name])
    if os.path.exists(path):
        return path
    cmd = [sys.executable, "-m", "data_prep", name, "--out", path]
    if name == "mnist":
        if not os.path.isdir(RAW["mnist"]):
            raise SystemExit("MNIST is not here: run `python -m data_prep mnist --download DIR` on a networked "
                             "machine (or --raw DIR with the four idx files), then run this again.")
        cmd += ["--raw", RAW["mnist"]]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr + ("\nFashion-MNIST: `apt-get install dataset-fashion-mnist` or "
                                     "`python -m data_prep fashion --download DIR`." if name == "fashion" else ""))
    return path


def schedule(dataset: str, epochs: int) -> tuple[str, str]:
    """(SPH phases, serial-only control phases): 80% of the epochs parallel first, then serial."""
    ser = max(1, epochs // 5)
    return f"penalty:{epochs - ser},serial:{ser}", f"skip:{epochs - ser},serial:{ser}"


def plan(a) -> list:
    """Every run as (label, dataset, preset, K, seed, extra --set list)."""
    runs = []
    if "mnist" in a.datasets and a.early:
        for method in ("penalty", "al"):
            for k in (2, 4):
                runs.append((f"early {method}", "mnist", f"mnist-resnet-{method}", k, a.seeds[0],
                             ["data.eval_batch_size=128", f"train.phases={method}:{a.epochs['mnist']}",
                              "run.stop_after=2"]))
    for ds in a.datasets:
        epochs = a.epochs[ds]
        sph, control = schedule(ds, epochs)
        sub = [f"data.subset={a.subset}"] if ds != "digits" and a.subset else []
        # batches of 128 evaluate about 3x faster than 1000 on a CPU core (cache), same result
        ev = [f"train.eval_every={a.eval_every if ds != 'digits' else 1}", "data.eval_batch_size=128"]
        common = sub + ev + list(a.sets)
        for seed in a.seeds:
            runs.append(("serial BP", ds, f"{ds}-resnet-serial", 1, seed, common + [f"train.phases=serial:{epochs}"]))
            runs.append(("serial-only control", ds, f"{ds}-resnet-serial", 1, seed,
                         common + [f"train.phases={control}"]))
            for method in ("penalty", "al"):
                for k in a.ks:
                    runs.append((f"SPH {method}", ds, f"{ds}-resnet-{method}", k, seed,
                                 common + [f"train.phases={sph.replace('penalty', method)}"]))
        s0 = a.seeds[0]
        for k in a.ks:
            runs.append(("pure parallel penalty", ds, f"{ds}-resnet-penalty", k, s0,
                         common + [f"train.phases=penalty:{epochs}"]))
        if a.ks:
            k4 = 4 if 4 in a.ks else a.ks[0]
            for seed in (a.seeds if a.ds_all_seeds else [s0]):
                runs.append(("SPH penalty DS s=2", ds, f"{ds}-resnet-penalty-ds2", k4, seed,
                             common + [f"train.phases={sph}"]))
    return runs


def launch(label, ds, preset, k, seed, extra, out, cores, force_sim=False):
    name = f"{ds}-{label.replace(' ', '_').replace('=', '').replace('-', '')}-k{k}-s{seed}"
    sets = [f"train.seed={seed}", f"run.name={name}", f"run.out_dir={out}", "run.threads=1",
            "run.progress=lines", f"data.path={os.path.join(ROOT, DATA[ds])}", *extra]
    simulate = k > cores or (force_sim and k > 1)
    if simulate:
        sets.append(f"parallel.simulate={k}")
    py = [sys.executable, "-m", "mpi4py", "-m", "hpc_layerpar", "train", "--preset", preset]
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = mpiexec if os.path.exists(mpiexec) else os.environ.get("MPIEXEC", "mpiexec")
    cmd = ([mpiexec, "-n", str(k)] if (k > 1 and not simulate) else []) + py + [x for s in sets for x in ("--set", s)]
    # Popen gives the child its own copy of the descriptor, so ours can close once it has started.
    with open(os.path.join(out, name + ".log"), "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    return p, name, (1 if simulate else k)


def collect(out, runs):
    rows = {}
    for label, ds, _preset, k, seed, _extra in runs:
        if label.startswith("early"):
            continue
        name = f"{ds}-{label.replace(' ', '_').replace('=', '').replace('-', '')}-k{k}-s{seed}"
        files = [f for f in os.listdir(out) if f.startswith(name + "-") and f.endswith(".h5")]
        if not files:
            rows.setdefault((ds, label, k), []).append(math.nan)
            continue
        m = read_metrics(os.path.join(out, sorted(files)[-1]))
        acc = m["columns"]["test_acc"]
        done = m["attrs"]["status"] == "completed"
        rows.setdefault((ds, label, k), []).append(100 * float(acc[~_isnan(acc)][-1]) if done else math.nan)
    return rows


def _isnan(a):
    import numpy as np
    return np.isnan(a)


def early_table(out, runs) -> str:
    lines = ["| method | K | test acc. after epoch 1 | after epoch 2 |", "| --- | --- | --- | --- |"]
    for label, ds, _preset, k, seed, _extra in runs:
        if not label.startswith("early"):
            continue
        name = f"{ds}-{label.replace(' ', '_').replace('=', '').replace('-', '')}-k{k}-s{seed}"
        files = sorted(f for f in os.listdir(out) if f.startswith(name + "-") and f.endswith(".h5"))
        acc = read_metrics(os.path.join(out, files[-1]))["columns"]["test_acc"] if files else []
        cell = [f"{100 * acc[i]:.2f}%" if len(acc) > i else "-" for i in (0, 1)]
        lines.append(f"| {label.split()[1]} | {k} | {cell[0]} | {cell[1]} |")
    return "\n".join(lines)


def table(rows, a) -> str:
    lines = ["| dataset | method | K | seeds | test acc. mean % | std | min - max | vs serial BP | vs control |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def stat(v):
        ok = [x for x in v if not math.isnan(x)]
        if len(ok) < len(v) or not ok:
            return math.nan, math.nan, math.nan, math.nan
        return statistics.mean(ok), (statistics.pstdev(ok) if len(ok) > 1 else 0.0), min(ok), max(ok)

    for ds in a.datasets:
        ser = stat(rows.get((ds, "serial BP", 1), [math.nan]))[0]
        ctl = stat(rows.get((ds, "serial-only control", 1), [math.nan]))[0]
        for (d, label, k), v in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
            if d != ds:
                continue
            m, sd, lo, hi = stat(v)
            f = (lambda x: "nan" if math.isnan(x) else f"{x:.2f}")
            lines.append(f"| {ds} | {label} | {k} | {len(v)} | {f(m)} | {f(sd)} | {f(lo)} - {f(hi)} | "
                         f"{f(m - ser) if label != 'serial BP' else '-'} | "
                         f"{f(m - ctl) if label not in ('serial BP', 'serial-only control') else '-'} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="digits,mnist,fashion")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--subset", type=int, default=15000, help="training images of MNIST / Fashion-MNIST (0: all)")
    ap.add_argument("--epochs", default="digits=30,mnist=10,fashion=20", help="budget per dataset")
    ap.add_argument("--no-early", dest="early", action="store_false",
                    help="skip the full-MNIST early-epoch runs")
    ap.add_argument("--eval-every", type=int, default=2, help="evaluate every N epochs (MNIST, Fashion)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at once (cores they may use)")
    ap.add_argument("--out", default="")
    ap.add_argument("--only", default="", help="comma-separated method labels to run (default: all)")
    ap.add_argument("--table-only", action="store_true", help="only rebuild the tables from DIR")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra override for every run")
    ap.add_argument("--ds-all-seeds", action="store_true",
                    help="run DS s = 2 for every seed, not only the first (its seed spread is wide)")
    ap.add_argument("--simulate", action="store_true", help="simulate every parallel run (one slot each)")
    a = ap.parse_args()
    a.datasets = [d for d in a.datasets.split(",") if d]
    a.ks = [int(k) for k in a.ks.split(",") if k]
    a.seeds = [int(s) for s in a.seeds.split(",") if s]
    a.epochs = {**{"digits": 30, "mnist": 20, "fashion": 20},
                **{d: int(e) for d, e in (x.split("=") for x in a.epochs.split(",") if x)}}
    out = a.out or os.path.join(HERE, "out", "protocol-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    runs = plan(a)
    if a.only:
        keep = set(a.only.split(","))
        runs = [r for r in runs if r[0] in keep]
    if not a.table_only:
        for ds in a.datasets:
            prepare(ds)
        cores = max(1, a.jobs)
        todo = list(runs)
        busy = []  # (process, name, slots, started)
        t0 = time.time()
        while todo or busy:
            for p, name, slots, started in list(busy):
                if p.poll() is not None:
                    busy.remove((p, name, slots, started))
                    status = "ok" if p.returncode == 0 else f"exit {p.returncode}"
                    print(f"[{time.time() - t0:7.0f}s] {name}: {status} ({time.time() - started:.0f}s)", flush=True)
            free = cores - sum(s for _, _, s, _ in busy)
            while todo and free > 0:
                label, ds, preset, k, seed, extra = todo[0]
                need = 1 if (k > cores or a.simulate) else k
                if need > free and busy:
                    break
                todo.pop(0)
                p, name, slots = launch(label, ds, preset, k, seed, extra, out, cores, a.simulate)
                busy.append((p, name, slots, time.time()))
                free -= slots
            time.sleep(2)
        subprocess.run([sys.executable, "-m", "hpc_layerpar", "report", out, "--out", os.path.join(out, "report"),
                        "--target", "0.9"], cwd=ROOT, capture_output=True)
    text = table(collect(out, runs), a)
    if any(r[0].startswith("early") for r in runs):
        text += ("\n\nWhole MNIST (60,000 training images), pure parallel, preset schedule, seed "
                 f"{a.seeds[0]}: the first two epochs\n\n" + early_table(out, runs))
    budget = ", ".join(f"{d} {a.epochs[d]} epochs" for d in a.datasets)
    head = (f"Accuracy protocol: datasets {', '.join(a.datasets)}; ResNet-20; K in {a.ks}; seeds {a.seeds}; "
            f"{budget}" + (f"; MNIST and Fashion-MNIST on a {a.subset}-image class-balanced training subset"
                           if a.subset else "")
            + "; full test sets. Final test accuracy of the true network; "
            "nan = a run diverged or did not finish (the mean then is nan too).\n\n")
    with open(os.path.join(out, "protocol.md"), "w") as fh:
        fh.write(head + text + "\n")
    print(head + text)
    print(f"\nmetrics files, logs and report/ in {out}")


if __name__ == "__main__":
    main()
