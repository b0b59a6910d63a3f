"""Pure: a performance model of one training step at K ranks, from measured per-element compute
times and the message sizes of ALGORITHM.md s.4, with a latency-bandwidth network model.

    serial back-propagation   T_1 = sum_i t_i                       (t_i: forward+backward of element i)
    parallel phase (K)        T_P = max_k [ r_k C_k + o_k , X_k ]   C_k: stage k's compute of the balanced split;
                              r_k = 4/3 for the pipeline's non-last stages (their forward runs
                              twice: F without gradients, then the recompute of B), 1 for the last
                              o_k = copies of its boundary activations in and out (memory bandwidth)
                              X_k = time to send and receive its messages (latency + bytes / bandwidth);
                              messages are posted ahead and overlap compute, so only the larger counts;
                              on the 1f1b schedule a micro-batch's messages lie on the critical path:
                              + 2 M (latency + one micro-batch message / bandwidth) per step
    data-parallel (K)         T_D = T_1 / K + ring allreduce of all gradients (not overlapped, as in serial.py)
    SPH run                   per epoch, a fraction f of parallel epochs and 1 - f data-parallel ones,
                              plus a stage exchange per switch

rho = T_1 / T_method. The model ignores what the measurement basis already contains (optimizer
step and data handling are inside t_i only as far as measured) and assumes batch-size-linear
compute for data-parallel shards, which holds on CPUs and for large enough GPU shards."""
from __future__ import annotations

from dataclasses import dataclass

from .partition import balanced_partition, role_costs, stage_costs, upstream_costs
from .pipeline_plan import recompute_share


@dataclass(frozen=True)
class Network:
    """A network for the model: per-message latency, per-direction bandwidth, local memory bandwidth."""
    name: str
    latency_s: float        # per message
    bandwidth: float        # bytes / s, per direction
    memory_bandwidth: float = 20e9  # bytes / s of a device-memory copy (local overheads)


PRESETS = {
    "nvlink": Network("NVLink (within a node)", 2e-6, 150e9, 1000e9),
    "ib-hdr": Network("InfiniBand HDR 200 Gb/s", 1.5e-6, 24e9, 1000e9),
    "eth25": Network("25 Gb Ethernet", 15e-6, 2.9e9, 1000e9),
}


@dataclass(frozen=True)
class Model:
    """What the model needs of a network: per-element compute seconds per step (at the global
    batch), per-boundary activation element counts per sample, and the parameter count."""
    name: str
    element_seconds: list
    boundary_numel: list    # numel of the input of element i (per sample), i = 0..n-1
    parameters: int
    batch: int
    t1_seconds: float = 0.0  # the one-rank step as measured whole (0: the sum of element_seconds)

    def t1(self) -> float:
        """Seconds of one one-rank back-propagation step."""
        return self.t1_seconds or sum(self.element_seconds)




def parallel_step(m: Model, k: int, net: Network, *, ds: int = 1, msg_bytes: int = 4, micro: int = 4,
                  steps_per_epoch: int = 390, micro_seconds=None, micro_forward=None,
                  keep: bool = False, schedule: str = "tick") -> tuple[float, list]:
    """(seconds per step of the parallel phase at K = k, the split used). The pipeline's
    non-last stages compute their forward twice, M micro-batches per step, and every epoch fills and
    drains the pipeline (2(K-1) micro-batch ticks; K-1 on the 1f1b schedule), spread over the epoch's steps.

    micro_seconds: per-element forward + backward seconds of one micro-batch (batch / micro samples)
    as measured on the device, micro_forward the forward alone (None: a third); a step is then micro
    of them. Without it, compute is taken as linear in the batch (element_seconds / micro per
    micro-batch): true on CPUs, not on a GPU, where 4 micro-batches of 32 cost 2.4 x one of 128.
    keep: B goes through F's kept graph where it may (parallel.keep_forward on eager steps; captured
    CUDA-graph steps recompute): a stage recomputes only pipeline_plan.recompute_share of its forwards.
    schedule: parallel.schedule; "1f1b" waits for each adjoint within the tick, so the ranks settle into a
    stagger whose period holds one activation and one adjoint hop of the slowest boundary."""
    if micro_seconds is None:
        us, fwd, reps = [max(1, int(t * 1e6)) for t in m.element_seconds], None, 1
    else:
        us, reps = [max(1, int(t * 1e6)) for t in micro_seconds], micro
        fwd = None if micro_forward is None else [max(1, int(t * 1e6)) for t in micro_forward]
    # split as a run splits: by each element's cost in its stage's role (partition.role_costs)
    shares = [recompute_share(s, k, micro, schedule) if keep else 1.0 for s in range(k - 1)]
    up, last = upstream_costs(us, fwd, shares), role_costs(us, fwd)[1]
    ranges = balanced_partition(last, k, last, upstream=up)
    comp = [reps * c / 1e6 for c in stage_costs(last, ranges, last, up)]  # the recompute counted upstream
    worst = hop = 0.0
    for s, (a, b) in enumerate(ranges):
        out_n = m.boundary_numel[b] // (ds * ds) if s < k - 1 else 0
        in_n = m.boundary_numel[a] // (ds * ds) if s > 0 else 0
        wire = m.batch * (out_n + in_n) * msg_bytes              # one message each way per boundary
        n_msgs = (s < k - 1) + (s > 0)
        comm = n_msgs * net.latency_s + wire / net.bandwidth
        # in flight: a kept until the update, the anchor and the adjoint read once ~ 4 passes
        local = m.batch * (2 * in_n * msg_bytes + 2 * out_n * msg_bytes) / net.memory_bandwidth
        comm += 2 * micro * net.latency_s  # one message per micro-batch each way
        worst = max(worst, comp[s] + local, comm)
        hop = max(hop, net.latency_s + m.batch * out_n * msg_bytes / (micro * net.bandwidth))
    if schedule == "1f1b":  # an activation and an adjoint hop per micro-batch, not hidden by compute
        worst += 2 * micro * hop
    if k > 1:
        worst *= 1.0 + (2 if schedule == "tick" else 1) * (k - 1) / (micro * steps_per_epoch)  # fill, drain
    return worst, ranges


def dataparallel_step(m: Model, k: int, net: Network) -> float:
    """Seconds per data-parallel step at k ranks: T_1 / k plus a ring allreduce of float32 gradients (T_1 at k = 1)."""
    t1 = m.t1()
    if k == 1:
        return t1
    return t1 / k + allreduce_seconds(4 * m.parameters, k, net)


def allreduce_seconds(nbytes: int, k: int, net: Network) -> float:
    """A ring allreduce of nbytes over k ranks: 2(k-1) messages, 2(k-1)/k of the buffer each way."""
    return 2 * (k - 1) * net.latency_s + 2 * (k - 1) / k * nbytes / net.bandwidth


def rho_parallel(m: Model, k: int, net: Network, **kw) -> float:
    """Speed-up of the parallel phase at k ranks over one-rank back-propagation (kw: as parallel_step)."""
    return m.t1() / parallel_step(m, k, net, **kw)[0]


def rho_dataparallel(m: Model, k: int, net: Network) -> float:
    """Speed-up of data-parallel training at k ranks over one-rank back-propagation."""
    return m.t1() / dataparallel_step(m, k, net)


def rho_sph(m: Model, k: int, net: Network, *, parallel_fraction: float = 0.8, phase_epochs: int = 4,
            steps_per_epoch: int = 390, **kw) -> float:
    """Whole SPH runs, per epoch on average: parallel epochs, data-parallel correction epochs, and
    per parallel phase two stage exchanges (parameters and momentum, 8 bytes per parameter)."""
    t1 = m.t1()
    tp, _ = parallel_step(m, k, net, steps_per_epoch=steps_per_epoch, **kw)
    td = dataparallel_step(m, k, net)
    exchange = 2 * (k * net.latency_s + 8 * m.parameters / net.bandwidth)
    phases_per_epoch = parallel_fraction / phase_epochs
    per_epoch = (parallel_fraction * steps_per_epoch * tp + (1 - parallel_fraction) * steps_per_epoch * td
                 + phases_per_epoch * exchange)
    return steps_per_epoch * t1 / per_epoch
