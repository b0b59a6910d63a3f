"""Time training epochs of one configuration on the ranks of this MPI job; rank 0 prints JSON.

Run through benchmarks/run.py, which launches every configuration and prints the ratios."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hpc_layerpar.comm import Comm  # noqa: E402
from hpc_layerpar.config import (
    OptimConfig,  # noqa: E402
    ParallelConfig,  # noqa: E402
)
from hpc_layerpar.data import DeviceDataset  # noqa: E402
from hpc_layerpar.models import build_model  # noqa: E402
from hpc_layerpar.parallel import ParallelEngine  # noqa: E402
from hpc_layerpar.runsetup import element_costs, stage_ranges  # noqa: E402
from hpc_layerpar.serial import SerialEngine, make_optimizer  # noqa: E402
from hpc_layerpar.sweep import forward_sweep  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--method", default="serial", choices=["serial", "penalty", "al"])
    p.add_argument("--ds", type=int, default=1)
    p.add_argument("--message-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--partition", default="time", choices=["time", "macs"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    comm = Comm.world()
    data = DeviceDataset(a.data, torch.device("cpu"))
    c, h, _ = data.shape
    torch.manual_seed(0)
    model = build_model("resnet", a.depth, in_channels=c, image_size=h, num_classes=data.num_classes)
    opt = make_optimizer(model, OptimConfig(lr=0.05))
    sweep_s = 0.0
    if a.method == "serial":
        eng = SerialEngine(model, opt, comm, data, None, batch_size=a.batch, drop_last=True, seed=0)
        step = lambda e: eng.train_epoch(e, lambda t: 0.05)  # noqa: E731
    else:
        pcfg = ParallelConfig(coupling="epoch", ds=a.ds, message_dtype=a.message_dtype, window=a.window,
                              partition=a.partition)
        ranges = stage_ranges(model, comm.size, pcfg, *element_costs(model, pcfg, comm, a.batch, torch.device("cpu")))
        eng = ParallelEngine(model, opt, comm, data, ranges, pcfg, method=a.method, batch_size=a.batch,
                             drop_last=True, seed=0)
        comm.barrier()
        t0 = time.perf_counter()
        forward_sweep(model, ranges, comm, data, eng.store, eng.filter, a.batch)
        comm.barrier()
        sweep_s = time.perf_counter() - t0
        step = lambda e: eng.train_epoch(e, lambda t: 0.05, 0.01)  # noqa: E731
    step(0)  # warm-up: allocator, first-touch, MPI connections
    times, sent, waits = [], [], []
    for e in range(1, a.epochs + 1):
        comm.counters.reset()
        comm.barrier()
        t0 = time.perf_counter()
        step(e)
        comm.barrier()
        times.append(time.perf_counter() - t0)
        sent.append(comm.counters.bytes_sent)
        waits.append(comm.counters.wait_seconds)
    per_rank = comm.gather_obj((sent[-1], min(waits)))
    if comm.rank == 0:
        print("RESULT " + json.dumps({
            "ranks": comm.size, "method": a.method, "ds": a.ds, "message_dtype": a.message_dtype,
            "depth": a.depth, "batch": a.batch, "epoch_seconds": min(times), "epoch_seconds_all": times,
            "bytes_sent_per_rank": max(b for b, _ in per_rank), "bytes_sent_total": sum(b for b, _ in per_rank),
            "wait_seconds_max": max(w for _, w in per_rank), "sweep_seconds": sweep_s,
            "samples": data.n_train // a.batch * a.batch,
            "ranges": ranges if a.method != "serial" else None}))


if __name__ == "__main__":
    main()
