"""`python -m data_prep digits|mnist|fashion|cifar10|cifar100 [--raw PATH | --download DIR] [--out FILE]`."""
from __future__ import annotations

import argparse
import os
import sys

from hpc_layerpar.dataformat import write_dataset

from . import converters as C

DEFAULT_OUT = {"digits": "data/digits.h5", "mnist": "data/mnist.h5", "fashion": "data/fashion.h5",
               "cifar10": "data/cifar10.h5", "cifar100": "data/cifar100.h5"}
# Debian/Ubuntu: `apt-get install dataset-fashion-mnist` puts the four idx .gz files here.
FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"


def _download(kind: str, root: str) -> str:
    """Fetch the raw files with torchvision (networked machines only); return the raw path."""
    try:
        import torchvision.datasets as tvd
    except Exception as exc:  # noqa: BLE001 - torchvision fails in many ways next to a foreign torch
        raise C.ConvertError(f"--download needs torchvision, which does not import here ({exc}). "
                             "Install it (`pip install -e .[vision]`) on a machine with internet access, "
                             "or fetch the raw files yourself and use --raw PATH.") from None
    if kind == "mnist":
        tvd.MNIST(root, train=True, download=True)
        return os.path.join(root, "MNIST", "raw")
    if kind == "fashion":
        tvd.FashionMNIST(root, train=True, download=True)
        return os.path.join(root, "FashionMNIST", "raw")
    cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
    cls(root, train=True, download=True)
    return os.path.join(root, C.CIFAR[kind]["archive"])


def convert(kind: str, out: str, raw: str | None = None, download: str | None = None) -> str:
    """Convert the raw files of `kind` (digits: scikit-learn's copy) into the HDF5 dataset `out`; return its
    path. Without --raw or --download, Fashion-MNIST is read from the Debian package's folder if present."""
    if kind == "digits":
        train, test = C.load_digits()
        return write_dataset(out, name="digits", train=train, test=test, num_classes=10,
                             source="sklearn.datasets.load_digits, split default_rng(0) 1437/360",
                             hflip=False)
    if kind == "fashion" and raw is None and download is None and os.path.isdir(FASHION_SYSTEM_DIR):
        raw = FASHION_SYSTEM_DIR
    if raw is None and download is None:
        hint = (f" (on Debian/Ubuntu: `apt-get install dataset-fashion-mnist`, then --raw {FASHION_SYSTEM_DIR})"
                if kind == "fashion" else "")
        raise C.ConvertError(f"{kind} needs --raw PATH (the original files) or --download DIR{hint}")
    path = raw if raw is not None else _download(kind, download)
    if kind in ("mnist", "fashion"):
        train, test = C.load_mnist(path)
        # Fashion-MNIST: a left-right mirrored garment is the same garment, so flips preserve labels.
        name, label = ("mnist", "MNIST") if kind == "mnist" else ("fashion", "Fashion-MNIST")
        return write_dataset(out, name=name, train=train, test=test, num_classes=10,
                             source=f"{label} idx files from {path}", hflip=kind == "fashion")
    train, test = C.load_cifar(kind, path)
    return write_dataset(out, name=kind, train=train, test=test, num_classes=C.CIFAR[kind]["classes"],
                         source=f"{C.CIFAR[kind]['archive']} from {path}", hflip=True)


def main(argv=None) -> int:
    """`python -m data_prep`: write one dataset file unless it exists (--force rewrites it); exit 0, or 2 on
    a conversion or I/O error."""
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    p.add_argument("dataset", choices=sorted(DEFAULT_OUT))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--raw", help="MNIST: folder with the four idx(.gz) files; CIFAR: the python "
                                   "tarball or its extracted folder")
    src.add_argument("--download", metavar="DIR", help="download raw files into DIR with torchvision")
    p.add_argument("--out", help="output HDF5 file (default data/<dataset>.h5)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = p.parse_args(argv)
    out = args.out or DEFAULT_OUT[args.dataset]
    if os.path.exists(out) and not args.force:
        print(f"{out} exists; keeping it (use --force to rebuild)")
        return 0
    try:
        path = convert(args.dataset, out, args.raw, args.download)
    except (C.ConvertError, OSError) as exc:
        sys.stderr.write(f"data_prep: error: {exc}\n")
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
