"""Metrics files -> one summary record per run, grouped the way a paper's tables group them."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from hpc_layerpar.metrics import read_metrics

PARALLEL = ("penalty", "al")


@dataclass
class Run:
    """One metrics file summarised: what ran (dataset, model, method, ranks, split, DS, messages, seed),
    its status, columns and attributes."""
    path: str
    dataset: str
    model: str
    method: str          # serial | data-parallel | SPH-penalty | SPH-al | penalty | al (no serial phase)
    ranks: int
    stages: int
    replicas: int
    ds: int
    message_dtype: str
    seed: int
    phases: str
    status: str
    columns: dict = field(repr=False)
    attrs: dict = field(repr=False)
    ds_up: str = "smooth"  # the DS upsampler (files written before it was a setting used nearest)

    @property
    def ds_label(self) -> str:
        """The DS column: the factor, with the upsampler when it is not the default smooth one."""
        return str(self.ds) if self.ds == 1 or self.ds_up == "smooth" else f"{self.ds} {self.ds_up}"

    @property
    def key(self):
        """(dataset, model, method, stages, replicas, DS label, message dtype): runs differing only in
        seed share it."""
        return (self.dataset, self.model, self.method, self.stages, self.replicas, self.ds_label,
                self.message_dtype)

    @property
    def final_acc(self) -> float:
        """The last evaluated test accuracy; NaN for a run the divergence guard stopped."""
        if self.status == "diverged":
            return math.nan
        acc = self.columns["test_acc"]
        acc = acc[~np.isnan(acc)]
        return float(acc[-1]) if len(acc) else math.nan

    def epoch_seconds(self, phase: str) -> float:
        """Median epoch time over epochs of this kind: 'parallel', 'serial' or 'all' (every epoch that
        trained: `skip` epochs of a control run take no time and would make any ratio meaningless)."""
        ph, t = self.columns["phase"], self.columns["epoch_seconds"]
        mask = (ph != "skip") if phase == "all" else (np.isin(ph, PARALLEL) if phase == "parallel"
                                                      else ph == "serial")
        return float(np.median(t[mask])) if mask.any() else math.nan

    def bytes_per_epoch(self, phase: str = "parallel") -> float:
        """Bytes all ranks sent per epoch of that kind (mean), the traffic on the wire."""
        ph = self.columns["phase"]
        mask = np.isin(ph, PARALLEL) if phase == "parallel" else ph == "serial"
        b = self.columns["bytes_sent"]
        return float(b[mask].sum(axis=1).mean()) if mask.any() else math.nan

    @property
    def aux_bytes(self) -> float:
        """Bytes of auxiliary storage summed over the ranks' entries (attribute aux_bytes); NaN if not recorded."""
        import json
        v = self.attrs.get("aux_bytes")
        return float(sum(json.loads(v))) if isinstance(v, str) else math.nan

    def wall_clock(self) -> tuple:
        """(training seconds spent by the end of each epoch: epochs and phase switches, no evaluation;
        test accuracy after each epoch, NaN where none was measured)."""
        return np.cumsum(self.columns["epoch_seconds"] + self.columns["switch_seconds"]), self.columns["test_acc"]

    def time_to(self, target: float) -> float:
        """Training seconds until test accuracy first reaches target; NaN if it never does."""
        spent, acc = self.wall_clock()
        hit = np.nonzero(np.nan_to_num(acc, nan=-1) >= target)[0]
        return float(spent[hit[0]]) if len(hit) else math.nan


def method_of(cfg: dict, world: int) -> str:
    """The run's method label from its phase list and rank count: serial, data-parallel,
    serial-only control, or the parallel method(s), prefixed SPH- when the schedule has serial epochs too."""
    methods = [p.split(":")[0] for p in cfg["train"]["phases"].strip("()").split(")")[0].split(",")]
    par = sorted({m for m in methods if m in PARALLEL})
    if not par:
        if "skip" in methods:
            return "serial-only control" + ("" if world == 1 else " (data-parallel)")
        return "serial" if world == 1 else "data-parallel"
    return ("SPH-" if "serial" in methods else "") + "+".join(par)


def load(paths) -> list[Run]:
    """One Run per metrics file (MetricsError for a foreign one); simulated runs get ' (simulated)'."""
    runs = []
    for p in paths:
        m = read_metrics(p)  # MetricsError for foreign files and other schema versions
        cfg, a = m["config"], m["attrs"]
        world = int(a["world_size"])
        replicas = int(cfg.get("parallel", {}).get("replicas", 1))
        method = method_of(cfg, world)
        parallel = method not in ("serial", "data-parallel")
        if a.get("simulated_ranks"):
            # threads of one process: the accuracy is that of `world` ranks, the timings are not
            method += " (simulated)"
        runs.append(Run(
            path=p, dataset=str(a.get("dataset", "?")), model=str(a.get("model", "?")), method=method,
            ranks=world, stages=world // replicas if parallel else 1, replicas=replicas if parallel else world,
            ds=int(cfg["parallel"]["ds"]) if parallel else 1,
            message_dtype=cfg["parallel"]["message_dtype"] if parallel else "-",
            seed=int(cfg["train"]["seed"]), phases=cfg["train"]["phases"], status=str(a.get("status")),
            columns=m["columns"], attrs=a,
            ds_up=cfg["parallel"].get("ds_up", "nearest") if parallel else "smooth"))
    return runs


def group(runs: list[Run]) -> dict:
    """Runs grouped by Run.key, in the given order within a group."""
    out: dict = {}
    for r in runs:
        out.setdefault(r.key, []).append(r)
    return out


def mean_std(values, keep_nan: bool = False) -> tuple[float, float]:
    """Mean and population spread. keep_nan: one NaN (a diverged run) makes the mean NaN, so a
    table never averages a failure away; otherwise NaNs (figures that do not apply) are skipped."""
    if keep_nan and any(math.isnan(v) for v in values):
        return math.nan, math.nan
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), (statistics.pstdev(vals) if len(vals) > 1 else 0.0)
