"""Write SLURM batch scripts for a sweep: dataset x method x ranks x seed.

    python -m slurm.generate --datasets digits --methods serial,penalty --ranks 2,4 --seeds 0,1,2 \\
        [--site slurm/site.yaml] [--launcher srun|mpirun|mpiexec] [--out jobs] [--set k=v ...] [--submit]

Job names encode the parameters (hpl-DATASET-MODEL-METHOD[-dsS]-kK-sSEED) and are also the run
names, so metrics files, checkpoints and logs can be told apart. `serial` on K > 1 ranks is the
data-parallel baseline. Everything site-specific comes from the site file."""
from __future__ import annotations

import argparse
import itertools
import os
import shlex
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = {"digits": "resnet", "mnist": "resnet", "cifar10": "resnet56", "cifar100": "resnet56"}
# srun --kill-on-bad-exit: a rank that dies takes the whole step down instead of leaving its peers waiting
LAUNCHERS = {"srun": "srun --kill-on-bad-exit=1", "mpirun": "mpirun -n $SLURM_NTASKS",
             "mpiexec": "mpiexec -n $SLURM_NTASKS"}
SITE_KEYS = {"partition", "account", "nodes", "tasks_per_node", "cpus_per_task", "gpus_per_task", "time",
             "signal_lead_s", "checkpoint_every", "launcher", "launcher_args", "python", "workdir", "setup",
             "env"}


class GenerateError(ValueError):
    """A bad site file or job request; the message says what to change."""


def load_site(path: str) -> dict:
    try:
        with open(path) as fh:
            site = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise GenerateError(f"site file {path}: {exc}; copy slurm/site.yaml and edit it") from None
    unknown = set(site) - SITE_KEYS
    if unknown:
        raise GenerateError(f"site file {path}: unknown keys {sorted(unknown)}; valid: {sorted(SITE_KEYS)}")
    with open(os.path.join(HERE, "site.yaml")) as fh:
        defaults = yaml.safe_load(fh)
    return {**defaults, **site}


def preset_name(dataset: str, model: str, method: str, ds: int) -> str:
    base = "serial" if method == "serial" else method
    return f"{dataset}-{model}-{base}" + ("-ds2" if ds == 2 else "")


def render(site: dict, *, dataset: str, model: str, method: str, ranks: int, seed: int, ds: int,
           sets: list, site_path: str) -> tuple[str, str]:
    from hpc_layerpar.config import PRESETS

    preset = preset_name(dataset, model, method, ds)
    if preset not in PRESETS:
        raise GenerateError(f"no preset {preset!r} (dataset {dataset}, model {model}, method {method}, "
                            f"ds {ds}); see `python -m hpc_layerpar presets`")
    if site["launcher"] not in LAUNCHERS:
        raise GenerateError(f"site launcher {site['launcher']!r} is not one of {', '.join(LAUNCHERS)}")
    if ranks < 1 or ranks % max(site["nodes"], 1):
        raise GenerateError(f"{ranks} ranks do not spread evenly over {site['nodes']} nodes; "
                            "change --ranks or the site's nodes")
    name = f"hpl-{dataset}-{model}-{method}" + (f"-ds{ds}" if ds > 1 else "") + f"-k{ranks}-s{seed}"
    workdir = os.path.abspath(site["workdir"]) if site["workdir"] == "." else site["workdir"]
    all_sets = [f"train.seed={seed}"] + list(sets)
    tpn = site["tasks_per_node"]
    with open(os.path.join(HERE, "job.sbatch.in")) as fh:
        template = fh.read()
    text = template.format(
        job_name=name, nodes=site["nodes"], ntasks=ranks, cpus_per_task=site["cpus_per_task"],
        tasks_per_node_line=f"#SBATCH --ntasks-per-node={tpn}\n" if tpn else "",
        gpus_line=f"#SBATCH --gpus-per-task={site['gpus_per_task']}\n" if site["gpus_per_task"] else "",
        partition_line=f"#SBATCH --partition={site['partition']}\n" if site["partition"] else "",
        account_line=f"#SBATCH --account={site['account']}\n" if site["account"] else "",
        time=site["time"], log_dir=os.path.join(workdir, "logs"), signal_lead_s=site["signal_lead_s"],
        site=site_path, description=f"{dataset} {model} {method} ds={ds} K={ranks} seed={seed}",
        setup="\n".join(site["setup"]), workdir=shlex.quote(workdir),
        env="\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in (site["env"] or {}).items()),
        launcher=(LAUNCHERS[site["launcher"]] + (" " + site["launcher_args"] if site["launcher_args"] else "")),
        launcher_kind=site["launcher"], python=site["python"], preset=preset, out_dir="runs",
        checkpoint_every=site["checkpoint_every"],
        sets="".join(f" \\\n    --set {shlex.quote(s)}" for s in all_sets))
    return name, text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slurm.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--site", default=os.path.join(HERE, "site.yaml"))
    ap.add_argument("--datasets", default="digits")
    ap.add_argument("--model", default="", help="resnet | resnet56 | wrn28-10 (default: by dataset)")
    ap.add_argument("--methods", default="serial,penalty,al")
    ap.add_argument("--ds", default="1", help="DS factors for penalty/al, e.g. 1,2")
    ap.add_argument("--ranks", default="2")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--launcher", choices=sorted(LAUNCHERS), help="override the site's launcher")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="passed to every run")
    ap.add_argument("--out", default="jobs")
    ap.add_argument("--submit", action="store_true", help="sbatch every script and print the job ids")
    a = ap.parse_args(argv)
    try:
        site = load_site(a.site)
        if a.launcher:
            site["launcher"] = a.launcher
        os.makedirs(a.out, exist_ok=True)
        os.makedirs(os.path.join(os.path.abspath(site["workdir"]), "logs"), exist_ok=True)
        written = []
        for dataset, method, ranks, seed, ds in itertools.product(
                a.datasets.split(","), a.methods.split(","), [int(k) for k in a.ranks.split(",")],
                [int(s) for s in a.seeds.split(",")], [int(d) for d in a.ds.split(",")]):
            if method == "serial" and ds != 1:
                continue
            model = a.model or DEFAULT_MODEL[dataset]
            name, text = render(site, dataset=dataset, model=model, method=method, ranks=ranks, seed=seed,
                                ds=ds, sets=a.sets, site_path=a.site)
            path = os.path.join(a.out, name + ".sbatch")
            with open(path, "w") as fh:
                fh.write(text)
            os.chmod(path, 0o755)
            written.append(path)
    except GenerateError as exc:
        sys.stderr.write(f"slurm.generate: error: {exc}\n")
        return 2
    for path in written:
        if a.submit:
            p = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
            if p.returncode != 0:
                sys.stderr.write(f"sbatch {path} failed: {p.stderr}")
                return 1
            print(f"{p.stdout.strip()} {path}")
        else:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
