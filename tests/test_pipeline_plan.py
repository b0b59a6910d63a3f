"""The pipeline's tick plan (pipeline_plan.py), checked as data without processes, up to K = 64."""
import pytest

from hpc_layerpar.pipeline_plan import (
    ACTIVATIONS,
    ADJOINTS,
    SCHEDULES,
    delay,
    plan,
    rank_plan,
    recompute_share,
    render,
    reuses,
    sent_before,
    ticks,
)

from conftest import run_cli

CASES = [(K, M, steps, sch) for K in (1, 2, 3, 4, 8, 16, 64) for M in (1, 2, 4, 16) for steps in (1, 3)
         for sch in SCHEDULES]
LAG = {"tick": 1, "1f1b": 0}  # ticks an adjoint takes from its sender to its receiver


def _where(grid):
    """(rank, kind, mb, channel) -> [tick, ...] for every action of the plan."""
    seen = {}
    for k, row in enumerate(grid):
        for t, acts in enumerate(row):
            for a in acts:
                seen.setdefault((k, a.kind, a.mb, a.channel), []).append(t)
    return seen


@pytest.mark.parametrize("K,M,steps,sch", CASES)
def test_every_micro_batch_forwarded_updated_and_stepped_once(K, M, steps, sch):
    n = M * steps
    grid = plan(K, n, M, schedule=sch)
    assert len(grid) == K and all(len(row) == ticks(K, n, sch) == n + (1 + LAG[sch]) * (K - 1) for row in grid)
    seen = _where(grid)
    for k in range(K):
        for j in range(n):
            assert len(seen[(k, "F", j, None)]) == 1 and len(seen[(k, "B", j, None)]) == 1, (k, j)
        fs = [a.mb for row in grid[k] for a in row if a.kind == "F"]
        bs = [a.mb for row in grid[k] for a in row if a.kind == "B"]
        assert fs == list(range(n)) and bs == list(range(n)), "in order, once each"
        stepped = [(a.step, a.mb) for row in grid[k] for a in row if a.kind == "S"]
        assert stepped == [(g, g * M + M - 1) for g in range(steps)], "one step per global batch"
        for row in grid[k]:
            kinds = [a.kind for a in row]
            if "S" in kinds:  # the step follows the B of the global batch's last micro-batch
                assert kinds.index("S") > kinds.index("B")


@pytest.mark.parametrize("K,M,steps,sch", CASES)
def test_dependencies_only_on_the_previous_tick_of_the_neighbours(K, M, steps, sch):
    """Activations arrive a tick after they are sent; adjoints too ("tick") or within the tick ("1f1b",
    from the downstream neighbour, so the waits form a chain down the ranks and never a cycle)."""
    n = M * steps
    grid = plan(K, n, M, schedule=sch)
    seen = _where(grid)
    for k, row in enumerate(grid):
        for t, acts in enumerate(row):
            for a in acts:
                lag = 1 if a.channel == ACTIVATIONS else LAG[sch]
                if a.kind == "recv":
                    assert abs(a.peer - k) == 1 and sent_before(a, sch) == (lag == 1)
                    assert seen.get((a.peer, "send", a.mb, a.channel)) == [t - lag], (k, t, a)
                    assert lag == 1 or a.peer == k + 1
                if a.kind == "send":
                    assert seen.get((a.peer, "recv", a.mb, a.channel)) == [t + lag], (k, t, a)
            order = [(a.kind, a.mb, a.channel) for a in acts]
            for i, (kind, j, ch) in enumerate(order):  # a message arrives before its compute, leaves after it
                compute = order.index(("F" if ch == ACTIVATIONS else "B", j, None)) if ch else i
                assert (kind != "recv" or i < compute) and (kind != "send" or i > compute), (k, t, order)
    # the chain's ends: rank 0 receives no activations, the last rank no adjoints, nobody talks past them
    assert not any(a.kind == "recv" and a.channel == ACTIVATIONS for row in grid[0] for a in row)
    assert not any(a.kind == "recv" and a.channel == ADJOINTS for row in grid[K - 1] for a in row)


@pytest.mark.parametrize("sch", SCHEDULES)
@pytest.mark.parametrize("K", [1, 2, 4, 8, 64])
def test_delay_and_in_flight_micro_batches(K, sch):
    """Stage k updates micro-batch j 2(K-1-k) ("tick") or K-1-k ("1f1b") ticks after its forward, and
    holds at most that + 1 micro-batches in flight (ALGORITHM.md s.4, memory)."""
    n, M = 40, 4
    grid = plan(K, n, M, schedule=sch)
    seen = _where(grid)
    for k in range(K):
        d = (1 + LAG[sch]) * (K - 1 - k)
        for j in range(n):
            assert seen[(k, "B", j, None)][0] - seen[(k, "F", j, None)][0] == d == delay(k, K, sch)
        inflight = peak = 0
        for row in grid[k]:
            inflight += sum(a.kind == "F" for a in row)
            peak = max(peak, inflight)
            inflight -= sum(a.kind == "B" for a in row)
        assert inflight == 0 and peak <= d + 1


def test_a_partial_last_group_takes_its_own_step():
    """With n not a multiple of M (data.drop_last=false), the trailing micro-batches are a global batch of
    their own: a step follows the epoch's last B on every rank (before, none did and their gradients
    were dropped)."""
    for k, row in enumerate(plan(3, 5, 2)):
        assert [(a.step, a.mb) for acts in row for a in acts if a.kind == "S"] == [(0, 1), (1, 3), (2, 4)], k


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="stages"):
        plan(0, 4, 1)
    with pytest.raises(ValueError, match="micro-batches per step"):
        plan(2, 4, 0)
    with pytest.raises(ValueError, match="unknown pipeline schedule '1f2b'"):
        plan(2, 4, 1, schedule="1f2b")


def test_render_and_cli():
    text = render(3, 4, 2)
    lines = text.splitlines()
    assert "8 ticks" in lines[0] and len(lines) == 2 + 3
    assert lines[2].split()[2:4] == ["F0", "F1"] and "B0" in lines[4] and "S0" in lines[2]
    assert "<ac0" in render(2, 2, 1, messages=True)
    p = run_cli(["plan", "--ranks", "3", "--micro", "2", "--steps", "2"], n=1, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == text.strip()
    p = run_cli(["plan", "--ranks", "3", "--micro", "2", "--steps", "2", "--schedule", "1f1b"], n=1, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == render(3, 4, 2, schedule="1f1b").strip(), p.stderr
    assert "6 ticks" in p.stdout and p.stdout.splitlines()[2].split()[4:6] == ["F2", "B0"]  # rank 0 at tick 2
    bad = run_cli(["plan", "--ranks", "0", "--micro", "2"], n=1, timeout=120)
    assert bad.returncode == 2 and "--ranks" in bad.stderr


@pytest.mark.parametrize("K,n,M,every", [(1, 8, 1, 3), (2, 8, 4, 4), (4, 16, 2, 6), (8, 32, 1, 10)])
def test_checks_fall_on_the_same_ticks_of_every_rank_and_not_on_the_last(K, n, M, every):
    """run.check_every: a C ends the same ticks on every rank (a collective), never the epoch's last
    tick (the run checks the epoch's end), and leaves the other actions as they were."""
    with_c, without = plan(K, n, M, every), plan(K, n, M)
    at = [{t for t, acts in enumerate(row) if any(a.kind == "C" for a in acts)} for row in with_c]
    want = {t for t in range(ticks(K, n) - 1) if (t + 1) % every == 0}
    assert all(s == want for s in at) and want
    for row_c, row in zip(with_c, without):
        assert [[a for a in acts if a.kind != "C"] for acts in row_c] == row
        assert all(acts[-1].kind == "C" for acts in row_c if any(a.kind == "C" for a in acts))


@pytest.mark.parametrize("sch", SCHEDULES)
@pytest.mark.parametrize("K,M", [(K, M) for K in (1, 2, 3, 4, 8) for M in (1, 2, 3, 4, 8)])
def test_reuse_exactly_where_no_step_falls_between_f_and_b(K, M, sch):
    """Walk each rank's plan counting its optimizer steps: B of micro-batch j may use F's graph iff
    the count at its B equals the count at its F. Over a long epoch the rest, the micro-batches that
    recompute, approach recompute_share (d of every M)."""
    n = 40 * M + 1  # with a partial last batch
    for k, row in enumerate(plan(K, n, M, schedule=sch)):
        steps, at_f, same = 0, {}, {}
        for acts in row:
            for a in acts:
                if a.kind == "F":
                    at_f[a.mb] = steps
                elif a.kind == "B":
                    same[a.mb] = at_f.pop(a.mb) == steps
                elif a.kind == "S":
                    steps += 1
        assert [reuses(k, K, j, M, sch) for j in range(n)] == [same[j] for j in range(n)], (k, K, M)
        recompute = sum(not same[j] for j in range(n)) / n
        assert abs(recompute - (recompute_share(k, K, M, sch) if k < K - 1 else 0.0)) <= 2 * M / n
    assert recompute_share(0, 2, 4) == 0.5 and recompute_share(0, 4, 4) == 1.0 and recompute_share(2, 4, 4) == 0.5


@pytest.mark.parametrize("K,M,check", [(2, 4, 0), (2, 4, 3), (4, 4, 5), (8, 2, 0), (3, 1, 0)])
def test_rank0_runs_ahead_without_crossing_a_step_or_a_stop_tick(K, M, check):
    """ahead=True (1f1b, kept forward) moves rank 0's F a tick early: every action stays exactly once,
    B and S stay where they were, no F passes an S (its parameters would differ), the ticks a check
    may stop at keep the plain plan's state, and M = 1 (a step every tick) changes nothing."""
    n = 6 * M + 1
    plain = rank_plan(0, K, n, M, check, "1f1b")
    ahead = rank_plan(0, K, n, M, check, "1f1b", ahead=True)
    flat = lambda p: [(t, a) for t, acts in enumerate(p) for a in acts]  # noqa: E731
    assert sorted(map(repr, (a for _, a in flat(plain)))) == sorted(map(repr, (a for _, a in flat(ahead))))
    assert [[a for a in acts if a.kind != "F" and a.channel is None] for acts in plain] == \
        [[a for a in acts if a.kind != "F" and a.channel is None] for acts in ahead]
    seq = [a for _, a in flat(ahead)]
    plain_seq = [a for _, a in flat(plain)]
    for j in range(n):  # the steps before each F are the same in both orders
        f = next(i for i, a in enumerate(seq) if a.kind == "F" and a.mb == j)
        g = next(i for i, a in enumerate(plain_seq) if a.kind == "F" and a.mb == j)
        assert sum(a.kind == "S" for a in seq[:f]) == sum(a.kind == "S" for a in plain_seq[:g])
    nt = len(plain)
    stops = {min(t + K - 1, nt - 1) for t in range(check - 1, nt - 1, check)} if check else set()
    for t in stops:  # what rank 0 has forwarded by the end of a stop tick is the plain plan's
        forwarded = [{a.mb for acts in p[:t + 1] for a in acts if a.kind == "F"} for p in (plain, ahead)]
        assert forwarded[0] == forwarded[1]
    moved = sum(1 for (t, a), (u, b) in zip(flat(plain), flat(ahead)) if a != b)
    assert (moved == 0) == (M == 1)
