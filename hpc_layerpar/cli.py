"""Command line: `python -m mpi4py -m hpc_layerpar train --preset NAME [--set k=v ...]`."""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .comm import abort_job, world_rank
from .config import ConfigError, resolve
from .dataformat import DataError
from .presets import describe_presets

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that prints usage errors on rank 0 only (every rank still exits with 2)."""

    def error(self, message):
        if world_rank() == 0:
            self.print_usage(sys.stderr)
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the train, presets, plan, report and summary subcommands (usage errors on rank 0 only)."""
    p = _Parser(prog="hpc_layerpar", description="Layer-parallel training of residual networks (MPI).")
    p.add_argument("--version", action="version", version=f"hpc_layerpar {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a network (run under mpiexec/srun for several ranks)")
    t.add_argument("--preset", help="named preset (see `hpc_layerpar presets`)")
    t.add_argument("--config", help="YAML config file; its values override the preset")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one value, e.g. --set optim.lr=0.05 (repeatable; applied last)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--resume", metavar="auto|CHECKPOINT", help="continue from a checkpoint folder; auto: "
                   "the latest in the run's checkpoint folder, or a fresh start if there is none")
    sub.add_parser("presets", help="list the named presets")
    sub.add_parser("report", help="tables (Markdown, CSV) and PNG plots from metrics files; "
                   "see `hpc_layerpar report --help`", add_help=False)
    pl = sub.add_parser("plan", help="print the pipeline coupling's tick plan: what each rank does at each tick")
    pl.add_argument("--ranks", type=int, required=True, metavar="K", help="pipeline stages (ranks)")
    pl.add_argument("--micro", type=int, required=True, metavar="M", help="micro-batches per optimizer step")
    pl.add_argument("--steps", type=int, default=2, help="optimizer steps in the epoch shown (default 2)")
    pl.add_argument("--messages", action="store_true", help="show the sends and receives too")
    pl.add_argument("--schedule", default="tick", choices=("tick", "1f1b"),
                    help="parallel.schedule: tick (default) or 1f1b (the adjoint travels within the tick)")
    sm = sub.add_parser("summary", help="one line per metrics file: accuracy, time, traffic")
    sm.add_argument("files", nargs="+", metavar="RUN.h5")
    return p


def summarize(paths) -> str:
    """A text table, one row per metrics file: ranks, epochs, final and best test accuracy, wall time,
    seconds per epoch, MB sent per epoch and rank, status."""
    import numpy as np

    from .metrics import read_metrics

    rows = [f"{'run':28s} {'ranks':>5s} {'epochs':>6s} {'final acc':>9s} {'best acc':>8s} "
            f"{'wall s':>7s} {'s/epoch':>7s} {'MB sent/epoch/rank':>18s}  status"]
    for path in paths:
        m = read_metrics(path)
        c, a = m["columns"], m["attrs"]
        acc = c["test_acc"][~np.isnan(c["test_acc"])]
        # A run the divergence guard stopped has no final accuracy: say nan, not a stale figure.
        final = "nan" if a.get("status") == "diverged" else (f"{100 * acc[-1]:.2f}%" if len(acc) else "-")
        best = f"{100 * acc.max():.2f}%" if len(acc) else "-"
        wall = f"{a['wall_seconds']:.1f}" if "wall_seconds" in a else "-"
        per_epoch = f"{c['epoch_seconds'].mean():.3f}" if len(c["epoch"]) else "-"
        sent = f"{c['bytes_sent'].mean() / 1e6:.2f}" if len(c["epoch"]) else "-"
        rows.append(f"{m['config']['run']['name'][:28]:28s} {a['world_size']:5d} {len(c['epoch']):6d} "
                    f"{final:>9s} {best:>8s} {wall:>7s} {per_epoch:>7s} {sent:>18s}  {a['status']}")
    return "\n".join(rows)


def _fail(msg: str) -> int:
    if world_rank() == 0:
        sys.stderr.write(f"hpc_layerpar: error: {msg}\n")
        sys.stderr.flush()
    return EXIT_USAGE


def main(argv=None) -> int:
    """Run the command line and return the exit code: 0, 2 (usage, config or data error), 3 (diverged) or
    75 (stopped at a checkpoint); any other failure aborts the whole MPI job."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:  # its own parser: results/report.py
        from results.report import main as report_main
        return report_main(argv[1:]) if world_rank() == 0 else 0
    args = build_parser().parse_args(argv)
    if args.command == "presets":
        if world_rank() == 0:
            print(describe_presets())
        return 0
    if args.command == "plan":
        from .pipeline_plan import render
        for name in ("ranks", "micro", "steps"):
            if getattr(args, name) < 1:
                return _fail(f"--{name} must be >= 1, got {getattr(args, name)}")
        if world_rank() == 0:
            print(render(args.ranks, args.micro * args.steps, args.micro, messages=args.messages,
                         schedule=args.schedule))
        return 0
    if args.command == "summary":
        from .metrics import MetricsError
        try:
            text = summarize(args.files)
        except MetricsError as exc:
            return _fail(str(exc))
        if world_rank() == 0:
            print(text)
        return 0
    try:
        cfg = resolve(args.preset, args.config, args.sets)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.print_config:
        if world_rank() == 0:
            import yaml
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from .guard import EXIT_DIVERGED, DivergenceError
    from .train import run  # torch import deferred: config errors come back fast

    try:
        summary = run(cfg, resume=args.resume)
    except (ConfigError, DataError) as exc:
        return _fail(str(exc))
    except DivergenceError as exc:  # every rank raised it alike; rank 0 says why, all exit 3
        _fail(str(exc))
        return EXIT_DIVERGED
    except BaseException as exc:  # noqa: BLE001 - any other failure must take the whole job down
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        abort_job(exc)
    if summary.stopped_at is not None:
        from .train import EXIT_CHECKPOINTED
        return EXIT_CHECKPOINTED
    return 0
