"""Which host synchronisations a parallel epoch makes on a GPU, counted by the PyTorch profiler.

    mpiexec -n 2 python -m mpi4py benchmarks/gpu_profile.py [--depth 20] [--steps 20] [--graphs cuda]

Every rank trains one warm-up epoch (captures) of the pipeline coupling (penalty, bf16, channels_last,
host-staged messages), then profiles one epoch of --steps steps and prints, per rank, how often the CUDA
runtime was asked to synchronise: the whole device (cudaDeviceSynchronize), one stream
(cudaStreamSynchronize, e.g. a blocking copy or reading a value), one event (cudaEventSynchronize: a
staged message's own copy), and blocking copies. A hot path without device-wide syncs shows
cudaDeviceSynchronize once per epoch (the timing at its end) whatever the step count."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hpc_layerpar.comm import Comm  # noqa: E402
from hpc_layerpar.config import OptimConfig, ParallelConfig  # noqa: E402
from hpc_layerpar.data import DeviceDataset  # noqa: E402
from hpc_layerpar.dataformat import write_dataset  # noqa: E402
from hpc_layerpar.models import build_model, place_model  # noqa: E402
from hpc_layerpar.partition import balanced_partition  # noqa: E402
from hpc_layerpar.pipeline import PipelineEngine  # noqa: E402
from hpc_layerpar.serial import make_optimizer  # noqa: E402

SYNCS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--graphs", default="cuda", choices=["cuda", "off"])
    ap.add_argument("--json")
    a = ap.parse_args()
    comm = Comm.world()
    dev = torch.device("cuda", comm.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    path = None
    if comm.rank == 0:
        rng = np.random.default_rng(0)
        n = 128 * a.steps
        x = rng.integers(0, 256, size=(n, 1, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n).astype(np.int64)
        path = write_dataset(os.path.join(tempfile.mkdtemp(), "p.h5"), name="synthetic", train=(x, y),
                             test=(x[:128], y[:128]), num_classes=10, source="gpu_profile.py", hflip=False)
    path = comm.bcast_obj(path)
    data = DeviceDataset(path, dev, verify=False)
    torch.manual_seed(0)
    model = place_model(build_model("resnet", a.depth, in_channels=1, image_size=28, num_classes=10), dev, "bf16")
    ranges = balanced_partition([1] * len(model), comm.size)
    eng = PipelineEngine(model, make_optimizer(model, OptimConfig(lr=0.05)), comm, data, ranges, ParallelConfig(),
                         method="penalty", batch_size=128, drop_last=True, seed=0, graphs=a.graphs)
    eng.train_epoch(0, lambda t: 0.05, 1.0)
    comm.barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        st = eng.train_epoch(1, lambda t: 0.05, 1.0)
    counts = dict.fromkeys(SYNCS, 0)
    for ev in prof.key_averages():
        for k in SYNCS:
            if ev.key == k or (k == "cudaMemcpy" and ev.key in ("cudaMemcpy", "cudaMemcpy2D")):
                counts[k] += ev.count
    rows = comm.gather_obj({"rank": comm.rank, "steps": st.steps, "micro_batches": eng.M, **counts})
    if comm.rank == 0:
        print(f"# pipeline penalty epoch, ResNet-{a.depth}, K = {comm.size}, graphs {a.graphs}, bf16, "
              f"host-staged messages, {a.steps} steps of {eng.M} micro-batches")
        print("| rank | steps | " + " | ".join(SYNCS) + " |")
        print("| --- | --- | " + " | ".join("---" for _ in SYNCS) + " |")
        for r in rows:
            print(f"| {r['rank']} | {r['steps']} | " + " | ".join(str(r[k]) for k in SYNCS) + " |")
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(rows, fh, indent=1)
    comm.free()


if __name__ == "__main__":
    main()
