"""Run configuration: frozen dataclasses by concern, file + --set overrides (checks: validate.py)."""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field, fields

import yaml

from .errors import ConfigError
from .presets import PRESETS
from .validate import EPOCH_COUPLING_GONE, validate
from .validate import suggest as _suggest

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
    micro_measure: str = "auto"  # auto M timed on the device: auto (on GPUs) | on | off (BatchNorm rule alone)
    micro_overhead: float = 0.25  # ... keeps M only if M micro-batches cost <= 1 + this of one batch
    micro_max_delay: float = 6.0  # ... and only if stage 0's delay 2(K-1)/M (1f1b: (K-1)/M) <= this many steps
    schedule: str = "1f1b"      # 1f1b (adjoints within the tick: half the delay) | tick (adjoints a tick later)
    beta: str = "auto"          # penalty weight per element of a boundary, or auto: 3 at K <= 4, 10 at K > 4
    #                             (schedule.base_beta; docs/RESULTS.md, "The penalty weight at K = 8")
    beta_guard: str = "auto"    # auto: cap beta where lr*beta*curvature > 1 | refuse: error | off
    beta_growth: float = 1.0    # penalty: beta_e = min(beta * beta_growth^e, beta_max)
    beta_max: float = 1.0e4
    al_rho: float = 0.5         # AL: damping of the multiplier step, in (0, 1]
    augment: bool = True        # rank 0 augments in parallel epochs as well
    keep_forward: bool = True   # B reuses F's graph where no step falls between them (exact; memory)
    stash_weights: bool = False  # B at the parameters its F used, also across a step (eager steps; s.4)
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
