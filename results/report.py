"""`hpc_layerpar report RUN.h5 ... [--out DIR] [--target 0.98]`: tables (Markdown, CSV) and PNG plots."""
from __future__ import annotations

import argparse
import glob
import os
import sys

from hpc_layerpar.metrics import MetricsError


def model_curve(runs, ks=(1, 2, 4, 8, 16)):
    """The scaling model's rho(K) for the first layer-parallel run that recorded its element costs,
    with a shared-memory network (this kind of machine)."""
    import json

    import torch

    from hpc_layerpar import scaling as S
    from hpc_layerpar.models import build_model, count_parameters

    for r in runs:
        costs = r.attrs.get("element_costs")
        shape = r.attrs.get("input_shape")
        if not isinstance(costs, str) or not isinstance(shape, str):
            continue
        costs, (c, h, _) = json.loads(costs), json.loads(shape)
        cfg = json.loads(r.attrs["config"])
        mc = cfg["model"]
        # the class count only sizes the head, which carries no message: any value will do
        net = build_model(mc["arch"], mc["depth"], mc["width"], in_channels=c, image_size=h, num_classes=10,
                          base_width=mc["base_width"], norm=mc["norm"])
        batch = cfg["data"]["batch_size"] // int(cfg["parallel"].get("replicas", 1))
        m = S.Model(r.model, [u / 1e6 for u in costs], [int(torch.Size(s).numel()) for s in net.shapes],
                    count_parameters(net), batch)
        here = S.Network("shared memory", 1e-6, 5e9, 10e9)
        ks = [k for k in ks if k <= len(costs)]
        return {f"{r.model} parallel phase": (ks, [S.rho_parallel(m, k, here) for k in ks]),
                f"{r.model} data-parallel": (ks, [S.rho_dataparallel(m, k, here) for k in ks])}
    return None


def main(argv=None) -> int:
    """`hpc_layerpar report`: summary tables and plots of the metrics files (folders: every *.h5 inside)
    in --out; exit 2 when there is none or one is not a metrics file."""
    ap = argparse.ArgumentParser(prog="hpc_layerpar report", description=__doc__)
    ap.add_argument("files", nargs="+", metavar="RUN.h5", help="metrics files (folders: every *.h5 inside)")
    ap.add_argument("--out", default="report", help="output folder (default: report/)")
    ap.add_argument("--target", type=float, default=0.98, help="test accuracy for time-to-accuracy")
    a = ap.parse_args(argv)
    from . import plots, tables
    from .runs import load

    paths = []
    for f in a.files:
        paths += sorted(glob.glob(os.path.join(f, "**", "*.h5"), recursive=True)) if os.path.isdir(f) else [f]
    try:
        runs = load(paths)
    except MetricsError as exc:
        sys.stderr.write(f"hpc_layerpar report: error: {exc}\n")
        return 2
    if not runs:
        sys.stderr.write("hpc_layerpar report: error: no metrics files given\n")
        return 2
    os.makedirs(a.out, exist_ok=True)
    table = tables.write(runs, os.path.join(a.out, "summary.md"), os.path.join(a.out, "summary.csv"), a.target)
    plots.curves(runs, os.path.join(a.out, "curves.png"))
    plots.accuracy_vs_time(runs, os.path.join(a.out, "accuracy_vs_time.png"), a.target)
    plots.time_split(runs, os.path.join(a.out, "time_split.png"))
    plots.traffic(runs, os.path.join(a.out, "traffic.png"))
    plots.rho_vs_k(runs, os.path.join(a.out, "rho_vs_k.png"), table, model_curve(runs))
    plots.health(runs, os.path.join(a.out, "health.png"))
    with open(os.path.join(a.out, "summary.md")) as fh:
        print(fh.read())
    print(f"wrote {a.out}/summary.md, summary.csv, " + ", ".join(
        sorted(f for f in os.listdir(a.out) if f.endswith(".png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
