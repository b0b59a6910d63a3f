"""The independent oracle for every path of the pipeline engine (issue 20, item 5).

At learning rate 0 nothing moves between a micro-batch's F and B, so after one global batch every
stage's gradient (SGD's first step leaves it in the momentum buffer) must be back-propagation's of
the network the stages compute, whatever the path: eager or the graph path (emulated here), R > 1
replicas, DS filters (the network with U D inserted at the cuts), AL (the gradient of the
Lagrangian CE + sum_k <m_k, D(u_k)>, at zero and at random multipliers), bfloat16 messages (to a
stated tolerance), K = 2..8 stages, M = 1..8 micro-batches. The oracle is plain autograd over the
whole network: it shares no code with the engine but the model and, for smooth upsampling only, the
upsampler as an operator (nearest U and the pooling D are written out here).

`python tests/test_oracle.py` prints the table of the largest relative error per case."""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from hpc_layerpar.comm import Topology
from hpc_layerpar.config import OptimConfig, ParallelConfig
from hpc_layerpar.data import DeviceDataset, epoch_batches, replica_shard
from hpc_layerpar.filters import DSFilter
from hpc_layerpar.models import build_model
from hpc_layerpar.partition import balanced_partition
from hpc_layerpar.pipeline import PipelineEngine
from hpc_layerpar.serial import make_optimizer
from hpc_layerpar.simulate import run_simulated

from conftest import DEVICE, TOL, make_dataset

SEED, BATCH, SIZE = 5, 32, 16
# ||g - t|| / ||t|| per stage. float32 paths: summation order only (measured <= 1e-6). bfloat16
# messages: against the network with the same roundings at its cuts (forward state and adjoint); the
# engine rounds where its recomputation and penalty differ from one autograd pass (measured <= 6e-3
# at K = 8). The rounded network itself is 5-10% from the float32 one at this untrained,
# BatchNorm-free initialisation (the table's second bf16 column).
TOL_F32, TOL_BF16 = 2e-5 * TOL, 1.5e-2
_LOCK = threading.Lock()  # the virtual ranks share torch's global RNG


@dataclass(frozen=True)
class Case:
    K: int
    M: int
    path: str = "eager"      # eager | emulate (the CUDA-graph path, uncaptured)
    method: str = "penalty"  # penalty | al
    mult: str = "zero"       # AL multipliers: zero | random
    ds: int = 1
    up: str = "smooth"
    R: int = 1
    wire: str = "float32"

    def __str__(self):
        return (f"K={self.K} M={self.M} {self.path} {self.method}"
                + (f"/{self.mult}" if self.method == "al" else "") + f" ds={self.ds}"
                + (f"/{self.up}" if self.ds > 1 else "") + f" R={self.R} {self.wire}")


def cases() -> list:
    out = [Case(K, M) for K in range(2, 9) for M in (1, 2, 4, 8)]
    out += [Case(K, M, path="emulate") for K in (2, 3, 4, 8) for M in (1, 4, 8)]
    out += [Case(K, M, R=2) for K in (2, 3, 4) for M in (1, 2, 8)]
    out += [Case(K, M, ds=s, up=u) for s in (2, 4) for u in ("smooth", "nearest") for K in (2, 4, 8) for M in (1, 4)]
    out += [Case(K, M, method="al", mult=m) for m in ("zero", "random") for K in (2, 4, 8) for M in (1, 4)]
    out += [Case(K, M, method="al", mult="random", ds=2, R=2) for K in (2, 4) for M in (2,)]
    out += [Case(K, M, wire="bfloat16", method=meth) for meth in ("penalty", "al") for K in (2, 4, 8) for M in (1, 4)]
    return out


def plain_model():
    """ResNet-20 without BatchNorm (its statistics are per micro-batch, so back-propagation of the
    whole batch is the oracle only without it); 11 elements: up to K = 8 stages of 16x16 maps."""
    with _LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build_model("resnet", 20, in_channels=1, image_size=SIZE, num_classes=4, norm="none").to(DEVICE)


def multipliers(k: int, shape, n: int, mult: str) -> torch.Tensor:
    """Boundary k's multipliers for every sample: zero, or random of a fixed seed (each rank and the
    oracle draw the same)."""
    if mult == "zero":
        return torch.zeros(n, *shape)
    g = torch.Generator().manual_seed(100 + k)
    return 0.1 * torch.randn(n, *shape, generator=g)


def _down(x, s):
    return x if s == 1 else F.avg_pool2d(x, s)


def _up(a, s, up):
    if s == 1:
        return a
    if up == "nearest":
        return a.repeat_interleave(s, 2).repeat_interleave(s, 3)
    return DSFilter(s, up).up(a)  # the smooth upsampler as an operator (its D U = I: test_filters.py)


class _RoundBF16(torch.autograd.Function):
    """A bfloat16 message both ways: the state rounded forward, the adjoint (B x the gradient of the
    batch mean, as the engine sends it: a sample's own gradient) rounded backward."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.bfloat16).float()

    @staticmethod
    def backward(ctx, g):
        return (g * BATCH).to(torch.bfloat16).float() / BATCH


def oracle_gradients(case: Case, data, ranges, rounded: bool = True) -> list:
    """Back-propagation of (1/B) sum_i [CE_i + sum_k <m_k,i, D(u_k,i)>] through the network with U D
    (and, for bfloat16 messages when `rounded`, their rounding) at every cut, over the one global
    batch (every sample of the data): the gradient per stage."""
    model = plain_model()
    x, y = data.train_batch(torch.arange(data.n_train, device=DEVICE))
    loss = 0.0
    for k, (a, b) in enumerate(ranges):
        x = model(x, a, b)
        if k < len(ranges) - 1:
            d = _down(x, case.ds)
            if case.method == "al":
                m = multipliers(k, d.shape[1:], data.n_train, case.mult).to(DEVICE)
                loss = loss + (m * d).sum() / data.n_train
            if case.wire == "bfloat16" and rounded:
                d = _RoundBF16.apply(d)
            x = _up(d, case.ds, case.up)
    loss = loss + F.cross_entropy(x, y)
    loss.backward()
    return [[p.grad for el in model.elements[a:b] for p in el.parameters()] for a, b in ranges]


def stage_gradient(comm, case: Case, data, ranges) -> tuple:
    """(stage, its gradient after one global batch at lr = 0) on this rank of the engine."""
    topo = Topology(comm, case.R)
    try:
        k = topo.stage
        shard = replica_shard(data.n_train, case.R, topo.replica, SEED) if case.R > 1 else None
        model = plain_model()
        opt = make_optimizer(model, OptimConfig(lr=0.0, momentum=0.9, nesterov=False, weight_decay=0.0))
        pcfg = ParallelConfig(micro_batches=case.M, augment=False, ds=case.ds, ds_up=case.up,
                              message_dtype=case.wire, replicas=case.R)
        eng = PipelineEngine(model, opt, topo.pipe, data, ranges, pcfg, method=case.method, batch_size=BATCH,
                             drop_last=True, seed=SEED, replica_comm=topo.reps, shard=shard,
                             graphs="off" if case.path == "eager" else case.path)
        if eng.store is not None:
            m = multipliers(k, eng.out_shape, data.n_train, case.mult)
            eng.store.a.copy_((m if shard is None else m[shard]).to(eng.store.a))
        eng.train_epoch(0, lambda t: 0.0, 1.0)
        a, b = ranges[k]
        return k, [opt.state[p]["momentum_buffer"].clone() for el in model.elements[a:b] for p in el.parameters()]
    finally:
        topo.free()


def relative_error(got: list, true: list) -> float:
    """||g - t|| / ||t|| over the stage's whole gradient."""
    g, t = torch.cat([x.flatten() for x in got]), torch.cat([x.flatten() for x in true])
    return float((g - t).norm() / t.norm().clamp_min(1e-30))


def case_error(case: Case, data, rounded: bool = True) -> float:
    """The largest relative error over every stage (and replica) of the case."""
    ranges = balanced_partition(plain_model().costs, case.K)
    true = oracle_gradients(case, data, ranges, rounded)
    out = run_simulated(case.K * case.R, lambda comm: stage_gradient(comm, case, data, ranges))
    return max(relative_error(g, true[k]) for k, g in out)


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    path = make_dataset(tmp_path_factory.mktemp("oracle") / "d16.h5", n_train=BATCH, size=SIZE)
    return DeviceDataset(path, DEVICE)


@pytest.mark.parametrize("case", cases(), ids=str)
def test_stage_gradients_at_lr0_are_back_propagation(data16, case):
    err = case_error(case, data16)
    tol = TOL_F32 if case.wire == "float32" else TOL_BF16
    assert err < tol, f"{case}: relative error {err:.2e} from back-propagation (tolerance {tol:.0e})"


@pytest.mark.parametrize("K,M,path", [(2, 4, "eager"), (3, 4, "emulate"), (4, 2, "eager")])
def test_a_partial_last_batch_steps_with_its_own_mean(tmp_path, K, M, path):
    """data.drop_last=false: 32 + 12 samples, batch 32. At lr = 0 the momentum after the epoch is
    0.9 g1 + g2, g2 back-propagation's mean over the 12 samples of the last batch (micro-batches of
    8 and 4 at M = 4: weighted by their samples). Before, the last batch took no step (and a short
    micro-batch weighed like a full one)."""
    data = DeviceDataset(make_dataset(tmp_path / "d.h5", n_train=BATCH + 12, size=SIZE), DEVICE)
    ranges = balanced_partition(plain_model().costs, K)

    def engine(comm):
        model = plain_model()
        opt = make_optimizer(model, OptimConfig(lr=0.0, momentum=0.9, nesterov=False, weight_decay=0.0))
        eng = PipelineEngine(model, opt, comm, data, ranges, ParallelConfig(micro_batches=M, augment=False),
                             method="penalty", batch_size=BATCH, drop_last=False, seed=SEED,
                             graphs="off" if path == "eager" else path)
        st = eng.train_epoch(0, lambda t: 0.0, 1.0)
        a, b = ranges[comm.rank]
        bufs = [opt.state[p]["momentum_buffer"].clone() for el in model.elements[a:b] for p in el.parameters()]
        return comm.rank, bufs, st.steps, st.samples

    def backprop(ids):
        model = plain_model()
        x, y = data.train_batch(ids.to(DEVICE))
        F.cross_entropy(model(x, 0, len(model)), y).backward()
        return [[p.grad for el in model.elements[a:b] for p in el.parameters()] for a, b in ranges]

    first, last = epoch_batches(data.n_train, BATCH, SEED, 0, drop_last=False)
    g1, g2 = backprop(first), backprop(last)
    for k, bufs, steps, samples in run_simulated(K, engine):
        true = [0.9 * a + b for a, b in zip(g1[k], g2[k])]
        assert steps == 2 and samples == BATCH + 12, (k, steps, samples)
        err = relative_error(bufs, true)
        assert err < TOL_F32, f"stage {k} of {K}, M = {M}, {path}: {err:.2e} from 0.9 g1 + g2"


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = DeviceDataset(make_dataset(f"{tmp}/d16.h5", n_train=BATCH, size=SIZE), DEVICE)
        print("| path | method | multipliers | K | M | ds | R | messages | largest relative error | "
              "bf16: against float32 back-propagation |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for c in cases():
            err = case_error(c, data)
            ds = f"{c.ds} {c.up}" if c.ds > 1 else "1"
            mult = c.mult if c.method == "al" else "-"
            f32 = f"{case_error(c, data, rounded=False):.1e}" if c.wire == "bfloat16" else "-"
            print(f"| {c.path} | {c.method} | {mult} | {c.K} | {c.M} | {ds} | {c.R} | {c.wire} | {err:.1e} | {f32} |",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
