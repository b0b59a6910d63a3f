import pytest

from hpc_layerpar.config import PRESETS, ConfigError, from_dict, resolve

from conftest import run_cli


def test_every_preset_resolves():
    for name in PRESETS:
        cfg = resolve(name)
        assert cfg.run.name == name


def test_layering_preset_file_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.2\n  momentum: 0.8\nrun:\n  progress: off\n")
    cfg = resolve("digits-resnet-serial", str(f), ["optim.lr=0.3", "optim.milestones=[2,4]",
                                                   "train.phases=serial:5", "data.augment=false"])
    assert cfg.optim.lr == 0.3 and cfg.optim.momentum == 0.8 and cfg.run.progress == "off"
    assert cfg.optim.milestones == (2.0, 4.0) and cfg.train.phases == "serial:5"
    assert cfg.data.augment is False and cfg.data.batch_size == PRESETS["digits-resnet-serial"]["data"]["batch_size"]
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("sets,match", [
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr'. Did you mean 'lr'"),
    (["optimm.lr=0.1"], "unknown config section 'optimm'. Did you mean 'optim'"),
    (["optim.lr=fast"], "optim.lr='fast' is not a number"),
    (["optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
    (["data.batch_size=0"], "data.batch_size=0 must be > 0"),
    (["data.batch_size=1.5"], "not an integer"),
    (["model.depth=21"], "model.depth=21 is not a CIFAR ResNet depth 6n\\+2"),
    (["model.arch=vgg"], "model.arch='vgg' is not one of resnet, wrn"),
    (["model.width=4"], "applies to arch=wrn only"),
    (["train.phases=serial:0"], "epochs >= 1"),
    (["run.device=gpu"], "run.device='gpu' is not auto, cpu, cuda or cuda:N"),
    (["run.precision=fp16"], "run.precision='fp16' is not one of fp32, bf16"),
    (["run.cuda_aware=yes"], "run.cuda_aware='yes' is not one of auto, on, off, force"),
    (["optim.schedule=step"], "needs optim.milestones"),
    (["optim.momentum=0", "optim.nesterov=true"], "nesterov=true needs optim.momentum > 0"),
    (["data.augment=maybe"], "is not a boolean"),
    (["noequals"], "section.key=value"),
    (["parallel.coupling=async"], "parallel.coupling='async' is not one of pipeline\\."),
    (["parallel.coupling=epoch"], "parallel.coupling='epoch': version 1's epoch coupling \\(parallel.coupling=epoch\\) "
                                  "was removed; its record is docs/ALGORITHM.md s.4b and s.10. Use "
                                  "parallel.coupling=pipeline"),
    (["parallel.window=4"], "config key 'parallel.window' .* was removed with the epoch coupling: .*"
                            "docs/ALGORITHM.md s.4b and s.10. Delete the key"),
    (["parallel.micro_batches=3"], "divisible by parallel.replicas x parallel.micro_batches"),
    (["data.drop_last=false", "parallel.replicas=2", "train.phases=penalty:2,serial:1"],
     "data.drop_last=false with parallel.replicas=2: the replicas of a parallel phase take equal full"),
    (["parallel.beta_guard=maybe"], "is not one of auto, refuse, off"),
    (["parallel.al_rho=0"], "parallel.al_rho=0.0 must lie in \\(0, 1\\]"),
    (["parallel.beta=stiff"], "parallel.beta='stiff' is not a number or auto; give e.g. parallel.beta=3"),
    (["parallel.beta=-1"], "parallel.beta='-1' must be a finite number >= 0, or auto"),
    (["parallel.beta=nan"], "parallel.beta='nan' must be a finite number >= 0"),
    (["parallel.beta_max=5"], "parallel.beta_max=5.0 must be >= parallel.beta=auto \\(auto: up to 10\\)"),
    (["data.subset=-5"], "data.subset=-5 must be >= 0"),
    (["train.phases=idle:3"], "is not one of serial, penalty, al, skip"),
])
def test_bad_values_name_value_and_remedy(sets, match):
    with pytest.raises(ConfigError, match=match):
        resolve("digits-resnet-serial", None, sets)


def test_removed_epoch_coupling_keys_in_a_config_file_are_named(tmp_path):
    """An old config file (or a metrics file's stored config) that carries the epoch coupling's keys
    gets an error naming the key and saying why it went, not 'unknown key'."""
    for key, value in (("eta", 0.5), ("refresh_every", 2), ("window", 4)):
        f = tmp_path / f"{key}.yaml"
        f.write_text(f"parallel:\n  coupling: pipeline\n  {key}: {value}\n")
        with pytest.raises(ConfigError, match=f"config key 'parallel.{key}' .* was removed with the epoch coupling"):
            resolve("digits-resnet-serial", str(f))
    old = resolve("digits-resnet-penalty").to_dict()
    old["parallel"]["coupling"] = "epoch"
    with pytest.raises(ConfigError, match="epoch coupling .* was removed"):
        from_dict(old)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="unknown preset 'digits-resnet-seriall'. Did you mean"):
        resolve("digits-resnet-seriall")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(None, "/nonexistent.yaml")


@pytest.mark.spawns
def test_bad_config_exits_nonzero_on_every_rank_before_training():
    p = run_cli(["train", "--preset", "digits-resnet-serial", "--set", "optim.lrr=0.1"], n=2, timeout=120)
    assert p.returncode != 0
    assert "unknown config key 'optim.lrr'" in p.stderr
    assert "epoch" not in p.stdout


@pytest.mark.spawns
def test_missing_dataset_is_a_clear_error(tmp_path):
    p = run_cli(["train", "--preset", "digits-resnet-serial", "--set", f"data.path={tmp_path}/nope.h5",
                 "--set", f"run.out_dir={tmp_path}"], n=2, timeout=120)
    assert p.returncode != 0
    assert "does not exist" in p.stderr and "data_prep" in p.stderr
    assert not list(tmp_path.glob("*.h5")), "no metrics file for a run that never started"


def test_auto_micro_batches_grow_with_k_and_keep_batchnorm_statistics_over_768_values():
    from hpc_layerpar.config import ParallelConfig
    from hpc_layerpar.schedule import micro_batches

    auto = ParallelConfig()
    for k in (2, 3, 4):  # the cap is 4 up to K = 4
        assert micro_batches(auto, 128, 7 * 7, k) == 4   # MNIST, Fashion-MNIST: 32 x 49 >= 768
        assert micro_batches(auto, 128, 8 * 8, k) == 4   # CIFAR
    assert micro_batches(auto, 128, 7 * 7, 8) == 8       # 16 x 49 = 784 >= 768: half the delay at K = 8
    assert micro_batches(auto, 128, 7 * 7, 16) == 8      # 16 would leave 8 x 49 < 768
    assert micro_batches(auto, 128, 8 * 8, 16) == 8      # 16 x 64 = 1024; 8 x 64 is too few
    for k in (2, 4, 8):
        assert micro_batches(auto, 64, 2 * 2, k) == 1    # 8x8 digits: 2x2 maps at the end
    assert micro_batches(auto, 80, 7 * 7, 2) == 4        # 20 x 49 = 980; 3 does not divide 80
    assert micro_batches(auto, 96, 7 * 7, 8) == 6        # 8 does not divide 96; 6 leaves 16 x 49
    assert micro_batches(ParallelConfig(micro_batches=2), 64, 1, 8) == 2   # as configured
    assert micro_batches(ParallelConfig(replicas=2), 128, 7 * 7, 8) == 4   # 64 per replica: 16 x 49


def test_presets_run_the_parallel_phase_first_and_use_the_defaults():
    for name, tree in PRESETS.items():
        if name.endswith(("-penalty", "-al", "-ds2")):
            # no per-dataset penalty weight: the penalty takes the default, AL one weight everywhere
            assert tree.get("parallel", {}).get("beta") == (1.0 if "-al" in name else None), name
            cfg = resolve(name)
            method, serial = cfg.train.phases.split(",")
            assert serial.startswith("serial:") and not method.startswith("(")
