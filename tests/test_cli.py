"""End-to-end through the command line, as a user runs it under mpiexec."""
import os
import subprocess
import sys
import time

import pytest

from hpc_layerpar.metrics import read_metrics

from conftest import ROOT, make_dataset, mpiexec_cmd, run_cli

pytestmark = pytest.mark.spawns


def test_train_on_two_ranks_writes_metrics_and_logs_epochs(tmp_path):
    data = make_dataset(tmp_path / "d.h5")
    p = run_cli(["train", "--preset", "digits-resnet-serial", "--set", f"data.path={data}",
                 "--set", "data.batch_size=16", "--set", "model.depth=8", "--set", "train.phases=serial:2",
                 "--set", f"run.out_dir={tmp_path}/runs", "--set", "run.name=e2e"], n=2)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2, "one line per epoch, from rank 0 only"
    assert "metrics written to" in p.stdout
    (path,) = (tmp_path / "runs").glob("e2e-*.h5")
    m = read_metrics(str(path))
    assert m["attrs"]["world_size"] == 2 and len(m["columns"]["epoch"]) == 2
    s = run_cli(["summary", str(path)])
    assert s.returncode == 0 and "e2e" in s.stdout and "completed" in s.stdout


def test_exception_on_one_rank_aborts_the_whole_job(tmp_path):
    """Rank 1 of 3 raises at epoch 1 while its peers sit in collectives: the job must end, non-zero,
    with the rank and the message in the log, and the metrics file of the epochs before stays readable."""
    data = make_dataset(tmp_path / "d.h5")
    t0 = time.perf_counter()
    p = run_cli(["train", "--preset", "digits-resnet-serial", "--set", f"data.path={data}",
                 "--set", "data.batch_size=16", "--set", "model.depth=8", "--set", "train.phases=serial:5",
                 "--set", f"run.out_dir={tmp_path}/runs", "--set", "debug.fail_rank=1",
                 "--set", "debug.fail_epoch=1"], n=3, timeout=120)
    elapsed = time.perf_counter() - t0
    assert p.returncode != 0
    assert "[rank 1]" in p.stderr and "injected failure on rank 1 at epoch 1" in p.stderr
    assert elapsed < 60, f"abort took {elapsed:.1f}s"
    (path,) = (tmp_path / "runs").glob("*.h5")
    m = read_metrics(str(path))
    assert list(m["columns"]["epoch"]) == [0] and m["attrs"]["status"] == "running"


def test_exception_during_a_parallel_phase_aborts_without_hanging(tmp_path):
    """Rank 2 of 3 fails while its neighbours have receives posted ahead (channels.AHEAD)."""
    data = make_dataset(tmp_path / "d.h5")
    p = run_cli(["train", "--preset", "digits-resnet-penalty", "--set", f"data.path={data}",
                 "--set", "data.batch_size=16", "--set", "model.depth=8", "--set", "train.phases=penalty:3",
                 "--set", "parallel.beta=0.02", "--set", f"run.out_dir={tmp_path}/runs",
                 "--set", "debug.fail_rank=2", "--set", "debug.fail_epoch=1"], n=3, timeout=120)
    assert p.returncode != 0
    assert "[rank 2]" in p.stderr and "injected failure on rank 2 at epoch 1" in p.stderr


def test_a_hung_rank_is_caught_by_the_watchdog(tmp_path):
    """Rank 1 of 2 stops answering (no error) in epoch 1 of a parallel phase: its peer blocks in MPI.
    The watchdog (here 4 s) dumps the stacks and aborts the whole job with a message that says why;
    without it the job would wait for its time limit."""
    data = make_dataset(tmp_path / "d.h5")
    t0 = time.perf_counter()
    p = run_cli(["train", "--preset", "digits-resnet-penalty", "--set", f"data.path={data}",
                 "--set", "data.batch_size=16", "--set", "model.depth=8", "--set", "train.phases=penalty:3",
                 "--set", "parallel.beta=0.02", "--set", "parallel.partition=macs",
                 "--set", f"run.out_dir={tmp_path}/runs", "--set", "run.watchdog_s=4",
                 "--set", "debug.hang_rank=1", "--set", "debug.hang_epoch=1"], n=2, timeout=150)
    elapsed = time.perf_counter() - t0
    assert p.returncode != 0
    assert "watchdog: no progress for" in p.stderr and "run.watchdog_s=4" in p.stderr, p.stderr[-3000:]
    assert "most recent call first" in p.stderr, "the stacks of the rank's threads"
    assert elapsed < 120, f"the watchdog took {elapsed:.1f}s"


def test_rank_count_and_ds_errors_come_before_training(tmp_path):
    data = make_dataset(tmp_path / "d.h5", size=12)  # 12x12 -> 6x6 -> 3x3 activations
    base = ["train", "--preset", "digits-resnet-penalty", "--set", f"data.path={data}", "--set",
            "data.batch_size=16", "--set", "model.depth=8", "--set", f"run.out_dir={tmp_path}/runs"]
    # elements: stem, block (12x12 in), block (12x12 in, to 6x6), block (6x6 in, to 3x3), head (3x3 in)
    p = run_cli(base + ["--set", "parallel.ds=4", "--set", "parallel.partition=1,3"], n=3, timeout=120)
    assert p.returncode != 0 and "parallel.ds=4 does not divide" in p.stderr and "Use parallel.ds in" in p.stderr
    # the measured split may start stages only at elements 1 and 2 (12x12): three ranks at most
    p = run_cli(base + ["--set", "parallel.ds=4"], n=4, timeout=120)
    assert p.returncode != 0 and "at most 3 ranks" in p.stderr and "parallel.ds=4 divides" in p.stderr
    assert "epoch" not in p.stdout
    p = run_cli(base, n=6, timeout=120)
    assert p.returncode != 0 and "cannot split 5 elements" in p.stderr and "at most 5 ranks" in p.stderr
    assert "epoch" not in p.stdout


def test_ranks_with_different_configs_are_stopped_at_start(tmp_path):
    """MPMD launch: rank 1 gets another learning rate than rank 0."""
    data = make_dataset(tmp_path / "d.h5")
    base = [sys.executable, "-m", "mpi4py", "-m", "hpc_layerpar", "train", "--preset", "digits-resnet-serial",
            "--set", f"data.path={data}", "--set", f"run.out_dir={tmp_path}/runs"]
    exe = mpiexec_cmd(1)[0]
    cmd = [exe, "-n", "1"] + base + ["--set", "optim.lr=0.1", ":", "-n", "1"] + base + ["--set", "optim.lr=0.2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert p.returncode != 0
    assert "ranks [1] resolved a different configuration than rank 0" in p.stderr
    assert "epoch" not in p.stdout


def test_presets_and_print_config():
    p = run_cli(["presets"])
    assert p.returncode == 0 and "cifar10-resnet56-serial" in p.stdout
    p = run_cli(["train", "--preset", "cifar10-resnet56-serial", "--set", "optim.lr=0.05", "--print-config"])
    assert p.returncode == 0 and "lr: 0.05" in p.stdout and "depth: 56" in p.stdout


@pytest.mark.spawns
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_simulated_run_has_the_metrics_of_the_mpi_run(tmp_path, precision):
    """`parallel.simulate=3` in one process and `mpiexec -n 3`: the same metrics, row by row (losses,
    accuracies, residuals, health columns, bytes), with the simulated file marked as such; in
    float32 and in bf16 compute (run.precision)."""
    import numpy as np


    data = make_dataset(tmp_path / "d.h5", n_train=96)
    base = ["train", "--preset", "digits-resnet-al", "--set", f"data.path={data}", "--set", "data.batch_size=16",
            "--set", "model.depth=8", "--set", "train.phases=al:2,serial:1", "--set", "parallel.partition=macs",
            "--set", "run.threads=1", "--set", "run.device=cpu", "--set", f"run.out_dir={tmp_path}/runs",
            "--set", f"run.precision={precision}"]
    mpi = run_cli(base + ["--set", "run.name=mpi"], n=3)
    sim = run_cli(base + ["--set", "run.name=sim", "--set", "parallel.simulate=3"], n=1)
    assert mpi.returncode == 0 and sim.returncode == 0, mpi.stderr + sim.stderr
    (a,), (b,) = (tmp_path / "runs").glob("mpi-*.h5"), (tmp_path / "runs").glob("sim-*.h5")
    ma, mb = read_metrics(str(a)), read_metrics(str(b))
    assert mb["attrs"]["simulated_ranks"] == 3 and ma["attrs"]["world_size"] == mb["attrs"]["world_size"] == 3
    for col in ("train_loss", "train_acc", "test_loss", "test_acc", "local_loss", "residual", "multiplier_norm",
                "consistency", "grad_cosine", "grad_norm_ratio", "beta_effective", "bytes_sent", "bytes_recv"):
        assert np.allclose(ma["columns"][col], mb["columns"][col], rtol=1e-5, atol=1e-6, equal_nan=True), col


@pytest.mark.spawns
def test_deterministic_runs_every_phase_and_matches_the_default_on_cpu(tmp_path):
    """run.deterministic=true turns on PyTorch's deterministic algorithms, which raise for any op
    without a deterministic kernel: serial and parallel epochs must run under it. On the CPU
    (one thread) the default kernels are deterministic already, so the figures are the same."""
    import numpy as np

    data = make_dataset(tmp_path / "d.h5", n_train=64)
    base = ["train", "--preset", "digits-resnet-al", "--set", f"data.path={data}", "--set", "data.batch_size=16",
            "--set", "model.depth=8", "--set", "train.phases=al:1,serial:1", "--set", "parallel.simulate=2",
            "--set", "parallel.partition=macs",  # a timed split may differ between launches
            "--set", "run.threads=1", "--set", "run.device=cpu", "--set", f"run.out_dir={tmp_path}/runs"]
    for name, extra in (("plain", []), ("det", ["--set", "run.deterministic=true"])):
        p = run_cli(base + ["--set", f"run.name={name}"] + extra, n=1)
        assert p.returncode == 0, p.stderr
    (a,), (b,) = (tmp_path / "runs").glob("plain-*.h5"), (tmp_path / "runs").glob("det-2*.h5")
    ca, cb = read_metrics(str(a))["columns"], read_metrics(str(b))["columns"]
    for col in ("train_loss", "test_loss", "local_loss", "residual"):
        assert np.array_equal(ca[col], cb[col], equal_nan=True), col


@pytest.mark.spawns
def test_cuda_aware_on_is_refused_when_the_library_reports_no_support(tmp_path):
    """On every rank alike, before training, naming the library and the remedies; `force` runs. Where
    the library does report CUDA support, `on` is accepted instead."""
    from hpc_layerpar.comm import detect_cuda_aware, library_version
    data = make_dataset(tmp_path / "d.h5", n_train=64)
    base = ["train", "--preset", "digits-resnet-penalty", "--set", f"data.path={data}", "--set", "data.batch_size=16",
            "--set", "model.depth=8", "--set", "train.phases=penalty:2", "--set", "run.threads=1",
            "--set", f"run.out_dir={tmp_path}/runs"]
    p = run_cli(base + ["--set", "run.cuda_aware=on", "--set", "run.name=on"], n=2)
    if detect_cuda_aware():
        assert p.returncode == 0, p.stderr
    else:
        assert p.returncode == 2, p.stderr
        assert "run.cuda_aware=on" in p.stderr and library_version().split()[0] in p.stderr \
            and "run.cuda_aware=auto" in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not list((tmp_path / "runs").glob("*.h5")), "refused before any metrics file"
    p = run_cli(base + ["--set", "run.cuda_aware=force"], n=2)
    assert p.returncode == 0, p.stderr


@pytest.mark.spawns
def test_default_beta_is_3_up_to_4_stages_and_10_beyond(tmp_path):
    """parallel.beta=auto, the default: what a run uses (the metrics file's beta, the log) follows the
    number of pipeline stages, and a number given on the command line wins at any K."""
    data = make_dataset(tmp_path / "d.h5", n_train=64)
    base = ["train", "--preset", "digits-resnet-penalty", "--set", f"data.path={data}", "--set", "data.batch_size=16",
            "--set", "model.depth=14", "--set", "train.phases=penalty:1", "--set", "optim.warmup_epochs=0",
            "--set", "parallel.partition=macs", "--set", "parallel.micro_batches=1", "--set", "run.threads=1",
            "--set", "run.device=cpu", "--set", f"run.out_dir={tmp_path}/runs"]
    for name, k, extra, want in (("k2", 2, [], 3.0), ("k5", 5, [], 10.0), ("k5b", 5, ["parallel.beta=2"], 2.0)):
        p = run_cli(base + ["--set", f"run.name={name}", "--set", f"parallel.simulate={k}"]
                    + [x for e in extra for x in ("--set", e)], n=1)
        assert p.returncode == 0, p.stderr
        (f,) = (tmp_path / "runs").glob(f"{name}-2*.h5")
        assert list(read_metrics(str(f))["columns"]["beta"]) == [want], name
        assert f"beta {want:g} ({'auto' if not extra else '2'})" in p.stdout + p.stderr, name
