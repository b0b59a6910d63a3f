"""The HDF5 metrics file: one per run, written by rank 0, reopened and closed every epoch so a
killed job leaves a readable file; and the reader that checks its schema."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
from contextlib import contextmanager

import h5py
import numpy as np

SCHEMA = "hpc_layerpar-metrics"
SCHEMA_VERSION = 4
READS = (2, 3, 4)  # version 2 lacks the health columns, version 3 grad_norm_ratio; they read as NaN

# name -> (dtype, per_rank, unit / meaning). Per-rank columns have shape (epochs, world_size).
COLUMNS = {
    "epoch": ("i8", False, "global epoch index, 0-based"),
    "phase": ("str", False, "method of the SPH phase this epoch belongs to (serial, ...)"),
    "phase_index": ("i8", False, "index of the phase in the schedule"),
    "lr": ("f8", False, "learning rate at the start of the epoch"),
    "train_loss": ("f8", False, "mean training loss over the epoch's samples (augmented when on)"),
    "train_acc": ("f8", False, "training accuracy over the epoch's samples, in [0, 1]"),
    "test_loss": ("f8", False, "test loss of the true network; NaN when not evaluated this epoch"),
    "test_acc": ("f8", False, "test accuracy of the true network in [0, 1]; NaN when not evaluated"),
    "beta": ("f8", False, "penalty / AL weight of a parallel epoch; NaN in serial epochs"),
    "epoch_seconds": ("f8", False, "wall time of the training epoch (max over ranks), no evaluation"),
    "switch_seconds": ("f8", False, "phase-switch work before the epoch: a new engine, stage sharing"),
    "eval_seconds": ("f8", False, "wall time of the evaluation after the epoch (0 when none)"),
    "compute_seconds": ("f8", True, "per rank: seconds of the epoch outside MPI calls"),
    "comm_seconds": ("f8", True, "per rank: seconds inside MPI calls (posting, waiting, collectives)"),
    "wait_seconds": ("f8", True, "per rank: seconds blocked waiting for point-to-point messages"),
    "bytes_sent": ("f8", True, "per rank: bytes sent in the epoch (collectives as a ring moves them)"),
    "bytes_recv": ("f8", True, "per rank: bytes received in the epoch (same convention)"),
    "switch_bytes_sent": ("f8", True, "per rank: bytes sent by the phase-switch work before the epoch"),
    "local_loss": ("f8", True, "per rank: mean local objective of a parallel epoch (penalty or CE)"),
    "residual": ("f8", True, "per rank k: mean per-sample ||D(Phi_{k-1}) - a_k|| at boundary k"),
    "multiplier_norm": ("f8", True, "per rank k: mean per-sample ||m_k|| after the AL update"),
    "beta_effective": ("f8", True, "per rank k: penalty weight of its outgoing boundary after the guard"),
    "consistency": ("f8", True, "per rank k: mean ||a_k - D(x_k)|| / ||D(x_k)|| on the probe batch"),
    "grad_cosine": ("f8", True, "per rank: cosine of the applied stage gradient and true BP (probe batch)"),
    "grad_norm_ratio": ("f8", True, "per rank: norm of the applied stage gradient / true BP's (probe batch)"),
}


class MetricsError(ValueError):
    """A file is missing, not a readable metrics file, of another schema version, or lacks its epochs group."""


def _attr(v):
    """HDF5-storable form: lists/dicts as JSON, numpy scalars (np.str_ included) as Python values."""
    if isinstance(v, (list, dict, tuple)):
        return json.dumps(v)
    if isinstance(v, str):
        return v.encode().decode()  # plain str: h5py rejects str subclasses such as TorchVersion
    return v.item() if isinstance(v, np.generic) else v


def git_info() -> tuple[str, bool | None]:
    """(HEAD commit of the package's git checkout, whether tracked files differ from it);
    ("unknown", None) outside a checkout or without git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return (sha or "unknown"), (dirty if sha else None)
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def provenance(extra: dict) -> dict:
    """Software versions, git commit and state, and start time (UTC), updated with `extra`: the run's
    provenance attributes."""
    import torch

    from .comm import mpi4py_version

    sha, dirty = git_info()
    info = {
        "git_sha": sha, "git_dirty": "unknown" if dirty is None else str(dirty).lower(),
        "torch_version": torch.__version__, "mpi4py_version": mpi4py_version(),
        "h5py_version": h5py.__version__, "numpy_version": np.__version__,
        "hdf5_version": h5py.version.hdf5_version, "python_version": platform.python_version(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    info.update(extra)
    return info


def unique_path(out_dir: str, name: str) -> str:
    """A metrics path `<out_dir>/<name>-<local time>[-j<SLURM_JOB_ID>].h5` not yet taken (else a -N suffix)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    job = os.environ.get("SLURM_JOB_ID")
    base = os.path.join(out_dir, f"{name}-{stamp}" + (f"-j{job}" if job else ""))
    path, i = base + ".h5", 1
    while os.path.exists(path):
        path, i = f"{base}-{i}.h5", i + 1
    return path


@contextmanager
def _atomic_update(path: str, create: bool = False):
    """Edit a copy, then rename it over the file: whenever the job is killed, the file on disk is
    a complete earlier or later version, never a half-written one. Metrics files are small."""
    tmp = f"{path}.tmp{os.getpid()}"
    if not create:
        shutil.copyfile(path, tmp)
    try:
        with h5py.File(tmp, "w" if create else "a") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _create_column(g, name: str, world_size: int, rows: int) -> None:
    """A growable dataset for COLUMNS[name] in the epochs group g, with `rows` rows of NaN."""
    dtype, per_rank, doc = COLUMNS[name]
    shape = (rows, world_size) if per_rank else (rows,)
    maxshape = (None, world_size) if per_rank else (None,)
    dt = h5py.string_dtype() if dtype == "str" else dtype
    d = g.create_dataset(name, shape=shape, maxshape=maxshape, dtype=dt,
                         chunks=(64, world_size) if per_rank else (256,))
    if rows and dtype == "f8":
        d[...] = np.nan
    d.attrs["doc"] = doc


class MetricsWriter:
    """Rank 0's writer. Columns grow by one row per epoch; each update is atomic (see above)."""

    def __init__(self, path: str, *, config_json: str, world_size: int, attrs: dict):
        self.path, self.world_size = path, world_size
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        with _atomic_update(path, create=True) as f:
            f.attrs["schema"] = SCHEMA
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["config"] = config_json
            f.attrs["world_size"] = world_size
            f.attrs["status"] = "running"
            for k, v in attrs.items():
                f.attrs[k] = _attr(v)
            g = f.create_group("epochs")
            for name in COLUMNS:
                _create_column(g, name, world_size, 0)

    @classmethod
    def reopen(cls, path: str, keep_rows: int) -> "MetricsWriter":
        """Continue a run's file after a resume: rows from epoch `keep_rows` on (written after the
        checkpoint, before the job died) are dropped so that no epoch appears twice."""
        self = cls.__new__(cls)
        self.path = path
        with _atomic_update(path) as f:
            self.world_size = int(f.attrs["world_size"])
            for d in f["epochs"].values():
                if d.shape[0] > keep_rows:
                    d.resize(keep_rows, axis=0)
            rows = f["epochs"]["epoch"].shape[0]
            for name in COLUMNS:  # a file of an older schema: its missing columns, NaN so far
                if name not in f["epochs"]:
                    _create_column(f["epochs"], name, self.world_size, rows)
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["status"] = "running"
        return self

    def add_resume(self, epoch: int, source: str, attrs: dict) -> None:
        """Record the resume (epoch, checkpoint, hosts...) in a growing JSON list attribute."""
        with _atomic_update(self.path) as f:
            log = json.loads(f.attrs.get("resumes", "[]"))
            log.append({"epoch": epoch, "checkpoint": source, "started": attrs.get("started"),
                        "hostnames": attrs.get("hostnames"), "slurm_job_id": attrs.get("slurm_job_id")})
            f.attrs["resumes"] = json.dumps(log)

    def append(self, row: dict) -> None:
        """Append one epoch row; KeyError if a column of COLUMNS is missing."""
        missing = set(COLUMNS) - set(row)
        if missing:
            raise KeyError(f"metrics row lacks {sorted(missing)}")
        with _atomic_update(self.path) as f:
            g = f["epochs"]
            for name, (_dtype, per_rank, _) in COLUMNS.items():
                d = g[name]
                n = d.shape[0]
                d.resize(n + 1, axis=0)
                d[n] = np.asarray(row[name], dtype=np.float64) if per_rank else row[name]

    def set_attrs(self, **attrs) -> None:
        """Set file attributes, lists and dicts stored as JSON and numpy scalars as Python values."""
        with _atomic_update(self.path) as f:
            for k, v in attrs.items():
                f.attrs[k] = _attr(v)


def read_metrics(path: str) -> dict:
    """{'attrs': {...}, 'config': dict, 'columns': {name: ndarray}}; checks schema and version."""
    if not os.path.exists(path):
        raise MetricsError(f"metrics file '{path}' does not exist")
    try:
        # No HDF5 file lock: reading a live run's file, or one whose writer was killed, is safe
        # because the writer only ever renames complete files into place.
        f = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise MetricsError(f"'{path}' is not a readable HDF5 file ({exc})") from None
    with f:
        if f.attrs.get("schema") != SCHEMA:
            raise MetricsError(f"'{path}' is not an hpc_layerpar metrics file "
                               f"(schema attribute {f.attrs.get('schema')!r})")
        ver = int(f.attrs.get("schema_version", -1))
        if ver not in READS:
            raise MetricsError(f"'{path}' has metrics schema version {ver}; this hpc_layerpar reads "
                               f"versions {', '.join(map(str, READS))}. Use the hpc_layerpar release that wrote it.")
        if "epochs" not in f:
            raise MetricsError(f"'{path}' lacks the /epochs group; the run died while creating it")
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        cols = {}
        for name in f["epochs"]:
            d = f["epochs"][name][...]
            cols[name] = d.astype(str) if d.dtype.kind in ("O", "S") else d
    if "epoch" in cols:
        for name, (_, per_rank, _) in COLUMNS.items():
            if name not in cols:  # an older schema: the column did not exist yet
                w = int(attrs.get("world_size", 1))
                cols[name] = np.full((len(cols["epoch"]), w) if per_rank else (len(cols["epoch"]),), np.nan)
    return {"attrs": attrs, "config": json.loads(attrs["config"]), "columns": cols}
