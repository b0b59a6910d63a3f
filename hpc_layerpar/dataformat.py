"""The one HDF5 dataset format: writing it (data_prep) and reading it back with full checks."""
from __future__ import annotations

import hashlib
import os

import h5py
import numpy as np

from .errors import DataError  # re-exported: data_prep and tests import it from here

FORMAT = "hpc_layerpar-dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "test")




def checksum(*arrays: np.ndarray) -> str:
    """'sha256:<hex>' over each array's dtype, shape and bytes: stored per split, checked on reading."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def write_dataset(path: str, *, name: str, train: tuple, test: tuple, num_classes: int,
                  source: str, hflip: bool) -> str:
    """Write images (N, C, H, W) uint8 and labels (N,) int64 per split; mean/std from train.

    Writes to a temporary name then renames, so a crash never leaves a half-written file behind."""
    (xtr, ytr), (xte, yte) = train, test
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"{split} images must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{split} labels must be (N,) matching {len(x)} images, got {y.shape}")
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"{split} labels out of range [0, {num_classes})")
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"train and test image shapes differ: {xtr.shape[1:]} vs {xte.shape[1:]}")
    xf = xtr.astype(np.float64) / 255.0
    mean = xf.mean(axis=(0, 2, 3))
    std = xf.std(axis=(0, 2, 3))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with h5py.File(tmp, "w") as f:
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, name=name,
                       num_classes=int(num_classes), mean=mean, std=std, source=source,
                       hflip=bool(hflip))
        for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
            g = f.create_group(split)
            g.create_dataset("images", data=x)
            g.create_dataset("labels", data=y.astype(np.int64))
            g.attrs["checksum"] = checksum(x, y.astype(np.int64))
    os.replace(tmp, path)
    return path


def _remedy(path):
    return (f"Re-create it with `python -m data_prep <digits|mnist|cifar10|cifar100> --out {path}` "
            "(see docs/USER_GUIDE.md, Data).")


def read_dataset(path: str, verify: bool = True) -> dict:
    """Load a dataset file fully into memory, checking format, shapes, labels and checksums."""
    if not os.path.exists(path):
        raise DataError(f"dataset file '{path}' does not exist. {_remedy(path)}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"dataset file '{path}' cannot be read as HDF5 ({exc}); it may be truncated "
                        f"or not a dataset file. {_remedy(path)}") from None
    with f:
        if f.attrs.get("format") != FORMAT:
            raise DataError(f"'{path}' is not an hpc_layerpar dataset (attribute format="
                            f"{f.attrs.get('format')!r}, expected {FORMAT!r}). {_remedy(path)}")
        if int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
            raise DataError(f"'{path}' has dataset format version {f.attrs.get('format_version')}, this "
                            f"hpc_layerpar reads version {FORMAT_VERSION}. {_remedy(path)}")
        out = {"path": path, "name": str(f.attrs["name"]), "num_classes": int(f.attrs["num_classes"]),
               "mean": np.asarray(f.attrs["mean"], dtype=np.float64),
               "std": np.asarray(f.attrs["std"], dtype=np.float64),
               "source": str(f.attrs.get("source", "")), "hflip": bool(f.attrs.get("hflip", False))}
        for split in SPLITS:
            if split not in f or "images" not in f[split] or "labels" not in f[split]:
                raise DataError(f"'{path}' lacks /{split}/images or /{split}/labels. {_remedy(path)}")
            try:
                x = f[split]["images"][...]
                y = f[split]["labels"][...]
            except (OSError, KeyError) as exc:
                raise DataError(f"'{path}': reading /{split} failed ({exc}); the file is probably "
                                f"truncated. {_remedy(path)}") from None
            if x.dtype != np.uint8 or x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
                raise DataError(f"'{path}': /{split} has images {x.dtype}{x.shape} and labels "
                                f"{y.shape}; expected uint8 (N, C, H, W) and (N,). {_remedy(path)}")
            if len(y) and (y.min() < 0 or y.max() >= out["num_classes"]):
                raise DataError(f"'{path}': /{split}/labels outside [0, {out['num_classes']}). "
                                f"{_remedy(path)}")
            if verify:
                want = f[split].attrs.get("checksum")
                got = checksum(x, y.astype(np.int64))
                if want != got:
                    raise DataError(f"'{path}': /{split} checksum mismatch (stored {want}, computed "
                                    f"{got[:20]}...); the file is corrupted or was edited. {_remedy(path)}")
            out[split] = (x, y.astype(np.int64))
    if out["train"][0].shape[1:] != out["test"][0].shape[1:]:
        raise DataError(f"'{path}': train and test images differ in shape. {_remedy(path)}")
    c = out["train"][0].shape[1]
    if out["mean"].shape != (c,) or out["std"].shape != (c,) or np.any(out["std"] <= 0):
        raise DataError(f"'{path}': mean/std attributes do not match {c} channels. {_remedy(path)}")
    return out
