"""The automatic micro-batch count that knows the device (parallel.micro_measure): the pure choice
from timed candidates, the run that trains at the timed M, and the real timing on this CPU."""
import json

import numpy as np
import pytest

from hpc_layerpar import runsetup
from hpc_layerpar.config import ConfigError, resolve
from hpc_layerpar.metrics import read_metrics
from hpc_layerpar.schedule import least_micro, timed_micro

from conftest import make_dataset, run_cli

# ResNet-56, captured bf16 graphs on an H100 (docs/gpu-h100/gpu-role.log): forward + backward of
# the 29 elements at micro-batch 128 and at 32, microseconds
H100_FB128 = [138, 379, 379, 377, 379, 379, 379, 379, 379, 379, 325, 237, 237, 236, 237, 236, 236, 236, 236, 255,
              177, 177, 176, 175, 176, 175, 173, 177, 83]
H100_FB32 = [72, 188, 188, 190, 189, 190, 190, 190, 191, 190, 212, 161, 160, 161, 160, 159, 159, 159, 160, 166,
             135, 135, 134, 134, 135, 135, 134, 134, 69]


def test_the_timed_choice_keeps_the_gpu_busy_and_the_cpu_rule():
    # on the H100, four micro-batches of 32 cost 2.44 x one batch of 128: M = 1
    assert timed_micro({1: sum(H100_FB128), 4: 4 * sum(H100_FB32)}, 0.25) == 1
    assert timed_micro({1: sum(H100_FB128), 4: 4 * sum(H100_FB32)}, 1.5) == 4
    # a device that costs each sample its share (a CPU at one thread): the largest candidate
    assert timed_micro({1: 1.0, 2: 1.02, 4: 1.08}, 0.25) == 4
    # in between: the largest within the bound, even if a larger one is cheaper than a smaller one
    assert timed_micro({1: 1.0, 2: 1.2, 4: 2.4}, 0.25) == 2
    assert timed_micro({1: 1.0, 2: 1.3, 4: 1.2}, 0.25) == 4
    assert timed_micro({1: 1.0}, 0.0) == 1


def test_the_timed_choice_keeps_the_delay_trainable():
    """Stage 0 updates 2(K-1)/M optimizer steps after its forward. At K = 8 and M = 1 (14 steps) the
    Fashion-MNIST runs diverged in the warm-up epoch (RESULTS.md); at K = 4 (6 steps) they trained.
    With micro_max_delay = 6 the timed M on the H100 costs is therefore 1 at K = 4 and 4 at K = 8."""
    assert least_micro([1, 2, 4], 4, 6) == 1
    assert least_micro([1, 2, 4, 8], 8, 6) == 4       # 14 / 4 = 3.5 steps; 14 / 2 = 7 > 6
    assert least_micro([1, 2, 4], 4, 2) == 4          # 6 / 4 = 1.5 steps; 6 / 2 = 3 > 2
    assert least_micro([1, 2], 8, 6) == 2             # none is short enough: the largest
    assert least_micro([1, 2, 4, 8], 8, 6, "1f1b") == 2  # 1f1b halves the delay: 7 / 2 = 3.5 steps; 7 / 1 > 6
    assert least_micro([1, 2, 4], 4, 2, "1f1b") == 2  # 3 / 2 = 1.5 steps; 3 / 1 = 3 > 2
    h100 = {1: sum(H100_FB128), 4: 4 * sum(H100_FB32)}
    assert timed_micro(h100, 0.25, least_micro([1, 2, 4], 4, 6)) == 1
    assert timed_micro(h100, 0.25, least_micro([1, 2, 4, 8], 8, 6)) == 4


def test_micro_measure_and_overhead_are_checked():
    with pytest.raises(ConfigError, match="parallel.micro_measure='gpu' is not one of auto, on, off"):
        resolve("mnist-resnet-penalty", sets=["parallel.micro_measure=gpu"])
    for bad in ("-0.1", "nan", "inf"):
        with pytest.raises(ConfigError, match=f"parallel.micro_overhead={bad} must be a number >= 0"):
            resolve("mnist-resnet-penalty", sets=[f"parallel.micro_overhead={bad}"])
    for bad in ("0", "nan", "inf"):
        with pytest.raises(ConfigError, match=f"parallel.micro_max_delay={bad}.* must be a number > 0"):
            resolve("mnist-resnet-penalty", sets=[f"parallel.micro_max_delay={bad}"])


def _cfg(tmp_path, data, name, *sets, ranks=2):
    return resolve("mnist-resnet-penalty", sets=[
        f"data.path={data}", "data.batch_size=64", "model.depth=8", "model.base_width=4", "train.phases=penalty:1",
        "optim.warmup_epochs=0", "parallel.partition=macs", f"parallel.simulate={ranks}", "run.threads=1",
        "run.device=cpu", f"run.out_dir={tmp_path}/runs", f"run.name={name}", "data.augment=false", *sets])


def _fixed_cost(fixed_us, seen):
    """A device where every element costs fixed_us per call plus 1 us per sample (a GPU, when fixed_us
    is large against the batch): what runsetup.measure_costs would time there. seen: the batch sizes."""
    def measure(model, batch_size, device, reps=4, graphs=False, forward=False):
        seen.add(batch_size)
        return [fixed_us + batch_size] * len(model)
    return measure


# (fixed cost, replicas, the timed M, another M, the batch sizes timed, the delay cap); K = 2 stages x R
# replicas on the tick schedule, so stage 0 is 2 / M steps behind: a cap of 1 step makes M = 2 the least
TIMED = [(100, 1, 1, 4, {64, 32, 16}, 6), (0, 1, 4, 1, {64, 32, 16}, 6), (100, 2, 1, 2, {32, 16}, 6),
         (100, 1, 2, 1, {64, 32, 16}, 1)]


@pytest.mark.parametrize("fixed_us, replicas, expect, other_m, batches, cap", TIMED)
def test_the_run_trains_at_the_timed_micro_batch_count(tmp_path, monkeypatch, fixed_us, replicas, expect, other_m,
                                                       batches, cap):
    """28x28 images at batch 64: the BatchNorm rule allows M = 1, 2, 4 (1, 2 for a replica's 32). With a
    per-call cost of 100 us against 1 us per sample, 2 micro-batches cost 1.6 x one batch: the timed M
    is 1; with none it is the largest. The run times a replica's batch, records the timings and trains
    exactly as the run given that M (the engine takes set-up's M, not its own), and differently from
    another M. parallel.micro_measure=auto times nothing here (a CPU, and simulated)."""
    from hpc_layerpar.train import run

    data = make_dataset(tmp_path / "d.h5", n_train=256, n_test=64, size=28, classes=4)
    seen = set()
    monkeypatch.setattr(runsetup, "measure_costs", _fixed_cost(fixed_us, seen))
    n, rep = 2 * replicas, f"parallel.replicas={replicas}"

    def metrics(name, *sets):
        return read_metrics(run(_cfg(tmp_path, data, name, rep, "parallel.schedule=tick", *sets, ranks=n),
                                quiet=True).metrics_path)

    timed = metrics("timed", "parallel.micro_measure=on", f"parallel.micro_max_delay={cap}")
    assert seen == batches and timed["attrs"]["micro_batches"] == expect
    seconds = {int(m): t for m, t in json.loads(timed["attrs"]["micro_seconds"])}
    assert sorted(seconds) == sorted(64 // replicas // b for b in batches)
    assert timed_micro(seconds, 0.25, least_micro(sorted(seconds), 2, cap)) == expect
    auto = metrics("auto")
    assert auto["attrs"]["micro_seconds"] == "[]" and auto["attrs"]["micro_batches"] == 4 // replicas
    monkeypatch.undo()
    same = metrics("same", f"parallel.micro_batches={expect}")
    other = metrics("other", f"parallel.micro_batches={other_m}")
    assert same["attrs"]["micro_seconds"] == "[]" and same["attrs"]["micro_batches"] == expect
    for col in ("train_loss", "local_loss", "residual", "test_acc"):
        assert np.array_equal(timed["columns"][col], same["columns"][col], equal_nan=True), col
    assert not np.array_equal(timed["columns"]["local_loss"], other["columns"]["local_loss"])


def test_the_automatic_micro_batches_timed_on_this_cpu_and_kept_on_resume(tmp_path):
    """No stand-in: parallel.micro_measure=on times the candidates on this CPU under mpiexec. The log
    says what was timed and chosen, the metrics file holds the figures, the chosen M is the rule's
    pick from them, and a resume takes the M from the checkpoint instead of timing again."""
    data = make_dataset(tmp_path / "d.h5", n_train=256, n_test=64, size=28, classes=4)
    base = ["train", "--preset", "mnist-resnet-penalty", "--set", f"data.path={data}", "--set", "data.batch_size=64",
            "--set", "model.depth=8", "--set", "model.base_width=4", "--set", "train.phases=penalty:2",
            "--set", "run.threads=1", "--set", "run.device=cpu", "--set", f"run.out_dir={tmp_path}/runs",
            "--set", "run.name=cpu", "--set", "parallel.micro_measure=on"]
    first = run_cli(base + ["--set", "run.stop_after=1"], n=2)
    assert first.returncode == 75, first.stdout + first.stderr
    assert "automatic micro-batches timed on cpu" in first.stdout
    (path,) = (tmp_path / "runs").glob("cpu-*.h5")
    m = read_metrics(str(path))
    seconds = {int(k): t for k, t in json.loads(m["attrs"]["micro_seconds"])}
    assert sorted(seconds) == [1, 2, 4] and all(t > 0 for t in seconds.values())
    assert m["attrs"]["micro_batches"] == timed_micro(seconds, 0.25)
    again = run_cli(base + ["--resume", "auto"], n=2)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "automatic micro-batches timed" not in again.stdout
    assert read_metrics(str(path))["attrs"]["micro_batches"] == m["attrs"]["micro_batches"]
