"""The curvature guard (caps or refuses a penalty weight SGD cannot follow) and the divergence guard
(a non-finite value stops the whole job within its epoch, says where, exit code 3, files intact)."""
import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from hpc_layerpar.filters import DSFilter
from hpc_layerpar.guard import EXIT_DIVERGED, penalty_curvature
from hpc_layerpar.metrics import read_metrics
from hpc_layerpar.progress import epoch_line

from conftest import make_dataset, run_cli


class _Seq(nn.Module):
    def __init__(self, *els):
        super().__init__()
        self.elements = nn.ModuleList(els)


def test_curvature_of_a_linear_stage_is_the_top_eigenvalue_of_its_input_covariance():
    """u = W x per pixel (1x1 conv): (1/n) J^T J = (1/n) sum_{i,p} x_ip x_ip^T (x) I, so its top
    eigenvalue is that of the pixel covariance; per element it is divided by C*H*W."""
    torch.manual_seed(0)
    c, n, h = 3, 5, 4
    conv = nn.Conv2d(c, c, 1, bias=False)
    x = torch.randn(n, c, h, h) * torch.tensor([3.0, 1.0, 0.5]).view(1, c, 1, 1)
    pix = x.permute(0, 2, 3, 1).reshape(-1, c)
    want = float(torch.linalg.eigvalsh(pix.T @ pix / n).max())
    got = penalty_curvature(_Seq(conv), 0, 1, x, DSFilter(1), per_element=False, iters=40)
    assert got == pytest.approx(want, rel=1e-3)
    per = penalty_curvature(_Seq(conv), 0, 1, x, DSFilter(1), per_element=True, iters=40)
    assert per == pytest.approx(want / (c * h * h), rel=1e-3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("g") / "d.h5", n_train=128)


def base(data, out, name, *extra):
    sets = [f"data.path={data}", "data.batch_size=16", "model.depth=8", "parallel.partition=macs",
            "run.threads=1", f"run.out_dir={out}", f"run.name={name}", *extra]
    return ["train", "--preset", "digits-resnet-penalty"] + [x for s in sets for x in ("--set", s)]


@pytest.mark.spawns
def test_refuse_names_the_value_and_the_safe_range(data, tmp_path):
    p = run_cli(base(data, tmp_path, "r", "parallel.beta=1000", "parallel.beta_guard=refuse",
                     "train.phases=penalty:2"), n=2)
    assert p.returncode == 2, p.stderr
    assert "parallel.beta=1000 " in p.stderr and "Safe range: parallel.beta <=" in p.stderr
    assert "Traceback" not in p.stderr and not list(tmp_path.glob("r-*.h5")), "refused before training"


@pytest.mark.spawns
def test_guard_off_diverges_and_auto_caps_the_same_setting(data, tmp_path):
    """beta = 1000 per element: without the guard SGD on the penalty explodes in the first epoch and
    the divergence guard stops the job; with the guard the cap keeps the run finite."""
    sets = ("parallel.beta=1000", "train.phases=penalty:2,serial:1", "optim.lr=0.1")
    off = run_cli(base(data, tmp_path, "off", *sets, "parallel.beta_guard=off"), n=2)
    assert off.returncode == EXIT_DIVERGED, off.stdout + off.stderr
    assert "training diverged in epoch" in off.stderr and "(penalty phase)" in off.stderr
    auto = run_cli(base(data, tmp_path, "auto", *sets, "parallel.beta_guard=auto"), n=2)
    assert auto.returncode == 0, auto.stderr
    (path,) = tmp_path.glob("auto-*.h5")
    m = read_metrics(str(path))
    caps = json.loads(m["attrs"]["beta_cap"])
    assert caps[0] < 1000 and math.isinf(caps[1])
    assert np.isfinite(m["columns"]["train_loss"]).all()
    assert m["columns"]["beta_effective"][0, 0] == pytest.approx(caps[0])


@pytest.mark.spawns
@pytest.mark.parametrize("how", ["mpi", "simulate"])
def test_forced_divergence_stops_every_rank_with_one_message(data, tmp_path, how):
    """A NaN written into rank 1's stage at the start of epoch 3 (0-based 2): the job stops within
    that epoch on every rank, exit code 3, one message naming rank, stage, epoch and a remedy, no
    traceback; the metrics file says 'diverged' and the checkpoint of epoch 2 is complete."""
    sets = ["train.phases=penalty:4", "run.checkpoint_every=1", "debug.nan_rank=1", "debug.nan_epoch=2"]
    if how == "simulate":
        p = run_cli(base(data, tmp_path, "nan", *sets, "parallel.simulate=3"), n=1)
    else:
        p = run_cli(base(data, tmp_path, "nan", *sets), n=3)
    assert p.returncode == EXIT_DIVERGED, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    msg = [ln for ln in p.stderr.splitlines() if "diverged" in ln]
    assert len(msg) == 1, p.stderr
    assert "epoch 3" in msg[0] and "rank 1 (stage 1)" in msg[0] and "Remedy" in msg[0]
    (path,) = tmp_path.glob("nan-*.h5")
    m = read_metrics(str(path))
    assert m["attrs"]["status"] == "diverged" and m["attrs"]["diverged_epoch"] == 2
    assert list(m["columns"]["epoch"]) == [0, 1, 2]
    assert math.isnan(m["columns"]["local_loss"][2, 1])
    ckpt = tmp_path / "nan.ckpt"
    with open(ckpt / "latest") as fh:
        assert fh.read().strip() == "epoch-000001"
    state = torch.load(ckpt / "epoch-000001" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert "epoch-000001" in msg[0], "the message names the last good checkpoint"
    summary = run_cli(["summary", str(path)])
    assert summary.returncode == 0 and " nan " in f" {summary.stdout} ".replace("\n", " ").lower() \
        and "diverged" in summary.stdout


@pytest.mark.spawns
@pytest.mark.parametrize("phases,sch", [("penalty:3", "tick"), ("penalty:3", "1f1b"), ("serial:3", "tick")])
def test_in_epoch_check_halts_a_diverging_epoch_within_check_every_steps(data, tmp_path, phases, sch):
    """A NaN written into rank 1 at the start of epoch 2: with run.check_every=2 every rank stops after
    step 2 (serial) or tick 2 (pipeline, M = 1) of the epoch's 8 (before, the epoch ran to its end), then
    the guard reports it as usual; on the 1f1b schedule too (whose adjoints of the next tick are not
    sent when it stops), one tick later: it decides a check K-1 ticks after it is made."""
    p = run_cli(base(data, tmp_path, "h", f"train.phases={phases}", "run.check_every=2", "debug.nan_rank=1",
                     "debug.nan_epoch=1", f"parallel.schedule={sch}"), n=2)
    assert p.returncode == EXIT_DIVERGED, p.stdout + p.stderr
    unit = "steps" if phases.startswith("serial") else "micro-batches"  # a pipeline's rank 0 forwarded
    assert f"halted epoch 2 after {2 + (sch == '1f1b')} of 8 {unit}" in p.stdout, p.stdout
    assert "Traceback" not in p.stderr and "diverged" in p.stderr


def test_progress_prints_nan_as_nan():
    row = {"epoch": 0, "phase": "penalty", "lr": 0.1, "train_loss": float("nan"), "train_acc": 0.1,
           "test_loss": float("nan"), "test_acc": float("nan"), "beta": 1.0,
           "residual": [float("nan"), float("nan"), 2.0], "consistency": [float("nan"), float("inf"), 0.1],
           "grad_cosine": [float("nan"), 0.5, 0.9], "grad_norm_ratio": [1.0, 0.25, float("nan")],
           "wait_seconds": [0.0] * 3, "epoch_seconds": 1.0,
           "compute_seconds": [1.0] * 3, "comm_seconds": [0.0] * 3, "switch_seconds": 0.0}
    line = epoch_line(row, 3)
    assert "train_loss nan" in line and "residual nan,2.00" in line and "consistency inf,0.10" in line
    assert "cos nan,0.50,0.90" in line and "gnorm 1.00,0.25,nan" in line
    assert " 0 " not in line.replace("0.0", "")


def test_metrics_writer_keeps_nan(tmp_path):
    from hpc_layerpar.metrics import COLUMNS, MetricsWriter
    w = MetricsWriter(str(tmp_path / "m.h5"), config_json="{}", world_size=2, attrs={})
    row = {k: ([float("nan")] * 2 if per else (0 if k in ("epoch", "phase_index") else "serial" if k == "phase"
                                               else float("nan"))) for k, (_, per, _) in COLUMNS.items()}
    w.append(row)
    m = read_metrics(str(tmp_path / "m.h5")) if os.path.exists(tmp_path / "m.h5") else None
    assert m is not None and math.isnan(m["columns"]["train_loss"][0])
