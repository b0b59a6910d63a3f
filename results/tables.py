"""The summary table: method x dataset x K x DS, accuracy over seeds, rho, time to accuracy, traffic."""
from __future__ import annotations

import csv
import math

from .runs import group, mean_std

HEADER = ["dataset", "model", "method", "ranks", "K", "R", "DS", "messages", "seeds", "test acc mean %",
          "test acc std", "rho parallel epoch", "rho whole run", "time to target s", "MB/epoch (wire)",
          "aux MiB", "resumed runs", "incomplete runs", "diverged runs"]


def baseline_epoch(groups: dict, dataset: str, model: str) -> float:
    """Median epoch time of the one-rank serial runs of the same dataset and model."""
    for key, runs in groups.items():
        if key[0] == dataset and key[1] == model and key[2] == "serial":
            return sorted(r.epoch_seconds("all") for r in runs)[len(runs) // 2]
    return math.nan


def rows(runs, target: float) -> list[list]:
    """One row per run group, columns as HEADER: mean accuracy over seeds, rho against the one-rank serial
    run, time to target and traffic."""
    groups = group(runs)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2] != "serial", k[2], k[3] * k[4], k[5], k[6])):
        rs = groups[key]
        dataset, model, method, k, rep, ds, dt = key
        base = baseline_epoch(groups, dataset, model)
        acc, sd = mean_std([100 * r.final_acc for r in rs], keep_nan=True)
        par_t = mean_std([r.epoch_seconds("parallel") for r in rs])[0]
        all_t = mean_std([r.epoch_seconds("all") for r in rs])[0]
        tta = mean_std([r.time_to(target) for r in rs])[0]
        wire = mean_std([r.bytes_per_epoch("parallel" if method not in ("serial", "data-parallel") else "serial")
                         for r in rs])[0]
        if "simulated" in method:  # no speed-up from threads that share one process's cores
            par_t = all_t = tta = math.nan
        out.append([dataset, model, method, rs[0].ranks, k, rep, ds, dt, len(rs), acc, sd, base / par_t,
                    base / all_t, tta, wire / 1e6, rs[0].aux_bytes / 2**20,
                    sum(1 for r in rs if "resumes" in r.attrs),
                    sum(1 for r in rs if r.status not in ("completed", "diverged")),
                    sum(1 for r in rs if r.status == "diverged")])
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.2f}"
    return str(v)


def write(runs, md_path: str, csv_path: str, target: float) -> list[list]:
    """Write the summary rows as CSV and as a Markdown table under a preamble explaining rho; return them."""
    table = rows(runs, target)
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        w.writerows(table)
    with open(md_path, "w") as fh:
        fh.write(f"Runs: {len(runs)}. rho = median epoch time of one-rank serial back-propagation on the same "
                 f"dataset and model / this method's (parallel epochs only, and all epochs); time to "
                 f"{100 * target:.1f}% test accuracy counts training epochs and phase switches, no evaluation.\n\n")
        fh.write("| " + " | ".join(HEADER) + " |\n|" + " --- |" * len(HEADER) + "\n")
        for row in table:
            fh.write("| " + " | ".join(_fmt(v) for v in row) + " |\n")
    return table
