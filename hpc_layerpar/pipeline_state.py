"""A pipeline epoch stopped between two ticks, as data: what one rank holds in flight (the micro-batches
between their F and B, the messages received for the next tick, the gradients of the global batch in
progress, the epoch's sums and the health probe's inputs), so that a preempted run resumes at the next
tick and continues bitwise as if it had not stopped (ALGORITHM.md s.4: every rank only waits for its
neighbours' previous tick, so the state at a tick boundary is all there is).

Only tensors, numbers, strings, lists and dicts: the file loads with torch.load(weights_only=True)."""
from __future__ import annotations

import dataclasses

import torch

from .pipeline_step import MicroBatch

# F's kept graph is not state: a thawed B recomputes the forward (the same numbers)
FIELDS = [f.name for f in dataclasses.fields(MicroBatch) if f.name != "kept"]


def _plain(v):
    """A field as saved: stashed parameters (leaves that gather B's gradient) as plain tensors."""
    return [t.detach() for t in v] if isinstance(v, list) else v


def freeze(eng, ep, tick: int) -> dict:
    """This rank's epoch state before `tick` (whose receives are already in ep.inbox)."""
    objs, index = [], {}

    def ref(mb) -> int:  # a micro-batch held by both inflight and the probe is one object: keep it one
        if id(mb) not in index:
            index[id(mb)] = len(objs)
            objs.append({f: _plain(getattr(mb, f)) for f in FIELDS})
        return index[id(mb)]

    sums = eng.sums
    return {
        "where": [ep.epoch, eng.stage.k, eng.stage.K, eng.M, len(ep.mbs), eng.schedule],
        "tick": tick, "updates": ep.updates,
        "inflight": [[j, ref(mb)] for j, mb in ep.inflight.items()],
        "probe_mbs": [ref(mb) for mb in ep.probe["mbs"]],
        "probe": {k: list(ep.probe[k]) for k in ("a", "idx", "x")},
        "micro_batches": objs,
        "inbox": [[ch, j, t] for (ch, j), t in ep.inbox.items()],
        "sums": [sums.acc.clone(), sums.bad.clone(), sums.step.clone()],
        "counts": [sums.n, sums.n_ce, sums.n_res],
        "grads": eng.stage.bucket.flat.clone(),
    }


def thaw(eng, ep, state: dict) -> int:
    """Restore a frozen state into a new epoch of the same (epoch, rank, K, M, micro-batches); returns
    the tick to continue at (its receives are done)."""
    want = [ep.epoch, eng.stage.k, eng.stage.K, eng.M, len(ep.mbs), eng.schedule]
    where = list(state["where"]) + ["tick"] * (len(state["where"]) == 5)  # states saved before parallel.schedule
    if where != want:
        raise ValueError(f"a pipeline state of (epoch, rank, K, M, micro-batches, schedule) {where} cannot "
                         f"continue {want}")
    dev = eng.device

    def on(t):
        if isinstance(t, list):  # stashed parameters, leaves again
            return [x.to(dev).requires_grad_() for x in t]
        return t.to(dev) if torch.is_tensor(t) else t

    objs = [MicroBatch(**{f: on(d[f]) for f in FIELDS}) for d in state["micro_batches"]]
    ep.inflight = {int(j): objs[i] for j, i in state["inflight"]}
    ep.probe["mbs"] = [objs[i] for i in state["probe_mbs"]]
    for k, v in state["probe"].items():
        ep.probe[k] = [on(t) for t in v]
    ep.inbox = {(ch, int(j)): on(t) for ch, j, t in state["inbox"]}
    ep.updates = int(state["updates"])
    sums = eng.sums
    for mine, saved in zip((sums.acc, sums.bad, sums.step), state["sums"]):
        mine.copy_(saved)
    sums.n, sums.n_ce, sums.n_res = (int(c) for c in state["counts"])
    eng.stage.bucket.flat.copy_(state["grads"])
    return int(state["tick"])
