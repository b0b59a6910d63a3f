"""The data-parallel engine on K ranks equals one-rank back-propagation on the global batch."""
import hashlib

import pytest
import torch
import torch.nn.functional as F

from hpc_layerpar.comm import Comm
from hpc_layerpar.data import Augment, DeviceDataset, epoch_batches
from hpc_layerpar.evaluate import evaluate
from hpc_layerpar.models import build_model
from hpc_layerpar.serial import SerialEngine

from conftest import DEVICE, TOL, assert_all, deterministic

pytestmark = pytest.mark.mpi

LR, EPOCHS, BATCH, SEED = 0.05, 2, 16, 3


def fresh(norm="none"):
    """SiLU, not ReLU: runs compared at 1e-5 over many steps need an activation without a kink
    (models.ACTIVATIONS)."""
    torch.manual_seed(SEED)
    return build_model("resnet", 8, in_channels=1, image_size=8, num_classes=4, norm=norm, act="silu").to(DEVICE)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)


def engine_run(comm, data, norm="none", augment=None):
    model = fresh(norm)
    eng = SerialEngine(model, sgd(model), comm, data, augment, batch_size=BATCH, drop_last=False, seed=SEED)
    for e in range(EPOCHS):
        eng.train_epoch(e, lambda t: LR)
    return model


def reference_run(data, augment=None):
    """Plain single-process PyTorch on the whole global batch: the ground truth."""
    model = fresh()
    opt = sgd(model)
    for e in range(EPOCHS):
        for step, idx in enumerate(epoch_batches(data.n_train, BATCH, SEED, e, drop_last=False)):
            x, y = data.train_batch(idx)
            if augment is not None:
                x = augment.apply(x, *augment.draws(e, step, len(idx)))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def digest(model):
    h = hashlib.sha256()
    for p in model.state_dict().values():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("augmented", [False, True])
def test_data_parallel_equals_global_batch_backprop(world, tiny_data, augmented):
    data = DeviceDataset(tiny_data, DEVICE)
    aug = Augment(pad=1, flip=True, seed=SEED) if augmented else None
    dp = engine_run(world, data, augment=aug)
    ref = reference_run(data, augment=aug)
    diffs = [float((a - b).detach().abs().max()) for a, b in zip(dp.parameters(), ref.parameters())]
    # 64 samples / batch 16 = 4 uneven-shard steps per epoch at 3 ranks; float32 sums differ in order
    assert_all(world, max(diffs) < 2e-5 * TOL, f"max parameter difference {max(diffs):.2e}")
    assert_all(world, max(diffs) >= 0 and any(float(p.detach().abs().sum()) > 0 for p in dp.parameters()),
               "parameters are non-trivial")


def test_every_rank_holds_the_same_network_and_runs_are_deterministic(world, tiny_data):
    data = DeviceDataset(tiny_data, DEVICE)
    with deterministic():
        a = digest(engine_run(world, data, norm="batch"))
        b = digest(engine_run(world, data, norm="batch"))
    assert_all(world, a == b, "two runs with the same seed must be bitwise identical")
    digests = world.allgather_obj(a)
    assert_all(world, len(set(digests)) == 1, f"ranks disagree on the parameters: {digests}")


def test_one_rank_engine_is_plain_backprop(tiny_data):
    data = DeviceDataset(tiny_data, DEVICE)
    solo = Comm.self_()
    try:
        a = engine_run(solo, data)
    finally:
        solo.free()
    b = reference_run(data)
    assert max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters())) < 1e-6 * TOL


def test_sharded_evaluation_reduces_counts(world, tiny_data):
    data = DeviceDataset(tiny_data, DEVICE)
    model = fresh("batch")
    loss, acc = evaluate(model, data, world, batch_size=5)
    solo = Comm.self_()
    try:
        loss1, acc1 = evaluate(model, data, solo, batch_size=1000)
    finally:
        solo.free()
    assert_all(world, abs(acc - acc1) < 1e-12 and abs(loss - loss1) < 1e-5,
               f"sharded ({loss}, {acc}) vs whole ({loss1}, {acc1})")


def test_bytes_counted_for_the_gradient_allreduce(world, tiny_data):
    data = DeviceDataset(tiny_data, DEVICE)
    model = fresh()
    eng = SerialEngine(model, sgd(model), world, data, None, batch_size=BATCH, drop_last=True, seed=SEED)
    world.counters.reset()
    stats = eng.train_epoch(0, lambda t: LR)
    n = eng.bucket.flat.numel() * 4
    k = world.size
    # one allreduce per step, plus one for BN buffers (none here: norm='none')
    want = stats.steps * (2 * (k - 1) * n // k) if k > 1 else 0
    assert_all(world, world.counters.bytes_sent == want, f"{world.counters.bytes_sent} != {want}")
