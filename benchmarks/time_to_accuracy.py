"""Time to accuracy: serial back-propagation, data-parallel and layer-parallel training of the same
network on the same data and budget, launched from one command, timed on this machine. One command:

    python benchmarks/time_to_accuracy.py [--dataset digits|mnist|fashion] [--ranks 2] [--epochs 5]
                                          [--subset 15000] [--seed 0] [--set k=v ...] [--out DIR]
                                          [--target-drop 0.5] [--only LABELS] [--table-only]

Four runs, one after another (they are timed, so never at the same time), each a real
`mpiexec -n RANKS python -m mpi4py -m hpc_layerpar train` job with 1 thread per rank, real MPI ranks
(never the simulator), a test evaluation after every epoch (`train.eval_every=1`, batches of 128):

- serial BP: 1 rank, preset DATASET-resnet-serial, `serial:E`;
- data-parallel: --ranks ranks, the same preset and phases (serial phases use all ranks as
  data-parallel back-propagation);
- SPH penalty: --ranks ranks, preset DATASET-resnet-penalty, `penalty:E-E//5,serial:E//5`
  (E//5 at least 1), the layer-parallel phase first and the serial correction at the end;
- pure parallel: --ranks ranks, the same preset with `penalty:E` (no serial epoch).

What the figures mean. The clock is the cumulative *training* time of each run: per epoch,
`epoch_seconds + switch_seconds` of its metrics file (the training epoch, max over ranks, plus the
phase-switch work before it: starting the parallel engine, gathering the stages), summed over the
epochs so far. Test evaluation (`eval_seconds`) is excluded: it is measurement, run here after every
epoch, which a production run would not do; process start-up, data loading and the partition's
timing measurement before the first epoch are excluded as well. The column "whole run s" gives each
run's `wall_seconds` (start-up after the imports, every evaluation included) for comparison.
The target is serial BP's final test accuracy minus --target-drop points; a run's time to target is
its clock at the end of the first epoch whose test accuracy reaches the target ("not reached"
otherwise), and "speed-up to target" is serial BP's time to target divided by the run's.

These are wall-clock figures of this machine, one run each, no repetition: on a shared CPU they vary
by 5-10% between launches. On a CPU, data-parallel training is a strong competitor: its Allreduce
of the gradients is cheap next to the compute, while a pipeline stage moves a batch of activations
each way per step and a layer-parallel phase may need more epochs to reach an accuracy.

Outputs in DIR (default benchmarks/out/tta-<date>-<time>): per run its metrics file and log, then
tta.md (the tables), tta.json (the numbers) and tta.png (test accuracy against the cumulative
training clock, one line per run, the target dashed). `--table-only` rebuilds those three from the
metrics files already in DIR (default: the newest benchmarks/out/tta-*).

Data: data/NAME.h5 (or --data FILE). Missing data is made by `python -m data_prep digits --out
data/digits.h5`, `python -m data_prep mnist --raw ../shared/data/mnist` (or `--download DIR`), or
`python -m data_prep fashion` after `apt-get install dataset-fashion-mnist`. MNIST and
Fashion-MNIST train on a fixed class-balanced subset of --subset images (default 15000; 0: all),
always with the whole test set; digits are always whole."""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from hpc_layerpar.metrics import MetricsError, read_metrics  # noqa: E402

DATASETS = ("digits", "mnist", "fashion")
LABELS = ("serial BP", "data-parallel", "SPH penalty", "pure parallel")
SLUG = {"serial BP": "serial_bp", "data-parallel": "data_parallel", "SPH penalty": "sph_penalty",
        "pure parallel": "pure_parallel"}
MAKE = {"digits": "python -m data_prep digits --out data/digits.h5",
        "mnist": "python -m data_prep mnist --raw ../shared/data/mnist   (or: --download DIR on a networked machine)",
        "fashion": "apt-get install dataset-fashion-mnist && python -m data_prep fashion"}
CLOCK = ("cumulative training time: epoch_seconds + switch_seconds per epoch, summed; test evaluation, "
         "process start-up and the set-up before the first epoch excluded")


def plan(dataset: str, ranks: int, epochs: int) -> list:
    """Every run as (label, ranks, preset, phases)."""
    ser = max(1, epochs // 5)
    return [("serial BP", 1, f"{dataset}-resnet-serial", f"serial:{epochs}"),
            ("data-parallel", ranks, f"{dataset}-resnet-serial", f"serial:{epochs}"),
            ("SPH penalty", ranks, f"{dataset}-resnet-penalty", f"penalty:{epochs - ser},serial:{ser}"),
            ("pure parallel", ranks, f"{dataset}-resnet-penalty", f"penalty:{epochs}")]


def run_name(dataset: str, label: str, ranks: int, seed: int) -> str:
    return f"tta-{dataset}-{SLUG[label]}-k{ranks}-s{seed}"


def _mpiexec() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return exe if os.path.exists(exe) else os.environ.get("MPIEXEC", "mpiexec")


def launch(label, ranks, preset, phases, *, a, data, out) -> tuple:
    """One run through the CLI under mpiexec, waited for; (exit code, seconds, log path)."""
    name = run_name(a.dataset, label, ranks, a.seed)
    sets = [f"train.seed={a.seed}", f"run.name={name}", f"run.out_dir={out}", "run.threads=1", "run.device=cpu",
            "run.progress=lines", f"data.path={data}", "data.eval_batch_size=128", "train.eval_every=1",
            f"train.phases={phases}"]
    if a.dataset != "digits" and a.subset:
        sets.append(f"data.subset={a.subset}")
    sets += list(a.sets)  # the user's overrides come last, so they win
    cmd = [_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "hpc_layerpar", "train",
           "--preset", preset] + [x for s in sets for x in ("--set", s)]
    log = os.path.join(out, name + ".log")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    return rc, time.perf_counter() - t0, log


def latest_metrics(out: str, dataset: str, label: str, seed: int):
    """The newest metrics file of a run in DIR (any rank count), or None."""
    files = glob.glob(os.path.join(out, f"tta-{dataset}-{SLUG[label]}-k*-s{seed}-*.h5"))
    return max(files, key=os.path.getmtime) if files else None


def summarise(path: str, label: str) -> dict:
    """A run's per-epoch clock and test accuracy from its metrics file."""
    m = read_metrics(path)
    c, attrs = m["columns"], m["attrs"]
    sw = np.nan_to_num(np.asarray(c.get("switch_seconds", np.zeros(len(c["epoch"]))), dtype=float), nan=0.0)
    per_epoch = np.asarray(c["epoch_seconds"], dtype=float) + sw
    cum = np.cumsum(per_epoch)
    acc = [None if math.isnan(float(x)) else float(x) for x in c["test_acc"]]
    seen = [x for x in acc if x is not None]
    return {"label": label, "file": os.path.basename(path), "status": attrs.get("status", "?"),
            "ranks": int(attrs.get("world_size", 1)),
            "phases": str(attrs.get("phases", m["config"]["train"]["phases"])),
            "model": str(attrs.get("model", "")), "n_train": attrs.get("n_train"),
            "epochs": [int(e) + 1 for e in c["epoch"]], "phase": [str(p) for p in c["phase"]],
            "epoch_seconds": [float(x) for x in c["epoch_seconds"]], "switch_seconds": [float(x) for x in sw],
            "cum_seconds": [float(x) for x in cum], "test_acc": acc,
            "final_acc": seen[-1] if seen else None, "train_seconds": float(cum[-1]) if len(cum) else 0.0,
            "wall_seconds": float(attrs["wall_seconds"]) if "wall_seconds" in attrs else None}


def analyse(runs: list, target_drop: float) -> float | None:
    """Adds time_to_target and speedup_to_target to every run; returns the target (None without serial BP)."""
    serial = next((r for r in runs if r["label"] == "serial BP" and r["final_acc"] is not None), None)
    target = serial["final_acc"] - target_drop / 100 if serial else None
    for r in runs:
        r["time_to_target"] = None
        if target is not None:
            for s, acc in zip(r["cum_seconds"], r["test_acc"]):
                if acc is not None and acc >= target - 1e-12:
                    r["time_to_target"] = s
                    break
    base = serial["time_to_target"] if serial else None
    for r in runs:
        r["speedup_to_target"] = (base / r["time_to_target"]) if (base and r["time_to_target"]) else None
    return target


def _f(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def tables(runs: list, target, head: str) -> str:
    lines = [head, "",
             "| run | ranks | final test acc. % | training s | time to target s | speed-up to target "
             "(serial / run) | whole run s | status |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        ttt = _f(r["time_to_target"]) if target is not None and r["time_to_target"] is not None else (
            "not reached" if target is not None else "-")
        lines.append(f"| {r['label']} | {r['ranks']} | {_f(r['final_acc'] and 100 * r['final_acc'], '{:.2f}')} | "
                     f"{r['train_seconds']:.1f} | {ttt} | {_f(r['speedup_to_target'], '{:.2f}')} | "
                     f"{_f(r['wall_seconds'])} | {r['status']} |")
    n = max((len(r["epochs"]) for r in runs), default=0)
    lines += ["", "Per epoch: cumulative training s / test acc. %", "",
              "| epoch | " + " | ".join(f"{r['label']} s | {r['label']} acc. %" for r in runs) + " |",
              "| --- |" + " --- | --- |" * len(runs)]
    for e in range(n):
        cells = []
        for r in runs:
            if e < len(r["epochs"]):
                acc = r["test_acc"][e]
                cells += [f"{r['cum_seconds'][e]:.1f}", "-" if acc is None else f"{100 * acc:.2f}"]
            else:
                cells += ["", ""]
        lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list, target, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        pts = [(s, 100 * a) for s, a in zip(r["cum_seconds"], r["test_acc"]) if a is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=f"{r['label']} ({r['ranks']} rank{'s' * (r['ranks'] > 1)})")
    if target is not None:
        ax.axhline(100 * target, linestyle="--", color="gray", label=f"target {100 * target:.2f}%")
    ax.set_xlabel("cumulative training wall clock, s (evaluation excluded)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: str, a) -> int:
    """Tables, JSON and plot from the metrics files in DIR; 1 when a run is missing or incomplete."""
    runs, missing = [], []
    for label in LABELS:
        path = latest_metrics(out, a.dataset, label, a.seed)
        if path is None:
            missing.append(label)
            continue
        try:
            runs.append(summarise(path, label))
        except MetricsError as exc:
            print(f"{label}: {exc}", file=sys.stderr)
            missing.append(label)
    if not runs:
        print(f"no metrics files of dataset {a.dataset}, seed {a.seed} in {out}", file=sys.stderr)
        return 1
    target = analyse(runs, a.target_drop)
    model = runs[0]["model"] or "ResNet"
    head = (f"Time to accuracy: {a.dataset} ({runs[0]['n_train']} training images), {model}, seed {a.seed}, "
            f"{max(len(r['epochs']) for r in runs)} epochs, 1 thread per rank, this machine. Clock: {CLOCK}. "
            + (f"Target: serial BP's final test accuracy - {a.target_drop} points = {100 * target:.2f}%."
               if target is not None else "No serial BP run: no target.")
            + (f" Missing runs: {', '.join(missing)}." if missing else ""))
    text = tables(runs, target, head)
    with open(os.path.join(out, "tta.md"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(out, "tta.json"), "w") as fh:
        json.dump({"dataset": a.dataset, "seed": a.seed, "target_drop_points": a.target_drop, "target": target,
                   "clock": CLOCK, "missing": missing, "runs": runs}, fh, indent=1)
    plot(runs, target, os.path.join(out, "tta.png"), f"{a.dataset}, {model}: test accuracy vs training wall clock")
    print(text)
    print(f"\ntta.md, tta.json, tta.png, metrics files and logs in {out}")
    return 1 if missing or any(r["status"] != "completed" for r in runs) else 0


def data_path(a) -> str:
    path = os.path.abspath(a.data) if a.data else os.path.join(ROOT, "data", f"{a.dataset}.h5")
    if not os.path.exists(path):
        print(f"no {a.dataset} data at {path}; make it (in {ROOT}) with:\n  {MAKE[a.dataset]}", file=sys.stderr)
        raise SystemExit(2)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=DATASETS, default="digits")
    ap.add_argument("--data", default="", help="the dataset's HDF5 file (default data/DATASET.h5)")
    ap.add_argument("--ranks", type=int, default=2, help="K: ranks of data-parallel, SPH and pure parallel")
    ap.add_argument("--epochs", type=int, default=5, help="budget E of every run (at least 2)")
    ap.add_argument("--subset", type=int, default=15000,
                    help="training images of MNIST / Fashion-MNIST (0: all; digits are always whole)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra override for every run (repeat)")
    ap.add_argument("--out", default="", help="output folder (default benchmarks/out/tta-<date>-<time>)")
    ap.add_argument("--target-drop", type=float, default=0.5,
                    help="target = serial BP's final test accuracy minus this many points")
    ap.add_argument("--jobs", type=int, default=1, choices=[1],
                    help="runs at once: only 1, the runs are timed and must not share the cores")
    ap.add_argument("--only", default="", help="comma-separated labels to run, of: " + ", ".join(LABELS)
                    + " (the table takes every run found in DIR)")
    ap.add_argument("--table-only", action="store_true", help="only rebuild tta.md/json/png from DIR")
    a = ap.parse_args()
    if a.epochs < 2:
        ap.error("--epochs must be at least 2 (the SPH run has a parallel and a serial phase)")
    if a.ranks < 2:
        ap.error("--ranks must be at least 2")
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    if set(only) - set(LABELS):
        ap.error(f"unknown labels {sorted(set(only) - set(LABELS))}; choose from {', '.join(LABELS)}")
    if a.table_only:
        out = a.out or max(glob.glob(os.path.join(HERE, "out", "tta-*")), key=os.path.getmtime, default="")
        if not out or not os.path.isdir(out):
            ap.error("--table-only needs --out DIR (no benchmarks/out/tta-* found)")
        manifest = os.path.join(out, "tta-args.json")
        if os.path.exists(manifest):  # the launch's dataset and seed name its runs
            with open(manifest) as fh:
                m = json.load(fh)
            a.dataset, a.seed = m["dataset"], m["seed"]
        return report(out, a)
    data = data_path(a)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = os.path.abspath(a.out or os.path.join(HERE, "out", "tta-" + stamp))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tta-args.json"), "w") as fh:
        json.dump({"dataset": a.dataset, "data": data, "ranks": a.ranks, "epochs": a.epochs, "subset": a.subset,
                   "seed": a.seed, "sets": a.sets, "target_drop": a.target_drop}, fh, indent=1)
    failed = []
    t0 = time.perf_counter()
    for label, ranks, preset, phases in plan(a.dataset, a.ranks, a.epochs):
        if only and label not in only:
            continue
        print(f"[{time.perf_counter() - t0:6.0f}s] {label}: {ranks} rank(s), {preset}, {phases}", flush=True)
        rc, secs, log = launch(label, ranks, preset, phases, a=a, data=data, out=out)
        print(f"[{time.perf_counter() - t0:6.0f}s] {label}: {'ok' if rc == 0 else f'exit {rc}'} ({secs:.0f}s)",
              flush=True)
        if rc != 0:
            failed.append(label)
            with open(log) as fh:
                print(f"--- last lines of {log}:\n" + "".join(fh.readlines()[-15:]), file=sys.stderr)
    rc = report(out, a)
    return 1 if failed else rc


if __name__ == "__main__":
    sys.exit(main())
