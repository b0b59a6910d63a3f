"""Scaling model: rho(K) up to 64 ranks for CIFAR ResNet-56, ResNet-110, ResNet-1202 and WRN-28-10,
from per-element forward+backward times measured on this machine and the message sizes of
ALGORITHM.md, on latency-bandwidth network presets (NVLink, InfiniBand HDR, 25 Gb Ethernet).

    python benchmarks/scaling.py [--models resnet56,resnet110,resnet1202,wrn28-10] [--batch 128]
                                 [--validate benchmarks/out/run.json]

--device cuda times the elements on a GPU (synchronised per element); --save-costs FILE writes the
per-element costs, and --costs FILE projects from such a file instead of measuring (e.g. costs
measured on a GPU node, projected on a login node).

--validate compares the model at K = 2 with rho measured by `benchmarks/run.py --json FILE` (same
machine), using a network fitted to this machine: shared-memory MPI (latency 1 us, 5 GB/s) and a
memory bandwidth measured here. Large models are timed at a smaller batch and scaled linearly."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hpc_layerpar import scaling as S  # noqa: E402
from hpc_layerpar.costs import measure_costs  # noqa: E402
from hpc_layerpar.models import build_model, count_parameters  # noqa: E402

SPECS = {"resnet20": ("resnet", 20, 1), "resnet56": ("resnet", 56, 1), "resnet110": ("resnet", 110, 1),
         "resnet1202": ("resnet", 1202, 1), "wrn28-10": ("wrn", 28, 10)}
KS = [1, 2, 4, 8, 16, 32, 64]


def measured_model(name: str, batch: int, probe_batch: int, device=None) -> S.Model:
    device = device or torch.device("cpu")
    arch, depth, width = SPECS[name]
    torch.manual_seed(0)
    net = build_model(arch, depth, width, in_channels=3, image_size=32, num_classes=10)
    us = measure_costs(net, probe_batch, device, reps=1 if device.type == "cpu" else 5)
    scale = batch / probe_batch
    numel = [int(torch.Size(s).numel()) for s in net.shapes]
    return S.Model(name, [u * scale / 1e6 for u in us], numel, count_parameters(net), batch)


def memory_bandwidth() -> float:
    a = torch.empty(64 * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    return 2 * 10 * a.numel() * 4 / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet56,resnet110,resnet1202,wrn28-10")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--validate", help="JSON written by benchmarks/run.py --json")
    ap.add_argument("--json", help="write the predictions here")
    ap.add_argument("--device", default="cpu", help="where to time the elements: cpu, cuda, cuda:N")
    ap.add_argument("--costs", help="project from the per-element costs in this file (see --save-costs)")
    ap.add_argument("--save-costs", help="write the measured per-element costs to this JSON file")
    ap.add_argument("--speedup", type=float, default=1.0,
                    help="divide the measured compute by this factor to stand for a faster device, e.g. "
                         "100 for a GPU against one CPU thread: then communication starts to matter")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    if a.validate:
        with open(a.validate) as fh:
            # the peers' rows (DDP, torch pipelining) have no project method or depth: nothing to model
            measured = [r for r in json.load(fh) if "method" in r and "depth" in r]
        here = S.Network("this machine (shared-memory MPI)", 1e-6, 5e9, memory_bandwidth())
        print(f"Validation at K = 2 on this machine (memory bandwidth {here.memory_bandwidth / 1e9:.1f} GB/s):")
        print("| model | method | measured rho | modelled rho | error |")
        print("| --- | --- | --- | --- | --- |")
        for depth in sorted({r["depth"] for r in measured}):
            m = measured_model(f"resnet{depth}", a.batch, a.batch)
            for r in measured:
                if r["depth"] != depth or r["ranks"] != 2:
                    continue
                if r["method"] == "serial":
                    label, pred = "data-parallel", S.rho_dataparallel(m, 2, here)
                else:
                    label = f"{r['method']} ds={r['ds']} {r['message_dtype']} M={r['micro_batches']}"
                    pred = S.rho_parallel(m, 2, here, ds=r["ds"], micro=r["micro_batches"],
                                          msg_bytes=2 if r["message_dtype"] == "bfloat16" else 4,
                                          keep=r.get("keep_forward", False))
                err = (pred - r["rho"]) / r["rho"]
                print(f"| resnet{depth} | {label} | {r['rho']:.2f} | {pred:.2f} | {100 * err:+.1f}% |")
        print()
    saved = {}
    if a.costs:
        with open(a.costs) as fh:
            saved = json.load(fh)["models"]
        missing = [n for n in a.models.split(",") if n not in saved]
        if missing:
            raise SystemExit(f"--costs {a.costs} has no costs for {missing}; it has {sorted(saved)}. Measure "
                             "them with --save-costs on the device, or choose --models among those.")
    costs_out = {}
    for name in a.models.split(","):
        probe = 16 if name in ("resnet1202", "wrn28-10") else a.batch
        if name in saved:
            c = saved[name]
            m = S.Model(name, c["element_seconds"], c["boundary_numel"], c["parameters"], c["batch"])
            where = f"costs from {a.costs} ({c.get('device', '?')})"
        else:
            m = measured_model(name, a.batch, probe, torch.device(a.device))
            where = f"timed at {probe} on {a.device}" + (" (1 thread)" if a.device == "cpu" else "")
        costs_out[name] = {"element_seconds": m.element_seconds, "boundary_numel": m.boundary_numel,
                           "parameters": m.parameters, "batch": m.batch, "device": a.device}
        if a.speedup != 1.0:
            m = S.Model(m.name, [t / a.speedup for t in m.element_seconds], m.boundary_numel, m.parameters,
                        m.batch)
        print(f"{name}: {count_parameters_str(m)}; one-rank step {sum(m.element_seconds):.4f} s at batch "
              f"{m.batch} ({where}" + (f", divided by {a.speedup:g})" if a.speedup != 1 else ")"))
        print("| network | method | " + " | ".join(f"K={k}" for k in KS) + " |")
        print("| --- | --- | " + " | ".join("---" for _ in KS) + " |")
        for key, net in S.PRESETS.items():
            n_el = len(m.element_seconds)

            # The closures run inside this iteration; the defaults bind this iteration's values.
            def each(fn, n_el=n_el):  # a pipeline needs at least one element per rank
                return [fn(k) if k <= n_el else float("nan") for k in KS]

            rows = {
                "parallel phase": each(lambda k, m=m, net=net: S.rho_parallel(m, k, net)),
                "parallel, DS s=2": each(lambda k, m=m, net=net: S.rho_parallel(m, k, net, ds=2)),
                "parallel, bf16 messages": each(lambda k, m=m, net=net: S.rho_parallel(m, k, net, msg_bytes=2)),
                "SPH run (80% parallel)": each(lambda k, m=m, net=net: S.rho_sph(m, k, net)),
                "data-parallel": each(lambda k, m=m, net=net: S.rho_dataparallel(m, k, net)),
            }
            for label, vals in rows.items():
                print(f"| {net.name} | {label} | " + " | ".join("-" if v != v else f"{v:.1f}" for v in vals) + " |")
                out.setdefault(name, {}).setdefault(key, {})[label] = vals
        print()
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"K": KS, "rho": out}, fh, indent=1)
    if a.save_costs:
        with open(a.save_costs, "w") as fh:
            json.dump({"models": costs_out}, fh, indent=1)


def count_parameters_str(m: S.Model) -> str:
    return f"{m.parameters / 1e6:.2f} M parameters, {len(m.element_seconds)} elements"


if __name__ == "__main__":
    main()
