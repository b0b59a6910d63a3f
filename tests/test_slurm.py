"""Generated batch jobs on a real single-node SLURM cluster (tools/local-slurm.sh starts one where
it can: root and apt-get; otherwise these tests are skipped with the reason)."""
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from hpc_layerpar.metrics import read_metrics

from conftest import ROOT, make_dataset

pytestmark = pytest.mark.spawns
SCRIPT = os.path.join(ROOT, "tools", "local-slurm.sh")
SAME = ["train_loss", "train_acc", "test_loss", "test_acc", "local_loss", "residual", "lr", "phase"]


def _responds():
    return shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True,
                                                    timeout=20).returncode == 0


@pytest.fixture(scope="module")
def slurm():
    started = False
    if not _responds():
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("no SLURM cluster answers here, and tools/local-slurm.sh needs root and apt-get "
                        "to install one")
        p = subprocess.run(["bash", SCRIPT, "start"], capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            if os.environ.get("CI"):  # CI runs as root with apt: a failed start is a failure, not a skip
                pytest.fail(f"tools/local-slurm.sh start failed in CI: {p.stderr[-3000:]}")
            pytest.skip(f"tools/local-slurm.sh start failed: {p.stderr[-1500:]}")
        started = True
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONPATH=ROOT, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    yield env
    if started and not os.environ.get("HPC_LAYERPAR_KEEP_SLURM"):
        subprocess.run(["bash", SCRIPT, "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    work = tmp_path_factory.mktemp("slurmwork")
    data = make_dataset(work / "d.h5", n_train=256)
    (work / "site.yaml").write_text(f"python: {sys.executable}\nworkdir: {work}\ntime: '00:10:00'\n"
                                    "checkpoint_every: 0\n")
    return work, data


def generate(work, data, env, launcher="srun", seed=0, extra=()):
    sets = [f"data.path={data}", "data.batch_size=16", "model.depth=8", "train.phases=(penalty:3,serial:1)x3",
            "parallel.beta=0.02", "parallel.partition=macs", *extra]
    cmd = [sys.executable, "-m", "slurm.generate", "--site", str(work / "site.yaml"), "--methods", "penalty",
           "--ranks", "2", "--seeds", str(seed), "--launcher", launcher, "--out", str(work / "jobs")]
    p = subprocess.run(cmd + [x for s in sets for x in ("--set", s)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    (path,) = [ln for ln in p.stdout.split() if ln.endswith(".sbatch") and f"-s{seed}" in ln]
    return path


def submit(path, env, cwd):
    p = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True, env=env, cwd=cwd)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def wait(job, env, timeout=240):
    return subprocess.run(["bash", SCRIPT, "wait", job, str(timeout)], env=env, timeout=timeout + 30).returncode


def metrics_of(work, job):
    (path,) = (work / "runs").glob(f"*-j{job}.h5")
    return str(path)


def log_of(work, job):
    (path,) = (work / "logs").glob(f"*-{job}.out")
    return path.read_text()


@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_generated_job_completes_and_its_metrics_check_out(slurm, site, launcher):
    work, data = site
    job = submit(generate(work, data, slurm, launcher, seed=0 if launcher == "srun" else 1), slurm, work)
    rc = wait(job, slurm)
    assert rc == 0, log_of(work, job)
    m = read_metrics(metrics_of(work, job))
    assert m["attrs"]["status"] == "completed" and m["attrs"]["slurm_job_id"] == job
    assert m["attrs"]["world_size"] == 2 and list(m["columns"]["epoch"]) == list(range(12))
    assert m["config"]["run"]["name"] == f"hpl-digits-resnet-penalty-k2-s{0 if launcher == 'srun' else 1}"


def test_signalled_job_checkpoints_requeues_and_ends_like_an_uninterrupted_one(slurm, site):
    """SIGUSR1 at a random moment after epoch 2: with run.check_every=1 the job stops after the step
    it is in (mid-epoch, or at an epoch's end), checkpoints, is requeued, resumes and ends bitwise
    like the uninterrupted job."""
    work, data = site
    script = generate(work, data, slurm, "srun", seed=2, extra=("run.check_every=1",))
    ref = submit(script, slurm, work)
    assert wait(ref, slurm) == 0, log_of(work, ref)
    job = submit(script, slurm, work)
    deadline = time.time() + 120
    while "epoch    2/12" not in (log_of(work, job) if list((work / "logs").glob(f"*-{job}.out")) else ""):
        assert time.time() < deadline, "the job did not reach epoch 2"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.0))  # an epoch of this job takes about 0.1-0.3 s: any step
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env=slurm)
    assert wait(job, slurm) == 0, log_of(work, job)
    log = log_of(work, job)
    assert "stopped by a signal" in log and "requeueing job" in log, log
    print([ln for ln in log.splitlines() if "stopped by a signal" in ln])  # where it stopped (pytest -s)
    assert "restart count 1" in log and "resumed from" in log, log
    a = read_metrics(metrics_of(work, ref))["columns"]
    m = read_metrics(metrics_of(work, job))
    b = m["columns"]
    assert list(b["epoch"]) == list(range(12)), "no epoch lost or written twice"
    assert m["attrs"]["status"] == "completed" and "resumes" in m["attrs"]
    for col in SAME:
        assert np.array_equal(a[col], b[col], equal_nan=a[col].dtype.kind == "f"), col
