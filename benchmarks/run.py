"""One command, one run: per-epoch and per-step time of one-rank back-propagation, data-parallel on
--ranks ranks and the penalty and AL parallel phases (pipeline coupling) at K = 1 and --ranks (with and
without DS s=2, float32 and bfloat16 messages, the automatic micro-batch count and M = 1), 1 thread per
rank, ResNets on CIFAR-10-shaped inputs, the ratio rho = T(one-rank back-propagation) / T(method) per
step, and the bytes. Beside them, the peers of benchmarks/peers.py on the same network, batch and
threads: a plain PyTorch loop on 1 process, PyTorch DDP, and torch.distributed.pipelining's GPipe and
1F1B schedules at --ranks, whose rho is against the plain loop.

    python benchmarks/run.py [--depths 20,56] [--samples 2560] [--epochs 3] [--no-peers] [--peer-steps 10]

Every configuration of the project is a training run through the CLI (`hpc_layerpar train`, as a user
launches it): one warm-up epoch, then --epochs timed ones, no augmentation, constant lr; the figures come
from its metrics file (epoch_seconds: barriers around each epoch, evaluation excluded); per step =
epoch_seconds / (samples // batch). The peers time --peer-steps steps on one fixed batch after 3 warm-up
steps (median; barriers around each step).

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

sys.path.insert(0, HERE)
import peers  # noqa: E402


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


def launch(ranks, *, data, depth, batch, epochs, samples, method="serial", ds=1, message_dtype="float32",
           micro=0, keep=True, schedule="", extra=()):
    """One configuration as a training run on `ranks` ranks through the CLI; its figures, from the
    metrics file: best timed epoch (epoch 0 is the warm-up), bytes and waiting of the busiest rank.
    micro: the pipeline's micro-batch count (parallel.micro_batches; 0: the automatic one).
    keep: parallel.keep_forward (false: every upstream forward is recomputed at B, the engine before b3f3073).
    schedule: parallel.schedule ("": the default, 1f1b; "tick": the schedule before 2026-12-04).
    extra: further "key=value" settings (e.g. "parallel.partition=macs", a split that does not vary by launch)."""
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
        if micro:
            sets.append(f"parallel.micro_batches={micro}")
        if not keep:
            sets.append("parallel.keep_forward=false")
        if schedule:
            sets.append(f"parallel.schedule={schedule}")
        sets += list(extra)
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
    steps = int(a["n_train"]) // batch
    return {"ranks": ranks, "method": method, "ds": ds, "message_dtype": message_dtype, "depth": depth,
            "batch": batch, "epoch_seconds": float(timed.min()), "steps": steps,
            "step_seconds": float(timed.min()) / steps, "epoch_seconds_all": [float(t) for t in timed],
            "bytes_sent_per_rank": float(sent.max()), "bytes_sent_total": float(sent.sum()),
            "wait_seconds_max": float(c["wait_seconds"][1:].min(axis=0).max()),
            "switch_seconds": float(c["switch_seconds"][0]),
            "samples": int(a["n_train"]) // batch * batch,
            "micro_batches": int(a["micro_batches"]) if parallel else None,
            "keep_forward": bool(json.loads(a["config"])["parallel"]["keep_forward"]) if parallel else None,
            "schedule": json.loads(a["config"])["parallel"].get("schedule", "tick") if parallel else None,
            "ranges": _json(a["stage_ranges"]) if parallel else None}


def _json(v):
    """A list attribute of a metrics file (stored as JSON text)."""
    return json.loads(v) if isinstance(v, str) else v


def _cell(v, fmt, width):
    return f"{'-':>{width}s}" if v is None else f"{v:{width}{fmt}}"


def _row(depth, name, ranks, epoch, step, rho, mb=None, wait=None, switch=None):
    print(f"resnet{depth:<4d} {name:26s} {ranks:5d} {_cell(epoch, '.3f', 8)} {_cell(step, '.4f', 8)} "
          f"{_cell(rho, '.2f', 6)} {_cell(mb, '.2f', 24)} {_cell(wait, '.3f', 7)} {_cell(switch, '.3f', 8)}",
          flush=True)


PEER_NAMES = {"plain": "peer plain PyTorch", "accum": "peer plain, accumulated", "ddp": "peer DDP",
              "gpipe": "peer GPipe", "1f1b": "peer 1F1B"}


def peer_rows(a, depth, base, cut, micro):
    """The peers of benchmarks/peers.py on this depth, printed and returned with their rho against the
    peers' own plain loop; the plain loop's entry also carries plain / the project's one-rank step."""
    rows = peers.run_peers(a.ranks, depth=depth, batch=a.batch, micro=micro, warmup=a.peer_warmup,
                           steps=a.peer_steps, ranges=cut)
    plain = next(r for r in rows if r["config"] == "plain")["step_seconds"]
    out = []
    for r in rows:
        label = PEER_NAMES[r["config"]] + (f" M={r['micro_batches']}" if "micro_batches" in r else "")
        if r.get("skipped"):
            print(f"resnet{depth:<4d} {label:26s} {r['ranks']:5d} skipped: {r['skipped']}", flush=True)
            out.append({**r, "label": label})
            continue
        rho = plain / r["step_seconds"]
        e = {**r, "label": label, "rho": rho, "rho_baseline": "peer plain PyTorch"}
        if r["config"] == "plain":
            e["plain_over_project_bp"] = plain / base["step_seconds"]
        out.append(e)
        _row(depth, label, r["ranks"], None, r["step_seconds"], rho)
    print(f"resnet{depth:<4d} baselines: plain PyTorch / project one-rank back-propagation, per step = "
          f"{plain:.4f} / {base['step_seconds']:.4f} = {plain / base['step_seconds']:.2f}"
          + (f"; pipeline cut {cut}" if cut else ""), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="20,56", help="comma-separated ResNet depths")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--methods", default="penalty,al", help="parallel methods to measure")
    ap.add_argument("--json", help="also write every measurement (with its rho) to this file")
    ap.add_argument("--samples", type=int, default=2560)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the peers of benchmarks/peers.py (plain PyTorch, DDP, GPipe, 1F1B)")
    ap.add_argument("--peer-steps", type=int, default=10, help="timed steps of each peer (median)")
    ap.add_argument("--peer-warmup", type=int, default=3, help="untimed steps of each peer first")
    ap.add_argument("--peer-micro", type=int, default=0,
                    help="micro-batches of GPipe and 1F1B (0: the project's automatic M at --ranks)")
    ap.add_argument("--peer-split", choices=("project", "macs"), default="project",
                    help="the peers' pipeline cut: the project's measured one (from its first method's run at "
                         "--ranks) or balanced_partition(model.costs)")
    a = ap.parse_args()
    path, what = dataset(a.samples)
    print(f"data: {what}; batch {a.batch}; 1 thread per rank; best of {a.epochs} timed epochs "
          "after one warm-up; evaluation excluded; s/step = s/epoch / steps")
    if a.peers:
        print(f"peers: one fixed random batch, median of {a.peer_steps} steps after {a.peer_warmup} warm-up")
    print("rho: the project's rows against its one-rank back-propagation, the peer rows against the peers' "
          "plain PyTorch loop")
    print(f"{'model':10s} {'method':26s} {'ranks':>5s} {'s/epoch':>8s} {'s/step':>8s} {'rho':>6s} "
          f"{'MB sent/epoch (max rank)':>24s} {'wait s':>7s} {'switch s':>8s}", flush=True)
    results = []
    for depth in [int(d) for d in a.depths.split(",")]:
        common = {"data": path, "depth": depth, "batch": a.batch, "epochs": a.epochs, "samples": a.samples}
        base = launch(1, **common)
        runs = [("back-propagation", 1, {}), ("data-parallel", a.ranks, {})]
        for method in a.methods.split(","):
            runs += [(f"{method} K=1", 1, {"method": method}),
                     (method, a.ranks, {"method": method, "ds": 1}),
                     (f"{method} F recomputed", a.ranks, {"method": method, "keep": False}),
                     (f"{method} stashed weights", a.ranks, {"method": method,
                                                             "extra": ("parallel.stash_weights=true",)}),
                     (f"{method} tick schedule", a.ranks, {"method": method, "schedule": "tick"}),
                     (f"{method} M=1", a.ranks, {"method": method, "micro": 1}),
                     (f"{method} DS s=2", a.ranks, {"method": method, "ds": 2}),
                     (f"{method} bf16 messages", a.ranks, {"method": method, "message_dtype": "bfloat16"})]
        mine = []
        for name, ranks, extra in runs:
            r = base if not extra and ranks == 1 else launch(ranks, **common, **extra)
            rho = base["step_seconds"] / r["step_seconds"]
            mine.append({**r, "rho": rho, "label": name, "rho_baseline": "back-propagation"})
            _row(depth, name, r["ranks"], r["epoch_seconds"], r["step_seconds"], rho,
                 r["bytes_sent_per_rank"] / 1e6, r.get("wait_seconds_max", 0), r.get("switch_seconds", 0))
        results += mine
        if a.peers:
            pipe = next((r for r in mine if r["method"] != "serial" and r["ranks"] == a.ranks), None)
            cut = pipe["ranges"] if pipe and a.peer_split == "project" else None
            micro = a.peer_micro or (pipe["micro_batches"] if pipe else 4)
            results += peer_rows(a, depth, base, cut, micro)

    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
