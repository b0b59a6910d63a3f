"""The shipped presets: overrides on the defaults of config.py, named dataset-architecture-method[-ds2]
(`hpc_layerpar presets` lists them)."""
from __future__ import annotations

# Presets are overrides on the defaults; names read dataset-architecture-method[-ds2].
_DATASETS = {
    "digits": {"data": {"path": "data/digits.h5", "batch_size": 64, "eval_batch_size": 512},
               "optim": {"lr": 0.05, "warmup_epochs": 1}, "epochs": 30},
    "mnist": {"data": {"path": "data/mnist.h5", "batch_size": 128},
              "optim": {"lr": 0.1, "warmup_epochs": 1}, "epochs": 20},
    "fashion": {"data": {"path": "data/fashion.h5", "batch_size": 128},
                "optim": {"lr": 0.1, "warmup_epochs": 1}, "epochs": 20},
    "cifar10": {"data": {"path": "data/cifar10.h5", "batch_size": 128},
                "optim": {"lr": 0.1, "warmup_epochs": 2}, "epochs": 160},
    "cifar100": {"data": {"path": "data/cifar100.h5", "batch_size": 128},
                 "optim": {"lr": 0.1, "warmup_epochs": 2}, "epochs": 200},
}
_MODELS = {"resnet": {"arch": "resnet", "depth": 20}, "resnet56": {"arch": "resnet", "depth": 56},
           "wrn28-10": {"arch": "wrn", "depth": 28, "width": 10}}
_PAIRS = [("digits", "resnet"), ("mnist", "resnet"), ("fashion", "resnet"), ("cifar10", "resnet56"),
          ("cifar10", "wrn28-10"), ("cifar100", "resnet56"), ("cifar100", "wrn28-10")]
# SPH: the parallel phase first, then the serial correction (80% of the epochs parallel), as the
# paper describes the hybrid. No per-dataset penalty weight: the per-element beta and the curvature
# guard carry over between datasets and models. AL keeps beta = 1, where it was measured: its multiplier
# step grows with beta, and the default (auto: 3 up to 4 stages, 10 beyond) was measured for the penalty only.
_PARALLEL = {"penalty": {}, "al": {"beta": 1.0}}


def _make_presets() -> dict:
    """Every dataset x model pair: serial, and penalty / AL with and without the DS s = 2 filter."""
    out = {}
    for ds, mname in _PAIRS:
        d, m = _DATASETS[ds], _MODELS[mname]
        epochs = d["epochs"]
        base = {"data": dict(d["data"]), "model": dict(m),
                "optim": {"weight_decay": 5e-4, "schedule": "cosine", **d["optim"]}}
        out[f"{ds}-{mname}-serial"] = {**base, "train": {"phases": f"serial:{epochs}"}}
        serial = epochs // 5
        for method, par in _PARALLEL.items():
            for s in (1, 2):
                name = f"{ds}-{mname}-{method}" + ("-ds2" if s == 2 else "")
                out[name] = {**base, "train": {"phases": f"{method}:{epochs - serial},serial:{serial}"},
                             "parallel": {**par, "ds": s}}
    return out


PRESETS: dict[str, dict] = _make_presets()


def describe_presets() -> str:
    """One line per preset: model, data file, phases, DS factor."""
    lines = []
    for name in sorted(PRESETS):
        p = PRESETS[name]
        ds = p.get("parallel", {}).get("ds", 1)
        lines.append(f"{name:32s} {p['model']['arch']}-{p['model']['depth']}"
                     f"{'-' + str(p['model'].get('width')) if p['model'].get('width') else ''}"
                     f"  data={p['data']['path']}  phases={p['train']['phases']}"
                     + (f"  ds={ds}" if "parallel" in p else ""))
    return "\n".join(lines)
