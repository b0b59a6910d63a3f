"""Readers of the standard raw formats (MNIST idx(.gz), CIFAR python tarballs) and digits."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile

import numpy as np

# The fixed, documented digits split: the 1797 scikit-learn images shuffled by
# numpy.random.default_rng(0).permutation; the first 1437 train, the last 360 test.
DIGITS_SPLIT_SEED, DIGITS_N_TEST = 0, 360

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class ConvertError(ValueError):
    """A raw input is missing, unreadable or malformed; the message says what to fetch or point --raw at."""


def load_digits():
    """scikit-learn's digits as ((x, y) train, (x, y) test): (N, 1, 8, 8) uint8 images scaled to 0..255,
    int64 labels, the fixed 1437/360 split."""
    from sklearn.datasets import load_digits as sk_load

    d = sk_load()
    # 0..16 grey levels -> 0..255 so every dataset shares one uint8 convention.
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y))
    tr, te = perm[:-DIGITS_N_TEST], perm[-DIGITS_N_TEST:]
    return (x[tr], y[tr]), (x[te], y[te])


def _open_maybe_gz(path):
    with open(path, "rb") as fh:
        head = fh.read(2)
    return gzip.open(path, "rb") if head == b"\x1f\x8b" else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
    """An idx file (optionally gzipped): magic 0x00 0x00 dtype ndim, big-endian dims, data."""
    try:
        with _open_maybe_gz(path) as fh:
            raw = fh.read()
    except (EOFError, OSError) as exc:
        raise ConvertError(f"'{path}' cannot be read ({exc}): truncated or corrupt; download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ConvertError(f"'{path}' is not an idx file (bad magic number)")
    if raw[2] != 0x08:
        raise ConvertError(f"'{path}': idx data type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ConvertError(f"'{path}' is truncated (header)")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims))
    body = raw[4 + 4 * ndim:]
    if len(body) != size:
        raise ConvertError(f"'{path}' holds {len(body)} data bytes, its header promises {size}: "
                           "truncated or corrupt; download it again")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find(raw_dir, stem):
    for name in (stem + ".gz", stem):
        p = os.path.join(raw_dir, name)
        if os.path.exists(p):
            return p
    raise ConvertError(f"'{raw_dir}' lacks {stem}.gz (or {stem}); point --raw at the folder with the four "
                       "idx files (MNIST or Fashion-MNIST, same names), or use --download on a machine with "
                       "internet access")


def load_mnist(raw_dir: str):
    """((x, y) train, (x, y) test) from the four idx files (MNIST or Fashion-MNIST) in raw_dir:
    (N, 1, 28, 28) uint8 images, int64 labels."""
    out = []
    for split in ("train", "test"):
        xi, yi = (read_idx(_find(raw_dir, s)) for s in MNIST_FILES[split])
        if xi.ndim != 3 or yi.ndim != 1 or len(xi) != len(yi):
            raise ConvertError(f"MNIST {split}: images {xi.shape} and labels {yi.shape} do not match")
        out.append((xi[:, None, :, :].copy(), yi.astype(np.int64)))
    return tuple(out)


CIFAR = {
    "cifar10": {"dir": "cifar-10-batches-py", "archive": "cifar-10-python.tar.gz",
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                "labels": b"labels", "classes": 10},
    "cifar100": {"dir": "cifar-100-python", "archive": "cifar-100-python.tar.gz",
                 "train": ["train"], "test": ["test"], "labels": b"fine_labels", "classes": 100},
}


def _cifar_members(path: str, spec: dict):
    """{member name: bytes} from the tarball or from its extracted folder (or the folder above)."""
    names = spec["train"] + spec["test"]
    if os.path.isdir(path):
        folder = path if os.path.exists(os.path.join(path, names[0])) else os.path.join(path, spec["dir"])
        if not os.path.isdir(folder) and os.path.exists(os.path.join(path, spec["archive"])):
            return _cifar_members(os.path.join(path, spec["archive"]), spec)
        out = {}
        for n in names:
            p = os.path.join(folder, n)
            if not os.path.exists(p):
                raise ConvertError(f"'{folder}' lacks {n}; give the {spec['archive']} file or its "
                                   "extracted folder")
            with open(p, "rb") as fh:
                out[n] = fh.read()
        return out
    try:
        tf = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by `with tf:` below; the try covers the open alone
    except (OSError, tarfile.TarError) as exc:
        raise ConvertError(f"'{path}' is not a readable {spec['archive']} ({exc}); download it again") from None
    out = {}
    with tf:
        try:
            for m in tf:
                base = os.path.basename(m.name)
                if m.isfile() and base in names and os.path.basename(os.path.dirname(m.name)) == spec["dir"]:
                    out[base] = tf.extractfile(m).read()
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise ConvertError(f"'{path}' is truncated or corrupt ({exc}); download it again") from None
    missing = [n for n in names if n not in out]
    if missing:
        raise ConvertError(f"'{path}' lacks {spec['dir']}/{missing[0]}; is it the {spec['archive']} archive?")
    return out


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR batches: dicts, lists, bytes, strings and numbers need no class, and
    numpy arrays need exactly these (and bytes written by Python 3 at protocol 2, _codecs.encode, a pure
    function); anything else (a forged file's os.system, open, ...) is refused
    before it is called. Plain pickle.load would run whatever a file names."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),  # bytes in a protocol-2 pickle
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        """The class or function a pickle names, if a CIFAR batch may need it."""
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR batch holds")
        return super().find_class(module, name)


def load_cifar(kind: str, path: str):
    """((x, y) train, (x, y) test) of CIFAR-10/100 from the python tarball or its extracted folder:
    (N, 3, 32, 32) uint8 images, int64 labels (CIFAR-100: the fine labels)."""
    spec = CIFAR[kind]
    members = _cifar_members(path, spec)
    out = []
    for split in ("train", "test"):
        xs, ys = [], []
        for n in spec[split]:
            try:
                d = _BatchUnpickler(io.BytesIO(members[n]), encoding="bytes").load()
            except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
                raise ConvertError(f"{spec['dir']}/{n} cannot be unpickled safely ({exc}); it is not the "
                                   f"official {spec['archive']}: download it again") from None
            if not isinstance(d, dict) or b"data" not in d or spec["labels"] not in d:
                raise ConvertError(f"{spec['dir']}/{n} is not a CIFAR batch (no data and labels); download it again")
            data = np.asarray(d[b"data"], dtype=np.uint8)
            labels = np.asarray(d[spec["labels"]], dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
                raise ConvertError(f"{spec['dir']}/{n}: data {data.shape} / labels {labels.shape} are not "
                                   "(N, 3072) / (N,)")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(labels)
        out.append((np.concatenate(xs), np.concatenate(ys)))
    return tuple(out)
