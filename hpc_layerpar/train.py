"""run(cfg, comm): set up data and model on every rank, walk the schedule, write the metrics."""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from . import metrics as M
from .comm import Comm, hostname, library_version
from .config import Config, ConfigError
from .data import DeviceDataset, make_augment
from .dataformat import DataError
from .models import count_parameters, model_from_config
from .auxstore import DTYPES
from .filters import DSFilter, check_boundaries
from .parallel import ParallelEngine, beta_for_epoch
from .costs import measure_costs, parse_cuts
from .partition import balanced_partition, stage_costs
from .schedule import PARALLEL, lr_at, parallel_epochs_before, parse_phases, phase_of_epoch, total_epochs
from .serial import SerialEngine, make_optimizer
from .sweep import evaluate, forward_sweep, recalibrate_bn, share_stages


def resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"run.device={spec!r} but this torch sees no CUDA device "
                          f"(torch {torch.__version__}); use run.device=auto or cpu.")
    if spec == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    idx = int(spec.split(":")[1])
    if idx >= torch.cuda.device_count():
        raise ConfigError(f"run.device={spec!r} but only {torch.cuda.device_count()} CUDA devices exist.")
    return torch.device("cuda", idx)


def set_threads(threads: int, local_size: int) -> int:
    if threads == 0:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        threads = max(1, cores // max(local_size, 1))
    torch.set_num_threads(threads)
    return threads


def check_fit(cfg: Config, data: DeviceDataset, comm: Comm) -> None:
    """Configuration checks that need the dataset's shape."""
    c, h, w = data.shape
    if h != w or h % 4:
        raise ConfigError(f"images of {data.name} are {h}x{w}; the models need square images whose side "
                          "is divisible by 4. Re-create the dataset or pad it.")
    if cfg.data.batch_size > data.n_train:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} exceeds the {data.n_train} training "
                          f"images of {data.name}; use a smaller batch.")
    if cfg.data.batch_size < comm.size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is smaller than the {comm.size} ranks "
                          "that share each batch; use a batch of at least one sample per rank.")


def agree(comm: Comm, fn):
    """Run a set-up step on every rank; if it fails with a user error on any rank, raise that error
    on all ranks alike, so no rank waits in a collective for a peer that gave up."""
    err = None
    try:
        result = fn()
    except (ConfigError, DataError) as exc:
        err, result = exc, None
    errors = comm.allgather_obj(None if err is None else (type(err).__name__, str(err)))
    for r, e in enumerate(errors):
        if e is not None:
            cls = ConfigError if e[0] == "ConfigError" else DataError
            msg = e[1] if comm.size == 1 else f"{e[1]} (reported by rank {r})"
            raise cls(msg)
    return result


class Progress:
    """One line per epoch for batch logs; a live bar only when stdout is a terminal."""

    def __init__(self, mode: str, enabled: bool):
        self.enabled = enabled and mode != "off"
        self.bar = self.enabled and mode == "auto" and sys.stdout.isatty()

    def log(self, text: str):
        if self.enabled:
            if self.bar:
                sys.stdout.write("\r\x1b[K")
            print(text, flush=True)

    def step(self, epoch, total_epochs_, step, steps, loss):
        if self.bar:
            width = 30
            fill = int(width * step / steps)
            sys.stdout.write(f"\r  epoch {epoch + 1}/{total_epochs_} [{'#' * fill}{'.' * (width - fill)}] "
                             f"{step}/{steps} loss {loss:.4f}")
            sys.stdout.flush()


@dataclass
class Summary:
    metrics_path: str
    final_test_acc: float
    best_test_acc: float
    wall_seconds: float
    epochs: int


def element_costs(model, pcfg, comm, batch_size: int, device) -> list[int]:
    """Costs for the partitioner. Measured times are averaged over the ranks by one Allreduce, so
    every rank gets bit-identical numbers and computes the same split."""
    if pcfg.partition != "time":
        return list(model.costs)
    mine = measure_costs(model, batch_size, device)
    return [int(round(c)) for c in comm.allreduce_array(mine) / comm.size]


def stage_ranges(model, k: int, pcfg, costs) -> list:
    """The contiguous split for k ranks (balanced, or given), checked against the DS factor."""
    try:
        ranges = parse_cuts(pcfg.partition, len(model), k) or balanced_partition(costs, k)
    except ValueError as exc:  # PartitionError is a ValueError
        raise ConfigError(f"{exc} The parallel phases put one stage on each rank.") from None
    ds = pcfg.ds
    try:
        check_boundaries(ds, [model.shapes[a] for a, _ in ranges[1:]])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return ranges


def aux_bytes(model, ranges, n_train: int, pcfg, with_multipliers: bool) -> list:
    """Bytes of auxiliary storage per rank (rank 0 owns no boundary)."""
    filt = DSFilter(pcfg.ds)
    size = DTYPES[pcfg.aux_dtype].itemsize
    out = [0]
    for a, _ in ranges[1:]:
        c, h, w = filt.coarse_shape(model.shapes[a])
        out.append(n_train * c * h * w * size * (2 if with_multipliers else 1))
    return out


def run(cfg: Config, comm: Comm | None = None, quiet: bool = False) -> Summary:
    if comm is None:
        comm = Comm.world()
        try:
            return run(cfg, comm, quiet)
        finally:
            comm.free()
    t_start = time.perf_counter()
    progress = Progress(cfg.run.progress, enabled=(comm.rank == 0) and not quiet)
    phases = parse_phases(cfg.train.phases)
    n_epochs = total_epochs(phases)
    methods = {p.method for p in phases}
    any_parallel = bool(methods & set(PARALLEL))

    def setup():
        device = resolve_device(cfg.run.device, comm.local_rank)
        threads = set_threads(cfg.run.threads, comm.local_size)
        data = DeviceDataset(cfg.data.path, device)
        check_fit(cfg, data, comm)
        c, h, _ = data.shape
        model = model_from_config(cfg.model, in_channels=c, image_size=h, num_classes=data.num_classes,
                                  seed=cfg.train.seed).to(device)
        return device, threads, data, model

    device, threads, data, model = agree(comm, setup)
    ranges = costs = None
    if any_parallel:
        costs = element_costs(model, cfg.parallel, comm, cfg.data.batch_size, device)
        ranges = agree(comm, lambda: stage_ranges(model, comm.size, cfg.parallel, costs))
    c, h, _ = data.shape
    opt = make_optimizer(model, cfg.optim)
    augment = make_augment(cfg.data, data, cfg.train.seed)
    serial = SerialEngine(model, opt, comm, data, augment, batch_size=cfg.data.batch_size,
                          drop_last=cfg.data.drop_last, seed=cfg.train.seed)
    o, pc = cfg.optim, cfg.parallel

    def lr_fn(t):
        return lr_at(t, base=o.lr, total=n_epochs, schedule=o.schedule, warmup=o.warmup_epochs,
                     milestones=o.milestones, gamma=o.gamma)

    hosts = comm.allgather_obj(hostname())
    devices = comm.allgather_obj(str(device) + ("" if device.type != "cuda" else
                                                f" ({torch.cuda.get_device_name(device)})"))
    writer = None
    path = None
    if comm.rank == 0:
        path = M.unique_path(cfg.run.out_dir, cfg.run.name)
        extra = {}
        if ranges is not None:
            extra = {"stage_ranges": [list(r) for r in ranges], "element_costs": costs,
                     "partition": cfg.parallel.partition, "stage_costs": stage_costs(costs, ranges),
                     "aux_bytes": aux_bytes(model, ranges, data.n_train, pc, "al" in methods)}
        attrs = M.provenance({
            "mpi_library": library_version(), "hostnames": hosts, "devices": devices,
            "threads_per_rank": threads, "model": model.name, "num_parameters": count_parameters(model),
            "dataset": data.name, "dataset_path": os.path.abspath(cfg.data.path),
            "n_train": data.n_train, "n_test": data.n_test, "phases": cfg.train.phases,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), **extra,
        })
        writer = M.MetricsWriter(path, config_json=cfg.to_json(), world_size=comm.size, attrs=attrs)
    path = comm.bcast_obj(path)
    progress.log(f"hpc_layerpar: {model.name} ({count_parameters(model) / 1e6:.3f} M parameters) on "
                 f"{data.name} ({data.n_train} train / {data.n_test} test, {c}x{h}x{h}), "
                 f"{comm.size} rank(s), device {device}, {threads} thread(s)/rank, "
                 f"phases {cfg.train.phases}, batch {cfg.data.batch_size}")
    if ranges is not None:
        progress.log(f"stages (elements [start, end) per rank, partition={pc.partition}): {ranges}; "
                     f"stage cost shares {[round(c / sum(costs), 3) for c in stage_costs(costs, ranges)]}; DS factor {pc.ds}; "
                     f"auxiliary storage per rank {[round(b / 2**20, 1) for b in aux_bytes(model, ranges, data.n_train, pc, 'al' in methods)]} MiB")
    progress.log(f"metrics file: {path}")

    nan = float("nan")
    best = final = nan
    par = None
    starts = [sum(p.epochs for p in phases[:i]) for i in range(len(phases))]
    for epoch in range(n_epochs):
        pidx, phase = phase_of_epoch(phases, epoch)
        comm.counters.reset()
        comm.barrier()  # epochs start together, so epoch times measure the same thing on all ranks
        if epoch == cfg.debug.fail_epoch and comm.rank == cfg.debug.fail_rank:
            raise RuntimeError(f"injected failure on rank {comm.rank} at epoch {epoch} (debug.fail_rank)")
        t_sw = time.perf_counter()
        if epoch == starts[pidx]:
            previous = phases[pidx - 1].method if pidx > 0 else None
            if phase.method == "serial":
                par = None  # frees the auxiliary variables
                if previous in PARALLEL:
                    share_stages(model, ranges, comm, opt)  # every rank gets the whole network
            else:
                par = None
                par = ParallelEngine(model, opt, comm, data, ranges, pc, method=phase.method,
                                     batch_size=cfg.data.batch_size, drop_last=cfg.data.drop_last,
                                     seed=cfg.train.seed)
                forward_sweep(model, ranges, comm, data, par.store, par.filter, cfg.data.batch_size)
        switch_s = time.perf_counter() - t_sw
        switch_bytes = comm.counters.bytes_sent
        comm.counters.reset()
        t0 = time.perf_counter()
        beta = nan
        if phase.method == "serial":
            st = serial.train_epoch(epoch, lr_fn, on_step=lambda s_, n_, loss: progress.step(
                epoch, n_epochs, s_, n_, loss))
            local = (nan, nan, nan)
            train_loss, train_acc = st.train_loss, st.train_acc
        else:
            beta = beta_for_epoch(pc, phase.method, parallel_epochs_before(phases, epoch))
            st = par.train_epoch(epoch, lr_fn, beta)
            local = (st.local_loss, st.residual, st.multiplier_norm)
            train_loss, train_acc = st.train_loss, st.train_acc
        epoch_s = time.perf_counter() - t0
        counters = comm.counters.as_tuple()
        test_loss = test_acc = nan
        eval_s = 0.0
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch == n_epochs - 1:
            t1 = time.perf_counter()
            if phase.method != "serial":
                # The true network G: gather the stages, re-estimate BatchNorm, then evaluate.
                share_stages(model, ranges, comm)
                recalibrate_bn(model, data, comm, pc.bn_batches, cfg.data.batch_size, cfg.train.seed)
            test_loss, test_acc = evaluate(model, data, comm, cfg.data.eval_batch_size)
            eval_s = time.perf_counter() - t1
            final = test_acc
            best = test_acc if math.isnan(best) else max(best, test_acc)
        per_rank = comm.gather_obj((st.compute_seconds, *counters, epoch_s, switch_bytes,
                                    *local, train_loss, train_acc))
        if comm.rank == 0:
            cols = list(zip(*per_rank))
            if phase.method != "serial":  # the relaxed network's CE lives on the last rank
                train_loss, train_acc = cols[-2][-1], cols[-1][-1]
            row = {"epoch": epoch, "phase": phase.method, "phase_index": pidx, "lr": lr_fn(epoch),
                   "beta": beta, "train_loss": train_loss, "train_acc": train_acc,
                   "test_loss": test_loss, "test_acc": test_acc, "epoch_seconds": max(cols[5]),
                   "switch_seconds": switch_s, "eval_seconds": eval_s, "compute_seconds": cols[0],
                   "comm_seconds": cols[1], "wait_seconds": cols[2], "bytes_sent": cols[3],
                   "bytes_recv": cols[4], "switch_bytes_sent": cols[6], "local_loss": cols[7],
                   "residual": cols[8], "multiplier_norm": cols[9]}
            writer.append(row)
            progress.log(_epoch_line(row, n_epochs))
    wall = time.perf_counter() - t_start
    if comm.rank == 0:
        writer.set_attrs(status="completed", wall_seconds=wall, final_test_acc=final,
                         finished=M.provenance({})["started"])
        progress.log(f"done in {wall:.1f}s: final test accuracy {100 * final:.2f}% "
                     f"(best {100 * best:.2f}%); metrics written to {path}")
    return Summary(metrics_path=path, final_test_acc=final, best_test_acc=best, wall_seconds=wall,
                   epochs=n_epochs)


def _epoch_line(row: dict, n_epochs: int) -> str:
    acc = "" if math.isnan(row["test_acc"]) else \
        f" test_loss {row['test_loss']:.4f} test_acc {100 * row['test_acc']:6.2f}%"
    par = ""
    if row["phase"] != "serial":
        res = [r for r in row["residual"] if not math.isnan(r)]
        par = (f" beta {row['beta']:.3g} residual {sum(res) / max(len(res), 1):.3g}"
               f" wait {max(row['wait_seconds']):.2f}s")
    sw = f" switch {row['switch_seconds']:.2f}s" if row["switch_seconds"] > 0.005 else ""
    return (f"epoch {row['epoch'] + 1:4d}/{n_epochs} {row['phase']:7s} lr {row['lr']:.4f} "
            f"train_loss {row['train_loss']:.4f} train_acc {100 * row['train_acc']:6.2f}%{acc}{par} "
            f"time {row['epoch_seconds']:.2f}s (compute {max(row['compute_seconds']):.2f}s, "
            f"comm {max(row['comm_seconds']):.2f}s){sw}")
