"""run(cfg, comm): build the run's context once, then walk the pure epoch plan (schedule.py): enter
the epoch's phase, train it, check it, evaluate, record, checkpoint. The loop itself is thin; the
per-epoch steps are the small functions below."""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, replace

import torch

from . import checkpoint as C
from . import diagnostics, watchdog
from . import guard as G
from . import metrics as M
from .comm import Comm, abort_job, hostname, library_version
from .config import Config
from .context import RunContext, build_context
from .evaluate import evaluate, recalibrate_bn
from .models import count_parameters
from .partition import stage_costs
from .pipeline import PipelineEngine
from .progress import Progress, epoch_line
from .runsetup import aux_bytes, role_split_costs
from .schedule import PARALLEL, EpochStep, base_beta, beta_for_epoch, epoch_plan
from .stages import share_stages
from .stats import PhaseStats
from .stop import StopRequest
from .stop import request as stop_request

# EX_TEMPFAIL: stopped by a signal after a checkpoint. The SLURM template requeues the job on it
# (after the ranks have left MPI cleanly); elsewhere, run again with --resume auto.
EXIT_CHECKPOINTED = 75


@dataclass
class Summary:
    """What run() returns: metrics file, final and best test accuracy, wall time, epochs, and where a
    stop signal ended the run."""
    metrics_path: str
    final_test_acc: float
    best_test_acc: float
    wall_seconds: float
    epochs: int
    stopped_at: int | None = None   # epoch after which a signal stopped the run (checkpointed)
    checkpoint: str | None = None


def _remedy(cfg: Config, phase: str) -> str:
    o, pc = cfg.optim, cfg.parallel
    tips = [f"lower optim.lr (now {o.lr:g})", f"lengthen optim.warmup_epochs (now {o.warmup_epochs:g})"]
    if phase in PARALLEL:
        tips.insert(1, f"lower parallel.beta (now {pc.beta}) and keep parallel.beta_guard=auto "
                       f"(now {pc.beta_guard})")
    return ("Remedy: " + ", or ".join(tips) + "; resume from the last good checkpoint with --resume, or "
            "start again.")


def make_parallel_engine(ctx: RunContext, method: str):
    """The engine of a parallel phase: the pipeline coupling (ALGORITHM.md s.4)."""
    cfg = ctx.cfg
    kw = {"method": method, "batch_size": cfg.data.batch_size, "drop_last": cfg.data.drop_last,
          "seed": cfg.train.seed, "replica_comm": ctx.topo.reps, "shard": ctx.shard,
          "check_every": cfg.run.check_every}
    pc = replace(cfg.parallel, micro_batches=ctx.micro)  # the M set-up chose (it may be timed)
    return PipelineEngine(ctx.model, ctx.opt, ctx.pipe, ctx.data, ctx.ranges, pc,
                          augment=ctx.augment, graphs=ctx.serial.graphs.mode, **kw)


@dataclass
class _Loop:
    """What changes from epoch to epoch."""
    engine: object = None        # the parallel phase's engine, None outside parallel phases
    best: float = math.nan
    final: float = math.nan
    last_ckpt: str | None = None
    resume: dict | None = None   # this rank's state of the epoch a mid-epoch checkpoint stopped in


def _stage_costs(ctx: RunContext) -> list:
    """Each stage's cost in its role in the parallel phase (what the split balanced)."""
    upstream, last = role_split_costs(ctx.costs, ctx.fwd_costs, len(ctx.ranges), ctx.shares)
    return stage_costs(last, ctx.ranges, last, upstream)


def _open_metrics(ctx: RunContext, progress: Progress) -> tuple:
    """(writer on rank 0 / None, path on every rank): a new metrics file, or the resumed run's one."""
    cfg, comm, pc, meta = ctx.cfg, ctx.comm, ctx.cfg.parallel, ctx.meta
    hosts = comm.allgather_obj(hostname())
    devices = comm.allgather_obj(str(ctx.device) + ("" if ctx.device.type != "cuda" else
                                                    f" ({torch.cuda.get_device_name(ctx.device)})"))
    R = pc.replicas
    aux_sizes = aux_bytes(ctx.model, ctx.ranges, -(-ctx.data.n_train // R), pc, "al" in ctx.methods) \
        if ctx.ranges else None
    writer = path = None
    if comm.rank == 0:
        extra = {}
        if ctx.ranges is not None:
            extra = {"stage_ranges": [list(r) for r in ctx.ranges], "element_costs": ctx.costs, "replicas": R,
                     "partition": pc.partition, "stage_costs": _stage_costs(ctx),
                     "element_forward_costs": ctx.fwd_costs or [], "aux_bytes": aux_sizes, "coupling": pc.coupling,
                     "micro_batches": ctx.micro, "micro_seconds": [[m, t] for m, t in ctx.micro_seconds.items()],
                     "penalty_curvature": [c[0] for c in ctx.caps], "beta_cap": [c[1] for c in ctx.caps]}
        if pc.simulate:
            extra["simulated_ranks"] = pc.simulate
        attrs = M.provenance({
            "mpi_library": library_version(), "hostnames": hosts, "devices": devices,
            "threads_per_rank": ctx.threads, "model": ctx.model.name,
            "num_parameters": count_parameters(ctx.model), "dataset": ctx.data.name,
            "dataset_path": os.path.abspath(cfg.data.path), "n_train": ctx.data.n_train,
            "n_test": ctx.data.n_test, "phases": cfg.train.phases, "input_shape": list(ctx.data.shape),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "checkpoint_dir": os.path.abspath(ctx.ckpt_dir),
            "cuda_aware_mpi": str(comm.cuda_aware).lower() if ctx.device.type == "cuda" else "n/a (cpu)",
            **extra})
        old = meta.metrics_path if meta else None
        if old and os.path.exists(old) and meta.world_size == comm.size:
            path = old  # continue the same file: rows after the checkpoint are dropped, then rewritten
            writer = M.MetricsWriter.reopen(path, keep_rows=ctx.start_epoch)
            writer.add_resume(ctx.start_epoch, ctx.src, attrs)
        else:
            path = M.unique_path(cfg.run.out_dir, cfg.run.name)
            if old:
                attrs["continues"] = old  # resumed at another rank count: per-rank columns change width
            writer = M.MetricsWriter(path, config_json=cfg.to_json(), world_size=comm.size, attrs=attrs)
    path = comm.bcast_obj(path)
    m, d = ctx.model, ctx.data
    sim = f" (simulated: {comm.size} virtual ranks as threads of one process)" if pc.simulate else ""
    progress.log(f"hpc_layerpar: {m.name} ({count_parameters(m) / 1e6:.3f} M parameters) on {d.name} "
                 f"({d.n_train} train / {d.n_test} test, {d.shape[0]}x{d.shape[1]}x{d.shape[2]}), "
                 f"{comm.size} rank(s){sim}, device {ctx.device}, {ctx.threads} thread(s)/rank, "
                 f"precision {cfg.run.precision}{', deterministic' if cfg.run.deterministic else ''}, "
                 f"phases {cfg.train.phases}, batch {cfg.data.batch_size}")
    if ctx.ranges is not None:
        shown = [("%.3g" % c[1]) if math.isfinite(c[1]) else "-" for c in ctx.caps[:-1]]
        sc = _stage_costs(ctx)
        shares = [round(c / sum(sc), 3) for c in sc]
        progress.log(f"stages (elements [start, end) per rank, partition={pc.partition}): {ctx.ranges}; "
                     f"stage cost shares {shares}; coupling {pc.coupling} ({ctx.micro} micro-batches per step, "
                     f"schedule {pc.schedule}{', stashed weights' * pc.stash_weights}); DS factor {pc.ds}"
                     + (f" ({pc.ds_up} upsampling)" if pc.ds > 1 else "")
                     + f"; beta {base_beta(pc, ctx.topo.stages):g} ({pc.beta}), guard {pc.beta_guard}: caps "
                     f"{shown}; auxiliary storage per rank {[round(b / 2**20, 1) for b in aux_sizes]} MiB")
    if ctx.src is not None:
        part = meta.partial if meta is not None else None
        inside = f" after {part['done']} of its {part['total']} {part['unit']}" if part else ""
        progress.log(f"resumed from {ctx.src} at epoch {ctx.start_epoch + 1}{inside}")
    progress.log(f"metrics file: {path}")
    return writer, path


def _inject_faults(ctx: RunContext, loop: _Loop, step: EpochStep) -> None:
    """debug.*: make a rank raise, die, hang, go non-finite or ask to stop at the start of an epoch (tests)."""
    dbg, rank = ctx.cfg.debug, ctx.comm.rank
    if step.epoch == dbg.fail_epoch and rank == dbg.fail_rank:
        raise RuntimeError(f"injected failure on rank {rank} at epoch {step.epoch} (debug.fail_rank) "
                           f"at unix time {time.time():.3f}")
    if step.epoch == dbg.kill_epoch and rank == dbg.kill_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    if step.epoch == dbg.stop_epoch and rank == dbg.stop_rank:
        stop_request()  # what SIGUSR1 does: the ranks stop at the next check of this epoch
    if step.epoch == dbg.hang_epoch and rank == dbg.hang_rank:
        while True:  # a rank that stops answering without an error: the peers block in MPI
            time.sleep(1.0)
    if step.epoch == dbg.nan_epoch and rank == dbg.nan_rank:
        own = list(ctx.model.elements[ctx.ranges[ctx.pipe.rank][0]].parameters()) if ctx.ranges \
            else list(ctx.model.parameters())
        with torch.no_grad():
            own[0].view(-1)[0] = float("nan")


def _enter(ctx: RunContext, loop: _Loop, step: EpochStep, progress: Progress) -> None:
    """The work before an epoch trains: gather the stages, or start or resume a parallel phase. In an
    epoch resumed from its middle that work was done before the stop: only the engine is rebuilt."""
    mid = loop.resume is not None
    if step.method not in PARALLEL:
        if step.enter == "share" and not mid:
            share_stages(ctx.model, ctx.ranges, ctx.pipe, ctx.opt)  # every rank gets the whole network
            if ctx.cfg.parallel.switch_momentum == "reset":
                for q in ctx.model.parameters():
                    ctx.opt.state[q]["momentum_buffer"].zero_()
        loop.engine = None  # frees the auxiliary variables
        return
    if step.enter in ("phase", "resume") or loop.engine is None:
        loop.engine = make_parallel_engine(ctx, step.method)
    eng = loop.engine
    # Resuming inside an AL phase at the checkpoint's split reuses the saved multipliers; at another
    # split they restart at zero (collective: every rank says whether its table came back).
    if (step.enter == "resume" or mid) and step.method == "al":
        ok = eng.store is None or (ctx.same_split and C.load_aux(ctx.src, ctx.comm.rank, eng.store))
        restored = all(ctx.comm.allgather_obj(ok))
        if not restored and eng.store is not None:
            eng.store.a.zero_()  # all or none: a partly restored pipeline would be neither run
        progress.log("AL multipliers " + ("restored from the checkpoint" if restored else
                                          "restart at zero (the checkpoint was written at another split)"))


def _train(ctx: RunContext, loop: _Loop, step: EpochStep, progress: Progress) -> tuple:
    """(stats, scheduled beta, effective beta, problems for the divergence guard)."""
    nan = math.nan
    if step.method == "skip":  # nothing trains; the epoch keeps its place in the schedule
        return PhaseStats(nan, nan, nan, nan, nan, 0, 0, 0.0), nan, nan, []
    resume, loop.resume = loop.resume, None
    if step.method == "serial":
        st = ctx.serial.train_epoch(step.epoch, ctx.lr, on_step=lambda s_, n_, loss: progress.step(
            step.epoch, ctx.n_epochs, s_, n_, loss), resume=resume)
        problems = G.local_problems(st.first_bad_step, [st.train_loss], list(ctx.model.parameters()),
                                    _bn_statistics(ctx.model.modules()))
        return st, nan, nan, _halted(ctx, st, step, progress, problems)
    beta = beta_for_epoch(ctx.cfg.parallel, step.method, step.parallel_before, ctx.topo.stages)
    beta_eff = ctx.beta(beta)
    st = loop.engine.train_epoch(step.epoch, ctx.lr, 0.0 if math.isnan(beta_eff) else beta_eff, resume=resume)
    last = ctx.pipe.rank == ctx.pipe.size - 1
    losses = [st.local_loss] + ([st.train_loss] if last else [])
    problems = G.local_problems(st.first_bad_step, losses, loop.engine.params,
                                [("auxiliary values", st.extra.get("nonfinite_aux", 0))]
                                + _bn_statistics(loop.engine.stage_modules))
    return st, beta, beta_eff, _halted(ctx, st, step, progress, problems)


def _bn_statistics(modules) -> list:
    """(name, tensor) of the floating BatchNorm buffers of modules, for the divergence guard."""
    return [("BatchNorm statistics", b) for m in modules for b in m.buffers(recurse=False)
            if b.dtype.is_floating_point]


def _halted(ctx: RunContext, st, step: EpochStep, progress: Progress, problems: list) -> list:
    """Say where the in-epoch check (run.check_every) stopped the epoch, in the log and in this rank's
    problems (every rank halted alike; the guard reports the ranks that found something)."""
    if "halted" not in st.extra:
        return problems
    done, total, unit = st.extra["halted"]
    where = (f"the in-epoch check (run.check_every={ctx.cfg.run.check_every}) halted epoch {step.epoch + 1} "
             f"after {done} of {total} {unit}")
    progress.log(f"hpc_layerpar: {where}: a non-finite value")
    return problems + [where] if problems else problems


def _check(ctx: RunContext, loop: _Loop, step: EpochStep, problems: list):
    """The divergence guard (collective): the DivergenceError to raise after recording, or None."""
    try:
        G.check(ctx.comm, problems, epoch=step.epoch, phase=step.method,
                stage_of_rank=lambda r: r % ctx.pipe.size if step.method in PARALLEL else "all",
                remedy=_remedy(ctx.cfg, step.method) + (
                    f" The last good checkpoint is {loop.last_ckpt}." if loop.last_ckpt else
                    " No checkpoint was written before (run.checkpoint_every)."))
    except G.DivergenceError as exc:
        return exc
    return None


def _evaluate(ctx: RunContext, loop: _Loop, step: EpochStep) -> tuple:
    """(test loss, test accuracy, consistency, gradient cosine, gradient norm ratio): health after
    parallel epochs, the
    true network G on the test set when the plan says so (BatchNorm re-estimated first: running
    averages gathered while the weights moved, or per stage and micro-batch, misjudge the network)."""
    nan = math.nan
    cons = cos = ratio = test_loss = test_acc = nan
    if step.method in PARALLEL and loop.engine.probe:
        cons, cos, ratio = diagnostics.probe(ctx.model, ctx.ranges, ctx.pipe, ctx.data, loop.engine.filter, loop.engine)
    if step.evaluate:
        if step.method in PARALLEL:
            share_stages(ctx.model, ctx.ranges, ctx.pipe)  # the true network G: gather the stages
        recalibrate_bn(ctx.model, ctx.data, ctx.comm, ctx.cfg.parallel.bn_batches, ctx.cfg.data.batch_size,
                       ctx.cfg.train.seed)
        test_loss, test_acc = evaluate(ctx.model, ctx.data, ctx.comm, ctx.cfg.data.eval_batch_size)
        loop.final = test_acc
        loop.best = test_acc if math.isnan(loop.best) else max(loop.best, test_acc)
    return test_loss, test_acc, cons, cos, ratio


def _row(ctx: RunContext, step: EpochStep, mine: dict, extra: dict):
    """Gather the ranks' figures; on rank 0 the metrics row (None elsewhere)."""
    per_rank = ctx.comm.gather_obj(mine)
    if ctx.comm.rank != 0:
        return None
    col = {k: [r[k] for r in per_rank] for k in mine}
    if step.method in PARALLEL:
        # boundary k's residual and multipliers live on rank k-1: report them at rank k
        for key in ("residual", "multiplier_norm"):
            col[key] = [math.nan] + col[key][:-1]
    # serial: every rank has the same figures; parallel: the relaxed network's CE is on the last rank
    return {"epoch": step.epoch, "phase": step.method, "phase_index": step.phase_index, "lr": ctx.lr(step.epoch),
            "epoch_seconds": max(col.pop("epoch_seconds")), "train_loss": col.pop("train_loss")[-1],
            "train_acc": col.pop("train_acc")[-1], **extra, **col}


def _checkpoint(ctx: RunContext, loop: _Loop, step: EpochStep, path: str, preempted: dict | None = None) -> str:
    """Write a checkpoint after step's epoch, or (preempted: the engine's stop report) inside it."""
    if loop.engine is not None:
        share_stages(ctx.model, ctx.ranges, ctx.pipe, ctx.opt)  # the whole network, rank-count independent
    partial = None
    if preempted is not None:
        done, total, unit = preempted["where"]
        partial = {"epoch": step.epoch, "done": done, "total": total, "unit": unit}
    meta = C.CheckpointMeta(
        epoch=step.epoch - (partial is not None), world_size=ctx.comm.size, replicas=ctx.cfg.parallel.replicas,
        metrics_path=path, best_test_acc=loop.best, final_test_acc=loop.final, config=ctx.cfg.to_dict(),
        stage_ranges=[list(r) for r in ctx.ranges] if ctx.ranges else None, element_costs=ctx.costs,
        element_forward_costs=ctx.fwd_costs, beta_caps=[list(c) for c in ctx.caps] or None, partial=partial,
        micro=ctx.micro if ctx.ranges else None)
    return C.save(ctx.ckpt_dir, ctx.comm, model=ctx.model, optimizer=ctx.opt,
                  store=loop.engine.store if loop.engine is not None else None, meta=meta,
                  engine_state=None if preempted is None else preempted["state"])


def _stopped(ctx: RunContext, loop: _Loop, step: EpochStep, writer, progress, t_start: float, path: str,
             why: str) -> Summary:
    """A run that stopped at a checkpoint (a signal or run.stop_after): say so, mark the metrics, free."""
    wall = time.perf_counter() - t_start
    if ctx.comm.rank == 0:
        writer.set_attrs(status="checkpointed", wall_seconds_last_segment=wall)
        progress.log(f"stopped by {why}; checkpoint {loop.last_ckpt}; exit code {EXIT_CHECKPOINTED}: resume "
                     "with --resume auto (the SLURM template requeues the job)")
    ctx.free()
    return Summary(metrics_path=path, final_test_acc=loop.final, best_test_acc=loop.best, wall_seconds=wall,
                   epochs=ctx.n_epochs, stopped_at=step.epoch, checkpoint=loop.last_ckpt)


def run(cfg: Config, comm: Comm | None = None, quiet: bool = False, resume: str | None = None) -> Summary:
    """resume: None (fresh start), "auto" (the latest checkpoint in the run's checkpoint folder if
    there is one, else a fresh start) or the path of a checkpoint folder."""
    if comm is None:
        if cfg.parallel.simulate > 0:
            from .simulate import run_simulated
            return run_simulated(cfg.parallel.simulate, lambda c: run(cfg, c, quiet, resume))[0]
        comm = Comm.world()
        try:
            with watchdog.Watchdog(cfg.run.watchdog_s, lambda msg: abort_job(RuntimeError(msg)), rank=comm.rank):
                return run(cfg, comm, quiet, resume)
        finally:
            comm.free()
    t_start = time.perf_counter()
    progress = Progress(cfg.run.progress, enabled=(comm.rank == 0) and not quiet)
    ctx = build_context(cfg, comm, resume)
    watchdog.beat()
    writer, path = _open_metrics(ctx, progress)
    loop = _Loop(last_ckpt=ctx.src)
    if ctx.meta is not None:
        loop.best, loop.final = ctx.meta.best_test_acc, ctx.meta.final_test_acc
        if ctx.meta.partial:
            loop.resume = C.load_engine_state(ctx.src, comm.rank)
    plan = epoch_plan(ctx.phases, start_epoch=ctx.start_epoch, eval_every=cfg.train.eval_every,
                      checkpoint_every=cfg.run.checkpoint_every, stop_after=cfg.run.stop_after)
    with StopRequest() as stop:
        for step in plan:
            comm.counters.reset()
            comm.barrier()  # epochs start together, so epoch times measure the same thing on all ranks
            _inject_faults(ctx, loop, step)
            t0 = time.perf_counter()
            _enter(ctx, loop, step, progress)
            switch_s, switch_bytes = time.perf_counter() - t0, comm.counters.bytes_sent
            comm.counters.reset()
            t0 = time.perf_counter()
            st, beta, beta_eff, problems = _train(ctx, loop, step, progress)
            epoch_s, (comm_s, wait_s, sent, recv) = time.perf_counter() - t0, comm.counters.as_tuple()
            watchdog.epoch_done(epoch_s + switch_s)
            if "preempted" in st.extra:  # a stop request inside the epoch: checkpoint its state, leave
                loop.last_ckpt = _checkpoint(ctx, loop, step, path, st.extra["preempted"])
                done, total, unit = st.extra["preempted"]["where"]
                return _stopped(ctx, loop, step, writer, progress, t_start, path,
                                f"a signal in epoch {step.epoch + 1} after {done} of {total} {unit}")
            diverged = _check(ctx, loop, step, problems)
            t0 = time.perf_counter()
            test_loss, test_acc, cons, cos, ratio = _evaluate(ctx, loop, step) if diverged is None else (math.nan,) * 5
            par = step.method in PARALLEL
            mine = {"compute_seconds": st.compute_seconds, "comm_seconds": comm_s, "wait_seconds": wait_s,
                    "bytes_sent": sent, "bytes_recv": recv, "epoch_seconds": epoch_s,
                    "switch_bytes_sent": switch_bytes, "local_loss": st.local_loss if par else math.nan,
                    "residual": st.residual if par else math.nan,
                    "multiplier_norm": st.multiplier_norm if par else math.nan, "train_loss": st.train_loss,
                    "train_acc": st.train_acc, "consistency": cons, "grad_cosine": cos, "grad_norm_ratio": ratio,
                    "beta_effective": beta_eff}
            row = _row(ctx, step, mine, {"beta": beta, "test_loss": test_loss, "test_acc": test_acc,
                                         "switch_seconds": switch_s, "eval_seconds": time.perf_counter() - t0})
            if row is not None:
                writer.append(row)
                progress.log(epoch_line(row, ctx.n_epochs))
                if diverged is not None:
                    writer.set_attrs(status="diverged", diverged_epoch=step.epoch, diverged_message=str(diverged),
                                     wall_seconds=time.perf_counter() - t_start)
            if diverged is not None:
                raise diverged
            signalled = bool(comm.allreduce_array([stop.requested], "max")[0]) and not step.last
            if step.checkpoint or signalled:
                loop.last_ckpt = _checkpoint(ctx, loop, step, path)
                progress.log(f"checkpoint: {loop.last_ckpt}")
            if signalled or step.stop:
                why = "a signal" if signalled else f"run.stop_after={cfg.run.stop_after}"
                return _stopped(ctx, loop, step, writer, progress, t_start, path, f"{why} after epoch {step.epoch + 1}")
    ctx.free()
    wall = time.perf_counter() - t_start
    if comm.rank == 0:
        writer.set_attrs(status="completed", wall_seconds=wall, final_test_acc=loop.final,
                         finished=M.provenance({})["started"])
        progress.log(f"done in {wall:.1f}s: final test accuracy {100 * loop.final:.2f}% "
                     f"(best {100 * loop.best:.2f}%); metrics written to {path}")
    return Summary(metrics_path=path, final_test_acc=loop.final, best_test_acc=loop.best, wall_seconds=wall,
                   epochs=ctx.n_epochs)
