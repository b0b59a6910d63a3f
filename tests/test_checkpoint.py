"""Checkpoint and resume: an interrupted and resumed run ends with the same metrics and parameters
as an uninterrupted one (bitwise on CPU); a SIGKILLed rank leaves a readable metrics file and a
usable checkpoint; a checkpoint resumes at another rank count."""
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from hpc_layerpar.metrics import read_metrics

from conftest import DEVICE, ROOT, make_dataset, mpiexec_cmd, run_cli

pytestmark = pytest.mark.spawns

PHASES = "(penalty:3,serial:1)x3"
SAME = ["train_loss", "train_acc", "test_loss", "test_acc", "local_loss", "residual", "beta", "lr", "phase"]


def args(data, out, name, *extra):
    sets = [f"data.path={data}", "data.batch_size=16", "model.depth=8", f"train.phases={PHASES}",
            "parallel.beta=0.02", "parallel.partition=macs", "run.threads=1", f"run.out_dir={out}",
            # bitwise equality holds for one device type and thread count (README, "bitwise"): pin them;
            # HPL_TEST_DEVICE=cuda runs them on the GPU with deterministic kernels
            f"run.device={DEVICE.type}", *(["run.deterministic=true"] if DEVICE.type == "cuda" else []),
            f"run.name={name}", "run.checkpoint_every=0", *extra]
    return ["train", "--preset", "digits-resnet-penalty"] + [x for s in sets for x in ("--set", s)]


def final_model(ckpt_dir):
    with open(os.path.join(ckpt_dir, "latest")) as fh:
        latest = fh.read().strip()
    return torch.load(os.path.join(ckpt_dir, latest, "model.pt"), weights_only=True)


def assert_same_run(a_path, b_path, a_ckpt, b_ckpt):
    a, b = read_metrics(a_path)["columns"], read_metrics(b_path)["columns"]
    assert list(a["epoch"]) == list(b["epoch"]) == list(range(12)), "no epoch lost or written twice"
    for col in SAME:
        assert np.array_equal(a[col], b[col], equal_nan=a[col].dtype.kind == "f"), col
    ma, mb = final_model(a_ckpt), final_model(b_ckpt)
    for k in ma["model"]:
        assert torch.equal(ma["model"][k], mb["model"][k]), k
    assert all(torch.equal(x, y) for x, y in zip(ma["momentum"], mb["momentum"]))


def ref_and_cut(data, out, n, settings, stop) -> str:
    """The uninterrupted run "ref" and the run "cut" stopped by `stop` (settings that end it with exit
    code 75); returns cut's log."""
    p = run_cli(args(data, out, "ref", *settings), n=n)
    assert p.returncode == 0, p.stderr
    p = run_cli(args(data, out, "cut", *settings, *stop), n=n)
    assert p.returncode == 75, p.stdout + p.stderr
    return p.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (final checkpoint only)."""
    tmp = tmp_path_factory.mktemp("ref")
    data = make_dataset(tmp / "d.h5", n_train=256)
    p = run_cli(args(data, tmp / "runs", "ref", "run.checkpoint_every=12"), n=2)
    assert p.returncode == 0, p.stderr
    (path,) = (tmp / "runs").glob("ref-*.h5")
    return data, str(path), str(tmp / "runs" / "ref.ckpt")


def test_sigusr1_checkpoints_and_resume_equals_uninterrupted(reference, tmp_path):
    data, ref_path, ref_ckpt = reference
    out = tmp_path / "runs"
    cmd = mpiexec_cmd(2) + [sys.executable, "-m", "mpi4py", "-m", "hpc_layerpar"] + \
        args(data, out, "sig", "run.checkpoint_every=12")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch    2/12"):
            proc.send_signal(signal.SIGUSR1)  # mpiexec forwards it to every rank
    proc.wait(timeout=120)
    log = "".join(lines)
    assert proc.returncode == 75, (log, proc.stderr.read())
    # at the next in-epoch check (run.check_every, 10 of the 16 steps) or at the epoch's end
    found = re.search(r"stopped by a signal (?:after epoch (\d+);|in epoch (\d+) after)", log)
    assert found and "resume with --resume auto" in log, log
    start = int(found.group(1)) if found.group(1) else int(found.group(2)) - 1  # 0-based epoch to resume
    assert 2 <= start < 12
    (path,) = out.glob("sig-*.h5")
    assert read_metrics(str(path))["attrs"]["status"] == "checkpointed"
    p = run_cli(args(data, out, "sig", "run.checkpoint_every=12") + ["--resume", "auto"], n=2)
    assert p.returncode == 0, p.stderr
    assert "resumed from" in p.stdout and f"at epoch {start + 1}" in p.stdout
    m = read_metrics(str(path))
    assert m["attrs"]["status"] == "completed" and '"epoch": %d' % start in m["attrs"]["resumes"]
    assert_same_run(ref_path, str(path), ref_ckpt, str(out / "sig.ckpt"))


def test_sigkilled_rank_leaves_readable_metrics_and_usable_checkpoint(reference, tmp_path):
    data, ref_path, ref_ckpt = reference
    out = tmp_path / "runs"
    # epoch 5 (0-based) is the middle of the second penalty phase: resuming there starts a new engine
    # at the same split
    p = run_cli(args(data, out, "kill", "run.checkpoint_every=1", "debug.kill_rank=1", "debug.kill_epoch=6"), n=2)
    assert p.returncode != 0
    (path,) = out.glob("kill-*.h5")
    m = read_metrics(str(path))
    assert list(m["columns"]["epoch"]) == list(range(6)) and m["attrs"]["status"] == "running"
    with open(out / "kill.ckpt" / "latest") as fh:
        assert fh.read().strip() == "epoch-000005"
    p = run_cli(args(data, out, "kill", "run.checkpoint_every=1") + ["--resume", "auto"], n=2)
    assert p.returncode == 0, p.stderr
    assert_same_run(ref_path, str(path), ref_ckpt, str(out / "kill.ckpt"))


def test_resume_at_another_rank_count_continues_from_the_checkpoint(reference, tmp_path):
    data, ref_path, _ = reference
    out = tmp_path / "runs"
    p = run_cli(args(data, out, "k", "run.checkpoint_every=1", "debug.fail_rank=0", "debug.fail_epoch=5"), n=2)
    assert p.returncode != 0
    ckpt = out / "k.ckpt" / "epoch-000004"
    p = run_cli(args(data, out, "k") + ["--resume", str(ckpt)], n=3)
    assert p.returncode == 0, p.stderr
    assert "resumed from" in p.stdout and "at epoch 6" in p.stdout
    new = [f for f in out.glob("k-*.h5") if read_metrics(str(f))["attrs"]["world_size"] == 3]
    assert len(new) == 1
    m = read_metrics(str(new[0]))
    assert list(m["columns"]["epoch"]) == list(range(5, 12)) and m["attrs"]["continues"]
    # it continued from the checkpoint's weights: its first epoch trains about as well as the 2-rank
    # run's epoch 6 (another split: not bitwise), far better than a fresh start's first epoch
    ref = read_metrics(ref_path)["columns"]
    got, want, fresh = m["columns"]["train_loss"][0], ref["train_loss"][5], ref["train_loss"][0]
    assert abs(got - want) < 0.25 * want and got < 0.5 * fresh, (got, want, fresh)
    assert abs(m["columns"]["test_acc"][-1] - ref["test_acc"][-1]) < 0.1, (m["columns"]["test_acc"], ref["test_acc"])


def test_resume_keeps_the_curvature_guards_caps(tmp_path):
    """At a beta the guard caps, a resumed run uses the caps measured at the start, not caps measured
    again on the resumed weights (which differ): metrics and weights stay bitwise those of the
    uninterrupted run. (Before the caps were saved, beta_effective changed at the resume.)"""
    data = make_dataset(tmp_path / "d.h5", n_train=256)
    out = tmp_path / "runs"
    guard = ("parallel.beta=100", "train.phases=penalty:3,serial:1")
    ref_and_cut(data, out, 2, ("run.checkpoint_every=4", *guard), ("run.stop_after=1",))
    p = run_cli(args(data, out, "cut", "run.checkpoint_every=4", *guard) + ["--resume", "auto"], n=2)
    assert p.returncode == 0, p.stderr
    (ref,), (cut,) = out.glob("ref-*.h5"), out.glob("cut-*.h5")
    a, b = read_metrics(str(ref))["columns"], read_metrics(str(cut))["columns"]
    assert float(a["beta_effective"][0, 0]) < 100, "the guard caps boundary 1: else this test sees nothing"
    for col in ("beta_effective", "test_acc", "train_loss"):
        assert np.array_equal(a[col], b[col], equal_nan=True), col
    ma, mb = final_model(str(out / "ref.ckpt")), final_model(str(out / "cut.ckpt"))
    assert all(torch.equal(ma["model"][k], mb["model"][k]) for k in ma["model"])


def test_resume_refuses_changed_settings_and_a_dangling_latest(reference, tmp_path):
    """A resume compares the checkpoint's config with the launch: a changed DS factor or micro-batch
    count is refused before training, naming the keys; a `latest` that names no checkpoint is an
    error, not a silent fresh start; a missing one starts afresh and says so."""
    data, _, ref_ckpt = reference
    out = tmp_path / "runs"
    src = os.path.join(ref_ckpt, "epoch-000011")
    p = run_cli(args(data, out, "changed", "parallel.ds=2", "parallel.micro_batches=2") + ["--resume", src], n=1)
    msg = p.stderr + p.stdout
    assert p.returncode == 2 and "parallel.ds: 1 -> 2" in msg and "parallel.micro_batches: 0 -> 2" in msg, msg
    ckpt = out / "dangling.ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "latest").write_text("epoch-000003")
    p = run_cli(args(data, out, "dangling") + ["--resume", "auto"], n=1)
    assert p.returncode == 2 and "is not a complete checkpoint" in p.stderr + p.stdout, p.stderr
    p = run_cli(args(data, out, "fresh", "train.phases=penalty:2") + ["--resume", "auto"], n=1)
    assert p.returncode == 0 and "no checkpoint in" in p.stdout and "starting at epoch 1" in p.stdout, p.stderr


def test_al_resume_restores_the_multipliers_at_the_same_split(tmp_path):
    """A checkpoint inside an AL phase keeps each rank's multipliers: resumed at the same split the
    run is bitwise the uninterrupted one; at another rank count they restart at zero, and the log
    says which."""
    data = make_dataset(tmp_path / "d.h5", n_train=256)
    out = tmp_path / "runs"
    al = ("train.phases=al:4,serial:1", "parallel.al_rho=1.0", "run.checkpoint_every=1")
    ref_and_cut(data, out, 2, al, ("run.stop_after=2",))
    shutil.copytree(out / "cut.ckpt" / "epoch-000001", tmp_path / "at-epoch-2")
    p = run_cli(args(data, out, "cut", *al) + ["--resume", "auto"], n=2)
    assert p.returncode == 0 and "AL multipliers restored from the checkpoint" in p.stdout, p.stdout + p.stderr
    (ref,), (cut,) = out.glob("ref-*.h5"), out.glob("cut-*.h5")
    a, b = read_metrics(str(ref))["columns"], read_metrics(str(cut))["columns"]
    assert float(np.nanmax(a["multiplier_norm"][1])) > 0, "the multipliers are non-zero at the cut"
    for col in ("multiplier_norm", "residual", "train_loss", "test_acc"):
        assert np.array_equal(a[col], b[col], equal_nan=True), col
    p = run_cli(args(data, out, "k3", *al) + ["--resume", str(tmp_path / "at-epoch-2")], n=3)
    assert p.returncode == 0 and "AL multipliers restart at zero" in p.stdout, p.stdout + p.stderr


# (ranks, phases, epoch the stop request arrives in (0-based), run.check_every, M): inside a penalty
# phase, inside an AL phase at K = 3, in the first epoch of a phase, in the serial epoch that follows a
# parallel phase (its stage exchange was done before the stop). With M > 1 the stop falls inside a
# global batch on the downstream ranks (gradients of its first micro-batches held, not yet stepped).
# Then parallel.schedule=1f1b, whose adjoints of the tick after the stop are sent after it, not before;
# last, stashed weights (stage 0 holds a stashed micro-batch across the stop: its B recomputes at the copy).
MID_EPOCH = [(2, "(penalty:3,serial:1)x3", 5, 3, 2, "tick", ()), (3, "(al:3,serial:1)x3", 5, 3, 4, "tick", ()),
             (3, "(penalty:3,serial:1)x3", 4, 5, 1, "tick", ()), (2, "(penalty:3,serial:1)x3", 3, 6, 1, "tick", ()),
             (3, "(penalty:3,serial:1)x3", 4, 5, 1, "1f1b", ()),
             (3, "(penalty:3,serial:1)x3", 4, 5, 2, "1f1b", ("parallel.stash_weights=true",))]


@pytest.mark.parametrize("n,phases,epoch,check,micro,sch,more", MID_EPOCH)
def test_stop_inside_an_epoch_resumes_bitwise(tmp_path, n, phases, epoch, check, micro, sch, more):
    """A stop request inside an epoch takes effect at the next in-epoch check: every rank saves its
    state of the epoch in progress (the pipeline's micro-batches in flight, received messages,
    gradients, sums; or the serial phase's sums and BatchNorm statistics) and exits 75; the resumed
    run continues that epoch and ends bitwise equal to the uninterrupted run: every metric, weights,
    momentum. At another rank count such a checkpoint is refused with the remedy."""
    data = make_dataset(tmp_path / "d.h5", n_train=256)
    out = tmp_path / "runs"
    common = (f"train.phases={phases}", "run.checkpoint_every=12", f"run.check_every={check}",
              f"parallel.micro_batches={micro}", f"parallel.schedule={sch}", *more)
    log = ref_and_cut(data, out, n, common, ("debug.stop_rank=1", f"debug.stop_epoch={epoch}"))
    serial = epoch % 4 == 3  # (X:3,serial:1)x3
    late = n - 1 if sch == "1f1b" else 0  # 1f1b decides a check K-1 ticks after it is made
    done = f"{check} of 16 steps" if serial else f"{check * micro + late} of {16 * micro} micro-batches"
    assert f"stopped by a signal in epoch {epoch + 1} after {done}" in log, log
    ckpt = out / "cut.ckpt" / f"epoch-{epoch:06d}-part"
    assert (ckpt / "engine-rank0.pt").exists()
    other = run_cli(args(data, out, "cut", *common) + ["--resume", str(ckpt)], n=n - 1)
    assert other.returncode == 2 and f"resumes only at {n}" in other.stderr + other.stdout, other.stderr
    p = run_cli(args(data, out, "cut", *common) + ["--resume", "auto"], n=n)
    assert p.returncode == 0, p.stderr
    assert f"at epoch {epoch + 1} after {done.replace(' of ', ' of its ')}" in p.stdout, p.stdout
    (ref,), (cut,) = out.glob("ref-*.h5"), out.glob("cut-*.h5")
    a, b = read_metrics(str(ref))["columns"], read_metrics(str(cut))["columns"]
    assert list(b["epoch"]) == list(range(12)), "no epoch lost or written twice"
    for col in SAME + ["consistency", "grad_cosine", "grad_norm_ratio", "multiplier_norm"]:
        assert np.array_equal(a[col], b[col], equal_nan=a[col].dtype.kind == "f"), col
    ma, mb = final_model(str(out / "ref.ckpt")), final_model(str(out / "cut.ckpt"))
    assert all(torch.equal(ma["model"][k], mb["model"][k]) for k in ma["model"])
    assert all(torch.equal(x, y) for x, y in zip(ma["momentum"], mb["momentum"]))


def test_resume_compares_numbers_by_value():
    """parallel.beta is auto or a number written as text: a checkpoint written with beta 3.0 (before
    beta took auto) resumes with --set parallel.beta=3, while auto against 3 is a change."""
    from hpc_layerpar.checkpoint import config_changes

    saved = {"parallel": {"beta": 3.0, "ds": 1}}
    assert config_changes(saved, {"parallel": {"beta": "3", "ds": 1}}) == []
    assert config_changes({"parallel": {"beta": "3.0", "ds": 1}}, {"parallel": {"beta": "3", "ds": 1}}) == []
    assert config_changes(saved, {"parallel": {"beta": "auto", "ds": 1}}) == ["parallel.beta: 3.0 -> 'auto'"]
    assert config_changes(saved, {"parallel": {"beta": "3", "ds": 2}}) == ["parallel.ds: 1 -> 2"]
