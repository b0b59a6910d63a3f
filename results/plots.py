"""PNG figures: learning curves with SPH phase switches, accuracy against wall clock, per-rank time
split, traffic, rho vs K."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # batch jobs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .runs import PARALLEL, group  # noqa: E402


def _label(key) -> str:
    dataset, model, method, k, rep, ds, dt = key
    if method in ("serial", "data-parallel"):
        return f"{method} ({rep} rank{'s' * (rep > 1)})"
    return (f"{method} K={k}" + (f"xR={rep}" if rep > 1 else "") + (f" s={ds}" if ds != "1" else "")
            + (" bf16" if dt == "bfloat16" else ""))


def curves(runs, path: str) -> None:
    """Test accuracy and training loss by epoch, mean over each group's seeds, with the serial epochs of SPH
    schedules shaded; written as a PNG to path."""
    groups = group(runs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    shaded = False
    for key, rs in sorted(groups.items(), key=lambda kv: _label(kv[0])):
        n = min(len(r.columns["epoch"]) for r in rs)
        acc = np.nanmean([r.columns["test_acc"][:n] for r in rs], axis=0) * 100
        loss = np.nanmean([r.columns["train_loss"][:n] for r in rs], axis=0)
        ep = np.arange(1, n + 1)
        ok = ~np.isnan(acc)
        ax1.plot(ep[ok], acc[ok], marker=".", label=_label(key))
        ax2.plot(ep, loss, label=_label(key))
        if not shaded and any(m in PARALLEL for m in rs[0].columns["phase"]) and "serial" in rs[0].columns["phase"]:
            for e, ph in enumerate(rs[0].columns["phase"][:n]):
                if ph == "serial":
                    for ax in (ax1, ax2):
                        ax.axvspan(e + 0.5, e + 1.5, color="0.9", zorder=0)
            shaded = True
    ax1.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy of the true network")
    ax2.set(xlabel="epoch", ylabel="training loss", yscale="log",
            title="Training loss (parallel epochs: last stage on its auxiliary inputs)")
    lo = min((np.nanmin(np.nanmean([r.columns["test_acc"] for r in rs], axis=0)) for rs in groups.values()
              if all(len(r.columns["epoch"]) == len(rs[0].columns["epoch"]) for r in rs)), default=0)
    ax1.set_ylim(max(0, 100 * lo - 2), 100.5)
    ax1.legend(fontsize=7)
    if shaded:
        ax2.text(0.01, 0.02, "grey: serial correction epochs of the SPH schedule", transform=ax2.transAxes,
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_vs_time(runs, path: str, target: float) -> None:
    """Test accuracy against training wall clock (epochs and phase switches, no evaluation), one line
    per run, a colour per group, with the target of the time-to-accuracy column: which method gets
    there first, from the same files as the table."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (key, rs) in enumerate(sorted(group(runs).items(), key=lambda kv: _label(kv[0]))):
        for j, r in enumerate(rs):
            t, acc = r.wall_clock()
            ok = ~np.isnan(acc)
            ax.plot(t[ok], 100 * acc[ok], marker=".", color=f"C{i % 10}", alpha=0.8,
                    label=_label(key) if j == 0 else None)
    ax.axhline(100 * target, color="0.5", ls="--", lw=1, label=f"target {100 * target:g}%")
    ax.set(xlabel="training wall clock (s, no evaluation)", ylabel="test accuracy (%)",
           title="Test accuracy against wall clock (one line per run)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def time_split(runs, path: str) -> None:
    """Per rank, mean seconds per epoch in compute, waiting for messages, and other MPI time."""
    groups = {k: rs[0] for k, rs in group(runs).items() if rs[0].ranks > 1 and "simulated" not in k[2]}
    if not groups:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * sum(r.ranks for r in groups.values())), 4.5))
    x, ticks, names = 0, [], []
    for key, r in sorted(groups.items(), key=lambda kv: _label(kv[0])):
        c = r.columns
        ph = c["phase"]
        mask = np.isin(ph, PARALLEL) if any(m in PARALLEL for m in ph) else ph == "serial"
        comp = c["compute_seconds"][mask].mean(axis=0)
        wait = c["wait_seconds"][mask].mean(axis=0)
        other = np.maximum(c["comm_seconds"][mask].mean(axis=0) - wait, 0)
        pos = x + np.arange(r.ranks)
        ax.bar(pos, comp, color="tab:blue", label="compute" if x == 0 else None)
        ax.bar(pos, wait, bottom=comp, color="tab:red", label="waiting for messages" if x == 0 else None)
        ax.bar(pos, other, bottom=comp + wait, color="tab:orange", label="other MPI time" if x == 0 else None)
        ticks += list(pos)
        names += [f"r{i}" for i in range(r.ranks)]
        ax.annotate(_label(key), (x + (r.ranks - 1) / 2, 0), xytext=(0, -28), textcoords="offset points",
                    ha="center", fontsize=7)
        x += r.ranks + 1
    ax.set_xticks(ticks, names, fontsize=7)
    ax.set(ylabel="seconds per epoch (mean)",
           title="Time split per rank (parallel epochs for layer-parallel runs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def traffic(runs, path: str) -> None:
    """MB sent per epoch by all ranks, one bar per multi-rank group (parallel epochs for layer-parallel
    runs); no file when there is no multi-rank run."""
    groups = group(runs)
    items = []
    for key, rs in sorted(groups.items(), key=lambda kv: _label(kv[0])):
        par = key[2] not in ("serial", "data-parallel")
        if rs[0].ranks == 1:
            continue
        mb = np.mean([r.bytes_per_epoch("parallel" if par else "serial") for r in rs]) / 1e6
        items.append((_label(key), mb, rs[0].ds if par else 0))
    if not items:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = {0: "tab:gray", 1: "tab:blue", 2: "tab:green", 4: "tab:olive"}
    ax.barh([i[0] for i in items], [i[1] for i in items], color=[colors.get(i[2], "tab:purple") for i in items])
    for y, (_, mb, _) in enumerate(items):
        ax.text(mb, y, f" {mb:.1f}", va="center", fontsize=8)
    ax.set(xlabel="MB sent per epoch, all ranks", title="Traffic per epoch (blue: no DS, green: DS s=2, "
                                                         "grey: gradient Allreduce)")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rho_vs_k(runs, path: str, table, model_curve=None) -> None:
    """Measured rho of parallel epochs by K (points) and, when given, the scaling model's curve."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in table:  # columns as in tables.HEADER
        method, k, ranks = row[2], row[4], row[3]
        if "simulated" in method:
            continue
        par = method not in ("serial", "data-parallel")
        rho = row[11] if par else row[12]  # parallel epochs; whole run for back-propagation
        if math.isnan(rho) or ranks == 1:
            continue
        ax.scatter([ranks], [rho], marker="o" if par else "s",
                   label=f"measured: {method} K={k} R={row[5]} s={row[6]}" if par else f"measured: {method}")
    if model_curve:
        for label, (ks, vals) in model_curve.items():
            ax.plot(ks, vals, "--", label=f"model: {label}")
    ax.plot([1, max(8, max(r.ranks for r in runs))], [1, max(8, max(r.ranks for r in runs))], ":", color="0.6",
            label="ideal (rho = ranks)")
    top = max(8, max(r.ranks for r in runs))
    ax.set(xlabel="ranks", ylabel="rho = T(1-rank BP epoch) / T(epoch)", xscale="log", yscale="log",
           title="Speed-up of an epoch against one-rank back-propagation")
    ticks = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= top]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def health(runs, path: str) -> bool:
    """Per parallel group (mean over seeds), by epoch: consistency ||a_k - D(x_k)|| / ||D(x_k)||
    (mean over boundaries, band: best to worst boundary) and the cosine between each stage's
    gradient and true back-propagation (mean over stages, band: worst to best). Serial epochs are
    gaps. Returns False when no run has these columns."""
    items = []
    for key, rs in sorted(group(runs).items(), key=lambda kv: _label(kv[0])):
        if key[2].split(" ")[0] in ("serial", "data-parallel"):
            continue
        n = min(len(r.columns["epoch"]) for r in rs)
        cons = np.nanmean([r.columns["consistency"][:n] for r in rs], axis=0)[:, 1:]
        cos = np.nanmean([r.columns["grad_cosine"][:n] for r in rs], axis=0)
        if np.isnan(cons).all() and np.isnan(cos).all():
            continue
        items.append((_label(key), cons, cos))
    if not items:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    with np.errstate(all="ignore"):
        for label, cons, cos in items:
            ep = np.arange(1, len(cons) + 1)
            for ax, v, lo, hi in ((ax1, np.nanmean(cons, 1), np.nanmin(cons, 1), np.nanmax(cons, 1)),
                                  (ax2, np.nanmean(cos, 1), np.nanmin(cos, 1), np.nanmax(cos, 1))):
                line, = ax.plot(ep, v, marker=".", label=label)
                ax.fill_between(ep, lo, hi, color=line.get_color(), alpha=0.15)
    ax1.set(xlabel="epoch", ylabel="||a_k - D(x_k)|| / ||D(x_k)||", yscale="log",
            title="Consistency: auxiliary inputs vs true forward states")
    ax2.set(xlabel="epoch", ylabel="cosine", ylim=(-0.2, 1.02),
            title="Gradient fidelity: stage gradient vs true back-propagation")
    ax2.axhline(1.0, color="0.6", lw=0.8, ls=":")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    fig.text(0.5, 0.005, "lines: mean over boundaries / stages; bands: best to worst; gaps: serial epochs",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
