"""The converters on small files written in the exact raw formats of MNIST and CIFAR."""
import gzip
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest

from data_prep import converters as C
from data_prep.__main__ import convert, main
from hpc_layerpar.dataformat import read_dataset


def write_idx(path, arr, gz=True):
    arr = np.asarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = head + arr.tobytes()
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(data)


def make_mnist_raw(folder, n_train=12, n_test=5, gz=True):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        imgs, labels = C.MNIST_FILES[split]
        write_idx(os.path.join(folder, imgs + (".gz" if gz else "")), x, gz)
        write_idx(os.path.join(folder, labels + (".gz" if gz else "")), y, gz)
        out[split] = (x, y)
    return out


def make_cifar_tar(path, kind, per_file=6):
    spec = C.CIFAR[kind]
    rng = np.random.default_rng(1)
    truth = {"train": [], "test": []}
    with tarfile.open(path, "w:gz") as tf:
        for split in ("train", "test"):
            for name in spec[split]:
                data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
                labels = rng.integers(0, spec["classes"], size=per_file).tolist()
                d = {b"data": data, spec["labels"]: labels, b"filenames": [b"x.png"] * per_file}
                if kind == "cifar100":
                    d[b"coarse_labels"] = [0] * per_file
                blob = pickle.dumps(d, protocol=2)
                info = tarfile.TarInfo(f"{spec['dir']}/{name}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
                truth[split].append((data, labels))
    return truth


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_roundtrip(tmp_path, gz):
    truth = make_mnist_raw(tmp_path / "raw", gz=gz)
    out = convert("mnist", str(tmp_path / "mnist.h5"), raw=str(tmp_path / "raw"))
    d = read_dataset(out)
    assert d["train"][0].shape == (12, 1, 28, 28) and d["test"][0].shape == (5, 1, 28, 28)
    assert np.array_equal(d["train"][0][:, 0], truth["train"][0])
    assert np.array_equal(d["test"][1], truth["test"][1])
    assert d["num_classes"] == 10 and not d["hflip"]


def test_fashion_idx_roundtrip_marks_flips_label_preserving(tmp_path):
    truth = make_mnist_raw(tmp_path / "raw")
    d = read_dataset(convert("fashion", str(tmp_path / "fashion.h5"), raw=str(tmp_path / "raw")))
    assert d["name"] == "fashion" and d["hflip"] and d["num_classes"] == 10
    assert np.array_equal(d["train"][0][:, 0], truth["train"][0])


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_from_the_debian_package_without_raw(tmp_path):
    """`python -m data_prep fashion` finds /usr/share/datasets/fashion-mnist by itself."""
    out = tmp_path / "f.h5"
    assert main(["fashion", "--out", str(out)]) == 0
    d = read_dataset(str(out))
    assert d["train"][0].shape == (60000, 1, 28, 28) and d["test"][0].shape == (10000, 1, 28, 28)
    assert np.bincount(d["train"][1]).tolist() == [6000] * 10


def test_mnist_truncated_and_missing(tmp_path):
    make_mnist_raw(tmp_path / "raw", gz=False)
    p = tmp_path / "raw" / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(C.ConvertError, match="truncated"):
        convert("mnist", str(tmp_path / "m.h5"), raw=str(tmp_path / "raw"))
    os.remove(p)
    with pytest.raises(C.ConvertError, match="lacks train-images-idx3-ubyte"):
        convert("mnist", str(tmp_path / "m.h5"), raw=str(tmp_path / "raw"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(C.ConvertError, match="magic"):
        C.read_idx(str(tmp_path / "bad" / "x"))


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_tarball_roundtrip(tmp_path, kind):
    tar = tmp_path / C.CIFAR[kind]["archive"]
    truth = make_cifar_tar(tar, kind)
    out = convert(kind, str(tmp_path / f"{kind}.h5"), raw=str(tar))
    d = read_dataset(out)
    n_train = 6 * len(C.CIFAR[kind]["train"])
    assert d["train"][0].shape == (n_train, 3, 32, 32) and d["test"][0].shape == (6, 3, 32, 32)
    first = truth["train"][0]
    assert np.array_equal(d["train"][0][:6].reshape(6, -1), first[0])
    assert d["train"][1][:6].tolist() == first[1]
    assert d["num_classes"] == C.CIFAR[kind]["classes"] and d["hflip"]
    # the extracted folder works as well as the tarball
    with tarfile.open(tar) as tf:
        tf.extractall(tmp_path / "x", filter="data")
    d2 = read_dataset(convert(kind, str(tmp_path / "y.h5"), raw=str(tmp_path / "x")))
    assert np.array_equal(d2["train"][0], d["train"][0])


class _Forged:
    """What a forged batch can smuggle into a pickle: a call made while it is loaded."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_cifar_forged_pickle_is_refused_before_it_runs(tmp_path):
    """A data_batch_1 whose pickle opens a file for writing: plain pickle.load created the file (and
    the converter then stopped with a traceback); the restricted unpickler refuses the pickle first."""
    spec = C.CIFAR["cifar10"]
    tar = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_tar(tar, "cifar10")
    target = tmp_path / "written-by-the-pickle"
    forged = tmp_path / "forged.tar.gz"
    with tarfile.open(tar) as src, tarfile.open(forged, "w:gz") as dst:
        for m in src:
            blob = src.extractfile(m).read()
            if m.name.endswith("data_batch_1"):
                blob = pickle.dumps({b"data": _Forged(str(target)), spec["labels"]: [0]}, protocol=2)
            info = tarfile.TarInfo(m.name)
            info.size = len(blob)
            dst.addfile(info, io.BytesIO(blob))
    with pytest.raises(C.ConvertError, match=r"io.open, which no CIFAR batch holds"):
        convert("cifar10", str(tmp_path / "c.h5"), raw=str(forged))
    assert not target.exists()


def test_cifar_truncated_archive(tmp_path):
    tar = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_tar(tar, "cifar10")
    blob = tar.read_bytes()
    tar.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(C.ConvertError, match="truncated|not a readable|lacks"):
        convert("cifar10", str(tmp_path / "c.h5"), raw=str(tar))


def test_digits_split_is_fixed(tmp_path):
    out = convert("digits", str(tmp_path / "digits.h5"))
    d = read_dataset(out)
    assert d["train"][0].shape == (1437, 1, 8, 8) and d["test"][0].shape == (360, 1, 8, 8)
    assert d["train"][0].max() == 255 and not d["hflip"]
    again = read_dataset(convert("digits", str(tmp_path / "again.h5")))
    assert np.array_equal(again["test"][1], d["test"][1])


def test_cli_reports_errors_with_exit_2(tmp_path, capsys):
    assert main(["mnist", "--raw", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.h5")]) == 2
    assert "lacks" in capsys.readouterr().err
    assert main(["cifar10", "--out", str(tmp_path / "c.h5")]) == 2
