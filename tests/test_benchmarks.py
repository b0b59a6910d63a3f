"""The benchmark scripts' file interfaces (their figures are measurements, not tested here)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.spawns


def test_scaling_projects_from_saved_costs_as_from_measured_ones(tmp_path):
    """--save-costs writes per-element costs; --costs projects from them without measuring and gives
    the same rho table (the way costs measured on a GPU node feed the model elsewhere)."""
    base = [sys.executable, "benchmarks/scaling.py", "--models", "resnet20", "--batch", "8"]
    a = subprocess.run(base + ["--save-costs", str(tmp_path / "c.json"), "--json", str(tmp_path / "a.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert a.returncode == 0, a.stderr
    costs = json.loads((tmp_path / "c.json").read_text())["models"]["resnet20"]
    assert len(costs["element_seconds"]) == 11 == len(costs["boundary_numel"]) - 1 and costs["device"] == "cpu"
    b = subprocess.run(base + ["--costs", str(tmp_path / "c.json"), "--json", str(tmp_path / "b.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert b.returncode == 0, b.stderr
    assert "costs from" in b.stdout
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
    c = subprocess.run(base[:3] + ["resnet56", "--costs", str(tmp_path / "c.json")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert c.returncode != 0 and "no costs for ['resnet56']" in c.stderr


def test_gpu_benchmark_script_runs_end_to_end_on_cpu(tmp_path):
    """benchmarks/gpu.py's own code path (loops, engine steps, stages alone, projections, JSON) as a CPU
    smoke run with emulated graphs; its figures mean something only on a GPU."""
    out = tmp_path / "g.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--device", "cpu", "--steps", "1",
                        "--batch", "16", "--models", "resnet8-tiny", "--stage-models", "resnet8-tiny", "--ks", "2",
                        "--schedules", "tick,1f1b", "--json", str(out), "--save-costs", str(tmp_path / "c.json")],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())["models"]["resnet8-tiny"]
    assert r["engine_graph_bf16"] > 0 and len(r["stages"]["2/auto"]["engine_ms"]) == 2
    assert r["stages"]["2/timed"]["micro_batches"] == 1 and "16" in r["split_costs"]  # 8x8: no M > 1 keeps BatchNorm
    tick, f1b = r["stages"]["2/auto"], r["stages"]["2/auto/1f1b"]  # the same stage timings, projected twice
    assert f1b["engine_ms"] == tick["engine_ms"] and f1b["projected"]["nvlink"][0] <= tick["projected"]["nvlink"][0]
    costs = json.loads((tmp_path / "c.json").read_text())["models"]["resnet8-tiny"]
    assert len(costs["element_seconds"]) == 5 and "| 2 |" in p.stdout


def test_peers_run_end_to_end():
    """benchmarks/peers.py on 2 processes: plain PyTorch and its accumulated micro-batches on 1, DDP, GPipe
    and 1F1B on 2 (gloo from MPICH's PMI variables), one JSON line each with a positive per-step time; a
    smoke run, its figures mean nothing."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "peers.py"), "--ranks", "2", "--depth", "8",
                        "--batch", "8", "--warmup", "1", "--steps", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["config"]: r for r in map(json.loads, p.stdout.splitlines())}
    assert sorted(rows) == ["1f1b", "accum", "ddp", "gpipe", "plain"]
    assert all(r["step_seconds"] > 0 for r in rows.values())
    assert rows["plain"]["ranks"] == 1 and rows["ddp"]["ranks"] == 2 == len(rows["gpipe"]["ranges"])
    assert rows["1f1b"]["micro_batches"] == 4 == rows["accum"]["micro_batches"] and rows["accum"]["ranks"] == 1


def test_time_to_accuracy_end_to_end(tmp_path):
    """benchmarks/time_to_accuracy.py on digits, depth 8, 2 epochs: serial BP on 1 rank, data-parallel,
    SPH penalty and pure parallel on 2 real MPI ranks, then tta.md, tta.json (4 runs, one entry per epoch)
    and tta.png; a smoke run, its timings mean nothing."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    data = tmp_path / "digits.h5"
    d = subprocess.run([sys.executable, "-m", "data_prep", "digits", "--out", str(data)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env=env)
    assert d.returncode == 0, d.stderr[-3000:]
    out = tmp_path / "tta"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "time_to_accuracy.py"), "--dataset", "digits",
                        "--data", str(data), "--ranks", "2", "--epochs", "2", "--set", "model.depth=8",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads((out / "tta.json").read_text())
    assert [x["label"] for x in r["runs"]] == ["serial BP", "data-parallel", "SPH penalty", "pure parallel"]
    assert [x["ranks"] for x in r["runs"]] == [1, 2, 2, 2]
    for x in r["runs"]:
        assert len(x["cum_seconds"]) == len(x["test_acc"]) == 2 and x["status"] == "completed"
        assert 0 < x["cum_seconds"][0] <= x["cum_seconds"][1] and None not in x["test_acc"]
    assert r["runs"][0]["speedup_to_target"] == 1.0 and r["target"] is not None
    assert "time to target" in (out / "tta.md").read_text() and (out / "tta.png").stat().st_size > 0


def test_gpu_split_refinement_moves_one_cut_at_a_time_on_cpu(tmp_path):
    """benchmarks/gpu_split.py as a CPU smoke run, forced to move (--min-gain -1): every split on its
    path is valid and one cut one element away from the one before, and the cuts it hands the engine
    are the last of them."""
    out = tmp_path / "s.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_split.py"), "--device", "cpu",
                        "--model", "resnet8-tiny", "--ks", "3", "--steps", "1", "--batch", "16", "--rounds", "2",
                        "--min-gain", "-1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())["ks"]["3"]
    path = [tuple(x["cuts"]) for x in r["path"]]
    assert len(path) == 3 and path[0] == tuple(r["balanced_cuts"]) and path[-1] == tuple(r["refined_cuts"])
    for before, after in zip(path, path[1:]):
        assert sum(abs(a - b) for a, b in zip(before, after)) == 1
    assert all(0 < c[0] < c[1] < 5 for c in path)  # resnet8-tiny: 5 elements
    assert all(len(x["stage_ms"]) == 3 for x in r["path"]) and set(r["retimed_ms"]) == {"balanced", "refined"}
    assert f"parallel.partition={','.join(map(str, path[-1]))}" in p.stdout
