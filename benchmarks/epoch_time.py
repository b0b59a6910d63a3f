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
from hpc_layerpar.data import DeviceDataset  # noqa: E402
from hpc_layerpar.models import build_model  # noqa: E402
from hpc_layerpar.serial import SerialEngine  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--method", default="serial", choices=["serial"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    comm = Comm.world()
    data = DeviceDataset(a.data, torch.device("cpu"))
    c, h, _ = data.shape
    torch.manual_seed(0)
    model = build_model("resnet", a.depth, in_channels=c, image_size=h, num_classes=data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    eng = SerialEngine(model, opt, comm, data, None, batch_size=a.batch, drop_last=True, seed=0)
    eng.train_epoch(0, lambda t: 0.05)  # warm-up: allocator, first-touch, MPI connections
    times, sent = [], []
    for e in range(1, a.epochs + 1):
        comm.counters.reset()
        comm.barrier()
        t0 = time.perf_counter()
        eng.train_epoch(e, lambda t: 0.05)
        comm.barrier()
        times.append(time.perf_counter() - t0)
        sent.append(comm.counters.bytes_sent)
    if comm.rank == 0:
        print("RESULT " + json.dumps({"ranks": comm.size, "method": a.method, "depth": a.depth,
                                      "batch": a.batch, "epoch_seconds": min(times),
                                      "epoch_seconds_all": times, "bytes_sent_per_rank": sent[-1],
                                      "samples": eng.steps_per_epoch() * a.batch}))


if __name__ == "__main__":
    main()
