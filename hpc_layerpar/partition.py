"""Pure: split a sequence of element costs into K contiguous stages minimising the largest stage."""
from __future__ import annotations


class PartitionError(ValueError):
    """The elements cannot be split into the requested stages (too few elements or a negative cost)."""


def _fits(costs, k, bound) -> bool:
    stages, acc = 1, 0
    for c in costs:
        if acc + c > bound:
            stages, acc = stages + 1, c
            if stages > k:
                return False
        else:
            acc += c
    return True


def balanced_partition(costs, k: int) -> list[tuple[int, int]]:
    """K half-open ranges [start, end) covering range(len(costs)) in order, each non-empty,
    whose largest summed cost is as small as possible (the linear partition problem).

    Integer costs make the bisection exact. Stage 0 holds element 0 (the stem) and stage K-1 the
    last (the head) by construction. Among optimal splits it returns the one that fills early
    stages first, cut so that every later stage still gets at least one element."""
    costs = [int(c) for c in costs]
    n = len(costs)
    if k < 1:
        raise PartitionError(f"the number of stages must be >= 1, got {k}")
    if k > n:
        raise PartitionError(
            f"cannot split {n} elements (stem, {n - 2} blocks, head) into {k} stages: every stage needs "
            f"at least one element. Use at most {n} ranks per pipeline, or a deeper model.")
    if any(c < 0 for c in costs):
        raise PartitionError("element costs must be >= 0")
    lo, hi = max(costs), sum(costs)
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(costs, k, mid):
            hi = mid
        else:
            lo = mid + 1
    bound = lo
    ranges, start, acc = [], 0, 0
    for i, c in enumerate(costs):
        stages_left = k - len(ranges)          # including the one being filled
        must_cut = (n - i) == (stages_left - 1)  # the rest need one element each
        if i > start and (acc + c > bound or must_cut):
            ranges.append((start, i))
            start, acc = i, 0
        acc += c
    ranges.append((start, n))
    assert len(ranges) == k, (ranges, k)
    return ranges


def stage_costs(costs, ranges) -> list[int]:
    """The summed cost of each stage's range [a, b) of costs."""
    return [sum(costs[a:b]) for a, b in ranges]
