"""Pure: split a sequence of element costs into K contiguous stages minimising the largest stage."""
from __future__ import annotations


class PartitionError(ValueError):
    """The elements cannot be split into the requested stages (too few elements or a negative cost)."""


def _reach(per, bound: int) -> int:
    """How many leading elements the stages of `per` (each stage's element costs) of at most `bound`
    each can hold (greedy: each stage takes all it can, which leaves the later stages the least;
    stages may stay empty)."""
    i = 0
    for costs in per:
        acc = 0
        while i < len(costs) and acc + costs[i] <= bound:
            acc += costs[i]
            i += 1
    return i


def _last_start(per, last, k: int, bound: int):
    """Where the last stage starts in a split whose every stage fits `bound`, or None. Every prefix
    that k-1 stages can hold can also be cut into k-1 non-empty stages (if it has k-1 elements), and
    the last stage's cost only falls as its start moves right: the longest prefix is best."""
    j = min(_reach(per, bound), len(last) - 1)
    return j if j >= k - 1 and sum(last[j:]) <= bound else None


def balanced_partition(costs, k: int, last=None, starts=None, upstream=None) -> list[tuple[int, int]]:
    """K half-open ranges [start, end) covering range(len(costs)) in order, each non-empty,
    whose largest summed cost is as small as possible (the linear partition problem).

    last: each element's cost when it sits in the last stage, if that differs (default: costs).
    The pipeline coupling's non-last stages run every forward twice (F, and B's recompute), its last
    stage once: by role the same element costs about 4/3 as much upstream as at the end.

    Integer costs make the bisection exact. Stage 0 holds element 0 (the stem) and stage K-1 the
    last (the head) by construction. Among optimal splits it returns the one that fills early
    stages first, cut so that every later stage still gets at least one element.

    starts: the elements a stage may start at besides 0 (None: any). A DS filter needs boundaries
    whose H and W it divides; the split is then the optimum over those cuts only.

    upstream: the element costs of each non-last stage (k-1 lists), where they differ between stages
    (a stage that keeps F's graph for some micro-batches recomputes fewer forwards); default: costs."""
    costs = [int(c) for c in costs]
    last = costs if last is None else [int(c) for c in last]
    n = len(costs)
    per = [costs] * max(k - 1, 0) if upstream is None else [[int(c) for c in u] for u in upstream]
    if k < 1:
        raise PartitionError(f"the number of stages must be >= 1, got {k}")
    if k > n:
        raise PartitionError(
            f"cannot split {n} elements (stem, {n - 2} blocks, head) into {k} stages: every stage needs "
            f"at least one element. Use at most {n} ranks per pipeline, or a deeper model.")
    if len(last) != n or len(per) != max(k - 1, 0) or any(len(u) != n for u in per):
        raise PartitionError(f"{len(last)} last-stage costs and {[len(u) for u in per]} upstream costs for "
                             f"{n} elements and {k} stages")
    if any(c < 0 for c in costs + last + [c for u in per for c in u]):
        raise PartitionError("element costs must be >= 0")
    if starts is not None or any(u != per[0] for u in per):
        # stages of different costs: an element moved to an emptier stage may cost more there, so the
        # greedy fill below is not optimal; the dynamic programme over every cut is
        return _constrained(per, last, k, sorted({i for i in (range(1, n) if starts is None else starts)
                                                  if 0 < i < n}))
    lo, hi = 0, max([sum(u) for u in per] + [0]) + sum(last)  # hi always fits
    while lo < hi:
        mid = (lo + hi) // 2
        if _last_start(per, last, k, mid) is not None:
            hi = mid
        else:
            lo = mid + 1
    bound, j = lo, _last_start(per, last, k, lo)
    ranges, start, acc = [], 0, 0
    for i in range(j):  # stages 0..k-2 over [0, j): each filled as far as the bound allows
        stages_left = k - 1 - len(ranges)        # including the one being filled
        must_cut = (j - i) == (stages_left - 1)  # the rest need one element each
        if i > start and (acc + per[len(ranges)][i] > bound or must_cut):
            ranges.append((start, i))
            start, acc = i, 0
        acc += per[len(ranges)][i]
    if k > 1:
        ranges.append((start, j))
    ranges.append((j if k > 1 else 0, n))
    assert len(ranges) == k and all(a < b for a, b in ranges), (ranges, k)
    return ranges


def role_costs(costs, forward, share: float = 1.0):
    """(costs of each element in a non-last stage, in the last stage) for balanced_partition.
    costs: forward + backward per element; forward: the forward alone (None: a third of costs).
    A non-last stage of the pipeline adds F's forward to B's forward + backward: all of it when B
    recomputes the forward (share 1), nothing more where B goes through F's kept graph (share: the
    part of its micro-batches that recompute, pipeline_plan.recompute_share)."""
    forward = [c / 3 for c in costs] if forward is None else forward
    return [int(round(c + share * f)) for c, f in zip(costs, forward)], list(costs)


def upstream_costs(costs, forward, shares) -> list:
    """Each non-last stage's element costs (for balanced_partition's upstream) given the share of
    its micro-batches that recompute the forward, stage by stage."""
    return [role_costs(costs, forward, s)[0] for s in shares]


def stage_costs(costs, ranges, last=None, upstream=None) -> list[int]:
    """The summed cost of each stage's range [a, b) of costs (of `last` for the last stage, of
    upstream[s] for a non-last stage s, if given)."""
    per = [costs] * len(ranges) if upstream is None else list(upstream) + [costs]
    out = [sum(per[s][a:b]) for s, (a, b) in enumerate(ranges)]
    if last is not None and ranges:
        a, b = ranges[-1]
        out[-1] = sum(last[a:b])
    return out


def _constrained(per, last, k: int, starts: list) -> list[tuple[int, int]]:
    """The optimal split whose stages begin at 0 and at k-1 of `starts` (dynamic programming over
    the cut positions; ties go to the earliest cuts, so every rank computes the same split). per:
    each non-last stage's element costs."""
    n = len(last)
    if k == 1:
        return [(0, n)]
    if len(starts) < k - 1:
        raise PartitionError(f"only {len(starts)} places to cut the {n} elements allow a stage to start; "
                             f"{k} stages need {k - 1}. Use at most {len(starts) + 1} ranks per pipeline.")
    pre = []  # pre[j][i]: stage j's cost of elements [0, i)
    for costs in per:
        pre.append([0])
        for c in costs:
            pre[-1].append(pre[-1][-1] + c)
    cuts = [0] + starts
    # best[j][c]: the smallest largest cost of j + 1 non-last stages over [0, cuts[c]), with a choice
    best = [[None] * len(cuts) for _ in range(k - 1)]
    best[0] = [(pre[0][b], None) if c > 0 else None for c, b in enumerate(cuts)]
    for j in range(1, k - 1):
        for c in range(1, len(cuts)):
            for p in range(1, c):
                if best[j - 1][p] is not None:
                    v = max(best[j - 1][p][0], pre[j][cuts[c]] - pre[j][cuts[p]])
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
