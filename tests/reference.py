"""An independent one-process reference of the math of ALGORITHM.md, written from the text, not from
the engine: the test oracle the MPI engine is compared with.

- pipeline(): the pipeline coupling (s.4). Tick by tick: at tick t stage k forwards micro-batch
  t - k and updates with micro-batch t - 2(K-1) + k, whose adjoint stage k+1 produced at tick t-1
  (schedule "tick"), or with micro-batch t - (K-1), whose adjoint stage k+1 produced at this tick
  (schedule "1f1b"; the stages are visited last to first, so it is there)."""
import torch
import torch.nn.functional as F

from hpc_layerpar.auxstore import DTYPES
from hpc_layerpar.data import epoch_batches, replica_batches, replica_shard
from hpc_layerpar.filters import DSFilter
from hpc_layerpar.graphs import SGDUpdate


def pipeline(make_model, make_opt, data, ranges, *, method, ds, epochs, batch_size, micro, seed, lr, betas,
             al_rho=0.5, message_dtype="float32", replicas=1, ds_up="smooth", schedule="tick", stash=False):
    """betas[k]: the penalty weight of boundary k+1 (the output of stage k). Returns (models, M) with
    M[k] the per-sample multipliers of boundary k+1 (AL) or None. stash: every B of a non-last stage
    at a copy of the parameters its F used (weight stashing), its gradient added to the step in progress."""
    K = len(ranges)
    models = [make_model() for _ in range(K)]
    opts = [make_opt(m) for m in models]
    filt = DSFilter(ds, ds_up)
    # the package's one SGD expression (graphs.SGDUpdate, itself checked against torch.optim.SGD): the
    # optimizer is not what this reference checks, and a last-bit rounding difference in it would be
    # amplified by bfloat16 messages into a tolerance that depends on the CPU
    sgds = [SGDUpdate(o, [p for el in m.elements[a:b] for p in el.parameters()], data.train_x.device)
            for o, m, (a, b) in zip(opts, models, ranges)]
    wire = DTYPES[message_dtype]
    n, R = data.n_train, replicas
    sub = batch_size // R
    mb = sub // micro
    shards = [torch.arange(n)] if R == 1 else [replica_shard(n, R, r, seed) for r in range(R)]
    out_shapes = [filt.coarse_shape(models[0].shapes[b]) for _, b in ranges[:-1]]
    M = [torch.zeros((n,) + s, device=data.train_x.device) if method == "al" else None for s in out_shapes] + [None]

    def rnd(t):
        return t.to(wire).to(torch.float32)

    def bn_frozen(model):  # a recompute must not count the micro-batch twice in running statistics
        class Ctx:
            def __enter__(self):
                self.bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
                self.saved = [(b.momentum, b.num_batches_tracked.clone()) for b in self.bns]
                for b in self.bns:
                    b.momentum = 0.0

            def __exit__(self, *exc):
                for b, (m, c) in zip(self.bns, self.saved):
                    b.momentum = m
                    b.num_batches_tracked.copy_(c)
        return Ctx()

    for e in range(epochs):
        if R == 1:
            big = [epoch_batches(n, batch_size, seed, e, drop_last=True)]
        else:
            steps = (n // R) // sub
            big = [replica_batches(shards[r], sub, steps, seed, e, r) for r in range(R)]
        mbs = [[b[i * mb:(i + 1) * mb] for b in big[r] for i in range(micro)] for r in range(R)]
        nm = len(mbs[0])
        nb = nm // micro
        a_in = [[{} for _ in range(K)] for _ in range(R)]    # [r][k][j]: auxiliary input of stage k
        z_out = [[{} for _ in range(K)] for _ in range(R)]   # what stage k sent for j
        adj = [[{} for _ in range(K)] for _ in range(R)]     # adjoint arriving at stage k for j
        snap = [[{} for _ in range(K)] for _ in range(R)]    # stash: stage k's parameters at the F of j
        updates = [0] * K
        for m_ in models:
            m_.train()
        for o in opts:
            o.zero_grad(set_to_none=True)
        lag = {"tick": 1, "1f1b": 0}[schedule]  # ticks an adjoint takes to reach stage k-1
        for t in range(nm + (1 + lag) * (K - 1)):
            for k in range(K - 1, -1, -1):
                a0, b0 = ranges[k]
                jf, jb = t - k, t - (K - 1) - lag * (K - 1 - k)
                for r in range(R):
                    if 0 <= jf < nm and k < K - 1:  # F: the forward message (stage K-1 forwards in B)
                        x = data.train_batch(mbs[r][jf])[0] if k == 0 else filt.up(a_in[r][k][jf])
                        with torch.no_grad():
                            z_out[r][k][jf] = rnd(filt.down(models[k](x, a0, b0)))
                        if stash:
                            snap[r][k][jf] = _snapshot(models[k], a0, b0)
                        a_in[r][k + 1][jf] = z_out[r][k][jf]
                if not 0 <= jb < nm:
                    continue
                for r in range(R):
                    idx = mbs[r][jb]
                    nbt = len(idx)
                    leaf = None
                    if k == 0:
                        x = data.train_batch(idx)[0]
                    else:
                        leaf = a_in[r][k].pop(jb).clone().requires_grad_(True)
                        x = filt.up(leaf)
                    if k == K - 1:
                        loss = F.cross_entropy(models[k](x, a0, b0), data.train_y[idx])
                    else:
                        w = snap[r][k].pop(jb) if stash else None
                        with bn_frozen(models[k]):
                            d = filt.down(_apply(models[k], x, a0, b0, w))
                        numel = d[0].numel()
                        anchor = z_out[r][k].pop(jb)
                        p = adj[r][k].pop(jb)
                        loss = (p * d).sum() / nbt + 0.5 * betas[k] / numel * (d - anchor).pow(2).sum() / nbt
                        if method == "al":
                            m = M[k][idx]
                            loss = loss + (m * (d - anchor)).sum() / nbt
                            M[k][idx] = m + al_rho * betas[k] / numel * (d - anchor).detach()
                    (loss / micro).backward()  # sums the replicas' gradients, as the Allreduce does
                    if stash and k < K - 1:
                        _add_grads(models[k], w)
                    if leaf is not None:
                        adj[r][k - 1][jb] = rnd(leaf.grad * (nbt * micro))  # p = |mu| dL/da
                if (jb + 1) % micro == 0:
                    _step_stage(sgds[k], lr, R)
                    updates[k] += 1
        assert all(u == nb for u in updates)
    return models, M


def _snapshot(model, a, b) -> dict:
    """Copies of the parameters of elements [a, b), by name: what F saw."""
    mine = tuple(f"elements.{i}." for i in range(a, b))
    return {name: v.detach().clone() for name, v in model.named_parameters() if name.startswith(mine)}


def _apply(model, x, a, b, w=None):
    """Elements [a, b) applied to x, at the copies w (leaves that gather the gradient) if given."""
    if w is None:
        return model(x, a, b)
    return torch.func.functional_call(model, {n: v.requires_grad_(True) for n, v in w.items()}, (x, a, b))


def _add_grads(model, w) -> None:
    """The gradients at the copies w belong to the live parameters: added to what they hold."""
    live = dict(model.named_parameters())
    for name, v in w.items():
        g = live[name].grad
        live[name].grad = v.grad.clone() if g is None else g + v.grad


def _step_stage(sgd, lr, replicas):
    """One optimizer step of a stage at learning rate lr, its gradients (summed over the replicas'
    sub-batches) first divided by the replica count to give their mean; clears the gradients."""
    sgd.set_lr(lr)
    if replicas > 1:
        for prm in sgd.params:
            prm.grad /= replicas
    sgd()
    for prm in sgd.params:
        prm.grad = None
