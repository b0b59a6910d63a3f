"""Single-process simulation of the layer-parallel algorithm (ALGORITHM.md s.4): K stage copies
processed one after another, no messages. Within an epoch stage k only needs values of earlier
epochs from stage k+1 and this epoch's D(u) from stage k-1, so running the stages in order
0..K-1 reproduces exactly what the concurrent MPI ranks compute."""
import torch
import torch.nn.functional as F

from hpc_layerpar.auxstore import DTYPES, al_update, penalty_update
from hpc_layerpar.data import epoch_batches, replica_batches, replica_shard
from hpc_layerpar.filters import DSFilter


def simulate(make_model, make_opt, data, ranges, *, method, ds, epochs, batch_size, seed, lr, beta,
             eta=1.0, message_dtype="float32", aux_dtype="float32", replicas=1):
    """replicas R > 1: replica r owns the shard replica_shard(n, R, r) and steps on sub-batches of
    batch_size / R; each stage's gradients are the mean over the R sub-batches of a step."""
    K = len(ranges)
    models = [make_model() for _ in range(K)]
    opts = [make_opt(m) for m in models]
    filt = DSFilter(ds)
    wire, store = DTYPES[message_dtype], DTYPES[aux_dtype]

    def rnd(t, dt):  # what a trip through a lower-precision buffer does to a value
        return t.to(dt).to(torch.float32)

    n = data.n_train
    R = replicas
    sub = batch_size // R
    shards = [torch.arange(n)] if R == 1 else [replica_shard(n, R, r, seed) for r in range(R)]
    A = [None] + [torch.zeros((n,) + filt.coarse_shape(models[0].shapes[a])) for a, _ in ranges[1:]]
    M = [None] + [torch.zeros_like(t) for t in A[1:]]
    # forward sweep: sequential batches, BatchNorm batch statistics, running statistics restored
    with torch.no_grad():
        saved = [[b.clone() for b in m.buffers()] for m in models]
        for ids in shards:
            for lo in range(0, len(ids), sub):
                rows = ids[lo:lo + sub]
                x = data.normalise(data.train_x[rows])
                for k, (a, b) in enumerate(ranges):
                    if k > 0:
                        A[k][rows] = rnd(filt.down(x), store)
                    if k < K - 1:
                        x = models[k].train()(x, a, b)
        for m, s in zip(models, saved):
            for buf, v in zip(m.buffers(), s):
                buf.copy_(v)
    for e in range(epochs):
        if R == 1:
            per_replica = [epoch_batches(n, batch_size, seed, e, drop_last=True)]
        else:
            steps = (n // R) // sub
            per_replica = [replica_batches(shards[r], sub, steps, seed, e, r) for r in range(R)]
        z_prev = None
        for k, (a0, b0) in enumerate(ranges):
            z_this = [[] for _ in range(R)]
            models[k].train()
            for g in opts[k].param_groups:
                g["lr"] = lr
            for j in range(len(per_replica[0])):
                opts[k].zero_grad(set_to_none=True)
                todo = []
                for r in range(R):
                    idx = per_replica[r][j]
                    nb = len(idx)
                    av = None
                    if k == 0:
                        x = data.train_batch(idx)[0]
                    else:
                        av = A[k][idx].clone().requires_grad_(True)
                        x = filt.up(av)
                    u = models[k](x, a0, b0)
                    if k == K - 1:
                        loss = F.cross_entropy(u, data.train_y[idx])
                    else:
                        t = A[k + 1][idx] - (M[k + 1][idx] / beta if method == "al" else 0)
                        t = rnd(t, wire)
                        d = filt.down(u)
                        loss = 0.5 * beta * (d - t).pow(2).sum() / nb
                    loss.backward()  # sums the replicas' gradients, as the Allreduce does
                    if k < K - 1:
                        z_this[r].append(rnd(d.detach(), wire))
                    todo.append((r, idx, nb, av))
                if R > 1:
                    for prm in models[k].parameters():
                        if prm.grad is not None:
                            prm.grad /= R
                opts[k].step()
                for r, idx, nb, av in todo:
                    if k == 0:
                        continue
                    p = av.grad * nb
                    z = z_prev[r][j]
                    if method == "penalty":
                        A[k][idx] = rnd(penalty_update(av.detach(), z, p, beta, eta), store)
                    else:
                        an, mn = al_update(av.detach(), M[k][idx], z, p, beta, eta)
                        A[k][idx], M[k][idx] = rnd(an, store), rnd(mn, store)
            z_prev = z_this
    return models, A, M
