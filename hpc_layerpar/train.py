"""run(cfg, comm): set up data and model on every rank, walk the schedule, write the metrics,
checkpoint, and resume."""
from __future__ import annotations

import hashlib
import math
import os
import signal
import time
from dataclasses import dataclass

import torch

from . import checkpoint as C
from . import diagnostics
from . import guard as G
from . import metrics as M
from .comm import Comm, detect_cuda_aware, hostname, library_version
from .config import Config, ConfigError, micro_batches
from .data import DeviceDataset, make_augment, replica_shard
from .filters import DSFilter
from .models import count_parameters, model_from_config, smallest_map
from .parallel import ParallelEngine, beta_for_epoch
from .pipeline import PipelineEngine
from .partition import stage_costs
from .progress import Progress, epoch_line
from .runsetup import agree, aux_bytes, check_fit, element_costs, resolve_device, set_threads, stage_ranges
from .schedule import PARALLEL, lr_at, parallel_epochs_before, parse_phases, phase_of_epoch, total_epochs
from .serial import SerialEngine, make_optimizer
from .stats import PhaseStats
from .sweep import evaluate, forward_sweep, recalibrate_bn, share_stages

# EX_TEMPFAIL: stopped by a signal after a checkpoint. The SLURM template requeues the job on it
# (after the ranks have left MPI cleanly); elsewhere, run again with --resume auto.
EXIT_CHECKPOINTED = 75


@dataclass
class Summary:
    metrics_path: str
    final_test_acc: float
    best_test_acc: float
    wall_seconds: float
    epochs: int
    stopped_at: int | None = None   # epoch after which a signal stopped the run (checkpointed)
    checkpoint: str | None = None


class StopRequest:
    """SIGUSR1 / SIGTERM (SLURM --signal, preemption, time limit) only set a flag; the ranks agree
    on it at the end of the epoch, checkpoint, and leave. The flag is process-wide, so the virtual
    ranks of a simulated run (threads, which cannot install handlers) see the main thread's signal."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
    _signalled = False

    def __init__(self):
        self.saved = {}

    @property
    def requested(self) -> bool:
        return StopRequest._signalled

    def __enter__(self):
        try:
            for s in self.SIGNALS:
                self.saved[s] = signal.signal(s, self._handler)
            StopRequest._signalled = False  # a new run in this process starts unsignalled
        except ValueError:  # not the main thread: leave signals to the host program
            self.saved = {}
        return self

    def _handler(self, signum, frame):
        StopRequest._signalled = True

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            signal.signal(s, h)


def check_same_config(cfg: Config, comm: Comm) -> None:
    digests = comm.allgather_obj(hashlib.sha256(cfg.to_json().encode()).hexdigest())
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise ConfigError(f"ranks {odd} resolved a different configuration than rank 0 (different "
                          "--set values, config files or presets per rank?). Give every rank the same "
                          "command line and files.")


def _remedy(cfg: Config, phase: str) -> str:
    o, pc = cfg.optim, cfg.parallel
    tips = [f"lower optim.lr (now {o.lr:g})", f"lengthen optim.warmup_epochs (now {o.warmup_epochs:g})"]
    if phase in PARALLEL:
        tips.insert(1, f"lower parallel.beta (now {pc.beta:g}) and keep parallel.beta_guard=auto "
                       f"(now {pc.beta_guard})")
    return ("Remedy: " + ", or ".join(tips) + "; resume from the last good checkpoint with --resume, or "
            "start again.")


def make_parallel_engine(cfg, model, opt, pipe, data, ranges, method, augment, reps, shard):
    """The engine of a parallel phase for the configured coupling (ALGORITHM.md s.4 / s.4b)."""
    kw = dict(method=method, batch_size=cfg.data.batch_size, drop_last=cfg.data.drop_last,
              seed=cfg.train.seed, replica_comm=reps, shard=shard)
    if cfg.parallel.coupling == "pipeline":
        return PipelineEngine(model, opt, pipe, data, ranges, cfg.parallel, augment=augment, **kw)
    return ParallelEngine(model, opt, pipe, data, ranges, cfg.parallel, **kw)


def run(cfg: Config, comm: Comm | None = None, quiet: bool = False,  # noqa: C901
        resume: str | None = None) -> Summary:
    """resume: None (fresh start), "auto" (the latest checkpoint in the run's checkpoint folder if
    there is one, else a fresh start) or the path of a checkpoint folder."""
    if comm is None:
        if cfg.parallel.simulate > 0:
            from .simulate import run_simulated
            return run_simulated(cfg.parallel.simulate, lambda c: run(cfg, c, quiet, resume))[0]
        comm = Comm.world()
        try:
            return run(cfg, comm, quiet, resume)
        finally:
            comm.free()
    t_start = time.perf_counter()
    progress = Progress(cfg.run.progress, enabled=(comm.rank == 0) and not quiet)
    phases = parse_phases(cfg.train.phases)
    n_epochs = total_epochs(phases)
    methods = {p.method for p in phases}
    any_parallel = bool(methods & set(PARALLEL))
    ckpt_dir = cfg.run.checkpoint_dir or C.default_dir(cfg.run.out_dir, cfg.run.name)
    pc = cfg.parallel
    pipeline = pc.coupling == "pipeline"

    def setup():
        check_same_config(cfg, comm)
        if pc.simulate and comm.size != pc.simulate:
            raise ConfigError(f"parallel.simulate={pc.simulate} runs the virtual ranks as threads of one "
                              f"process, but this job has {comm.size} MPI ranks; launch it without mpiexec "
                              "(or with -n 1), or drop parallel.simulate.")
        device = resolve_device(cfg.run.device, comm.local_rank)
        threads = set_threads(cfg.run.threads, comm.local_size)
        data = DeviceDataset(cfg.data.path, device, subset=cfg.data.subset)
        check_fit(cfg, data, comm)
        c, h, _ = data.shape
        model = model_from_config(cfg.model, in_channels=c, image_size=h, num_classes=data.num_classes,
                                  seed=cfg.train.seed).to(device)
        src = None
        if resume:
            src = C.latest(ckpt_dir) if resume == "auto" else resume
            if resume != "auto" and (src is None or not os.path.exists(os.path.join(src, "meta.json"))):
                raise ConfigError(f"--resume {resume}: no checkpoint there (a folder with meta.json); "
                                  f"use --resume auto to take the latest in {ckpt_dir}.")
        return device, threads, data, model, src

    device, threads, data, model, src = agree(comm, setup)
    if device.type == "cuda":
        comm.cuda_aware = {"on": True, "off": False}.get(cfg.run.cuda_aware) if cfg.run.cuda_aware != "auto" \
            else all(comm.allgather_obj(detect_cuda_aware()))
    opt = make_optimizer(model, cfg.optim)
    meta = None
    if src is not None:
        meta = C.load_meta(src)
        C.load_model(src, model, opt)
    ranges = costs = shard = reps = None
    pipe = comm
    same_split = False
    R = pc.replicas
    sub_batch = cfg.data.batch_size // R
    caps = None
    if any_parallel:
        def check_replicas():
            if comm.size % R:
                raise ConfigError(f"{comm.size} ranks cannot form parallel.replicas={R} pipelines of equal "
                                  f"length; run a multiple of {R} ranks or change parallel.replicas.")
        agree(comm, check_replicas)
        if R > 1:  # world = R replicas x K stages; a replica's K ranks are consecutive (likely one node)
            k_stages = comm.size // R
            replica, stage = divmod(comm.rank, k_stages)
            pipe, reps = comm.split(replica, stage), comm.split(stage, replica)
            pipe.counters = reps.counters = comm.counters  # one account of this rank's traffic
            pipe.cuda_aware = reps.cuda_aware = comm.cuda_aware
            shard = replica_shard(data.n_train, R, replica, cfg.train.seed)
        same_split = bool(meta is not None and meta.get("world_size") == comm.size
                          and meta.get("replicas", 1) == R and meta.get("stage_ranges"))
        if same_split:  # the split the run started with: a re-measured one could differ
            costs, ranges = meta["element_costs"], [tuple(r) for r in meta["stage_ranges"]]
        else:
            costs = element_costs(model, pc, comm, sub_batch, device)
            ranges = agree(comm, lambda: stage_ranges(model, pipe.size, pc, costs))
        # The curvature guard: every rank measures its outgoing boundary on the whole network it
        # holds now, then the pipeline shares the caps (ALGORITHM.md s.4c).
        batch = sub_batch // micro_batches(pc, cfg.data.batch_size, smallest_map(model)) if pipeline else sub_batch
        mine = agree(comm, lambda: G.beta_caps(model, ranges, data, DSFilter(pc.ds), rank=pipe.rank,
                                               coupling=pc.coupling, beta=pc.beta, lr=cfg.optim.lr,
                                               batch=batch, seed=cfg.train.seed, mode=pc.beta_guard))
        caps = pipe.allgather_obj(mine)
    augment = make_augment(cfg.data, data, cfg.train.seed)
    serial = SerialEngine(model, opt, comm, data, augment, batch_size=cfg.data.batch_size,
                          drop_last=cfg.data.drop_last, seed=cfg.train.seed)
    o = cfg.optim

    def lr_fn(t):
        return lr_at(t, base=o.lr, total=n_epochs, schedule=o.schedule, warmup=o.warmup_epochs,
                     milestones=o.milestones, gamma=o.gamma)

    def effective_beta(scheduled: float, boundary_rank: int) -> float:
        """The penalty weight at the outgoing boundary of `boundary_rank` (capped by the guard)."""
        if caps is None or boundary_rank >= len(caps) - 1:
            return math.nan
        return min(scheduled, caps[boundary_rank][1])

    nan = float("nan")
    start_epoch = 0 if meta is None else meta["epoch"] + 1
    best = nan if meta is None else meta["best_test_acc"]
    final = nan if meta is None else meta["final_test_acc"]
    hosts = comm.allgather_obj(hostname())
    devices = comm.allgather_obj(str(device) + ("" if device.type != "cuda" else
                                                f" ({torch.cuda.get_device_name(device)})"))
    aux_sizes = aux_bytes(model, ranges, -(-data.n_train // R), pc, "al" in methods) if ranges else None
    writer = path = None
    if comm.rank == 0:
        extra = {}
        if ranges is not None:
            extra = {"stage_ranges": [list(r) for r in ranges], "element_costs": costs, "replicas": R,
                     "partition": pc.partition, "stage_costs": stage_costs(costs, ranges),
                     "aux_bytes": aux_sizes, "coupling": pc.coupling,
                     "penalty_curvature": [c[0] for c in caps], "beta_cap": [c[1] for c in caps]}
        if pc.simulate:
            extra["simulated_ranks"] = pc.simulate
        attrs = M.provenance({
            "mpi_library": library_version(), "hostnames": hosts, "devices": devices,
            "threads_per_rank": threads, "model": model.name, "num_parameters": count_parameters(model),
            "dataset": data.name, "dataset_path": os.path.abspath(cfg.data.path),
            "n_train": data.n_train, "n_test": data.n_test, "phases": cfg.train.phases,
            "input_shape": list(data.shape), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "checkpoint_dir": os.path.abspath(ckpt_dir),
            "cuda_aware_mpi": str(comm.cuda_aware).lower() if device.type == "cuda" else "n/a (cpu)",
            **extra})
        old = meta.get("metrics_path") if meta else None
        if old and os.path.exists(old) and meta["world_size"] == comm.size:
            path = old  # continue the same file: rows after the checkpoint are dropped, then rewritten
            writer = M.MetricsWriter.reopen(path, keep_rows=start_epoch)
            writer.add_resume(start_epoch, src, attrs)
        else:
            path = M.unique_path(cfg.run.out_dir, cfg.run.name)
            if old:
                attrs["continues"] = old  # resumed at another rank count: per-rank columns change width
            writer = M.MetricsWriter(path, config_json=cfg.to_json(), world_size=comm.size, attrs=attrs)
    path = comm.bcast_obj(path)
    sim = f" (simulated: {comm.size} virtual ranks as threads of one process)" if pc.simulate else ""
    progress.log(f"hpc_layerpar: {model.name} ({count_parameters(model) / 1e6:.3f} M parameters) on "
                 f"{data.name} ({data.n_train} train / {data.n_test} test, {data.shape[0]}x{data.shape[1]}x"
                 f"{data.shape[2]}), {comm.size} rank(s){sim}, device {device}, {threads} thread(s)/rank, "
                 f"phases {cfg.train.phases}, batch {cfg.data.batch_size}")
    if ranges is not None:
        shown = [("%.3g" % c[1]) if math.isfinite(c[1]) else "-" for c in caps[:-1]]
        progress.log(f"stages (elements [start, end) per rank, partition={pc.partition}): {ranges}; "
                     f"stage cost shares {[round(c / sum(costs), 3) for c in stage_costs(costs, ranges)]}; "
                     f"coupling {pc.coupling}"
                     + (f" ({micro_batches(pc, cfg.data.batch_size, smallest_map(model))} micro-batches per step)" if pipeline else "")
                     + f"; DS factor {pc.ds}; beta {pc.beta:g}, guard {pc.beta_guard}: cap per boundary "
                     f"{shown}; auxiliary storage per rank {[round(b / 2**20, 1) for b in aux_sizes]} MiB")
    if src is not None:
        progress.log(f"resumed from {src} at epoch {start_epoch + 1}")
    progress.log(f"metrics file: {path}")

    par = None
    since_sweep = 0
    last_ckpt = src
    starts = [sum(p.epochs for p in phases[:i]) for i in range(len(phases))]
    with StopRequest() as stop:
        for epoch in range(start_epoch, n_epochs):
            pidx, phase = phase_of_epoch(phases, epoch)
            comm.counters.reset()
            comm.barrier()  # epochs start together, so epoch times measure the same thing on all ranks
            if epoch == cfg.debug.fail_epoch and comm.rank == cfg.debug.fail_rank:
                raise RuntimeError(f"injected failure on rank {comm.rank} at epoch {epoch} (debug.fail_rank) "
                                   f"at unix time {time.time():.3f}")
            if epoch == cfg.debug.kill_epoch and comm.rank == cfg.debug.kill_rank:
                os.kill(os.getpid(), signal.SIGKILL)
            if epoch == cfg.debug.nan_epoch and comm.rank == cfg.debug.nan_rank:
                own = par.params if (par is not None and phase.method in PARALLEL) else \
                    list(model.elements[ranges[pipe.rank][0]].parameters()) if ranges else list(model.parameters())
                with torch.no_grad():
                    own[0].view(-1)[0] = float("nan")
            t_sw = time.perf_counter()
            new_phase = epoch == starts[pidx]
            if phase.method == "skip":
                pass
            elif phase.method == "serial":
                if par is not None or (new_phase and pidx > 0 and phases[pidx - 1].method in PARALLEL):
                    share_stages(model, ranges, pipe, opt)  # every rank gets the whole network
                    if pc.switch_momentum == "reset":
                        for q in model.parameters():
                            opt.state[q]["momentum_buffer"].zero_()
                par = None  # frees the auxiliary variables
            else:
                fresh = new_phase or par is None
                if fresh:
                    par = make_parallel_engine(cfg, model, opt, pipe, data, ranges, phase.method, augment,
                                               reps, shard)
                if not pipeline:
                    # Resuming inside a parallel phase: reuse the saved auxiliary variables only with
                    # the identical split; otherwise (another K) the forward sweep rebuilds them.
                    reuse = (not new_phase and same_split) if fresh else True
                    if fresh and reuse and par.store is not None:
                        reuse = C.load_aux(src, comm.rank, par.store)
                    refresh = bool(pc.refresh_every) and since_sweep >= pc.refresh_every
                    if not all(comm.allgather_obj(reuse)) or refresh:  # collective: the sweep is
                        forward_sweep(model, ranges, pipe, data, par.store, par.filter, sub_batch, ids=shard)
                        since_sweep = 0
                elif fresh and par.store is not None and not new_phase and same_split and src is not None:
                    C.load_aux(src, comm.rank, par.store)
            switch_s = time.perf_counter() - t_sw
            switch_bytes = comm.counters.bytes_sent
            comm.counters.reset()
            t0 = time.perf_counter()
            beta = beta_eff = nan
            if phase.method == "skip":  # nothing trains; the epoch keeps its place in the schedule
                st = PhaseStats(nan, nan, nan, nan, nan, 0, 0, 0.0)
                problems = []
            elif phase.method == "serial":
                st = serial.train_epoch(epoch, lr_fn, on_step=lambda s_, n_, loss: progress.step(
                    epoch, n_epochs, s_, n_, loss))
                problems = G.local_problems(st.first_bad_step, [st.train_loss], list(model.parameters()))
            else:
                beta = beta_for_epoch(pc, phase.method, parallel_epochs_before(phases, epoch))
                if pipeline:
                    beta_eff = effective_beta(beta, pipe.rank)
                    st = par.train_epoch(epoch, lr_fn, 0.0 if math.isnan(beta_eff) else beta_eff)
                else:  # one beta for the whole pipeline: every boundary's cap applies
                    beta_eff = min([beta] + [c[1] for c in caps[:-1]])
                    st = par.train_epoch(epoch, lr_fn, beta_eff)
                since_sweep += 1
                losses = [st.local_loss] + ([st.train_loss] if pipe.rank == pipe.size - 1 else [])
                problems = G.local_problems(st.first_bad_step, losses, par.params,
                                            [("auxiliary values", st.extra.get("nonfinite_aux", 0))])
            epoch_s = time.perf_counter() - t0
            counters = comm.counters.as_tuple()
            diverged = None
            try:
                G.check(comm, problems, epoch=epoch, phase=phase.method,
                        stage_of_rank=lambda r: r % pipe.size if phase.method in PARALLEL else "all",
                        remedy=_remedy(cfg, phase.method) + (
                            f" The last good checkpoint is {last_ckpt}." if last_ckpt else
                            " No checkpoint was written before (run.checkpoint_every)."))
            except G.DivergenceError as exc:
                diverged = exc
            test_loss = test_acc = nan
            consistency = cosine = nan
            eval_s = 0.0
            t1 = time.perf_counter()
            if diverged is None and phase.method in PARALLEL and par.probe:
                consistency, cosine = diagnostics.probe(model, ranges, pipe, data, par.filter, par)
            evaluate_now = (epoch + 1) % cfg.train.eval_every == 0 or epoch == n_epochs - 1
            if diverged is None and evaluate_now and phase.method != "skip":
                if phase.method in PARALLEL:
                    share_stages(model, ranges, pipe)  # the true network G: gather the stages
                # Evaluate with re-estimated BatchNorm statistics after every epoch of every method:
                # running averages taken while the weights moved (or per stage and per micro-batch in
                # a parallel phase) misjudge the network at hand, and unequally between methods.
                recalibrate_bn(model, data, comm, pc.bn_batches, cfg.data.batch_size, cfg.train.seed)
                test_loss, test_acc = evaluate(model, data, comm, cfg.data.eval_batch_size)
                final = test_acc
                best = test_acc if math.isnan(best) else max(best, test_acc)
            eval_s = time.perf_counter() - t1
            comm_s, wait_s, sent, recv = counters
            local = (st.local_loss, st.residual, st.multiplier_norm) if phase.method in PARALLEL else (nan,) * 3
            mine = {"compute_seconds": st.compute_seconds, "comm_seconds": comm_s, "wait_seconds": wait_s,
                    "bytes_sent": sent, "bytes_recv": recv, "epoch_seconds": epoch_s,
                    "switch_bytes_sent": switch_bytes, "local_loss": local[0], "residual": local[1],
                    "multiplier_norm": local[2], "train_loss": st.train_loss, "train_acc": st.train_acc,
                    "consistency": consistency, "grad_cosine": cosine, "beta_effective": beta_eff}
            per_rank = comm.gather_obj(mine)
            if comm.rank == 0:
                col = {k: [r[k] for r in per_rank] for k in mine}
                if pipeline and phase.method in PARALLEL:
                    # boundary k's residual and multipliers live on rank k-1: report them at rank k
                    for key in ("residual", "multiplier_norm"):
                        col[key] = [nan] + col[key][:-1]
                row = {"epoch": epoch, "phase": phase.method, "phase_index": pidx, "lr": lr_fn(epoch),
                       "beta": beta, "test_loss": test_loss, "test_acc": test_acc,
                       "switch_seconds": switch_s, "eval_seconds": eval_s,
                       "epoch_seconds": max(col.pop("epoch_seconds")),
                       # serial: every rank has the same figures; parallel: the relaxed network's
                       # CE lives on the last rank
                       "train_loss": col.pop("train_loss")[-1], "train_acc": col.pop("train_acc")[-1],
                       **col}
                writer.append(row)
                progress.log(epoch_line(row, n_epochs))
                if diverged is not None:
                    writer.set_attrs(status="diverged", diverged_epoch=epoch, diverged_message=str(diverged),
                                     wall_seconds=time.perf_counter() - t_start)
            if diverged is not None:
                raise diverged
            stopping = (bool(comm.allreduce_array([stop.requested], "max")[0])
                        or 0 < cfg.run.stop_after <= epoch + 1) and epoch < n_epochs - 1
            every = cfg.run.checkpoint_every
            if stopping or (every and (epoch + 1) % every == 0) or (every and epoch == n_epochs - 1):
                if par is not None:
                    share_stages(model, ranges, pipe, opt)  # the whole network, rank-count independent
                saved = C.save(ckpt_dir, comm, epoch=epoch, model=model, optimizer=opt,
                               store=par.store if par is not None else None,
                               meta={"world_size": comm.size, "replicas": R, "metrics_path": path,
                                     "best_test_acc": best,
                                     "final_test_acc": final, "config": cfg.to_dict(),
                                     "stage_ranges": [list(r) for r in ranges] if ranges else None,
                                     "element_costs": costs})
                last_ckpt = saved
                progress.log(f"checkpoint: {saved}")
            if stopping:
                wall = time.perf_counter() - t_start
                if comm.rank == 0:
                    writer.set_attrs(status="checkpointed", wall_seconds_last_segment=wall)
                    why = "a signal" if stop.requested else f"run.stop_after={cfg.run.stop_after}"
                    progress.log(f"stopped by {why} after epoch {epoch + 1}; checkpoint {saved}; "
                                 f"exit code {EXIT_CHECKPOINTED}: resume with --resume auto "
                                 "(the SLURM template requeues the job)")
                return Summary(metrics_path=path, final_test_acc=final, best_test_acc=best,
                               wall_seconds=wall, epochs=n_epochs, stopped_at=epoch, checkpoint=saved)
    for c in (pipe, reps):
        if c is not None and c is not comm:
            c.free()
    wall = time.perf_counter() - t_start
    if comm.rank == 0:
        writer.set_attrs(status="completed", wall_seconds=wall, final_test_acc=final,
                         finished=M.provenance({})["started"])
        progress.log(f"done in {wall:.1f}s: final test accuracy {100 * final:.2f}% "
                     f"(best {100 * best:.2f}%); metrics written to {path}")
    return Summary(metrics_path=path, final_test_acc=final, best_test_acc=best, wall_seconds=wall,
                   epochs=n_epochs)
