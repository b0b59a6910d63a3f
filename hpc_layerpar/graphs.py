"""CUDA graphs for the training steps (run.cuda_graphs): a step is captured once per input shape and
replayed, so a launch-bound ResNet step costs one graph launch instead of hundreds of kernel launches.

A step here is a function of *static* tensors: the engine copies each step's inputs into buffers it
owns, replays, and reads the step's outputs from the tensors the capture returned. MPI stays outside
every graph. The learning rate and the penalty weight are device scalars the engine fills before a
replay, so a schedule never forces a re-capture; only a new shape (a partial last batch) does.

Capture needs warm-up runs (cuDNN picks its algorithms, autograd sets up its streams), and those runs
really train. The state they touch (parameters, buffers, gradients, optimizer state, accumulators)
is copied before and restored after, so the first replay is the step's first real execution.

`mode="emulate"` runs the same code path on any device without capturing (the step function is
called where a replay would be): the static-buffer plumbing, the warm-up restore and the SGD update
are tested that way on machines without a GPU."""
from __future__ import annotations

import torch

MODES = ("off", "cuda", "emulate")


def graph_mode(setting: str, device: torch.device) -> str:
    """run.cuda_graphs as a mode: auto and on capture on CUDA devices; elsewhere there is nothing to
    capture (config validation refuses `on` without CUDA before a run starts)."""
    if setting in ("auto", "on") and device.type == "cuda":
        return "cuda"
    return "off"


class SGDUpdate:
    """torch.optim.SGD's update (dampening 0) with the learning rate as a device tensor, so it can be
    captured once and follow any schedule. The momentum buffers are the optimizer's own, so
    checkpoints and phase switches see one optimizer state."""

    def __init__(self, opt: torch.optim.Optimizer, params, device):
        if len(opt.param_groups) != 1:
            raise ValueError("SGDUpdate expects one parameter group")
        g = opt.param_groups[0]
        if g.get("dampening", 0) != 0:
            raise ValueError("SGDUpdate implements dampening 0 only")
        self.opt = opt
        self.params = [p for p in params if p.requires_grad]
        self.momentum, self.nesterov, self.wd = g["momentum"], g["nesterov"], g["weight_decay"]
        # the optimizer's lr (a checkpoint's last step's), not 0: anything that reads it before a new
        # engine's first step sees after a resume what the uninterrupted run saw
        self.lr = torch.full((), float(g["lr"]), dtype=torch.float32, device=device)

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next step (a fill kernel on the device: no host sync)."""
        for g in self.opt.param_groups:
            g["lr"] = lr  # what a checkpoint and the logs read
        self.lr.fill_(lr)

    def buffers(self) -> list:
        """The momentum buffers, in parameter order (the optimizer may have been handed new ones by a
        checkpoint load or a phase switch: read them afresh)."""
        out = []
        for p in self.params:
            st = self.opt.state[p]
            if st.get("momentum_buffer") is None:
                # what torch.optim.SGD's first step does (buf = g), as 0.9 * 0 + g: an optimizer made
                # without serial.make_optimizer's zero buffers steps alike
                st["momentum_buffer"] = torch.zeros_like(p)
            out.append(st["momentum_buffer"])
        return out

    @torch.no_grad()
    def __call__(self) -> None:
        """p -= lr * d, d the (Nesterov) momentum direction of the gradient plus weight decay."""
        params = self.params
        grads = [p.grad for p in params]
        d = torch._foreach_add(grads, params, alpha=self.wd) if self.wd else grads
        if self.momentum:
            bufs = self.buffers()
            torch._foreach_mul_(bufs, self.momentum)
            torch._foreach_add_(bufs, d)
            d = torch._foreach_add(d, bufs, alpha=self.momentum) if self.nesterov else bufs
        torch._foreach_sub_(params, torch._foreach_mul(d, self.lr))


def state_signature(tensors) -> tuple:
    """Where the tensors live: a captured graph is valid only while the same memory holds the state."""
    return tuple(t.data_ptr() for t in tensors)


def side_stream_runs(fn, n: int) -> None:
    """Run fn n times on a side stream ordered after the work queued so far (the warm-up PyTorch's
    CUDA-graph recipe asks for before a capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(side)


def capture(fn, warmup: int = 2) -> "torch.cuda.CUDAGraph":
    """fn warmed up and captured as a CUDA graph, for timing its replays (no state is restored)."""
    side_stream_runs(fn, warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class StepGraph:
    """fn() reads static inputs and returns its outputs (a tuple of tensors); call() runs it as a CUDA
    graph (mode "cuda"), or directly (mode "emulate"). `state()` lists the tensors fn updates in
    place, restored after the warm-up runs."""

    WARMUP = 2

    def __init__(self, fn, state, mode: str):
        if mode not in ("cuda", "emulate"):
            raise ValueError(f"StepGraph mode {mode!r}")
        self.fn, self.state, self.mode = fn, state, mode
        self.graph = None
        self.out = None

    def _warm_up(self) -> None:
        tensors = list(self.state())
        saved = [t.detach().clone() for t in tensors]
        if self.mode == "cuda":
            side_stream_runs(self.fn, self.WARMUP)
        else:
            for _ in range(self.WARMUP):
                self.fn()
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)

    def __call__(self):
        """Run the step (capturing it on the first call) and return its outputs."""
        if self.graph is None and self.out is None:
            self._warm_up()
            if self.mode == "cuda":
                self.graph = torch.cuda.CUDAGraph()
                # thread_local: only this thread's CUDA calls matter to the capture (an MPI library's
                # progress thread may touch CUDA meanwhile)
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                    self.out = self.fn()
                self.graph.replay()  # capture does not execute: the first replay is the first real step
                return self.out
            # emulate: outputs live in buffers every call overwrites, as a replay's do, so a caller
            # that keeps an output past the next call fails the CPU tests as it would on a GPU
            self.out = tuple(None if o is None else o.detach().clone() for o in self.fn())
            return self.out
        if self.mode == "cuda":
            self.graph.replay()
            return self.out
        for buf, o in zip(self.out, self.fn()):
            if buf is not None:
                buf.copy_(o.detach())
        return self.out


class GraphCache:
    """An engine's captured steps with their static inputs, keyed by kind and shape; dropped
    wholesale when the state moved in memory."""

    def __init__(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"graph mode {mode!r} is not one of {MODES}")
        self.mode = mode
        self.entries: dict = {}
        self.signature = None

    @property
    def enabled(self) -> bool:
        """Whether steps run through graphs (captured or emulated)."""
        return self.mode != "off"

    def validate(self, tensors) -> None:
        """Call once per epoch: a checkpoint load or a phase switch that put the parameters, gradients
        or optimizer state into new memory invalidates every captured graph."""
        sig = state_signature(tensors)
        if sig != self.signature:
            self.entries.clear()
            self.signature = sig

    def get(self, key, make):
        """The entry for key (static inputs and StepGraphs, as make() builds them), made on first use."""
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = make()
        return e

    def step(self, fn, state) -> StepGraph:
        """A StepGraph of fn in this cache's mode."""
        return StepGraph(fn, state, self.mode)
