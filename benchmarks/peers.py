"""The peers of benchmarks/run.py: per-step seconds of PyTorch's own ways to train the same network
on the same batch, 1 thread per process, on CPU (gloo).

    python benchmarks/peers.py [--ranks 2] [--depth 20] [--batch 128] [--micro 4] [--warmup 3] [--steps 10]

- plain: a plain PyTorch loop on 1 process (forward, cross-entropy, backward, SGD step), the peers'
  own baseline;
- accum: the same loop with the batch split into --micro micro-batches whose gradients accumulate
  before the step (BatchNorm per micro-batch, as the pipelines run). On a 1-thread CPU a 32-sample
  micro-batch runs 10-15% faster per sample than a 128-sample batch (caches), a gain every row that
  splits the batch shares; this row shows how much of a rho comes from it;
- ddp: torch.nn.parallel.DistributedDataParallel on --ranks processes, batch/ranks samples each;
- gpipe, 1f1b: torch.distributed.pipelining (PipelineStage with ScheduleGPipe / Schedule1F1B, loss =
  cross-entropy) on --ranks processes, the network cut into --ranks stages of whole elements, --micro
  micro-batches per step.

The network is this project's (hpc_layerpar.models.build_model("resnet", depth), 3x32x32 inputs, 10
classes); the pipeline's stages wrap elements[start:end], cut by hpc_layerpar.partition.
balanced_partition(model.costs, ranks) unless --ranges gives the cut (benchmarks/run.py passes the
project's measured one). Inputs are one fixed random batch (no data loading). SGD lr 0.05, momentum 0.9.
--warmup steps, then --steps timed ones, each between two barriers; the figure is the median.

The parent launches `mpiexec -n 1` (plain, accum) and `mpiexec -n RANKS` (the others) of this script with
--worker; torch.distributed (gloo) takes its rank and size from MPICH's PMI_RANK / PMI_SIZE and
MASTER_ADDR=127.0.0.1, MASTER_PORT=a free port the parent chose. One JSON line per configuration
(rank 0 prints it)."""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from hpc_layerpar.models import build_model  # noqa: E402
from hpc_layerpar.partition import balanced_partition  # noqa: E402

CONFIGS = ("plain", "accum", "ddp", "gpipe", "1f1b")
ONE_PROCESS = ("plain", "accum")
LR, MOMENTUM = 0.05, 0.9


def network(depth: int, seed: int = 0):
    """The benchmarked ResNet (every process builds it from the same seed)."""
    torch.manual_seed(seed)
    return build_model("resnet", depth, in_channels=3, image_size=32, num_classes=10)


def batch_of(batch: int, seed: int = 1):
    """One fixed random batch: 3x32x32 inputs, labels of 10 classes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)


class StageModule(nn.Module):
    """Elements [start, end) of a LayerSequence as one module: a pipeline stage's part of the network."""

    def __init__(self, model, start: int, end: int):
        super().__init__()
        self.elements = nn.ModuleList(model.elements[start:end])

    def forward(self, x):
        """The elements applied in order."""
        for el in self.elements:
            x = el(x)
        return x


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def time_steps(step, warmup: int, steps: int) -> list:
    """Seconds of each of `steps` calls of step() after `warmup` untimed ones, a barrier before and
    after each (all processes of the group run it alike)."""
    for _ in range(warmup):
        step()
    out = []
    for _ in range(steps):
        _barrier()
        t0 = time.perf_counter()
        step()
        _barrier()
        out.append(time.perf_counter() - t0)
    return out


def _result(config, ranks, depth, batch, times, **extra):
    return {"config": config, "ranks": ranks, "depth": depth, "batch": batch,
            "step_seconds": statistics.median(times), "step_seconds_all": times, **extra}


def time_plain(depth: int, batch: int, warmup: int, steps: int, micro: int = 1) -> dict:
    """Per-step seconds of a plain PyTorch training loop on this process alone; micro > 1: the batch
    as `micro` accumulated micro-batches (config "accum")."""
    model = network(depth)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x, y = batch_of(batch)
    parts = list(zip(x.chunk(micro), y.chunk(micro)))

    def step():
        opt.zero_grad(set_to_none=True)
        for xs, ys in parts:
            (F.cross_entropy(model(xs), ys) / len(parts)).backward()
        opt.step()

    extra = {} if micro == 1 else {"micro_batches": len(parts)}
    return _result("plain" if micro == 1 else "accum", 1, depth, batch, time_steps(step, warmup, steps), **extra)


def time_ddp(depth: int, batch: int, warmup: int, steps: int) -> dict:
    """Per-step seconds of DistributedDataParallel over the process group, batch/size samples per rank."""
    rank, size = dist.get_rank(), dist.get_world_size()
    if batch % size:
        raise SystemExit(f"batch {batch} is not divisible by {size} ranks")
    model = nn.parallel.DistributedDataParallel(network(depth))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x, y = batch_of(batch)
    b = batch // size
    x, y = x[rank * b:(rank + 1) * b].contiguous(), y[rank * b:(rank + 1) * b].contiguous()

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return _result("ddp", size, depth, batch, time_steps(step, warmup, steps))


def time_pipeline(schedule: str, depth: int, batch: int, micro: int, warmup: int, steps: int,
                  ranges=None) -> dict:
    """Per-step seconds of torch.distributed.pipelining (schedule "gpipe" or "1f1b") with one stage per
    rank of the process group and `micro` micro-batches per step."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    rank, size = dist.get_rank(), dist.get_world_size()
    model = network(depth)
    ranges = [tuple(r) for r in ranges] if ranges else balanced_partition(model.costs, size)
    if len(ranges) != size:
        raise SystemExit(f"{len(ranges)} stage ranges for {size} ranks")
    if batch % micro:
        raise SystemExit(f"batch {batch} is not divisible by {micro} micro-batches")
    if schedule == "1f1b" and micro < size:  # Schedule1F1B refuses it
        return {"config": schedule, "ranks": size, "depth": depth, "batch": batch, "micro_batches": micro,
                "ranges": [list(r) for r in ranges], "skipped": f"1F1B needs M >= stages ({micro} < {size})"}
    start, end = ranges[rank]
    part = StageModule(model, start, end)
    part.train()
    del model
    stage = PipelineStage(part, rank, size, torch.device("cpu"))
    cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    # loss per micro-batch is a mean; scale_grads divides the summed gradients by M: the batch mean
    sched = cls(stage, n_microbatches=micro, loss_fn=lambda out, target: F.cross_entropy(out, target),
                scale_grads=True)
    opt = torch.optim.SGD(part.parameters(), lr=LR, momentum=MOMENTUM)
    x, y = batch_of(batch)
    args = (x,) if rank == 0 else ()
    kwargs = {"target": y, "return_outputs": False} if rank == size - 1 else {}

    def step():
        opt.zero_grad(set_to_none=True)
        sched.step(*args, **kwargs)
        opt.step()

    return _result(schedule, size, depth, batch, time_steps(step, warmup, steps), micro_batches=micro,
                   ranges=[list(r) for r in ranges])


def worker(a) -> None:
    """One launch: every configuration of a.configs, in order, on this process group."""
    torch.set_num_threads(a.threads)
    size = int(os.environ.get("PMI_SIZE", "1"))
    rank = int(os.environ.get("PMI_RANK", "0"))
    if size > 1:
        dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        for config in a.configs.split(","):
            if config in ONE_PROCESS:
                if size != 1:
                    raise SystemExit(f"{config} runs on 1 process")
                r = time_plain(a.depth, a.batch, a.warmup, a.steps, a.micro if config == "accum" else 1)
                r["config"] = config
            elif config == "ddp":
                r = time_ddp(a.depth, a.batch, a.warmup, a.steps)
            elif config in ("gpipe", "1f1b"):
                r = time_pipeline(config, a.depth, a.batch, a.micro, a.warmup, a.steps,
                                  json.loads(a.ranges) if a.ranges else None)
            else:
                raise SystemExit(f"unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")
            if rank == 0:
                print(json.dumps({**r, "threads": a.threads, "warmup": a.warmup}), flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for torch.distributed's store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mpiexec():
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return exe if os.path.exists(exe) else os.environ.get("MPIEXEC", "mpiexec")


def launch(n: int, configs, *, depth: int, batch: int, micro: int, warmup: int, steps: int, threads: int = 1,
           ranges=None, timeout: float = 1800) -> list:
    """Run this script's worker on n processes for `configs`; the JSON lines rank 0 printed."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [_mpiexec(), "-n", str(n), sys.executable, os.path.abspath(__file__), "--worker",
           "--configs", ",".join(configs), "--depth", str(depth), "--batch", str(batch), "--micro", str(micro),
           "--warmup", str(warmup), "--steps", str(steps), "--threads", str(threads)]
    if ranges:
        cmd += ["--ranges", json.dumps([list(r) for r in ranges])]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"peer benchmark failed: {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def run_peers(ranks: int = 2, *, depth: int = 20, batch: int = 128, micro: int = 4, warmup: int = 3,
              steps: int = 10, threads: int = 1, ranges=None, configs=CONFIGS) -> list:
    """Every peer configuration: plain and accum on 1 process, the others in one launch on `ranks` processes.
    One dict per configuration, with its median per-step seconds (step_seconds)."""
    common = {"depth": depth, "batch": batch, "micro": micro, "warmup": warmup, "steps": steps, "threads": threads,
              "ranges": ranges}
    out = []
    one = [c for c in configs if c in ONE_PROCESS]
    if one:
        out += launch(1, one, **common)
    rest = [c for c in configs if c not in ONE_PROCESS]
    if rest:
        out += launch(ranks, rest, **common)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2, help="processes of ddp, gpipe and 1f1b")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of " + ", ".join(CONFIGS))
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128, help="global batch")
    ap.add_argument("--micro", type=int, default=4, help="micro-batches per step of the pipelines")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--ranges", help='the pipeline\'s stage cut as JSON, e.g. "[[0, 5], [5, 11]]"')
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    for r in run_peers(a.ranks, depth=a.depth, batch=a.batch, micro=a.micro, warmup=a.warmup, steps=a.steps,
                       threads=a.threads, ranges=json.loads(a.ranges) if a.ranges else None,
                       configs=a.configs.split(",")):
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
