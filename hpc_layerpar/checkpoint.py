"""Checkpoints: written atomically (a temporary folder renamed into place, then a `latest` pointer
renamed over the old one), so a job killed at any moment leaves the previous checkpoint usable.

Layout of `run.checkpoint_dir` (default `<out_dir>/<name>[-j<SLURM_JOB_ID>].ckpt`):

    latest               the name of the newest complete checkpoint, e.g. "epoch-000012"
    epoch-000012/
      meta.json          epoch, world size, stage ranges and costs, metrics path, accuracies, config
      model.pt           the whole network and SGD momentum: independent of the rank count
      aux-rank0.pt ...   the AL multipliers of each rank's outgoing boundary, when the checkpoint
                         falls inside an AL phase
    epoch-000013-part/   a stop request inside epoch 13 (0-based): as above, plus
      engine-rank0.pt ...  each rank's state of the epoch in progress (pipeline_state.py, or the
                         serial phase's sums and BatchNorm statistics), to continue it bitwise

The whole network is gathered before writing (one Bcast per stage), so a checkpoint taken at K
ranks resumes at any rank count; AL multipliers are reused only at the same K and split,
otherwise they restart at zero."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass

import torch

from .errors import ConfigError

LATEST = "latest"
KEEP = 2


@dataclass
class CheckpointMeta:
    """meta.json: where the run stood, and what a resume needs to decide how to continue."""
    epoch: int                      # the last completed global epoch
    world_size: int
    replicas: int
    metrics_path: str | None
    best_test_acc: float
    final_test_acc: float
    config: dict
    stage_ranges: list | None       # the split the run started with (None without parallel phases)
    element_costs: list | None
    element_forward_costs: list | None = None  # the pipeline's split weighs the forward twice upstream
    beta_caps: list | None = None   # the curvature guard's (curvature, cap) per stage, as measured at the start
    # a stop request inside an epoch: {"epoch": the epoch in progress, "done", "total", "unit"}; each rank's
    # state of that epoch is in engine-rank<r>.pt, and the run resumes there at the same rank count
    partial: dict | None = None
    micro: int | None = None        # the pipeline's M the run started with (the automatic one may be timed)

    @classmethod
    def from_json(cls, text: str) -> "CheckpointMeta":
        """Parse meta.json, dropping keys this version does not know, so newer checkpoints still load."""
        d = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def default_dir(out_dir: str, name: str) -> str:
    """`<out_dir>/<name>[-j<SLURM_JOB_ID>].ckpt`: the checkpoint folder used when run.checkpoint_dir is empty."""
    job = os.environ.get("SLURM_JOB_ID")
    return os.path.join(out_dir, f"{name}" + (f"-j{job}" if job else "") + ".ckpt")


# What a resumed run must share with the run that wrote the checkpoint: a change to any of these trains
# another problem from the saved state (a changed coupling would even load one kind of table as another).
# Rank count, threads, device, progress, checkpointing and evaluation may change.
RESUME_FIXED = {"model": None, "optim": None,
                "train": ("phases", "seed"),
                "data": ("batch_size", "augment", "crop_pad", "flip", "drop_last", "subset"),
                "parallel": ("coupling", "micro_batches", "beta", "beta_guard", "beta_growth", "beta_max", "al_rho",
                             "augment", "ds", "ds_up", "message_dtype", "aux_dtype", "replicas", "switch_momentum")}


def same_setting(a, b) -> bool:
    """Equal settings, numbers by value: parallel.beta is auto or a number written as text, so "3",
    "3.0" and a checkpoint's 3.0 (written before beta took auto) are one setting."""
    if a == b:
        return True
    try:
        return not isinstance(a, bool) and not isinstance(b, bool) and float(a) == float(b)
    except (TypeError, ValueError):
        return False


def config_changes(saved: dict, now: dict) -> list:
    """['section.key: saved -> now', ...] for the settings RESUME_FIXED names that differ."""
    out = []
    for section, keys in RESUME_FIXED.items():
        a, b = saved.get(section, {}), now.get(section, {})
        for k in (keys or sorted(set(a) | set(b))):
            if not same_setting(a.get(k), b.get(k)):
                out.append(f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def latest(ckpt_dir: str) -> str | None:
    """Path of the newest complete checkpoint in ckpt_dir, or None when the folder has none yet. A
    `latest` pointer that names no complete checkpoint is an error: starting afresh would silently
    overwrite a run that had checkpoints."""
    pointer = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as fh:
        name = fh.read().strip()
    path = os.path.join(ckpt_dir, name)
    if not os.path.exists(os.path.join(path, "meta.json")):
        raise ConfigError(f"{pointer} names '{name}', which is not a complete checkpoint (no {path}/meta.json). "
                          f"Resume from another one with --resume {ckpt_dir}/epoch-NNNNNN, or remove {pointer} "
                          "to start afresh.")
    return path


def _atomic_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(ckpt_dir: str, comm, *, model, optimizer, store, meta: CheckpointMeta, engine_state=None) -> str:
    """Collective: every rank calls it. The caller has already gathered the whole network on rank 0.
    engine_state: this rank's state of the epoch in progress (meta.partial set)."""
    epoch = meta.epoch
    name = f"epoch-{epoch:06d}" if meta.partial is None else f"epoch-{meta.partial['epoch']:06d}-part"
    final = os.path.join(ckpt_dir, name)
    tmp = os.path.join(ckpt_dir, f".{name}.tmp")
    if comm.rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    comm.barrier()
    if store is not None:
        torch.save({"a": store.a.cpu(), "m": None if store.m is None else store.m.cpu()},
                   os.path.join(tmp, f"aux-rank{comm.rank}.pt"))
    if engine_state is not None:
        torch.save(_to_cpu(engine_state), os.path.join(tmp, f"engine-rank{comm.rank}.pt"))
    if comm.rank == 0:
        params = list(model.parameters())
        torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()},
                    "momentum": [optimizer.state[p]["momentum_buffer"].cpu() for p in params],
                    "torch_rng": torch.get_rng_state()}, os.path.join(tmp, "model.pt"))
        _atomic_text(os.path.join(tmp, "meta.json"), json.dumps(dataclasses.asdict(meta), indent=1))
    comm.barrier()  # every rank's files are on disk before the folder becomes visible
    if comm.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_text(os.path.join(ckpt_dir, LATEST), name)
        old = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("epoch-") and d != name)
        for d in old[:-(KEEP - 1)] if KEEP > 1 else old:
            shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    comm.barrier()
    return final


def load_meta(path: str) -> CheckpointMeta:
    """The metadata of the checkpoint folder `path`."""
    with open(os.path.join(path, "meta.json")) as fh:
        return CheckpointMeta.from_json(fh.read())


def load_model(path: str, model, optimizer) -> None:
    """Restore the whole network, the SGD momentum buffers and the torch CPU RNG state from path/model.pt."""
    state = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    for p, buf in zip(model.parameters(), state["momentum"]):
        optimizer.state[p]["momentum_buffer"].copy_(buf)
    torch.set_rng_state(state["torch_rng"])


def _to_cpu(x):
    """x with every tensor in it moved to the host (lists, tuples and dicts walked)."""
    if torch.is_tensor(x):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_cpu(v) for v in x]
    return x


def load_engine_state(path: str, rank: int) -> dict:
    """This rank's state of the epoch a mid-epoch checkpoint stopped in (tensors on the host)."""
    f = os.path.join(path, f"engine-rank{rank}.pt")
    if not os.path.exists(f):
        raise ConfigError(f"{path} was written inside an epoch but has no {os.path.basename(f)}: it is "
                          "incomplete; resume from an earlier checkpoint in the same folder.")
    return torch.load(f, map_location="cpu", weights_only=True)


def load_aux(path: str, rank: int, store) -> bool:
    """Load this rank's per-sample table (the pipeline's AL multipliers) into store.
    False, store untouched, without a store or file or when the table shape differs: it restarts at zero."""
    f = os.path.join(path, f"aux-rank{rank}.pt")
    if store is None or not os.path.exists(f):
        return False
    state = torch.load(f, map_location="cpu", weights_only=True)
    if tuple(state["a"].shape) != tuple(store.a.shape):
        return False
    store.a.copy_(state["a"])
    if store.m is not None:
        if state["m"] is None:
            store.m.zero_()
        else:
            store.m.copy_(state["m"])
    return True
