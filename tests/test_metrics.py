import math
import os
import time

import h5py
import numpy as np
import pytest

from hpc_layerpar.config import from_dict, resolve
from hpc_layerpar.metrics import COLUMNS, MetricsError, MetricsWriter, read_metrics
from hpc_layerpar.train import run

from conftest import ROOT, assert_all


def row(epoch, world):
    return {name: (np.full(world, epoch + 0.5) if per_rank else ("serial" if dt == "str" else epoch))
            for name, (dt, per_rank, _) in COLUMNS.items()}


def test_writer_roundtrip_and_growth(tmp_path):
    p = str(tmp_path / "m.h5")
    w = MetricsWriter(p, config_json='{"run": {"name": "x"}}', world_size=3, attrs={"hostnames": ["a", "b", "c"]})
    for e in range(4):
        w.append(row(e, 3))
        m = read_metrics(p)  # readable after every epoch: a killed job leaves a usable file
        assert len(m["columns"]["epoch"]) == e + 1
    assert m["columns"]["compute_seconds"].shape == (4, 3)
    assert list(m["columns"]["phase"]) == ["serial"] * 4
    assert m["attrs"]["status"] == "running" and m["attrs"]["hostnames"] == '["a", "b", "c"]'


def test_resume_upgrades_a_version_3_file(tmp_path):
    """A run resumed by this version into a file written by the last (schema 3, no grad_norm_ratio):
    the missing column appears with NaN for the old rows, and the new rows fill it."""
    p = str(tmp_path / "m.h5")
    w = MetricsWriter(p, config_json="{}", world_size=2, attrs={})
    for e in range(3):
        w.append(row(e, 2))
    with h5py.File(p, "a") as f:
        del f["epochs"]["grad_norm_ratio"]
        f.attrs["schema_version"] = 3
    assert np.isnan(read_metrics(p)["columns"]["grad_norm_ratio"]).all()  # read as NaN
    w = MetricsWriter.reopen(p, keep_rows=2)
    w.append(row(2, 2))
    m = read_metrics(p)
    assert m["attrs"]["schema_version"] == 4
    g = m["columns"]["grad_norm_ratio"]
    assert g.shape == (3, 2) and np.isnan(g[:2]).all() and (g[2] == 2.5).all()


def test_schema_errors(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["a"] = 1
    with pytest.raises(MetricsError, match="not an hpc_layerpar metrics file"):
        read_metrics(str(tmp_path / "x.h5"))
    p = str(tmp_path / "m.h5")
    MetricsWriter(p, config_json="{}", world_size=1, attrs={})
    with h5py.File(p, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(MetricsError, match="schema version 99"):
        read_metrics(p)
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(MetricsError, match="not a readable HDF5"):
        read_metrics(str(tmp_path / "t.txt"))


def test_readme_documents_every_column():
    with open(os.path.join(ROOT, "docs", "METRICS.md")) as fh:
        text = fh.read()
    missing = [c for c in COLUMNS if f"`{c}`" not in text]
    assert not missing, f"docs/METRICS.md's metrics schema lacks {missing}"


@pytest.mark.mpi
def test_parallel_epochs_fill_every_column_with_its_meaning(world, tiny_data, tmp_path_factory):
    out = world.bcast_obj(str(tmp_path_factory.mktemp("runs")) if world.rank == 0 else None)
    cfg = resolve("digits-resnet-al", None, [
        f"data.path={tiny_data}", "data.batch_size=16", "model.depth=8", "train.phases=al:2,serial:1",
        "parallel.beta=0.02", "parallel.partition=macs", f"run.out_dir={out}", "run.name=cols",
        "run.progress=off", "run.threads=1"])
    t0 = time.perf_counter()
    s = run(cfg, world, quiet=True)
    wall = time.perf_counter() - t0
    ok, msg = True, ""
    if world.rank == 0:
        c = read_metrics(s.metrics_path)["columns"]
        k = world.size
        par, ser = slice(0, 2), 2
        checks = {
            "epoch time is a duration": bool((c["epoch_seconds"] > 0).all() and (c["epoch_seconds"] < wall).all()),
            # (no timing comparison: a loaded machine makes any ratio of small durations flaky)
            "switch time is a duration": bool((c["switch_seconds"] >= 0).all() and (c["switch_seconds"] < wall).all()),
            "no switch traffic inside a phase": bool((c["switch_bytes_sent"][1] == 0).all()),
            "beta in parallel epochs only": list(c["beta"][par]) == [0.02, 0.02] and math.isnan(c["beta"][ser]),
            "residual NaN at rank 0": bool(np.isnan(c["residual"][par, 0]).all()),
            "residual > 0 at boundaries": k == 1 or bool((c["residual"][par, 1:] > 0).all()),
            "multipliers > 0 at boundaries (AL)": k == 1 or bool((c["multiplier_norm"][1, 1:] > 0).all()),
            "local loss finite in parallel": bool(np.isfinite(c["local_loss"][par]).all()),
            "local loss NaN in serial": bool(np.isnan(c["local_loss"][ser]).all()),
            "bytes follow the direction of messages": k == 1 or bool((c["bytes_sent"][par] > 0).all()),
            # the pipeline keeps no auxiliary variables between ticks, so it enters without traffic
            "no traffic at phase entry": bool((c["switch_bytes_sent"][0] == 0).all()),
            "wait <= comm": bool((c["wait_seconds"] <= c["comm_seconds"] + 1e-9).all()),
            "train loss is a CE": bool((c["train_loss"] > 0).all() and (c["train_loss"] < 10).all()),
        }
        ok, msg = all(checks.values()), str({k_: v for k_, v in checks.items() if not v})
    ok = world.bcast_obj(ok)
    msg = world.bcast_obj(msg)
    assert_all(world, ok, msg)


@pytest.mark.mpi
def test_training_run_writes_a_complete_metrics_file(world, tiny_data, tmp_path_factory):
    out = world.bcast_obj(str(tmp_path_factory.mktemp("runs")) if world.rank == 0 else None)
    cfg = resolve("digits-resnet-serial", None, [
        f"data.path={tiny_data}", "data.batch_size=16", "model.depth=8", "train.phases=serial:3",
        "train.eval_every=2", f"run.out_dir={out}", "run.name=rt", "run.progress=off", "run.threads=1"])
    s = run(cfg, world, quiet=True)
    ok, msg = True, ""
    if world.rank == 0:
        m = read_metrics(s.metrics_path)
        c = m["columns"]
        checks = {
            "epochs": list(c["epoch"]) == [0, 1, 2],
            "eval cadence": math.isnan(c["test_acc"][0]) and not math.isnan(c["test_acc"][1])
            and not math.isnan(c["test_acc"][2]),
            "final acc": c["test_acc"][2] == s.final_test_acc,
            "per-rank shape": c["bytes_sent"].shape == (3, world.size),
            "traffic": bool((c["bytes_sent"] > 0).all()) == (world.size > 1),
            "config": from_dict(m["config"]) == cfg,
            "status": m["attrs"]["status"] == "completed",
            "provenance": all(k in m["attrs"] for k in ("git_sha", "torch_version", "mpi4py_version",
                                                        "h5py_version", "numpy_version", "mpi_library",
                                                        "hostnames", "devices", "world_size")),
        }
        ok, msg = all(checks.values()), str(checks)
    ok = world.bcast_obj(ok)
    msg = world.bcast_obj(msg)
    assert_all(world, ok, msg)
