"""Validation of a run configuration: checks that need no data and no MPI, each a ConfigError that
names the key, the value and the remedy (shape checks against the data happen at set-up)."""
from __future__ import annotations

import difflib

from .errors import ConfigError
from .pipeline_plan import SCHEDULES
from .schedule import BETA_AUTO, beta_is_auto, parse_phases

EPOCH_COUPLING_GONE = ("version 1's epoch coupling (parallel.coupling=epoch) was removed; its record is "
                       "docs/ALGORITHM.md s.4b and s.10")


def suggest(word: str, choices) -> str:
    """' Did you mean ...?' for the closest of choices, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _choice(key, value, choices):
    if value not in choices:
        names = [str(c) for c in choices]
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(names)}.{suggest(str(value), names)}")


def _positive(key, value, strict=True):
    if (value <= 0) if strict else (value < 0):
        raise ConfigError(f"{key}={value} must be {'> 0' if strict else '>= 0'}.")


def _beta(value) -> float:
    """The largest beta_0 parallel.beta may give: a number >= 0, or auto (schedule.BETA_AUTO)."""
    if beta_is_auto(value):
        return max(b for _, b in BETA_AUTO)
    try:
        beta = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"parallel.beta={value!r} is not a number or auto; give e.g. parallel.beta=3, or "
                          "parallel.beta=auto (3 up to 4 stages, 10 beyond).") from None
    if not 0 <= beta < float("inf"):
        raise ConfigError(f"parallel.beta={value!r} must be a finite number >= 0, or auto.")
    return beta


def validate(cfg) -> None:
    """Checks that need no data and no MPI (shape checks against the data happen at set-up): a
    ConfigError naming the key, the value and the remedy."""
    _validate_model_data(cfg)
    _validate_optim_train(cfg)
    _validate_parallel(cfg)
    _validate_run(cfg)


def _validate_model_data(cfg) -> None:
    d, m = cfg.data, cfg.model
    _positive("data.batch_size", d.batch_size)
    _positive("data.eval_batch_size", d.eval_batch_size)
    if d.crop_pad < -1:
        raise ConfigError(f"data.crop_pad={d.crop_pad} must be -1 (automatic) or >= 0.")
    _choice("data.flip", d.flip, ("auto", "on", "off"))
    _choice("model.arch", m.arch, ("resnet", "wrn"))
    _choice("model.norm", m.norm, ("batch", "none"))
    _positive("model.base_width", m.base_width)
    if m.arch == "resnet" and (m.depth < 8 or (m.depth - 2) % 6):
        raise ConfigError(f"model.depth={m.depth} is not a CIFAR ResNet depth 6n+2 (n >= 1); "
                          "use 8, 14, 20, 32, 44, 56, 110 or 1202.")
    if m.arch == "resnet" and m.width != 1:
        raise ConfigError(f"model.width={m.width} applies to arch=wrn only; set model.width=1 "
                          "or model.arch=wrn.")
    if m.arch == "wrn" and (m.depth < 10 or (m.depth - 4) % 6):
        raise ConfigError(f"model.depth={m.depth} is not a WideResNet depth 6n+4 (n >= 1); "
                          "use e.g. 16, 22, 28 or 40.")
    _positive("model.width", m.width)
    _positive("data.subset", d.subset, strict=False)


def _validate_optim_train(cfg) -> None:
    o, t = cfg.optim, cfg.train
    _positive("optim.lr", o.lr)
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"optim.momentum={o.momentum} must lie in [0, 1).")
    if o.nesterov and o.momentum == 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0; set one or the other.")
    _positive("optim.weight_decay", o.weight_decay, strict=False)
    _choice("optim.schedule", o.schedule, ("cosine", "step", "constant"))
    _positive("optim.warmup_epochs", o.warmup_epochs, strict=False)
    _positive("optim.gamma", o.gamma)
    if o.schedule == "step" and not o.milestones:
        raise ConfigError("optim.schedule=step needs optim.milestones, e.g. --set optim.milestones=[60,120].")
    if list(o.milestones) != sorted(o.milestones):
        raise ConfigError(f"optim.milestones={list(o.milestones)} must be increasing.")
    phases = parse_phases(t.phases)
    total = sum(p.epochs for p in phases)
    if o.warmup_epochs >= total:
        raise ConfigError(f"optim.warmup_epochs={o.warmup_epochs} must be shorter than the run "
                          f"({total} epochs from train.phases={t.phases!r}).")
    _positive("train.eval_every", t.eval_every)
    if t.seed < 0:
        raise ConfigError(f"train.seed={t.seed} must be >= 0.")


def _validate_run(cfg) -> None:
    r = cfg.run
    dev = r.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"run.device={dev!r} is not auto, cpu, cuda or cuda:N.")
    _positive("run.threads", r.threads, strict=False)
    _positive("run.watchdog_s", r.watchdog_s, strict=False)
    _positive("run.check_every", r.check_every, strict=False)
    _choice("run.progress", r.progress, ("auto", "lines", "off"))
    _choice("run.cuda_aware", r.cuda_aware, ("auto", "on", "off", "force"))
    _choice("run.precision", r.precision, ("fp32", "bf16"))
    _choice("run.cuda_graphs", r.cuda_graphs, ("auto", "on", "off"))
    _positive("run.checkpoint_every", r.checkpoint_every, strict=False)
    _positive("run.stop_after", r.stop_after, strict=False)
    dbg = cfg.debug
    if min(dbg.fail_epoch, dbg.kill_epoch, dbg.nan_epoch, dbg.hang_epoch, dbg.stop_epoch) < 0 or \
            min(dbg.fail_rank, dbg.kill_rank, dbg.nan_rank, dbg.hang_rank, dbg.stop_rank) < -1:
        raise ConfigError("debug.fail_rank / kill_rank / nan_rank / hang_rank / stop_rank must be >= -1 and "
                          "debug.fail_epoch / kill_epoch / nan_epoch / hang_epoch / stop_epoch >= 0.")
    if not r.name or any(c in r.name for c in "/\\ "):
        raise ConfigError(f"run.name={r.name!r} must be non-empty, without '/', '\\' or spaces; "
                          "it names the metrics file.")


def _validate_parallel(cfg) -> None:
    pc, d = cfg.parallel, cfg.data
    if pc.coupling == "epoch":
        raise ConfigError(f"parallel.coupling='epoch': {EPOCH_COUPLING_GONE}. Use parallel.coupling=pipeline "
                          "(the default and only coupling).")
    _choice("parallel.coupling", pc.coupling, ("pipeline",))
    _choice("parallel.beta_guard", pc.beta_guard, ("auto", "refuse", "off"))
    _choice("parallel.switch_momentum", pc.switch_momentum, ("keep", "reset"))
    _positive("parallel.micro_batches", pc.micro_batches, strict=False)
    _choice("parallel.micro_measure", pc.micro_measure, ("auto", "on", "off"))
    _choice("parallel.schedule", pc.schedule, SCHEDULES)
    if not 0 <= pc.micro_overhead < float("inf"):  # NaN fails too
        raise ConfigError(f"parallel.micro_overhead={pc.micro_overhead} must be a number >= 0 (0.25: M micro-batches "
                          "may cost 1.25x one batch).")
    if not 0 < pc.micro_max_delay < float("inf"):
        raise ConfigError(f"parallel.micro_max_delay={pc.micro_max_delay} must be a number > 0 (6: the timed M leaves "
                          "stage 0 at most 6 optimizer steps behind).")
    _positive("parallel.simulate", pc.simulate, strict=False)
    if not 0 < pc.al_rho <= 1:
        raise ConfigError(f"parallel.al_rho={pc.al_rho} must lie in (0, 1]; 1 is the undamped multiplier step.")
    beta = _beta(pc.beta)
    if pc.micro_batches and d.batch_size % (pc.replicas * pc.micro_batches):
        raise ConfigError(f"data.batch_size={d.batch_size} must be divisible by parallel.replicas x "
                          f"parallel.micro_batches = {pc.replicas} x {pc.micro_batches}; change one of them.")
    if not d.drop_last and pc.replicas > 1 and {p.method for p in parse_phases(cfg.train.phases)} & {"penalty", "al"}:
        raise ConfigError(f"data.drop_last=false with parallel.replicas={pc.replicas}: the replicas of a parallel "
                          "phase take equal full sub-batches, so a partial last batch would be dropped; use "
                          "data.drop_last=true (the default) or parallel.replicas=1.")
    if pc.beta_growth < 1:
        raise ConfigError(f"parallel.beta_growth={pc.beta_growth} must be >= 1 (beta never shrinks).")
    if pc.beta_max < beta:
        raise ConfigError(f"parallel.beta_max={pc.beta_max} must be >= parallel.beta={pc.beta}"
                          + (f" (auto: up to {beta:g})." if beta_is_auto(pc.beta) else "."))
    _choice("parallel.ds", pc.ds, (1, 2, 4))
    _choice("parallel.ds_up", pc.ds_up, ("smooth", "nearest"))
    _choice("parallel.message_dtype", pc.message_dtype, ("float32", "bfloat16"))
    _choice("parallel.aux_dtype", pc.aux_dtype, ("float32", "bfloat16"))
    _choice("parallel.aux_location", pc.aux_location, ("device", "host"))
    _positive("parallel.bn_batches", pc.bn_batches)
    _positive("parallel.replicas", pc.replicas)
    if d.batch_size % pc.replicas:
        raise ConfigError(f"data.batch_size={d.batch_size} must be divisible by parallel.replicas="
                          f"{pc.replicas} (each replica takes batch_size / R samples per step).")
    if pc.partition not in ("time", "macs") and not all(
            c.strip().isdigit() for c in pc.partition.split(",")):
        raise ConfigError(f"parallel.partition={pc.partition!r} is not time, macs or cut indices like '4,9'.")
