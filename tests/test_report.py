"""The report over real runs: tables, CSV and plots; clear errors for foreign files."""
import csv
import os

import h5py
import pytest

from conftest import make_dataset, run_cli

pytestmark = pytest.mark.spawns


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    data = make_dataset(tmp / "d.h5", n_train=128)
    out = tmp / "runs"
    common = [f"data.path={data}", "data.batch_size=16", "model.depth=8", "parallel.beta=0.02",
              f"run.out_dir={out}", "run.threads=1"]
    jobs = [("digits-resnet-serial", 1, ["train.phases=serial:3"]),
            ("digits-resnet-serial", 2, ["train.phases=serial:3"]),
            ("digits-resnet-penalty", 2, ["train.phases=penalty:2,serial:1"]),
            ("digits-resnet-penalty-ds2", 2, ["train.phases=penalty:2,serial:1"]),
            ("digits-resnet-al", 2, ["train.phases=al:2,serial:1", "train.seed=1"]),
            ("digits-resnet-penalty", 1, ["train.phases=penalty:2,serial:1", "parallel.simulate=2"])]
    for preset, n, extra in jobs:
        p = run_cli(["train", "--preset", preset] + [x for s in common + extra for x in ("--set", s)], n=n)
        assert p.returncode == 0, p.stderr
    return tmp, out


def test_report_writes_tables_and_plots(runs):
    tmp, out = runs
    p = run_cli(["report", str(out), "--out", str(tmp / "rep"), "--target", "0.3"])
    assert p.returncode == 0, p.stderr
    with open(tmp / "rep" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    methods = {(r["method"], r["DS"]) for r in rows}
    assert methods == {("serial", "1"), ("data-parallel", "1"), ("SPH-penalty", "1"), ("SPH-penalty", "2"),
                       ("SPH-al", "1"), ("SPH-penalty (simulated)", "1")}
    serial = next(r for r in rows if r["method"] == "serial")
    assert float(serial["rho whole run"]) == pytest.approx(1.0)
    pen = {r["DS"]: r for r in rows if r["method"] == "SPH-penalty"}
    assert float(pen["1"]["MB/epoch (wire)"]) == pytest.approx(4 * float(pen["2"]["MB/epoch (wire)"]), rel=1e-6)
    # pipeline coupling: penalty keeps no per-sample state, AL its multipliers
    assert float(pen["1"]["aux MiB"]) == 0
    assert float(next(r for r in rows if r["method"] == "SPH-al")["aux MiB"]) > 0
    sim = next(r for r in rows if "simulated" in r["method"])
    assert sim["rho parallel epoch"] == "nan" and float(sim["test acc mean %"]) > 0, "no speed-up for threads"
    assert all(float(r["rho parallel epoch"]) > 0 for r in rows if r["method"] in ("SPH-penalty", "SPH-al"))
    for png in ("curves.png", "accuracy_vs_time.png", "time_split.png", "traffic.png", "rho_vs_k.png", "health.png"):
        f = tmp / "rep" / png
        assert f.exists() and f.stat().st_size > 10_000, png
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(tmp / "rep" / "summary.md") as fh:
        assert "| SPH-penalty |" in fh.read()


def test_report_rejects_foreign_files_and_other_schema_versions(runs, tmp_path):
    (tmp_path / "x.h5").write_bytes(b"not hdf5")
    p = run_cli(["report", str(tmp_path / "x.h5"), "--out", str(tmp_path / "rep")])
    assert p.returncode == 2 and "not a readable HDF5" in p.stderr
    _, out = runs
    src = sorted(out.glob("*.h5"))[0]
    old = tmp_path / "old.h5"
    old.write_bytes(src.read_bytes())
    with h5py.File(old, "a") as f:
        f.attrs["schema_version"] = 1
    p = run_cli(["report", str(old), "--out", str(tmp_path / "rep")])
    assert p.returncode == 2 and "schema version 1" in p.stderr
    assert not os.path.exists(tmp_path / "rep" / "summary.md")


def test_skip_epochs_do_not_count_as_epoch_time():
    """A serial-only control (skip epochs, then serial) is timed by its serial epochs alone."""
    import numpy as np

    from results.runs import Run
    cols = {"phase": np.array(["skip", "skip", "serial"]), "epoch_seconds": np.array([0.0, 0.0, 4.0]),
            "test_acc": np.array([np.nan, np.nan, 0.5])}
    r = Run(path="x", dataset="d", model="m", method="serial-only control", ranks=1, stages=1, replicas=1,
            ds=1, message_dtype="float32", seed=0, phases="skip:2,serial:1", status="completed",
            columns=cols, attrs={})
    assert r.epoch_seconds("all") == 4.0 and r.epoch_seconds("serial") == 4.0


def test_ds_upsamplers_are_separate_groups():
    """DS runs with the nearest upsampler (and files from before it was a setting) do not average
    with smooth ones: the DS column names the upsampler when it is not the default."""
    from results.runs import Run, group

    def run(ds, up, seed):
        return Run(path="x", dataset="d", model="m", method="SPH-penalty", ranks=4, stages=4, replicas=1,
                   ds=ds, message_dtype="float32", seed=seed, phases="penalty:4,serial:1",
                   status="completed", columns={}, attrs={}, ds_up=up)
    runs = [run(2, "smooth", 0), run(2, "smooth", 1), run(2, "nearest", 0), run(1, "smooth", 0)]
    labels = sorted(k[5] for k in group(runs))
    assert labels == ["1", "2", "2 nearest"]


def test_report_reads_files_of_the_removed_epoch_coupling(runs, tmp_path):
    """Result folders keep version 1's runs (parallel.coupling=epoch, with its keys eta, refresh_every,
    window): the report and the summary read them although a run can no longer be configured so."""
    import json

    _, out = runs

    def penalty_k2(f):
        with h5py.File(f, "r") as h:
            cfg = json.loads(h.attrs["config"])
            return cfg["train"]["phases"].startswith("penalty") and cfg["parallel"]["ds"] == 1 \
                and "simulated_ranks" not in h.attrs

    src = next(f for f in sorted(out.glob("*.h5")) if penalty_k2(f))
    old = tmp_path / "v1.h5"
    old.write_bytes(src.read_bytes())
    with h5py.File(old, "a") as f:
        cfg = json.loads(f.attrs["config"])
        cfg["parallel"].update(coupling="epoch", eta=1.0, refresh_every=0, window=4)
        f.attrs["config"] = json.dumps(cfg)
        f.attrs["coupling"] = "epoch"
    p = run_cli(["report", str(old), "--out", str(tmp_path / "rep"), "--target", "0.3"])
    assert p.returncode == 0, p.stderr
    with open(tmp_path / "rep" / "summary.csv") as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == ["SPH-penalty"]
    p = run_cli(["summary", str(old)])
    assert p.returncode == 0, p.stderr
