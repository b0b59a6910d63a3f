"""The graph path (run.cuda_graphs, graphs.py) against the eager engines. On any device it runs
uncaptured ("emulate"): that tests its static buffers, the warm-up restore and the device-scalar SGD.
With HPL_TEST_DEVICE=cuda it captures real CUDA graphs, with channels_last weights."""
import threading

import pytest
import torch

from hpc_layerpar.config import OptimConfig, ParallelConfig
from hpc_layerpar.data import Augment, DeviceDataset
from hpc_layerpar.graphs import SGDUpdate, StepGraph
from hpc_layerpar.models import build_model, place_model
from hpc_layerpar.partition import balanced_partition
from hpc_layerpar.pipeline import PipelineEngine
from hpc_layerpar.serial import SerialEngine, make_optimizer

from conftest import DEVICE, TOL, assert_all, run_cli

MODE = "cuda" if DEVICE.type == "cuda" else "emulate"
SEED, BATCH, LR = 7, 16, 0.05
# The graph path runs the eager path's functions: on the CPU ("emulate") nothing may differ. A captured
# CUDA graph may pick other kernels than the eager launch (cuDNN's algorithm search per capture).
GRAPH_TOL = 0.0 if DEVICE.type == "cpu" else 2e-5 * TOL
_LOCK = threading.Lock()


def lr_fn(t):
    """A schedule that changes every step: a captured step must follow it without re-capture."""
    return LR * (1.0 + 0.5 * t)


def make_model(norm="batch"):
    """Placed as a run places it, graphs or not: on CUDA channels_last, whose convolutions round
    differently from the default layout's (amplified by BatchNorm over small batches)."""
    with _LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        m = build_model("resnet", 8, in_channels=1, image_size=8, num_classes=4, norm=norm)
    return place_model(m, DEVICE)


@pytest.mark.parametrize("nesterov,wd,momentum,prefill", [(True, 5e-4, 0.9, True), (False, 0.0, 0.9, True),
                                                         (True, 5e-4, 0.9, False), (False, 5e-4, 0.0, False)])
def test_sgd_update_matches_torch_sgd(nesterov, wd, momentum, prefill):
    """SGDUpdate, the package's one SGD update, against torch.optim.SGD: with the zero momentum buffers
    make_optimizer creates, without them (created as SGD's first step would), and without momentum."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    a = [t.clone().to(DEVICE).requires_grad_(True) for t in base]
    b = [t.clone().to(DEVICE).requires_grad_(True) for t in base]
    opt_a = torch.optim.SGD(a, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    opt_b = torch.optim.SGD(b, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    for p in b if prefill else []:
        opt_b.state[p]["momentum_buffer"] = torch.zeros_like(p)
    upd = SGDUpdate(opt_b, b, DEVICE)
    for step in range(5):
        grads = [torch.randn(t.shape, generator=g).to(DEVICE) for t in base]
        for p, q, gr in zip(a, b, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        lr = 0.1 / (step + 1)
        opt_a.param_groups[0]["lr"] = lr
        opt_a.step()
        upd.set_lr(lr)
        upd()
    for p, q in zip(a, b):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), float((p - q).abs().max())
    assert opt_b.param_groups[0]["lr"] == pytest.approx(0.02)


def test_warm_up_runs_leave_no_trace():
    """The runs before a capture really execute; the state they touch is restored, so the first call
    does the step exactly once."""
    t = torch.zeros(3, device=DEVICE)
    g = StepGraph(lambda: (t.add_(1.0),), lambda: [t], MODE)
    g()
    assert t.tolist() == [1.0, 1.0, 1.0]
    g()
    assert t.tolist() == [2.0, 2.0, 2.0]


@pytest.mark.mpi
@pytest.mark.parametrize("augmented,norm,batch", [(False, "batch", 24), (True, "none", 31)])
def test_serial_graph_path_equals_eager(world, tiny_data, augmented, norm, batch):
    """Uneven shards and a partial last batch (two shapes), augmentation, a changing lr; with
    BatchNorm a last batch of 16, without it a last batch of 2, which leaves ranks 3 and 4 with
    no sample (they contribute nothing). Both paths run the same SGD expression (graphs.SGDUpdate)
    on the same kernels: on the CPU they must agree bitwise (BatchNorm over tiny shards amplified a
    last-bit difference in the update to 4e-3 when the eager path used torch.optim.SGD)."""
    data = DeviceDataset(tiny_data, DEVICE)
    aug = Augment(pad=1, flip=True, seed=SEED) if augmented else None
    runs = []
    for graphs in ("off", MODE):
        model = make_model(norm)
        eng = SerialEngine(model, make_optimizer(model, OptimConfig(lr=LR, momentum=0.9, nesterov=True,
                                                                     weight_decay=5e-4)),
                           world, data, aug, batch_size=batch, drop_last=False, seed=SEED, graphs=graphs)
        stats = [eng.train_epoch(e, lr_fn) for e in range(2)]
        runs.append((model, stats, eng))
    (m0, s0, _), (m1, s1, eng) = runs
    dp = max(float((a - b).abs().max()) for a, b in zip(m0.state_dict().values(), m1.state_dict().values())
             if a.is_floating_point())
    dl = max(abs(a.train_loss - b.train_loss) for a, b in zip(s0, s1))
    same_acc = all(a.train_acc == b.train_acc and a.samples == b.samples for a, b in zip(s0, s1))
    assert_all(world, dp <= GRAPH_TOL and dl <= GRAPH_TOL and same_acc,
               f"graph path vs eager: state {dp:.2e}, loss {dl:.2e}, "
               f"accuracy {[(a.train_acc, b.train_acc) for a, b in zip(s0, s1)]}")
    # 64 samples: the full batches' shard and the last batch's
    assert_all(world, len(eng.graphs.entries) == 2, f"captured shapes {list(eng.graphs.entries)}")


@pytest.mark.mpi
@pytest.mark.parametrize("ds,wire,augmented", [(1, "float32", False), (2, "float32", True)])
def test_pipeline_graph_path_equals_eager(world, tiny_data, ds, wire, augmented):
    """Every stage's F, B and optimizer step through the graph path give the eager pipeline's
    parameters and epoch statistics (penalty method; AL stays eager): the same StageStep functions,
    replayed over static buffers, bitwise on the CPU."""
    data = DeviceDataset(tiny_data, DEVICE)
    ranges = balanced_partition(make_model().costs, world.size)
    pcfg = ParallelConfig(ds=ds, message_dtype=wire, micro_batches=2)
    aug = Augment(pad=1, flip=True, seed=SEED) if augmented else None
    runs = []
    for graphs in ("off", MODE):
        model = make_model()
        opt = make_optimizer(model, OptimConfig(lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4))
        eng = PipelineEngine(model, opt, world, data, ranges, pcfg, method="penalty", batch_size=BATCH,
                             drop_last=True, seed=SEED, augment=aug, graphs=graphs)
        stats = [eng.train_epoch(e, lr_fn, beta) for e, beta in enumerate((0.0, 1.5))]  # beta 0: no penalty term
        state = [p.detach().clone() for p in eng.params] + \
            [b.detach().float().clone() for m in eng.stage_modules for b in m.buffers(recurse=False)]
        runs.append((state, stats, eng))
    (p0, s0, _), (p1, s1, eng) = runs
    dp = max(float((a - b).abs().max()) for a, b in zip(p0, p1))  # parameters and BatchNorm statistics
    dl = max(abs(a.local_loss - b.local_loss) for a, b in zip(s0, s1))
    # the graph path sums inside the captured steps: every epoch figure must match the eager sums
    figures = ("residual", "train_loss", "train_acc", "samples", "steps", "first_bad_step")
    same = all((getattr(a, f) == getattr(b, f)) or abs(getattr(a, f) - getattr(b, f)) <= GRAPH_TOL
               for a, b in zip(s0, s1) for f in figures if getattr(a, f) == getattr(a, f))  # NaN: n/a
    assert_all(world, dp <= GRAPH_TOL and dl <= GRAPH_TOL and same,
               f"rank {world.rank}: params {dp:.2e}, local loss {dl:.2e}, stats {s0} vs {s1}")
    assert_all(world, eng.graphs.enabled and len(eng.graphs.entries) >= 1, "the graph path ran")
    probe = eng.probe_gradient()
    assert_all(world, all(torch.isfinite(g).all() for g in probe), "the diagnostics probe works on the graph path")


def test_al_stays_eager(tiny_data):
    from hpc_layerpar.comm import Comm

    data = DeviceDataset(tiny_data, DEVICE)
    solo = Comm.self_()
    try:
        model = make_model()
        eng = PipelineEngine(model, make_optimizer(model, OptimConfig()), solo, data, [(0, 5)], ParallelConfig(),
                             method="al", batch_size=BATCH, drop_last=True, seed=SEED, graphs=MODE)
        assert not eng.graphs.enabled
    finally:
        solo.free()


@pytest.mark.skipif(DEVICE.type == "cuda", reason="checks the refusal on a machine without CUDA")
def test_cuda_graphs_on_is_refused_without_cuda(tmp_path, tiny_data):
    p = run_cli(["train", "--preset", "digits-resnet-serial", "--set", f"data.path={tiny_data}",
                 "--set", "run.device=cpu", "--set", "run.cuda_graphs=on", "--set", f"run.out_dir={tmp_path}"])
    assert p.returncode != 0
    assert "run.cuda_graphs=on needs a CUDA device" in p.stderr + p.stdout, p.stderr[-2000:]


@pytest.mark.skipif(DEVICE.type != "cuda", reason="captures CUDA graphs: needs HPL_TEST_DEVICE=cuda and a GPU")
def test_steps_are_captured_once_per_shape(tiny_data):
    from hpc_layerpar.comm import Comm

    data = DeviceDataset(tiny_data, DEVICE)
    solo = Comm.self_()
    try:
        model = make_model()
        eng = SerialEngine(model, make_optimizer(model, OptimConfig()), solo, data, None, batch_size=BATCH,
                           drop_last=False, seed=SEED, graphs="cuda")
        for e in range(3):
            eng.train_epoch(e, lr_fn)
        graphs = [g for entry in eng.graphs.entries.values() for g in entry[1:] if g is not None]
        assert len(eng.graphs.entries) == 1 and all(g.graph is not None for g in graphs)
    finally:
        solo.free()
