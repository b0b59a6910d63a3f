"""One command, one run on one GPU: how this engine's steps compare with the best single-GPU loop, and
what K GPUs would gain (what each figure is: benchmarks/README.md, "GPU").

    python benchmarks/gpu.py [--models resnet20-mnist,resnet56] [--ks 2,4,8] [--steps 60] [--micro timed,0,1]
                             [--json OUT.json] [--save-costs COSTS.json] [--share 2 --data data/mnist.h5]

Per model, at batch 128, ms per step of a plain loop (eager; captured as one CUDA graph, fp32 and
bf16: the single-GPU limit) and of this engine's serial step; then, at each K and M, every pipeline
stage of the split a run makes, timed alone as if on its own GPU (the engine's F, B and optimizer
replays, messages not sent) against its captured twin; data parallelism (the network captured at
batch 128/K plus a ring allreduce); rho of both projected for NVLink and InfiniBand HDR, from the
measured steps and from the scaling model (hpc_layerpar/scaling.py) fed with the micro-batch's
element costs timed as captured bf16 graphs."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from gpu_share import share  # noqa: E402  (beside this script)

from hpc_layerpar import graphs  # noqa: E402
from hpc_layerpar import scaling as S  # noqa: E402
from hpc_layerpar.buckets import sync_device  # noqa: E402
from hpc_layerpar.comm import Comm  # noqa: E402
from hpc_layerpar.config import OptimConfig, ParallelConfig  # noqa: E402
from hpc_layerpar.data import DeviceDataset  # noqa: E402
from hpc_layerpar.dataformat import write_dataset  # noqa: E402
from hpc_layerpar.models import build_model, count_parameters, place_model, smallest_map  # noqa: E402
from hpc_layerpar.partition import balanced_partition, role_costs  # noqa: E402
from hpc_layerpar.pipeline import PipelineEngine  # noqa: E402
from hpc_layerpar.runsetup import device_micro, element_costs  # noqa: E402
from hpc_layerpar.schedule import micro_batches, micro_candidates  # noqa: E402
from hpc_layerpar.serial import SerialEngine, make_optimizer  # noqa: E402

MODELS = {"resnet20-mnist": (20, 1, 28, 10), "resnet56": (56, 3, 32, 10), "resnet110": (110, 3, 32, 10),
          "resnet8-tiny": (8, 1, 8, 4)}  # the last: the CPU smoke test of this script
OPT = OptimConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
BATCH = 128
DEV = torch.device("cuda")  # --device cpu: a smoke run of the same code, graphs emulated (no timing value)


def wall_ms(fn, steps: int, warm: int = 3) -> float:
    """ms per call of fn, wall clock between device syncs (host overheads count, as in a run)."""
    for _ in range(warm):
        fn()
    sync_device(DEV)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync_device(DEV)
    return 1e3 * (time.perf_counter() - t0) / steps


def synthetic(tmp: str, c: int, h: int, classes: int, n: int) -> str:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, c, h, h), dtype=np.uint8)
    y = rng.integers(0, classes, size=n).astype(np.int64)
    return write_dataset(os.path.join(tmp, f"bench-{c}x{h}.h5"), name="synthetic", train=(x, y),
                         test=(x[:256], y[:256]), num_classes=classes, source="benchmarks/gpu.py", hflip=False)


def new_model(depth, c, h, classes, *, precision="fp32", placed=True):
    torch.manual_seed(0)
    m = build_model("resnet", depth, in_channels=c, image_size=h, num_classes=classes)
    return place_model(m, DEV, precision) if placed else m.to(DEV)


def capture(fn, warm: int = 3):
    """The step captured as one CUDA graph (graphs.capture); off CUDA, an object whose replay runs it."""
    if DEV.type != "cuda":
        fn()
        return SimpleNamespace(replay=fn)  # off CUDA: replay() runs the function
    return graphs.capture(fn, warm)


# ---- the single-GPU loops -------------------------------------------------------------------
def plain_loop(data, depth, c, h, classes, steps, *, graph: bool, bf16: bool, batch: int = 0) -> float:
    """ms per step of the best plain PyTorch loop: eager fp32, or one captured graph per step
    (batch: BATCH unless given)."""
    batch = batch or BATCH
    model = new_model(depth, c, h, classes, placed=bf16)
    if not bf16:
        model.channels_last = False
    opt = torch.optim.SGD(model.parameters(), lr=OPT.lr, momentum=OPT.momentum, nesterov=True,
                          weight_decay=OPT.weight_decay)
    ids = torch.randint(0, data.n_train, (batch,), device=DEV)
    pool = torch.randint(0, data.n_train, (steps + 8, batch), device=DEV)

    def step():
        x, y = data.train_batch(ids)
        with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.elements[0](x.contiguous(memory_format=torch.channels_last) if bf16 else x)
            for el in model.elements[1:]:
                out = el(out)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=not graph)
        loss.backward()
        opt.step()

    it = iter(range(10**9))
    if not graph:
        return wall_ms(lambda: (ids.copy_(pool[next(it) % len(pool)]), step()), steps)
    g = capture(step)
    return wall_ms(lambda: (ids.copy_(pool[next(it) % len(pool)]), g.replay()), steps)


def engine_serial(path, depth, c, h, classes, steps, *, graphs: str, precision: str) -> float:
    """ms per step of SerialEngine over an epoch of `steps` steps (after one epoch that captures)."""
    data = DeviceDataset(path, DEV, verify=False)
    model = new_model(depth, c, h, classes, precision=precision, placed=True)
    solo = Comm.self_()
    eng = SerialEngine(model, make_optimizer(model, OPT), solo, data, None, batch_size=BATCH, drop_last=True,
                       seed=0, graphs=graphs)
    eng.train_epoch(0, lambda t: OPT.lr)
    sync_device(DEV)
    t0 = time.perf_counter()
    st = eng.train_epoch(1, lambda t: OPT.lr * (1 - 0.01 * t))
    sync_device(DEV)
    ms = 1e3 * (time.perf_counter() - t0) / st.steps
    solo.free()
    return ms


# ---- one stage alone -------------------------------------------------------------------------
class _Alone:
    """Rank k of K for a stage timed alone: the engine's channels need neighbour ranks to name, and
    this benchmark sends nothing (Channel.send is not called)."""

    def __init__(self, k, K):
        self.rank, self.size = k, K

    def neighbours(self):
        return self.rank - 1, self.rank + 1


def stage_engine_ms(data, depth, c, h, classes, ranges, k, steps, micro=0):
    """(engine ms per global-batch step, twin ms, bytes per step sent by this stage); micro: the
    pipeline's M (0: parallel.micro_batches=auto)."""
    K = len(ranges)
    model = new_model(depth, c, h, classes, precision="bf16")
    eng = PipelineEngine(model, make_optimizer(model, OPT), _Alone(k, K), data, ranges,
                         ParallelConfig(micro_batches=micro),
                         method="penalty", batch_size=BATCH, drop_last=True, seed=0, graphs=GRAPHS())
    M, n = eng.M, eng.micro
    mbs = eng.micro_batches(0)
    dev = eng.begin_epoch(0, 1.0, mbs)
    g = torch.Generator(device=DEV).manual_seed(k)
    a = None if eng.first else torch.randn((n,) + tuple(eng.in_shape), device=DEV, generator=g)
    if not eng.last:
        p_in = 1e-3 * torch.randn((n,) + tuple(eng.out_shape), device=DEV, generator=g)
        anchor = torch.randn((n,) + tuple(eng.out_shape), device=DEV, generator=g)
        outbox = torch.empty_like(anchor)
    inbox = None if eng.first else torch.empty_like(a)
    it = iter(range(10**9))

    def step():  # as PipelineEngine._forward / _backward / _step issue it, messages not sent
        base = (next(it) % max(len(mbs) // M, 1)) * M
        for i in range(M):
            j = base + i
            if not eng.last:
                d = eng.graphs.replay("F", dev, j, n, a=a)[0]
                outbox.copy_(d)
                d.clone()  # the anchor kept for B
                (adj,) = eng.graphs.replay("B", dev, j, n, a=a, p=p_in, anchor=anchor)
            else:
                (adj,) = eng.graphs.replay("B", dev, j, n, a=a)
            eng.sums.count(n, residual=not eng.last, ce=eng.last)
            if adj is not None:
                inbox.copy_(adj)
        eng.stage.sgd.set_lr(OPT.lr)
        eng.graphs.replay("S", dev, None, 0)

    ms = wall_ms(step, steps)
    sent = eng.bytes_per_epoch(BATCH, 4)
    twin = stage_twin_ms(data, depth, c, h, classes, eng, steps)
    return ms, twin, sent


def stage_twin_ms(data, depth, c, h, classes, eng, steps) -> float:
    """The stage's step as one captured graph of plain PyTorch: the lower bound for the engine. Its
    inputs come as the engine's do: stage 0 gathers its images (for F and again for B), the last
    stage its labels; the others read an auxiliary input."""
    model = new_model(depth, c, h, classes, precision="bf16")
    start, end, M, n = eng.stage.start, eng.stage.end, eng.M, eng.micro
    params = [p for el in model.elements[start:end] for p in el.parameters()]
    opt = torch.optim.SGD(params, lr=OPT.lr, momentum=OPT.momentum, nesterov=True, weight_decay=OPT.weight_decay)
    ids = torch.randint(0, data.n_train, (n,), device=DEV)
    a_in = torch.randn((n,) + tuple(model.shapes[start]), device=DEV)

    def x_in():
        return data.train_batch(ids)[0] if start == 0 else a_in
    numel = 1 if eng.last else int(torch.Size(eng.out_shape).numel())
    p_in = 1e-3 * torch.randn((n,) + tuple(eng.out_shape or ()), device=DEV) if not eng.last else None
    anchor = torch.randn_like(p_in) if p_in is not None else None

    def step():
        for _ in range(M):
            if not eng.last:
                with torch.no_grad():
                    model(x_in(), start, end)
            leaf = x_in().detach().requires_grad_(start > 0)
            u = model(leaf, start, end)
            if eng.last:
                loss = F.cross_entropy(u, data.train_y[ids])
            else:
                diff = u - anchor
                loss = (p_in * u).sum() / n + (0.5 / numel) * diff.pow(2).sum() / n
            (loss / M).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()  # creates .grad and the momentum buffers outside the graph's pool
    g = capture(step)
    return wall_ms(g.replay, steps)


# ---- per-element costs: the split and the scaling model ---------------------------------------
def micro_of(model, micro, k: int, timed: dict, sched: str = "tick") -> tuple:
    """(the pipeline's M at K = k, the device timings behind it): micro as given, 0 the BatchNorm rule
    (parallel.micro_measure=off), "timed" the automatic M a run makes on this device
    (runsetup.device_micro), timed once per candidate list (the same for every K <= 4) in `timed`."""
    net = new_model(*model, precision="bf16")
    if micro != "timed":
        return micro_batches(ParallelConfig(micro_batches=micro), BATCH, smallest_map(net), stages=k), {}
    key = (sched,) + tuple(micro_candidates(ParallelConfig(), BATCH, smallest_map(net), k))
    if key not in timed:
        solo = Comm.self_()
        pc = ParallelConfig(micro_measure="on", schedule=sched)
        timed[key] = device_micro(net, pc, solo, BATCH, k, DEV, DEV.type == "cuda")
        solo.free()
    return timed[key]


def split_costs_graph(depth, c, h, classes, m: int) -> tuple:
    """(upstream costs, last-stage costs, forward + backward, forward) per element in us at the
    micro-batch BATCH / m, measured as a run measures them (runsetup.element_costs, bf16, captured
    graphs on CUDA): what parallel.partition=time balances."""
    model = new_model(depth, c, h, classes, precision="bf16")
    solo = Comm.self_()
    fb, fwd = element_costs(model, ParallelConfig(micro_batches=m), solo, BATCH // m, DEV, graphs=DEV.type == "cuda")
    solo.free()
    return role_costs(fb, fwd) + (fb, fwd)


def GRAPHS() -> str:
    """The engines' graph mode here: captured on CUDA, emulated in a CPU smoke run."""
    return "cuda" if DEV.type == "cuda" else "emulate"


def main():
    global DEV, BATCH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20-mnist,resnet56")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--stage-models", default="resnet56", help="models whose stages are timed at each K")
    ap.add_argument("--micro", default="timed,0,1",
                    help="the pipeline's micro-batches per step to time: timed (the automatic M a run makes on "
                         "this device), 0 (the BatchNorm rule alone), or a count")
    ap.add_argument("--schedules", default="tick", help="parallel.schedule values to project: tick, 1f1b")
    ap.add_argument("--split", default="time", choices=["time", "blocks"],
                    help="stage split: balanced by captured element times (as a run does), or by block count")
    ap.add_argument("--share-micro", type=int, default=0, help="parallel.micro_batches of the --share run")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--save-costs", help="per-element captured-bf16 costs, for benchmarks/scaling.py --costs")
    ap.add_argument("--share", type=int, default=0, help="K ranks sharing this GPU on --data (0: skip)")
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "mnist.h5"))
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke test of this script")
    a = ap.parse_args()
    DEV, BATCH = torch.device(a.device), a.batch
    if DEV.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device (this torch sees none); --device cpu: a smoke run")
    torch.backends.cudnn.benchmark = True
    ks = [int(k) for k in a.ks.split(",")]
    res = {"device": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu (smoke run)",
           "torch": torch.__version__, "batch": BATCH, "models": {}}
    print(f"# {res['device']}, torch {torch.__version__}, batch {BATCH}, {a.steps} timed steps per figure")
    tmp = tempfile.mkdtemp()
    costs_out = {}
    for name in a.models.split(","):
        depth, c, h, classes = MODELS[name]
        path = synthetic(tmp, c, h, classes, BATCH * a.steps)
        data = DeviceDataset(path, DEV, verify=False)
        r = {}
        r["eager_fp32"] = plain_loop(data, depth, c, h, classes, a.steps, graph=False, bf16=False)
        r["graph_fp32"] = plain_loop(data, depth, c, h, classes, a.steps, graph=True, bf16=False)
        r["graph_bf16"] = plain_loop(data, depth, c, h, classes, a.steps, graph=True, bf16=True)
        r["engine_eager_fp32"] = engine_serial(path, depth, c, h, classes, a.steps, graphs="off", precision="fp32")
        r["engine_graph_bf16"] = engine_serial(path, depth, c, h, classes, a.steps, graphs=GRAPHS(),
                                               precision="bf16")
        r["engine_vs_graph_bf16"] = r["engine_graph_bf16"] / r["graph_bf16"]
        print(f"\n## {name} ({c}x{h}x{h}), ms per step")
        print("| eager fp32 | graph fp32 | graph bf16 (limit) | engine eager fp32 | engine graph bf16 "
              "| engine / limit |")
        print("| --- | --- | --- | --- | --- | --- |")
        print(f"| {r['eager_fp32']:.2f} | {r['graph_fp32']:.2f} | {r['graph_bf16']:.2f} | "
              f"{r['engine_eager_fp32']:.2f} | {r['engine_graph_bf16']:.2f} | {r['engine_vs_graph_bf16']:.2f} |",
              flush=True)
        if name in a.stage_models.split(","):
            model = new_model(depth, c, h, classes)
            n_el, params = len(model), count_parameters(model)
            numel = [int(torch.Size(s).numel()) for s in model.shapes]
            t1 = r["graph_bf16"] / 1e3
            split_at = {1: split_costs_graph(depth, c, h, classes, 1)}  # by M: measured once each
            el = [us / 1e6 for us in split_at[1][2]]  # forward + backward at the whole batch
            costs_out[name] = {"element_seconds": el, "boundary_numel": numel, "parameters": params,
                               "batch": BATCH, "device": f"{res['device']} captured bf16"}
            smodel = S.Model(name, el, numel, params, BATCH, t1_seconds=t1)
            r["stages"], r["timed_micro"] = {}, {}
            r["split_costs"] = {str(BATCH): {"forward_backward_us": split_at[1][2], "forward_us": split_at[1][3]}}
            # time: the engine's split (parallel.partition=time, elements timed as captured graphs);
            # blocks: one element one unit (the split of the table)
            rows_at = {}  # (K, M): the stages' timings, the same replays on either schedule
            for micro, sched in [(x if x == "timed" else int(x), sc) for x in a.micro.split(",")
                                 for sc in a.schedules.split(",")]:
                mlabel = {0: "auto", "timed": "timed"}.get(micro, str(micro))
                print(f"\n### {name}: stages alone (bf16, graphs), micro-batches {mlabel}, schedule {sched}, split by "
                      f"{a.split}; T1 = graph bf16 loop; model: the scaling model fed the micro-batch's element costs")
                print("| K | M | stage ms (engine) | twin ms | engine / twin (max) | MB sent per step (max) | "
                      "rho compute | DP at batch/K ms | rho DP compute | NVLink rho par / DP | IB HDR rho par / DP "
                      "| model NVLink par / DP |")
                print("| --- | " + " | ".join("---" for _ in range(11)) + " |")
                notes, timed = [], {}
                for k in ks:
                    m, per = micro_of((depth, c, h, classes), micro, k, timed, sched)
                    if per:
                        r["timed_micro"][str(k)] = {"M": m, "seconds": {str(x): t for x, t in per.items()}}
                    if m not in split_at:
                        split_at[m] = split_costs_graph(depth, c, h, classes, m)
                        r["split_costs"][str(BATCH // m)] = {"forward_backward_us": split_at[m][2],
                                                             "forward_us": split_at[m][3]}
                    split_costs = split_at[m] if a.split == "time" else ([1] * n_el, [1] * n_el)
                    ranges = balanced_partition(split_costs[0], k, split_costs[1])
                    if (k, m) not in rows_at:
                        rows_at[(k, m)] = [stage_engine_ms(data, depth, c, h, classes, ranges, s, a.steps, m)
                                           for s in range(k)]
                    rows = rows_at[(k, m)]
                    eng_ms, twin_ms, sent = ([x[i] for x in rows] for i in range(3))
                    dp_ms = plain_loop(data, depth, c, h, classes, a.steps, graph=True, bf16=True, batch=BATCH // k)
                    proj, fb_s, fwd_s = {}, *([us / 1e6 for us in split_at[m][i]] for i in (2, 3))
                    for key, net in (("nvlink", S.PRESETS["nvlink"]), ("ib-hdr", S.PRESETS["ib-hdr"])):
                        comm = [2 * m * net.latency_s + b / net.bandwidth for b in sent]
                        tp = max(max(e / 1e3, cm) for e, cm in zip(eng_ms, comm))
                        if sched == "1f1b":  # an activation and an adjoint hop per micro-batch on the critical path
                            tp = max(eng_ms) / 1e3 + 2 * m * (net.latency_s + max(sent) / (2 * m) / net.bandwidth)
                        td = dp_ms / 1e3 + S.allreduce_seconds(4 * params, k, net)
                        model_par = S.rho_parallel(smodel, k, net, micro=m, micro_seconds=fb_s, micro_forward=fwd_s,
                                                   schedule=sched)
                        proj[key] = (t1 / tp, t1 / td, model_par, S.rho_dataparallel(smodel, k, net))
                    r["stages"][f"{k}/{mlabel}" + ("" if sched == "tick" else f"/{sched}")] = {
                        "ranges": ranges, "engine_ms": eng_ms, "twin_ms": twin_ms, "bytes_per_step": sent,
                        "dp_ms": dp_ms, "projected": proj, "micro_batches": m}
                    ratio = max(e / t for e, t in zip(eng_ms, twin_ms))
                    print(f"| {k} | {m} | {' / '.join(f'{x:.2f}' for x in eng_ms)} | "
                          f"{' / '.join(f'{x:.2f}' for x in twin_ms)} | {ratio:.2f} | {max(sent) / 1e6:.2f} | "
                          f"{t1 * 1e3 / max(eng_ms):.2f} | {dp_ms:.2f} | {r['graph_bf16'] / dp_ms:.2f} | "
                          f"{proj['nvlink'][0]:.2f} / {proj['nvlink'][1]:.2f} | "
                          f"{proj['ib-hdr'][0]:.2f} / {proj['ib-hdr'][1]:.2f} | "
                          f"{proj['nvlink'][2]:.2f} / {proj['nvlink'][3]:.2f} |", flush=True)
                    if per:
                        notes.append(f"K = {k}: " + ", ".join(f"M = {x} {t * 1e3:.2f} ms" for x, t in per.items()))
                if notes:
                    print("\n(the automatic M timed on this device, forward + backward of a batch as M micro-batches: "
                          + "; ".join(notes) + ")", flush=True)
        res["models"][name] = r
    if a.share:
        if not os.path.exists(a.data):
            raise SystemExit(f"--share needs --data {a.data}: python -m data_prep mnist --download first")
        sh = share(a.share, a.data, tmp, a.share_micro)
        res["share"] = sh
        print(f"\n## {a.share} ranks sharing this GPU (micro-batches {a.share_micro or 'auto'}), one epoch of "
              f"{os.path.basename(a.data)} (bf16): serial "
              f"{sh['serial_epoch_s']:.2f} s, penalty {sh['penalty_epoch_s']:.2f} s, rho {sh['rho']:.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    if a.save_costs and costs_out:
        with open(a.save_costs, "w") as fh:
            json.dump({"models": costs_out}, fh, indent=1)


if __name__ == "__main__":
    main()
