"""Set-up steps of a run that every rank performs alike: device, threads, checks against the data,
the stage split; user errors are agreed on so that all ranks fail together."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from .auxstore import DTYPES
from .config import Config
from .costs import measure_costs, parse_cuts
from .errors import ConfigError, UserError
from .filters import DSFilter, check_boundaries, divides
from .models import smallest_map
from .partition import balanced_partition, role_costs, upstream_costs
from .pipeline_plan import recompute_share
from .schedule import least_micro, micro_batches, micro_candidates, timed_micro

if TYPE_CHECKING:  # annotations only: importing comm here at run time is not needed
    from .comm import Comm
    from .data import DeviceDataset


def resolve_device(spec: str, local_rank: int) -> torch.device:
    """run.device as a torch device; ranks on one node take its GPUs round-robin."""
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"run.device={spec!r} but this torch sees no CUDA device "
                          f"(torch {torch.__version__}); use run.device=auto or cpu.")
    if spec == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    idx = int(spec.split(":")[1])
    if idx >= torch.cuda.device_count():
        raise ConfigError(f"run.device={spec!r} but only {torch.cuda.device_count()} CUDA devices exist.")
    return torch.device("cuda", idx)


def set_deterministic(on: bool) -> None:
    """run.deterministic: PyTorch's deterministic algorithms (an error, not a silent fallback, for an
    operation that has none), cuDNN without autotuning, and the cuBLAS workspace setting those need
    (read when cuBLAS initialises, so set here, before the first CUDA kernel). CPU kernels of this
    code are deterministic at a fixed thread count either way."""
    if not on:
        # cuDNN times its algorithms once per shape (in the warm-up before a CUDA graph capture)
        torch.backends.cudnn.benchmark = True
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def set_threads(threads: int, local_size: int) -> int:
    """torch threads per rank: run.threads, or this node's cores shared among its ranks (0)."""
    if threads == 0:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        threads = max(1, cores // max(local_size, 1))
    torch.set_num_threads(threads)
    return threads


def check_fit(cfg: Config, data: DeviceDataset, comm: Comm) -> None:
    """Configuration checks that need the dataset's shape."""
    c, h, w = data.shape
    if h != w or h % 4:
        raise ConfigError(f"images of {data.name} are {h}x{w}; the models need square images whose side "
                          "is divisible by 4. Re-create the dataset or pad it.")
    if cfg.data.subset > data.n_train_file:
        raise ConfigError(f"data.subset={cfg.data.subset} exceeds the {data.n_train_file} training images of "
                          f"{data.name}; use at most {data.n_train_file}, or 0 for all of them.")
    if cfg.data.batch_size > data.n_train:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} exceeds the {data.n_train} training "
                          f"images of {data.name}; use a smaller batch.")
    if cfg.data.batch_size < comm.size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is smaller than the {comm.size} ranks "
                          "that share each batch; use a batch of at least one sample per rank.")


def agree(comm: Comm, fn):
    """Run a set-up step on every rank; if it fails with a user error on any rank, raise that error
    on all ranks alike, so no rank waits in a collective for a peer that gave up."""
    err = None
    try:
        result = fn()
    except UserError as exc:
        err, result = exc, None
    # the exception itself travels (it pickles), so every rank raises the same class and message
    errors = comm.allgather_obj(err)
    for r, e in enumerate(errors):
        if e is not None:
            raise type(e)(str(e) if comm.size == 1 else f"{e} (reported by rank {r})")
    return result


def element_costs(model, pcfg, comm, batch_size: int, device, graphs: bool = False) -> tuple[list, list]:
    """(forward + backward, forward alone) per element, for the partitioner. Measured times are
    averaged over the ranks by one Allreduce, so every rank gets bit-identical numbers and computes
    the same split; with graphs (the steps run as CUDA graphs) each element is timed as a captured
    graph too. partition=macs: the analytic forward count, backward taken as twice the forward.
    batch_size: the batch a stage step runs on (the pipeline: a micro-batch)."""
    if pcfg.partition != "time":
        return [3 * c for c in model.costs], list(model.costs)

    def mean(mine):
        return [int(round(c)) for c in comm.allreduce_array(mine) / comm.size]

    fb = mean(measure_costs(model, batch_size, device, graphs=graphs))
    fwd = mean(measure_costs(model, batch_size, device, graphs=graphs, forward=True))
    return fb, fwd


def device_micro(model, pcfg, comm, batch_size: int, stages: int, device, graphs: bool = False,
                 deterministic: bool = False) -> tuple:
    """(M, {M: seconds of forward + backward of one replica's batch as M micro-batches}): the
    automatic micro-batch count on a device that loses throughput on small batches (a GPU, where a
    32-sample micro-batch of a ResNet on 32x32 images runs at 40% of the 128-sample throughput:
    docs/RESULTS.md). Of the BatchNorm rule's candidates, the largest whose M micro-batches (the
    whole network timed per element at batch/(R M), as the partitioner times it, summed over the
    elements, averaged over ranks so all ranks choose alike) cost at most 1 + micro_overhead of one
    batch, but never one that leaves stage 0 more than micro_max_delay optimizer steps behind.
    Timed with micro_measure=on, or auto when every rank holds a GPU and the run is neither
    simulated (its threads would time each other) nor run.deterministic (a timed M may differ
    between launches); otherwise the rule's M and {}."""
    cands = micro_candidates(pcfg, batch_size, smallest_map(model), stages)
    rule = micro_batches(pcfg, batch_size, smallest_map(model), stages)
    if pcfg.micro_batches or pcfg.micro_measure == "off" or len(cands) == 1:
        return rule, {}
    if pcfg.micro_measure == "auto":
        # decided together: a rank that skipped the timing would leave the others in its allreduce
        gpus = comm.allreduce_array([float(device.type == "cuda")], op="min")[0]
        if not gpus or pcfg.simulate or deterministic:
            return rule, {}
    sub = batch_size // pcfg.replicas
    per = {}
    for m in cands:  # ascending, 1 first
        mine = measure_costs(model, sub // m, device, graphs=graphs)
        per[m] = m * float(comm.allreduce_array(mine).sum()) / comm.size / 1e6
    # never below the M that keeps the delay trainable: at K = 8, M = 1 (14 steps) diverged (RESULTS.md)
    return timed_micro(per, pcfg.micro_overhead, least_micro(cands, stages, pcfg.micro_max_delay,
                                                                          pcfg.schedule)), per


def recompute_shares(pcfg, stages: int, micro: int, captured: bool) -> list | None:
    """Per non-last stage, the share of its micro-batches whose B recomputes the forward: those whose
    parameters move between F and B when F's graph is kept (parallel.keep_forward, eager steps only:
    captured ones always recompute), else all; none with stashed weights (parallel.stash_weights: every
    B goes through its F's graph). None: all of them on every stage."""
    if not pcfg.keep_forward or captured:
        return None
    if pcfg.stash_weights:
        return [0.0] * (stages - 1)
    shares = [recompute_share(k, stages, micro, pcfg.schedule) for k in range(stages - 1)]
    return None if all(s == 1.0 for s in shares) else shares


def role_split_costs(costs, forward, k: int, shares=None) -> tuple:
    """(upstream, last): each non-last stage's element costs in its role (k-1 lists, by `shares`, the
    part of its micro-batches that recompute the forward: all without) and the last stage's."""
    upstream = upstream_costs(costs, forward, [1.0] * (k - 1) if shares is None else shares)
    return upstream, role_costs(costs, forward)[1]


def _role_split(costs, forward, k: int, starts=None, shares=None) -> list:
    upstream, last = role_split_costs(costs, forward, k, shares)
    return balanced_partition(last, k, last, starts, upstream=upstream)


def ds_starts(model, ds: int):
    """The elements a stage may start at under DS factor ds (its H and W divisible by ds), or None
    when every element qualifies (the split is then the unconstrained one, unchanged)."""
    ok = [i for i in range(1, len(model)) if divides(ds, model.shapes[i])]
    return None if len(ok) == len(model) - 1 else ok


def stage_ranges(model, k: int, pcfg, costs, forward=None, shares=None) -> list:
    """The contiguous split for k ranks (balanced by each element's cost in its stage's role, with
    stages starting only where the DS factor divides the activations; or given, then checked).
    shares: recompute_shares."""
    try:
        starts = ds_starts(model, pcfg.ds)
        ranges = parse_cuts(pcfg.partition, len(model), k) or \
            _role_split(costs, forward, k, starts, shares)
    except ValueError as exc:  # PartitionError is a ValueError
        why = "" if starts is None else (f" parallel.ds={pcfg.ds} divides the activations only where elements "
                                         f"{starts} start; use a smaller parallel.ds or fewer ranks.")
        raise ConfigError(f"{exc}{why} The parallel phases put one stage on each rank.") from None
    ds = pcfg.ds
    try:
        check_boundaries(ds, [model.shapes[a] for a, _ in ranges[1:]])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return ranges


def aux_bytes(model, ranges, n_train: int, pcfg, with_multipliers: bool) -> list:
    """Bytes of per-sample auxiliary storage per rank. The auxiliary variables live only while a
    micro-batch is in flight; AL keeps per-sample multipliers of boundary k+1 on rank k."""
    filt = DSFilter.of(pcfg)
    size = DTYPES[pcfg.aux_dtype].itemsize
    rows = [n_train * int(torch.Size(filt.coarse_shape(model.shapes[a])).numel()) * size for a, _ in ranges[1:]]
    return [r if with_multipliers else 0 for r in rows] + [0]
