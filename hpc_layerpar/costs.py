"""Per-element costs for the stage partitioner: measured forward+backward time on the device, or
the analytic multiply-accumulate counts of models.py; no MPI."""
from __future__ import annotations

import copy
import time

import torch

from .buckets import sync_device
from .graphs import capture


def measure_costs(model, batch_size: int, device: torch.device, reps: int = 4, graphs: bool = False,
                  forward: bool = False) -> list[int]:
    """Microseconds of forward + backward of each element at this batch size on this device (the
    best of `reps` after one warm-up), with the input gradient every element but the stem needs,
    in the model's compute precision. forward: time the forward alone, without gradients (the
    pipeline's F pass), instead.
    Eager elements are timed in a chain, as a stage runs them: one forward through the whole
    network, element by element, then one backward from the last element to the first. Timing one
    element over and over instead keeps its weights and activations in the CPU's caches, which
    made the small late elements of a ResNet look 10-20% cheaper than they run in a stage and left
    the downstream rank of a measured split the slower one (RESULTS.md, "A chained cost probe").
    graphs: time each element as a captured CUDA graph, as the training steps run with
    run.cuda_graphs; eager GPU timings of these small elements measure kernel-launch latency, which
    is about the same for every element, and would split the stages by block count.
    Works on a copy, so the model's parameters and BatchNorm statistics are untouched. On CPUs
    the multiply-accumulate count misjudges wide-and-shallow against narrow-and-high-resolution
    blocks by 2-3x, which is why this is the default."""
    m = copy.deepcopy(model).to(device).train()
    g = torch.Generator().manual_seed(0)  # not the global RNG: simulated ranks are threads
    x = torch.randn((batch_size,) + tuple(m.shapes[0]), generator=g).to(device)
    if graphs and device.type == "cuda":
        return _graph_costs(m, x, reps, forward)
    best = [float("inf")] * len(m)
    for r in range(reps + 1):
        spent = _chain(m, x, device, forward)
        if r > 0:  # the first pass warms up
            best = [min(b, s) for b, s in zip(best, spent)]
    return [max(1, int(b * 1e6)) for b in best]


def _now(device) -> float:
    """perf_counter after the device has finished its queued work."""
    sync_device(device)
    return time.perf_counter()


def _chain(m, x, device, forward: bool) -> list[float]:
    """Seconds of each element in one pass through the whole network: its forward (no gradients when
    forward), plus its backward in the reverse pass that follows."""
    spent, ins, outs, h = [], [], [], x
    for i in range(len(m)):
        xi = h if forward else h.detach().requires_grad_(i > 0)
        t0 = _now(device)
        with torch.set_grad_enabled(not forward):
            h = m(xi, i, i + 1)
        spent.append(_now(device) - t0)
        ins.append(xi)
        outs.append(h)
    if forward:
        return spent
    for i in reversed(range(len(m))):
        t0 = _now(device)
        if i == len(m) - 1:
            outs[i].square().mean().backward()
        else:
            outs[i].backward(ins[i + 1].grad)
        spent[i] += _now(device) - t0
    return spent


def _graph_costs(m, x, reps: int, forward: bool) -> list[int]:
    """Microseconds of each element as a captured CUDA graph replay, on its input from the network."""
    inputs = [x]
    with torch.no_grad():
        for i in range(len(m) - 1):
            inputs.append(m(inputs[-1], i, i + 1))
    costs = []
    for i in range(len(m)):
        xi = inputs[i].detach().requires_grad_(i > 0)

        def fb(i=i, xi=xi):
            if forward:
                with torch.no_grad():
                    m(xi, i, i + 1)
            else:
                m(xi, i, i + 1).square().mean().backward()
        costs.append(_graph_us(fb, reps))
    return costs


def _graph_us(fn, reps: int, replays: int = 20) -> int:
    """Microseconds per replay of fn captured as a CUDA graph (best of reps batches of replays)."""
    graph = capture(fn)
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / replays)
    return max(1, int(best * 1e6))


def parse_cuts(text: str, n_elements: int, k: int) -> list[tuple[int, int]] | None:
    """'4,9' -> [(0, 4), (4, 9), (9, n)]; None for the named strategies. ValueError when invalid."""
    if text in ("time", "macs"):
        return None
    try:
        cuts = [int(c) for c in text.replace(" ", "").split(",") if c]
    except ValueError:
        raise ValueError(f"parallel.partition={text!r} is not time, macs or a list of cut indices "
                         "such as '4,9'.") from None
    if len(cuts) != k - 1:
        raise ValueError(f"parallel.partition={text!r} gives {len(cuts) + 1} stages for {k} ranks; "
                         f"give {k - 1} cut indices, or use time or macs.")
    bounds = [0] + cuts + [n_elements]
    if any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"parallel.partition={text!r}: cut indices must increase strictly within "
                         f"1..{n_elements - 1} (the model has {n_elements} elements).")
    return list(zip(bounds, bounds[1:]))
