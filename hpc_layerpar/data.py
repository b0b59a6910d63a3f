"""The whole dataset on the rank's device, per-epoch permutations and batched augmentation."""
from __future__ import annotations

import numpy as np
import torch

from .dataformat import read_dataset


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers, identical on every rank and every platform."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def _cpu_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


# Streams keep the random draws of unrelated uses apart for the same (seed, epoch).
STREAM_PERMUTATION, STREAM_AUGMENT, STREAM_CALIBRATION, STREAM_SHARD, STREAM_SUBSET = 1, 2, 3, 4, 5


def train_subset(labels: np.ndarray, n: int) -> np.ndarray:
    """Ids of a fixed, class-balanced subset of n training samples (sorted). The same for every run,
    seed and rank count (it depends on the labels and n only), and subsets nest: the ids of a
    smaller n are a subset of those of a larger one. Classes take turns in a fixed random order."""
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    g = np.random.default_rng(derive_seed(0, 0, STREAM_SUBSET))
    classes = np.unique(labels)
    queues = [g.permutation(np.nonzero(labels == c)[0]) for c in classes]
    order = []
    for rank in range(max(len(q) for q in queues)):  # round robin: class balance at every prefix
        order.extend(q[rank] for q in queues if rank < len(q))
    return np.sort(np.asarray(order[:n], dtype=np.int64))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of an epoch; every rank computes it alike, no communication."""
    return torch.randperm(n, generator=_cpu_generator(seed, epoch, STREAM_PERMUTATION))


def calibration_order(n: int, seed: int) -> torch.Tensor:
    """The fixed sample order used to re-estimate BatchNorm statistics."""
    return torch.randperm(n, generator=_cpu_generator(seed, 0, STREAM_CALIBRATION))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool) -> list[torch.Tensor]:
    """The epoch's batches of sample ids in epoch_permutation order; drop_last drops a final short batch."""
    perm = epoch_permutation(n, seed, epoch)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [perm[i:i + batch_size] for i in range(0, stop, batch_size)]


def replica_shard(n: int, replicas: int, replica: int, seed: int) -> torch.Tensor:
    """The training-sample ids a replica owns in the parallel phase (a fixed random deal, so each
    replica sees every class); sorted, so its auxiliary table is in id order."""
    deal = torch.randperm(n, generator=_cpu_generator(seed, 0, STREAM_SHARD))
    return deal[replica::replicas].sort().values


def replica_batches(shard: torch.Tensor, sub_batch: int, steps: int, seed: int, epoch: int,
                    replica: int) -> list[torch.Tensor]:
    """A replica's sub-batches for an epoch: its shard in a per-(seed, epoch, replica) order; every
    replica takes the same number of steps, so their gradients can be averaged step by step."""
    order = shard[torch.randperm(len(shard), generator=_cpu_generator(seed, epoch, STREAM_SHARD, replica))]
    return [order[j * sub_batch:(j + 1) * sub_batch] for j in range(steps)]


def shard_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """Contiguous, as-even-as-possible [lo, hi) of n items for part `index` of `parts`."""
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


class DeviceDataset:
    """uint8 images and labels resident on the device; batches are normalised on the fly
    (4x less memory than storing float32, and normalisation is free next to a conv)."""

    def __init__(self, path: str, device: torch.device, verify: bool = True, subset: int = 0):
        """subset > 0: train on the fixed class-balanced subset of that many samples (train_subset);
        the test set is always whole."""
        raw = read_dataset(path, verify=verify)
        self.name, self.num_classes, self.hflip = raw["name"], raw["num_classes"], raw["hflip"]
        self.device = device
        x, y = raw["train"]
        self.n_train_file = len(y)
        if 0 < subset < len(y):
            keep = train_subset(y, subset)
            x, y = x[keep], y[keep]
        self.train_x = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        self.train_y = torch.from_numpy(np.ascontiguousarray(y)).to(device)
        self.test_x = torch.from_numpy(raw["test"][0]).to(device)
        self.test_y = torch.from_numpy(raw["test"][1]).to(device)
        c = self.train_x.shape[1]
        self.mean = torch.tensor(raw["mean"] * 255.0, dtype=torch.float32, device=device).view(1, c, 1, 1)
        self.std = torch.tensor(raw["std"] * 255.0, dtype=torch.float32, device=device).view(1, c, 1, 1)

    @property
    def shape(self) -> tuple:
        """Per-sample image shape (C, H, W)."""
        return tuple(self.train_x.shape[1:])

    @property
    def n_train(self) -> int:
        """Number of training samples (after data.subset)."""
        return len(self.train_y)

    @property
    def n_test(self) -> int:
        """Number of test samples."""
        return len(self.test_y)

    def normalise(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images as float32, normalised by the training set's per-channel mean and std."""
        return (x_uint8.float() - self.mean) / self.std

    def train_batch(self, idx: torch.Tensor):
        """(normalised images, labels) of the training samples idx, on the device."""
        idx = idx.to(self.device)
        return self.normalise(self.train_x[idx]), self.train_y[idx]

    def test_batch(self, lo: int, hi: int):
        """(normalised images, labels) of the test samples lo:hi."""
        return self.normalise(self.test_x[lo:hi]), self.test_y[lo:hi]


class Augment:
    """Pad-and-random-crop and optional horizontal flip, batched on the device.

    The random draws are made for the whole *global* batch from (seed, epoch, step) on the CPU and
    each rank takes its shard's slice, so a run augments the same way at any rank count and on any
    device."""

    def __init__(self, pad: int, flip: bool, seed: int):
        self.pad, self.flip, self.seed = pad, flip, seed

    def draws(self, epoch: int, step: int, n: int):
        """(crop offsets (n, 2), flips (n,)) for `step` of `epoch`, drawn on the CPU from (seed, epoch, step)."""
        g = _cpu_generator(self.seed, epoch, STREAM_AUGMENT, step)
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return offsets, flips

    def apply(self, x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """x: normalised (B, C, H, W); offsets (B, 2) in [0, 2*pad]; flips (B,) bool."""
        b, c, h, w = x.shape
        if b == 0:
            return x
        dev = x.device
        offsets, flips = offsets.to(dev), flips.to(dev)
        if self.pad > 0:
            # Zero padding in normalised space = padding with the mean colour, as is customary.
            xp = torch.nn.functional.pad(x, (self.pad,) * 4)
            rows = (offsets[:, 0, None] + torch.arange(h, device=dev)[None, :])  # (B, H)
            cols = (offsets[:, 1, None] + torch.arange(w, device=dev)[None, :])  # (B, W)
            bi = torch.arange(b, device=dev)[:, None, None, None]
            ci = torch.arange(c, device=dev)[None, :, None, None]
            x = xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
        if self.flip:
            x = torch.where(flips[:, None, None, None], x.flip(3), x)
        return x


def make_augment(dcfg, dataset: DeviceDataset, seed: int) -> Augment | None:
    """The configured augmentation, or None when data.augment is off. crop_pad < 0 pads by H // 8;
    flip=auto flips only datasets marked hflip."""
    if not dcfg.augment:
        return None
    pad = dataset.shape[1] // 8 if dcfg.crop_pad < 0 else dcfg.crop_pad
    flip = dataset.hflip if dcfg.flip == "auto" else dcfg.flip == "on"
    return Augment(pad=pad, flip=flip, seed=seed)
