"""Single-process simulation of the layer-parallel algorithm (ALGORITHM.md s.4): K stage copies
processed one after another, no messages. Within an epoch stage k only needs values of earlier
epochs from stage k+1 and this epoch's D(u) from stage k-1, so running the stages in order
0..K-1 reproduces exactly what the concurrent MPI ranks compute."""
import torch
import torch.nn.functional as F

from hpc_layerpar.auxstore import DTYPES, al_update, penalty_update
from hpc_layerpar.data import epoch_batches
from hpc_layerpar.filters import DSFilter


def simulate(make_model, make_opt, data, ranges, *, method, ds, epochs, batch_size, seed, lr, beta,
             eta=1.0, message_dtype="float32", aux_dtype="float32"):
    K = len(ranges)
    models = [make_model() for _ in range(K)]
    opts = [make_opt(m) for m in models]
    filt = DSFilter(ds)
    wire, store = DTYPES[message_dtype], DTYPES[aux_dtype]

    def rnd(t, dt):  # what a trip through a lower-precision buffer does to a value
        return t.to(dt).to(torch.float32)

    n = data.n_train
    A = [None] + [torch.zeros((n,) + filt.coarse_shape(models[0].shapes[a])) for a, _ in ranges[1:]]
    M = [None] + [torch.zeros_like(t) for t in A[1:]]
    # forward sweep: sequential batches, BatchNorm batch statistics, running statistics restored
    with torch.no_grad():
        saved = [[b.clone() for b in m.buffers()] for m in models]
        for lo in range(0, n, batch_size):
            x = data.normalise(data.train_x[lo:lo + batch_size])
            for k, (a, b) in enumerate(ranges):
                if k > 0:
                    A[k][lo:lo + len(x)] = rnd(filt.down(x), store)
                if k < K - 1:
                    x = models[k].train()(x, a, b)
        for m, s in zip(models, saved):
            for buf, v in zip(m.buffers(), s):
                buf.copy_(v)
    for e in range(epochs):
        batches = epoch_batches(n, batch_size, seed, e, drop_last=True)
        z_prev = None
        for k, (a0, b0) in enumerate(ranges):
            z_this = []
            models[k].train()
            for g in opts[k].param_groups:
                g["lr"] = lr
            for j, idx in enumerate(batches):
                nb = len(idx)
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
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
                if k < K - 1:
                    z_this.append(rnd(d.detach(), wire))
                if k > 0:
                    p = av.grad * nb
                    z = z_prev[j]
                    if method == "penalty":
                        A[k][idx] = rnd(penalty_update(av.detach(), z, p, beta, eta), store)
                    else:
                        an, mn = al_update(av.detach(), M[k][idx], z, p, beta, eta)
                        A[k][idx], M[k][idx] = rnd(an, store), rnd(mn, store)
            z_prev = z_this
    return models, A, M
