"""The pipeline's split refined by measured stage times, on one GPU (issue 19: at K = 4 the split
balanced on element costs left one stage 20% slower than the others on an H200).

    python benchmarks/gpu_split.py [--model resnet56] [--ks 4] [--micro 1] [--steps 60] [--rounds 4]
                                   [--json OUT.json]

Why: `parallel.partition=time` balances per-element costs, each element timed alone as a captured
graph. Those sums miss how a captured stage really runs (at K = 2 the stages were 12-16% faster than
their elements' sum, at K = 8 up to 13% slower), so the balanced split is not the fastest one. This
script starts from that split, times every stage as gpu.py does (the engine's F, B and S replays,
alone on this GPU), then moves one cut by one element at a time to the neighbouring split whose
projected 1f1b step (slowest stage plus the two NVLink hops per micro-batch, as gpu.py projects it)
is shortest, while that gains more than --min-gain. Each stage range is timed once; the start and
the end split are timed again at the end, in the same run, for the ratio. The cuts it prints run in
the engine as `--set parallel.partition=C1,C2,...`.

Off CUDA (`--device cpu --model resnet8-tiny`) it is a smoke test of this script, no timing value.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpu  # noqa: E402  (beside this script)

from hpc_layerpar import scaling as S  # noqa: E402
from hpc_layerpar.data import DeviceDataset  # noqa: E402
from hpc_layerpar.partition import balanced_partition  # noqa: E402


def projected_ms(stage_ms, sent, m: int, net) -> float:
    """A step on the 1f1b schedule, ms: the slowest stage plus an activation and an adjoint hop per
    micro-batch on the critical path (gpu.py's projection)."""
    return max(stage_ms) + 1e3 * 2 * m * (net.latency_s + max(sent) / (2 * m) / net.bandwidth)


def neighbours(cuts: tuple, n_el: int):
    """Every split one cut away by one element, cuts strictly increasing inside (0, n_el)."""
    for i in range(len(cuts)):
        for d in (-1, 1):
            c = list(cuts)
            c[i] += d
            if all(a < b for a, b in zip([0] + c, c + [n_el])):
                yield tuple(c)


def ranges_of(cuts: tuple, n_el: int) -> list:
    edges = [0, *cuts, n_el]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def refine(k: int, a, data, t1: float, up: list, last: list) -> dict:
    """The search at K = k from the split balanced on element costs (up, last: the partitioner's)."""
    depth, c, h, classes = gpu.MODELS[a.model]
    m, net, n_el = a.micro, S.PRESETS["nvlink"], len(up)
    timed = {}  # (range, first, last) -> (ms per step, bytes sent per step)

    def stage(ranges, s):
        key = (ranges[s], s == 0, s == len(ranges) - 1)  # a stage's step depends on nothing else
        if key not in timed:
            ms, _twin, sent = gpu.stage_engine_ms(data, depth, c, h, classes, ranges, s, a.steps, m)
            timed[key] = (ms, sent)
        return timed[key]

    def step_ms(cuts):
        rows = [stage(ranges_of(cuts, n_el), s) for s in range(k)]
        return projected_ms([x[0] for x in rows], [x[1] for x in rows], m, net), [x[0] for x in rows]

    start = tuple(r[1] for r in balanced_partition(up, k, last)[:-1])
    cuts, (best, per) = start, step_ms(start)
    path = [(cuts, best, per)]
    print(f"\n## K = {k}: balanced on element costs, cuts {','.join(map(str, cuts))}: stages "
          f"{' / '.join(f'{x:.2f}' for x in per)} ms, step {best:.2f} ms, rho {t1 / best:.2f}", flush=True)
    for _ in range(a.rounds):
        (ms, per), nb = min(((step_ms(nb), nb) for nb in neighbours(cuts, n_el)), key=lambda x: x[0][0])
        if ms > best * (1 - a.min_gain):
            break
        cuts, best = nb, ms
        path.append((cuts, best, per))
        print(f"move to cuts {','.join(map(str, cuts))}: stages {' / '.join(f'{x:.2f}' for x in per)} ms, "
              f"step {best:.2f} ms, rho {t1 / best:.2f}", flush=True)
    timed.clear()  # the two ends again, back to back, for a ratio from one stretch of this run
    again = {name: step_ms(x)[0] for name, x in (("balanced", start), ("refined", cuts))}
    print(f"retimed: balanced {again['balanced']:.2f} ms (rho {t1 / again['balanced']:.2f}), refined "
          f"{again['refined']:.2f} ms (rho {t1 / again['refined']:.2f}), "
          f"refined / balanced {again['refined'] / again['balanced']:.3f}; run it with "
          f"--set parallel.partition={','.join(map(str, cuts))}", flush=True)
    return {"balanced_cuts": start, "refined_cuts": cuts, "retimed_ms": again,
            "path": [{"cuts": c_, "step_ms": s_, "stage_ms": p_} for c_, s_, p_ in path]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56", choices=sorted(gpu.MODELS))
    ap.add_argument("--ks", default="4")
    ap.add_argument("--micro", type=int, default=1, help="the pipeline's micro-batches per step")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=4, help="moves at most")
    ap.add_argument("--min-gain", type=float, default=0.02,
                    help="a move must shorten the step by this fraction (negative: move anyway, a smoke test)")
    ap.add_argument("--batch", type=int, default=gpu.BATCH)
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke test of this script")
    a = ap.parse_args()
    gpu.DEV, gpu.BATCH = torch.device(a.device), a.batch
    if gpu.DEV.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_split.py needs a CUDA device (this torch sees none); "
                         "--device cpu: a smoke run")
    torch.backends.cudnn.benchmark = True
    depth, c, h, classes = gpu.MODELS[a.model]
    m = a.micro
    data = DeviceDataset(gpu.synthetic(tempfile.mkdtemp(), c, h, classes, gpu.BATCH * a.steps), gpu.DEV, verify=False)
    t1 = gpu.plain_loop(data, depth, c, h, classes, a.steps, graph=True, bf16=True)
    up, last, _, _ = gpu.split_costs_graph(depth, c, h, classes, m)
    res = {"device": torch.cuda.get_device_name(0) if gpu.DEV.type == "cuda" else "cpu (smoke run)",
           "torch": torch.__version__, "model": a.model, "micro_batches": m, "t1_ms": t1, "ks": {}}
    print(f"# {res['device']}, {a.model}, batch {gpu.BATCH}, M = {m}, T1 (captured bf16 loop) {t1:.2f} ms")
    for k in [int(x) for x in a.ks.split(",")]:
        res["ks"][str(k)] = refine(k, a, data, t1, up, last)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
