"""Run configuration: frozen dataclasses by concern, file + --set overrides, validation (presets: presets.py)."""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field, fields

import yaml

from .errors import ConfigError
from .presets import PRESETS
from .schedule import parse_phases

__all__ = ["Config", "ConfigError", "PRESETS", "resolve", "from_dict", "validate"]


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/digits.h5"
    batch_size: int = 128
    eval_batch_size: int = 1000
    augment: bool = True
    crop_pad: int = -1          # -1: image height // 8 (4 for 32x32, 1 for 8x8)
    flip: str = "auto"          # auto: follow the dataset's `hflip` attribute; on | off
    drop_last: bool = True      # equal-sized steps keep BatchNorm statistics and timings comparable
    subset: int = 0             # > 0: train on a fixed class-balanced subset of that many images


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet"        # resnet (pre-activation, depth 6n+2) | wrn (WRN-d-k, depth 6n+4)
    depth: int = 20
    width: int = 1              # WRN widening factor k; must be 1 for resnet
    base_width: int = 16
    norm: str = "batch"         # batch | none (none: for exact equivalence tests)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"    # cosine | step | constant
    warmup_epochs: float = 0.0
    milestones: tuple = ()      # epochs at which `step` multiplies the lr by gamma
    gamma: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    phases: str = "serial:30"   # SPH phase list, see schedule.parse_phases
    seed: int = 0
    eval_every: int = 1         # evaluate the true network every N epochs (and after the last)


@dataclass(frozen=True)
class ParallelConfig:
    coupling: str = "pipeline"  # pipeline (ALGORITHM.md s.4), the only one; kept so config files load
    micro_batches: int = 0      # M micro-batches per global batch (one step per M); 0: auto
    beta: float = 1.0           # penalty weight, per element of the boundary
    beta_guard: str = "auto"    # auto: cap beta where lr*beta*curvature > 1 | refuse: error | off
    beta_growth: float = 1.0    # penalty: beta_e = min(beta * beta_growth^e, beta_max)
    beta_max: float = 1.0e4
    al_rho: float = 0.5         # AL: damping of the multiplier step, in (0, 1]
    augment: bool = True        # rank 0 augments in parallel epochs as well
    ds: int = 1                 # DS filter factor s in {1, 2, 4}: messages and storage / s^2
    ds_up: str = "smooth"       # DS upsampling U: smooth (bilinear, block means kept) | nearest (v1)
    message_dtype: str = "float32"   # float32 | bfloat16 (on the wire)
    aux_dtype: str = "float32"       # float32 | bfloat16 (storage of the AL multipliers)
    aux_location: str = "device"     # device | host (pinned when the device is a GPU)
    bn_batches: int = 20        # training batches used to re-estimate BatchNorm statistics
    partition: str = "time"     # time (measured per element) | macs (analytic) | cut indices "4,9"
    replicas: int = 1           # R: world = K stages x R replicas in the parallel phase (data x layer)
    switch_momentum: str = "keep"    # entering a serial phase after a parallel one: keep | reset
    simulate: int = 0           # > 0: run that many virtual ranks as threads of this one process


EPOCH_COUPLING_GONE = ("version 1's epoch coupling (parallel.coupling=epoch) was removed; its record is "
                       "docs/ALGORITHM.md s.4b and s.10")
REMOVED_KEYS = {"parallel.eta": "the relaxation of its auxiliary update",
                "parallel.refresh_every": "its forward sweeps inside a phase",
                "parallel.window": "the batches of messages it posted ahead"}


@dataclass(frozen=True)
class RunConfig:
    name: str = ""              # empty: the preset name, or "run"
    out_dir: str = "runs"
    device: str = "auto"        # auto | cpu | cuda | cuda:N
    precision: str = "fp32"     # fp32 | bf16: autocast compute, float32 weights, optimizer state and messages
    cuda_graphs: str = "auto"   # auto (= on for CUDA devices) | on | off: capture each training step once, replay it
    threads: int = 0            # torch threads per rank; 0: cores per node / ranks per node
    deterministic: bool = False  # bitwise-reproducible kernels on GPUs too (PyTorch deterministic algorithms)
    # GPU tensors straight to MPI: auto (ask the MPI library) | on | off (stage via pinned host memory)
    cuda_aware: str = "auto"
    progress: str = "auto"      # auto: a live bar on a terminal, lines otherwise | lines | off
    checkpoint_every: int = 0   # epochs between checkpoints (0: only on SIGUSR1/SIGTERM)
    checkpoint_dir: str = ""    # empty: <out_dir>/<name>[-j<SLURM_JOB_ID>].ckpt
    stop_after: int = 0         # > 0: checkpoint and stop (exit 75, resumable) after that global epoch
    watchdog_s: float = 900.0   # abort the job after max(this, 3 x the longest epoch) without progress; 0: off
    check_every: int = 10       # optimizer steps between in-epoch checks for non-finite values; 0: epoch end only


@dataclass(frozen=True)
class DebugConfig:
    fail_rank: int = -1         # >= 0: that rank raises at the start of epoch `fail_epoch` (tests the abort)
    fail_epoch: int = 0
    kill_rank: int = -1         # >= 0: that rank SIGKILLs itself at the start of epoch `kill_epoch`
    kill_epoch: int = 0
    nan_rank: int = -1          # >= 0: that rank writes a NaN into its stage at the start of `nan_epoch`
    nan_epoch: int = 0          #       (tests the divergence guard)
    hang_rank: int = -1         # >= 0: that rank stops answering at the start of `hang_epoch` (tests the watchdog)
    hang_epoch: int = 0
    stop_rank: int = -1         # >= 0: that rank is asked to stop (as by SIGUSR1) at the start of `stop_epoch`
    stop_epoch: int = 0         #       (tests a stop inside an epoch: it takes effect at the next check)


@dataclass(frozen=True)
class Config:
    """The whole run configuration: one frozen dataclass per section of the YAML file and of --set."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict:
        """The configuration as nested plain dicts and lists."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The configuration as JSON with sorted keys: hashed to check all ranks agree, stored in the metrics file."""
        return json.dumps(self.to_dict(), sort_keys=True)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _coerce(section: str, f: dataclasses.Field, value, hints):
    key = f"{section}.{f.name}"
    typ = hints[f.name]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key}={value!r} is not a boolean; use true or false.")
    if typ in (int, float):
        what = "an integer; give a whole number," if typ is int else "a number; give"
        try:  # booleans are ints to Python, and int(2.5) would truncate: neither is taken
            if isinstance(value, bool) or (typ is int and not isinstance(value, (int, str))):
                raise TypeError
            return typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not {what} e.g. {f.default}.") from None
    if typ is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        return str(value)
    if typ is tuple:
        if isinstance(value, str):
            value = value.strip().strip("[]()").replace(",", " ").split()
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is not a list; give e.g. [60, 120].")
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} must be a list of numbers, e.g. [60, 120].") from None
    raise AssertionError(f"unhandled config type {typ} for {key}")


def _build(overrides: dict) -> Config:
    if not isinstance(overrides, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(overrides).__name__}; "
                          "see docs/CONFIG.md.")
    sections = {f.name: f for f in fields(Config)}
    for name in overrides:
        if name not in sections:
            raise ConfigError(f"unknown config section '{name}'.{_suggest(name, sections)} "
                              f"Valid sections: {', '.join(sections)}.")
    built = {}
    for sname, sfield in sections.items():
        cls = sfield.default_factory
        hints = typing.get_type_hints(cls)
        given = overrides.get(sname, {}) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"config section '{sname}' must be a mapping, got {given!r}.")
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in given.items():
            if f"{sname}.{key}" in REMOVED_KEYS:
                raise ConfigError(f"config key '{sname}.{key}' ({REMOVED_KEYS[f'{sname}.{key}']}) was removed with "
                                  f"the epoch coupling: {EPOCH_COUPLING_GONE}. Delete the key.")
            if key not in known:
                raise ConfigError(f"unknown config key '{sname}.{key}'.{_suggest(key, known)} "
                                  f"Valid keys of '{sname}': {', '.join(known)}.")
            kwargs[key] = _coerce(sname, known[key], value, hints)
        built[sname] = cls(**kwargs)
    return Config(**built)


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def parse_set(items) -> dict:
    """`section.key=value` strings -> nested dict of raw strings; _coerce types them per field."""
    out: dict = {}
    for item in items or ():
        path = item.split("=", 1)[0]
        if "=" not in item or "." not in path or not all(path.split(".", 1)):
            raise ConfigError(f"--set {item!r} is not of the form section.key=value, "
                              "e.g. --set optim.lr=0.05.")
        section, key = path.strip().split(".", 1)
        out.setdefault(section, {})[key] = item.split("=", 1)[1].strip()
    return out


def load_file(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"config file '{path}' does not exist; check the path or use --preset.")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (data:, model:, ...).")
    return data


def resolve(preset: str | None = None, path: str | None = None, sets=()) -> Config:
    """Defaults <- preset <- config file <- --set overrides, then validation."""
    tree: dict = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}'.{_suggest(preset, PRESETS)} "
                              f"Available: {', '.join(sorted(PRESETS))} (list them with `hpc_layerpar presets`).")
        tree = _merge(tree, PRESETS[preset])
    if path:
        tree = _merge(tree, load_file(path))
    tree = _merge(tree, parse_set(sets))
    cfg = _build(tree)
    if not cfg.run.name:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=preset or "run"))
    validate(cfg)
    return cfg


def from_dict(tree: dict) -> Config:
    """Rebuild a Config from its to_dict() form (e.g. the one stored in a metrics file)."""
    cfg = _build(tree)
    validate(cfg)
    return cfg


def _choice(key, value, choices):
    if value not in choices:
        names = [str(c) for c in choices]
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(names)}.{_suggest(str(value), names)}")


def _positive(key, value, strict=True):
    if (value <= 0) if strict else (value < 0):
        raise ConfigError(f"{key}={value} must be {'> 0' if strict else '>= 0'}.")


def validate(cfg: Config) -> None:
    """Checks that need no data and no MPI (shape checks against the data happen at set-up): a
    ConfigError naming the key, the value and the remedy."""
    _validate_model_data(cfg)
    _validate_optim_train(cfg)
    _validate_parallel(cfg)
    _validate_run(cfg)


def _validate_model_data(cfg: Config) -> None:
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


def _validate_optim_train(cfg: Config) -> None:
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


def _validate_run(cfg: Config) -> None:
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


def _validate_parallel(cfg: Config) -> None:
    pc, d = cfg.parallel, cfg.data
    if pc.coupling == "epoch":
        raise ConfigError(f"parallel.coupling='epoch': {EPOCH_COUPLING_GONE}. Use parallel.coupling=pipeline "
                          "(the default and only coupling).")
    _choice("parallel.coupling", pc.coupling, ("pipeline",))
    _choice("parallel.beta_guard", pc.beta_guard, ("auto", "refuse", "off"))
    _choice("parallel.switch_momentum", pc.switch_momentum, ("keep", "reset"))
    _positive("parallel.micro_batches", pc.micro_batches, strict=False)
    _positive("parallel.simulate", pc.simulate, strict=False)
    if not 0 < pc.al_rho <= 1:
        raise ConfigError(f"parallel.al_rho={pc.al_rho} must lie in (0, 1]; 1 is the undamped multiplier step.")
    _positive("parallel.beta", pc.beta, strict=False)
    if pc.micro_batches and d.batch_size % (pc.replicas * pc.micro_batches):
        raise ConfigError(f"data.batch_size={d.batch_size} must be divisible by parallel.replicas x "
                          f"parallel.micro_batches = {pc.replicas} x {pc.micro_batches}; change one of them.")
    if not d.drop_last and pc.replicas > 1 and {p.method for p in parse_phases(cfg.train.phases)} & {"penalty", "al"}:
        raise ConfigError(f"data.drop_last=false with parallel.replicas={pc.replicas}: the replicas of a parallel "
                          "phase take equal full sub-batches, so a partial last batch would be dropped; use "
                          "data.drop_last=true (the default) or parallel.replicas=1.")
    if pc.beta_growth < 1:
        raise ConfigError(f"parallel.beta_growth={pc.beta_growth} must be >= 1 (beta never shrinks).")
    if pc.beta_max < pc.beta:
        raise ConfigError(f"parallel.beta_max={pc.beta_max} must be >= parallel.beta={pc.beta}.")
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
