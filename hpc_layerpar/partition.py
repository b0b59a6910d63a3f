"""Pure: split a sequence of element costs into K contiguous stages minimising the largest stage."""
from __future__ import annotations


class PartitionError(ValueError):
    """The elements cannot be split into the requested stages (too few elements or a negative cost)."""


def _reach(costs, stages: int, bound: int) -> int:
    """How many leading elements `stages` stages of at most `bound` each can hold (greedy: each
    stage takes all it can; stages may stay empty)."""
    i, n = 0, len(costs)
    for _ in range(stages):
        acc = 0
        while i < n and acc + costs[i] <= bound:
            acc += costs[i]
            i += 1
    return i


def _last_start(costs, last, k: int, bound: int):
    """Where the last stage starts in a split whose every stage fits `bound`, or None. Every prefix
    that k-1 stages can hold can also be cut into k-1 non-empty stages (if it has k-1 elements), and
    the last stage's cost only falls as its start moves right: the longest prefix is best."""
    j = min(_reach(costs, k - 1, bound), len(costs) - 1)
    return j if j >= k - 1 and sum(last[j:]) <= bound else None


def balanced_partition(costs, k: int, last=None, starts=None) -> list[tuple[int, int]]:
    """K half-open ranges [start, end) covering range(len(costs)) in order, each non-empty,
    whose largest summed cost is as small as possible (the linear partition problem).

    last: each element's cost when it sits in the last stage, if that differs (default: costs).
    The pipeline coupling's non-last stages run every forward twice (F, and B's recompute), its last
    stage once: by role the same element costs about 4/3 as much upstream as at the end.

    Integer costs make the bisection exact. Stage 0 holds element 0 (the stem) and stage K-1 the
    last (the head) by construction. Among optimal splits it returns the one that fills early
    stages first, cut so that every later stage still gets at least one element.

    starts: the elements a stage may start at besides 0 (None: any). A DS filter needs boundaries
    whose H and W it divides; the split is then the optimum over those cuts only."""
    costs = [int(c) for c in costs]
    last = costs if last is None else [int(c) for c in last]
    n = len(costs)
    if k < 1:
        raise PartitionError(f"the number of stages must be >= 1, got {k}")
    if k > n:
        raise PartitionError(
            f"cannot split {n} elements (stem, {n - 2} blocks, head) into {k} stages: every stage needs "
            f"at least one element. Use at most {n} ranks per pipeline, or a deeper model.")
    if len(last) != n:
        raise PartitionError(f"{len(last)} last-stage costs for {n} elements")
    if any(c < 0 for c in costs + last):
        raise PartitionError("element costs must be >= 0")
    if starts is not None:
        return _constrained(costs, last, k, sorted({i for i in starts if 0 < i < n}))
    lo, hi = 0, sum(costs) + sum(last)  # hi always fits
    while lo < hi:
        mid = (lo + hi) // 2
        if _last_start(costs, last, k, mid) is not None:
            hi = mid
        else:
            lo = mid + 1
    bound, j = lo, _last_start(costs, last, k, lo)
    ranges, start, acc = [], 0, 0
    for i in range(j):  # stages 0..k-2 over [0, j): each filled as far as the bound allows
        stages_left = k - 1 - len(ranges)        # including the one being filled
        must_cut = (j - i) == (stages_left - 1)  # the rest need one element each
        if i > start and (acc + costs[i] > bound or must_cut):
            ranges.append((start, i))
            start, acc = i, 0
        acc += costs[i]
    if k > 1:
        ranges.append((start, j))
    ranges.append((j if k > 1 else 0, n))
    assert len(ranges) == k and all(a < b for a, b in ranges), (ranges, k)
    return ranges


def role_costs(costs, forward):
    """(costs of each element in a non-last stage, in the last stage) for balanced_partition.
    costs: forward + backward per element; forward: the forward alone (None: a third of costs).
    A non-last stage of the pipeline adds F's forward to B's forward + backward."""
    forward = [c / 3 for c in costs] if forward is None else forward
    return [int(round(c + f)) for c, f in zip(costs, forward)], list(costs)


def stage_costs(costs, ranges, last=None) -> list[int]:
    """The summed cost of each stage's range [a, b) of costs (of `last` for the last stage, if given)."""
    out = [sum(costs[a:b]) for a, b in ranges]
    if last is not None and ranges:
        a, b = ranges[-1]
        out[-1] = sum(last[a:b])
    return out


def _constrained(costs, last, k: int, starts: list) -> list[tuple[int, int]]:
    """The optimal split whose stages begin at 0 and at k-1 of `starts` (dynamic programming over
    the cut positions; ties go to the earliest cuts, so every rank computes the same split)."""
    n = len(costs)
    if k == 1:
        return [(0, n)]
    if len(starts) < k - 1:
        raise PartitionError(f"only {len(starts)} places to cut the {n} elements allow a stage to start; "
                             f"{k} stages need {k - 1}. Use at most {len(starts) + 1} ranks per pipeline.")
    pre = [0]
    for c in costs:
        pre.append(pre[-1] + c)
    cuts = [0] + starts
    # best[j][c]: the smallest largest cost of j + 1 non-last stages over [0, cuts[c]), with a choice
    best = [[None] * len(cuts) for _ in range(k - 1)]
    best[0] = [(pre[b], None) if c > 0 else None for c, b in enumerate(cuts)]
    for j in range(1, k - 1):
        for c in range(1, len(cuts)):
            for p in range(1, c):
                if best[j - 1][p] is not None:
                    v = max(best[j - 1][p][0], pre[cuts[c]] - pre[cuts[p]])
                    if best[j][c] is None or v < best[j][c][0]:
                        best[j][c] = (v, p)
    top = None
    for c in range(1, len(cuts)):
        if best[k - 2][c] is not None:
            v = max(best[k - 2][c][0], sum(last[cuts[c]:]))
            if top is None or v < top[0]:
                top = (v, c)
    bounds, c, j = [n], top[1], k - 2
    while c is not None:
        bounds.append(cuts[c])
        c, j = best[j][c][1], j - 1
    bounds = [0] + bounds[::-1]
    ranges = list(zip(bounds[:-1], bounds[1:]))
    assert len(ranges) == k and all(a < b for a, b in ranges), (ranges, k)
    return ranges
