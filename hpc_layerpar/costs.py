"""Per-element costs for the stage partitioner: measured forward+backward time on the device, or
the analytic multiply-accumulate counts of models.py; no MPI."""
from __future__ import annotations

import copy
import time

import torch

from .buckets import sync_device


def measure_costs(model, batch_size: int, device: torch.device, reps: int = 4) -> list[int]:
    """Microseconds of forward + backward of each element at this batch size on this device (the
    best of `reps` after one warm-up), with the input gradient every element but the stem needs.

    Works on a copy, so the model's parameters and BatchNorm statistics are untouched. On CPUs
    the multiply-accumulate count misjudges wide-and-shallow against narrow-and-high-resolution
    blocks by 2-3x, which is why this is the default."""
    m = copy.deepcopy(model).to(device).train()
    g = torch.Generator().manual_seed(0)  # not the global RNG: simulated ranks are threads
    x = torch.randn((batch_size,) + tuple(m.shapes[0]), generator=g).to(device)
    inputs = [x]
    with torch.no_grad():
        for el in m.elements[:-1]:
            inputs.append(el(inputs[-1]))
    costs = []
    for i, el in enumerate(m.elements):
        best = float("inf")
        for r in range(reps + 1):
            xi = inputs[i].detach().requires_grad_(i > 0)
            sync_device(device)
            t0 = time.perf_counter()
            el(xi).float().square().mean().backward()
            sync_device(device)
            if r > 0:
                best = min(best, time.perf_counter() - t0)
        costs.append(max(1, int(best * 1e6)))
    return costs


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
