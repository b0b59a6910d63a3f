"""Everything a run sets up once, before its first epoch: device, threads, data, model, optimizer,
the K x R topology, the stage split, the curvature guard's caps and the resume state. Each step is
agreed on by all ranks, so a user error on one rank ends the job on every rank before training."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

from . import checkpoint as C
from . import guard as G
from .comm import Topology, detect_cuda_aware, library_version
from .config import Config
from .data import DeviceDataset, make_augment, replica_shard
from .errors import ConfigError
from .filters import DSFilter
from .graphs import graph_mode
from .models import model_from_config, place_model, smallest_map
from .runsetup import (
    agree,
    check_fit,
    device_micro,
    element_costs,
    recompute_shares,
    resolve_device,
    set_deterministic,
    set_threads,
    stage_ranges,
)
from .schedule import PARALLEL, base_beta, lr_at, micro_batches, parse_phases, total_epochs
from .serial import SerialEngine, make_optimizer


@dataclass
class RunContext:
    """The state a run is built from; the training loop (train.py) only reads it, and the engines."""
    cfg: Config
    comm: object
    device: object
    threads: int
    data: DeviceDataset
    model: object
    opt: object
    phases: list
    n_epochs: int
    ckpt_dir: str
    augment: object
    serial: SerialEngine
    src: str | None = None               # the checkpoint this launch resumes from
    meta: C.CheckpointMeta | None = None
    topo: Topology | None = None          # parallel runs only
    ranges: list | None = None
    costs: list | None = None
    fwd_costs: list | None = None
    caps: list = field(default_factory=list)  # per stage: (penalty curvature, beta cap) of its output
    shard: object = None                 # this replica's sample ids (R > 1)
    same_split: bool = False             # resumed at the rank count and split of the checkpoint
    micro: int = 1                       # the pipeline's micro-batches per step
    shares: list | None = None           # per non-last stage: the share of B that recomputes F (None: all)
    micro_seconds: dict = field(default_factory=dict)  # auto M timed on the device: {M: s per batch as M}

    @property
    def start_epoch(self) -> int:
        """The first global epoch this launch trains: 0, the one after the resumed checkpoint's, or the
        one a mid-epoch checkpoint stopped in."""
        if self.meta is None:
            return 0
        return self.meta.partial["epoch"] if self.meta.partial else self.meta.epoch + 1

    @property
    def pipe(self):
        """The communicator of this rank's pipeline (its replica's K stages); the whole comm without a topology."""
        return self.topo.pipe if self.topo is not None else self.comm

    @property
    def methods(self) -> set:
        """The set of methods the phase schedule uses."""
        return {p.method for p in self.phases}

    def lr(self, t: float) -> float:
        """The learning rate at fractional global epoch t."""
        o = self.cfg.optim
        return lr_at(t, base=o.lr, total=self.n_epochs, schedule=o.schedule, warmup=o.warmup_epochs,
                     milestones=o.milestones, gamma=o.gamma)

    def beta(self, scheduled: float) -> float:
        """The penalty weight this rank's stage uses (after the curvature guard): scheduled, capped by
        its own outgoing boundary's cap (NaN on the last stage)."""
        if not self.caps:
            return math.nan
        k = self.pipe.rank
        return math.nan if k == len(self.caps) - 1 else min(scheduled, self.caps[k][1])

    def free(self) -> None:
        """Release the topology's split communicators, if there is a topology."""
        if self.topo is not None:
            self.topo.free()


def check_same_config(cfg: Config, comm) -> None:
    """Ranks launched with different command lines (MPMD, typos in a script) stop at start."""
    digests = comm.allgather_obj(hashlib.sha256(cfg.to_json().encode()).hexdigest())
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise ConfigError(f"ranks {odd} resolved a different configuration than rank 0 (different "
                          "--set values, config files or presets per rank?). Give every rank the same "
                          "command line and files.")


def build_context(cfg: Config, comm, resume: str | None) -> RunContext:
    """Set up a run on every rank (collective). resume: None, "auto" or a checkpoint folder."""
    pc = cfg.parallel
    phases = parse_phases(cfg.train.phases)
    ckpt_dir = cfg.run.checkpoint_dir or C.default_dir(cfg.run.out_dir, cfg.run.name)

    def setup():
        check_same_config(cfg, comm)
        if pc.simulate and comm.size != pc.simulate:
            raise ConfigError(f"parallel.simulate={pc.simulate} runs the virtual ranks as threads of one "
                              f"process, but this job has {comm.size} MPI ranks; launch it without mpiexec "
                              "(or with -n 1), or drop parallel.simulate.")
        set_deterministic(cfg.run.deterministic)
        if cfg.run.cuda_aware == "on" and not detect_cuda_aware():
            raise ConfigError(f"run.cuda_aware=on, but the MPI library ({library_version()}) reports no CUDA "
                              "support (MPIX_Query_cuda_support): device buffers handed to it would crash or "
                              "corrupt. Use run.cuda_aware=auto (stages GPU messages through pinned host "
                              "memory), a CUDA-aware MPI build, or run.cuda_aware=force if you know better.")
        device = resolve_device(cfg.run.device, comm.local_rank)
        if cfg.run.cuda_graphs == "on" and device.type != "cuda":
            raise ConfigError(f"run.cuda_graphs=on needs a CUDA device, but this rank runs on {device} "
                              f"(run.device={cfg.run.device}); use run.cuda_graphs=auto or off.")
        if pc.stash_weights and not pc.simulate and graph_mode(cfg.run.cuda_graphs, device) != "off":
            raise ConfigError(f"parallel.stash_weights=true runs eager steps, but run.cuda_graphs="
                              f"{cfg.run.cuda_graphs} captures them on {device}; set run.cuda_graphs=off "
                              "or drop parallel.stash_weights.")
        threads = set_threads(cfg.run.threads, comm.local_size)
        data = DeviceDataset(cfg.data.path, device, subset=cfg.data.subset)
        check_fit(cfg, data, comm)
        c, h, _ = data.shape
        model = model_from_config(cfg.model, in_channels=c, image_size=h, num_classes=data.num_classes,
                                  seed=cfg.train.seed)
        place_model(model, device, cfg.run.precision)
        src = None
        if resume:
            src = C.latest(ckpt_dir) if resume == "auto" else resume
            if resume != "auto" and (src is None or not os.path.exists(os.path.join(src, "meta.json"))):
                raise ConfigError(f"--resume {resume}: no checkpoint there (a folder with meta.json); "
                                  f"use --resume auto to take the latest in {ckpt_dir}.")
        return device, threads, data, model, src

    device, threads, data, model, src = agree(comm, setup)
    if device.type == "cuda":
        if cfg.run.cuda_aware == "auto":
            comm.cuda_aware = all(comm.allgather_obj(detect_cuda_aware()))
        else:
            comm.cuda_aware = cfg.run.cuda_aware in ("on", "force")
    opt = make_optimizer(model, cfg.optim)
    meta = None
    if src is not None:
        meta = C.load_meta(src)
        changed = C.config_changes(meta.config, json.loads(cfg.to_json()))  # as saved: lists, not tuples
        if changed:
            raise ConfigError(f"--resume {resume}: the checkpoint {src} was written with other settings "
                              f"({'; '.join(changed)}). Resume with the settings it was written with, or "
                              "start a new run (another run.name or run.out_dir).")
        if meta.partial and meta.world_size != comm.size:
            p = meta.partial
            raise ConfigError(f"--resume {resume}: {src} was written inside epoch {p['epoch'] + 1} (after {p['done']} "
                              f"of {p['total']} {p['unit']}) by {meta.world_size} ranks; the epoch in progress is "
                              f"split over exactly those ranks, so it resumes only at {meta.world_size}. Launch "
                              f"{meta.world_size} ranks, or resume from the epoch-end checkpoint before it in "
                              f"{os.path.dirname(src)} (if run.checkpoint_every wrote one) at any rank count.")
        C.load_model(src, model, opt)
    elif resume == "auto" and comm.rank == 0:
        print(f"hpc_layerpar: --resume auto: no checkpoint in {ckpt_dir} yet; starting at epoch 1", flush=True)
    augment = make_augment(cfg.data, data, cfg.train.seed)
    # the simulator's virtual ranks are threads of one process: concurrent captures would collide
    graphs = graph_mode(cfg.run.cuda_graphs, device) if not cfg.parallel.simulate else "off"
    serial = SerialEngine(model, opt, comm, data, augment, batch_size=cfg.data.batch_size,
                          drop_last=cfg.data.drop_last, seed=cfg.train.seed, graphs=graphs,
                          check_every=cfg.run.check_every)
    ctx = RunContext(cfg=cfg, comm=comm, device=device, threads=threads, data=data, model=model, opt=opt,
                     phases=phases, n_epochs=total_epochs(phases), ckpt_dir=ckpt_dir, augment=augment,
                     serial=serial, src=src, meta=meta)
    if ctx.methods & set(PARALLEL):
        _split(ctx)
    return ctx


def _same_guard(saved: dict, cfg: Config) -> bool:
    """Whether a checkpoint's config measured its caps under the settings this launch would use."""
    keys = (("parallel", "beta"), ("parallel", "beta_guard"), ("parallel", "ds"), ("parallel", "micro_batches"),
            ("optim", "lr"), ("train", "seed"), ("data", "batch_size"))
    now = json.loads(cfg.to_json())
    return all(C.same_setting(saved.get(s, {}).get(k), now[s][k]) for s, k in keys)


def _split(ctx: RunContext) -> None:
    """Topology, stage split and the curvature guard's caps of a run with parallel phases."""
    cfg, comm, pc, meta = ctx.cfg, ctx.comm, ctx.cfg.parallel, ctx.meta
    ctx.topo = agree(comm, lambda: Topology(comm, pc.replicas))
    sub_batch = cfg.data.batch_size // pc.replicas
    if pc.replicas > 1:
        ctx.shard = replica_shard(ctx.data.n_train, pc.replicas, ctx.topo.replica, cfg.train.seed)
    ctx.same_split = bool(meta is not None and meta.world_size == comm.size and meta.replicas == pc.replicas
                          and meta.stage_ranges)
    if ctx.same_split:  # the M the run started with (a re-timed one could differ; none stored: untimed)
        ctx.micro = meta.micro or micro_batches(pc, cfg.data.batch_size, smallest_map(ctx.model), ctx.topo.stages)
    else:
        ctx.micro, ctx.micro_seconds = device_micro(ctx.model, pc, comm, cfg.data.batch_size, ctx.topo.stages,
                                                    ctx.device, graphs=ctx.serial.graphs.mode == "cuda",
                                                    deterministic=cfg.run.deterministic)
        if ctx.micro_seconds and comm.rank == 0:
            t1 = ctx.micro_seconds[1]
            timed = ", ".join(f"M = {m}: {t * 1e3:.3g} ms ({t / t1:.2f}x)" for m, t in ctx.micro_seconds.items())
            print(f"hpc_layerpar: automatic micro-batches timed on {ctx.device} (forward + backward of "
                  f"{sub_batch} samples, summed per element): {timed}; M = {ctx.micro}, the largest within "
                  f"1 + parallel.micro_overhead = {1 + pc.micro_overhead:g}x", flush=True)
    ctx.shares = recompute_shares(pc, ctx.topo.stages, ctx.micro, ctx.serial.graphs.mode == "cuda")
    if ctx.same_split:  # the split the run started with: a re-measured one could differ
        ctx.costs, ctx.ranges = meta.element_costs, [tuple(r) for r in meta.stage_ranges]
        ctx.fwd_costs = meta.element_forward_costs
    else:
        # timed on what a stage step runs on: the pipeline's micro-batches
        ctx.costs, ctx.fwd_costs = element_costs(ctx.model, pc, comm, sub_batch // ctx.micro, ctx.device,
                                                 graphs=ctx.serial.graphs.mode == "cuda")
        ctx.ranges = agree(comm, lambda: stage_ranges(ctx.model, ctx.topo.stages, pc, ctx.costs, ctx.fwd_costs,
                                                      ctx.shares))
    if ctx.same_split and meta.beta_caps and _same_guard(meta.config, cfg):
        # the caps the run started with: measured again on the resumed weights they would differ, and
        # the resumed run would no longer equal the uninterrupted one
        ctx.caps = [tuple(c) for c in meta.beta_caps]
        return
    # The curvature guard: every rank measures its outgoing boundary on the whole network it holds
    # now, then the pipeline shares the caps (ALGORITHM.md s.4c).
    batch = sub_batch // ctx.micro
    mine = agree(comm, lambda: G.beta_caps(ctx.model, ctx.ranges, ctx.data, DSFilter.of(pc), rank=ctx.topo.stage,
                                           beta=base_beta(pc, ctx.topo.stages), lr=cfg.optim.lr, batch=batch,
                                           seed=cfg.train.seed, mode=pc.beta_guard))
    ctx.caps = ctx.pipe.allgather_obj(mine)
