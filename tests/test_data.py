import h5py
import numpy as np
import pytest
import torch

from hpc_layerpar.data import Augment, DeviceDataset, epoch_batches, epoch_permutation, shard_range
from hpc_layerpar.dataformat import DataError, read_dataset

from conftest import make_dataset


def test_roundtrip_and_normalisation(tmp_path):
    p = make_dataset(tmp_path / "d.h5", n_train=50, n_test=20, channels=3, size=8, classes=5)
    raw = read_dataset(p)
    assert raw["train"][0].shape == (50, 3, 8, 8) and raw["test"][1].shape == (20,)
    ds = DeviceDataset(p, torch.device("cpu"))
    x, y = ds.train_batch(torch.arange(50))
    assert x.dtype == torch.float32 and torch.equal(y, torch.from_numpy(raw["train"][1]))
    # normalised with the stored train statistics: per-channel mean 0 and std 1 over the train set
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(DataError, match="does not exist.*data_prep"):
        read_dataset(str(tmp_path / "none.h5"))
    p = make_dataset(tmp_path / "d.h5")
    with open(p, "rb") as fh:
        blob = fh.read()
    (tmp_path / "trunc.h5").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="truncated"):
        read_dataset(str(tmp_path / "trunc.h5"))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DataError, match="not an hpc_layerpar dataset"):
        read_dataset(str(tmp_path / "other.h5"))


def test_checksum_mismatch_is_detected(tmp_path):
    p = make_dataset(tmp_path / "d.h5")
    with h5py.File(p, "a") as f:
        f["train/images"][0, 0, 0, 0] ^= 1
    with pytest.raises(DataError, match="checksum mismatch"):
        read_dataset(p)


def test_label_out_of_range_and_shape_mismatch(tmp_path):
    p = make_dataset(tmp_path / "d.h5", classes=4)
    with h5py.File(p, "a") as f:
        f.attrs["num_classes"] = 2
    with pytest.raises(DataError, match="labels outside"):
        read_dataset(p)


def test_permutation_is_a_pure_function_of_seed_and_epoch():
    a = epoch_permutation(100, seed=3, epoch=7)
    assert torch.equal(a, epoch_permutation(100, seed=3, epoch=7))
    assert not torch.equal(a, epoch_permutation(100, seed=3, epoch=8))
    assert sorted(a.tolist()) == list(range(100))
    bs = epoch_batches(100, 32, 0, 0, drop_last=True)
    assert [len(b) for b in bs] == [32, 32, 32]
    assert [len(b) for b in epoch_batches(100, 32, 0, 0, drop_last=False)] == [32, 32, 32, 4]


def test_shard_range_covers_evenly():
    for n in (0, 1, 7, 16, 128):
        for parts in (1, 2, 3, 4):
            rs = [shard_range(n, parts, i) for i in range(parts)]
            assert rs[0][0] == 0 and rs[-1][1] == n
            assert all(rs[i][1] == rs[i + 1][0] for i in range(parts - 1))
            sizes = [b - a for a, b in rs]
            assert max(sizes) - min(sizes) <= 1


def test_augment_crop_and_flip_match_manual_slicing():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8, 8)
    aug = Augment(pad=2, flip=True, seed=1)
    offsets, flips = aug.draws(epoch=0, step=0, n=5)
    out = aug.apply(x, offsets, flips)
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(5):
        oy, ox = offsets[i].tolist()
        want = xp[i, :, oy:oy + 8, ox:ox + 8]
        if flips[i]:
            want = want.flip(2)
        assert torch.equal(out[i], want)
    # the same draws on every rank: a shard is a slice of the global draw
    o2, f2 = aug.draws(epoch=0, step=0, n=5)
    assert torch.equal(offsets, o2) and torch.equal(flips, f2)
    assert not Augment(pad=1, flip=False, seed=1).draws(0, 0, 64)[1].any()


def test_train_subset_is_balanced_fixed_and_nested():
    from hpc_layerpar.data import train_subset

    labels = np.repeat(np.arange(10), 100)[np.random.default_rng(3).permutation(1000)]
    a, b = train_subset(labels, 250), train_subset(labels, 500)
    assert len(a) == 250 and len(set(a.tolist())) == 250 and (np.diff(a) > 0).all()
    counts = np.bincount(labels[a], minlength=10)
    assert counts.max() - counts.min() <= 1, counts
    assert set(a.tolist()) <= set(b.tolist()), "a smaller subset is part of a larger one"
    assert np.array_equal(a, train_subset(labels, 250)), "the same ids every time"
    assert len(train_subset(labels, 0)) == 1000 and len(train_subset(labels, 5000)) == 1000


def test_dataset_subset_keeps_the_test_set_whole(tmp_path):
    p = make_dataset(tmp_path / "d.h5", n_train=64, n_test=32)
    ds = DeviceDataset(p, torch.device("cpu"), subset=20)
    assert ds.n_train == 20 and ds.n_test == 32 and ds.n_train_file == 64
