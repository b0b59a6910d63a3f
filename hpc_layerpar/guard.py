"""Two guards of the parallel phase: the curvature guard that keeps the penalty's step sizes stable
(checked at the start of a run), and the divergence guard that stops a run whose values stopped
being finite (checked after every epoch, on every rank alike)."""
from __future__ import annotations

import math

import torch

from .config import ConfigError
from .data import calibration_order

# lr * beta * curvature must stay below this. SGD with momentum 0.9 is stable on a quadratic up to
# about 2(1+mu)/(1+2mu) ~ 1.4 (Nesterov); the margin covers the curvature's growth during training.
SAFE = 1.0
# A distinct exit code for a run stopped by the divergence guard (2: bad input, 75: checkpointed).
EXIT_DIVERGED = 3


class DivergenceError(RuntimeError):
    """Raised on every rank alike when the divergence guard stops the run; the message says where
    the first non-finite value appeared and what to change."""


# ---- curvature guard -------------------------------------------------------------------------
def penalty_curvature(model, start: int, end: int, x: torch.Tensor, filt, per_element: bool,
                      iters: int = 12, seed: int = 0) -> float:
    """Largest eigenvalue of the Gauss-Newton matrix of the stage's penalty per unit beta:
    (1/n) J^T J with J = d D(Phi(x)) / d theta over the batch x (n samples), divided by the
    boundary's element count when the penalty is a per-element mean (as the pipeline's is).
    Power iteration with Jacobian-vector products (double backward); BatchNorm in train mode as in
    training, running statistics untouched. Works on a copy of the stage."""
    import copy

    stage = copy.deepcopy(torch.nn.Sequential(*model.elements[start:end])).train()
    params = [p for p in stage.parameters() if p.requires_grad]
    n = x.shape[0]
    u = filt.down(stage(x))
    numel = u[0].numel()
    y = torch.zeros_like(u, requires_grad=True)
    jt_y = torch.autograd.grad(u, params, grad_outputs=y, create_graph=True)  # J^T y, linear in y
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = [torch.randn(p.shape, generator=g).to(p.device) for p in params]
    lam = 0.0
    for _ in range(iters):
        norm = math.sqrt(sum(float((t * t).sum()) for t in v))
        v = [t / max(norm, 1e-30) for t in v]
        jv = torch.autograd.grad(jt_y, y, grad_outputs=v, retain_graph=True)[0]          # J v
        jtjv = torch.autograd.grad(u, params, grad_outputs=jv, retain_graph=True)        # J^T J v
        w = [t / n for t in jtjv]
        lam = sum(float((a * b).sum()) for a, b in zip(w, v))  # Rayleigh quotient, |v| = 1
        v = [t.detach() for t in w]
    return lam / numel if per_element else lam


def stage_inputs(model, ranges, data, batch: int, seed: int) -> list:
    """The true input of every stage for one fixed, un-augmented training batch, computed from the
    whole network that every rank holds at the start of a run (no communication)."""
    idx = calibration_order(data.n_train, seed)[:batch]
    x = data.train_batch(idx)[0]
    out = []
    with torch.no_grad():
        saved = [b.clone() for b in model.buffers()]
        was = model.training
        model.train()
        for a, b in ranges:
            out.append(x)
            x = model(x, a, b)
        for buf, s in zip(model.buffers(), saved):
            buf.copy_(s)
        model.train(was)
    return out


def beta_caps(model, ranges, data, filt, *, rank: int, beta: float, lr: float, batch: int, seed: int,
              mode: str) -> tuple[float, float]:
    """(curvature per unit beta, cap on beta) of this rank's outgoing boundary (nan, inf on the
    last rank); beta weighs the per-element mean of the pipeline's penalty. mode: auto (the cap is
    applied) | refuse (ConfigError when beta exceeds the cap) | off (cap = inf). The caller gathers
    the values so every rank knows every boundary's."""
    if rank == len(ranges) - 1 or mode == "off":
        return (math.nan, math.inf)
    a, b = ranges[rank]
    x = stage_inputs(model, ranges, data, batch, seed)[rank]
    kappa = penalty_curvature(model, a, b, x, filt, per_element=True, seed=seed)
    cap = SAFE / (lr * kappa) if kappa > 0 else math.inf
    if mode == "refuse" and beta > cap:
        raise ConfigError(
            f"parallel.beta={beta:g} is too stiff at boundary {rank + 1} (output of stage {rank}): the "
            f"penalty's curvature there is {kappa:.3g} per unit beta, so optim.lr x beta x curvature = "
            f"{lr * beta * kappa:.3g} > {SAFE:g} and SGD on stage {rank} would diverge. Safe range: "
            f"parallel.beta <= {cap:.3g} (or a smaller optim.lr); parallel.beta_guard=auto caps it for you.")
    return (kappa, cap)


# ---- divergence guard ------------------------------------------------------------------------
def nonfinite(tensors) -> torch.Tensor:
    """Whether any of tensors holds a NaN or Inf, as a device bool (no host read)."""
    return ~torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def agree(comms, *flags) -> tuple:
    """Collective over each communicator of comms (None skipped): for each flag, whether any rank set
    it. One small allreduce per communicator: the in-epoch check of run.check_every."""
    v = [float(f) for f in flags]
    for c in comms:
        if c is not None:
            v = [float(x) for x in c.allreduce_array(v, "max")]
    return tuple(bool(x) for x in v)


def local_problems(first_bad_step, losses, params, tensors=()) -> list:
    """What is not finite on this rank after an epoch, as short descriptions. losses: the epoch's
    loss figures that apply on this rank; tensors: (name, tensor or count of non-finite values)."""
    out = []
    if first_bad_step is not None:
        out.append(f"non-finite loss from step {first_bad_step} of the epoch")
    elif not all(math.isfinite(v) for v in losses):
        out.append("non-finite loss")
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        out.append("non-finite parameters")
    for name, t in tensors:
        if isinstance(t, int):
            if t:
                out.append(f"{t} non-finite {name}")
        elif t is not None and not bool(torch.isfinite(t).all()):
            out.append(f"non-finite {name}")
    return out


def check(comm, problems: list, *, epoch: int, phase: str, stage_of_rank, remedy: str) -> None:
    """Collective: if any rank reported a problem, raise DivergenceError on every rank with one
    message naming the ranks, stages, the epoch and the quantities."""
    every = comm.allgather_obj(problems)
    bad = [(r, p) for r, p in enumerate(every) if p]
    if not bad:
        return
    parts = [f"rank {r} (stage {stage_of_rank(r)}): {', '.join(p)}" for r, p in bad]
    raise DivergenceError(f"training diverged in epoch {epoch + 1} ({phase} phase): " + "; ".join(parts)
                          + f". The run stopped here. {remedy}")
