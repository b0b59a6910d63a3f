"""The pipeline coupling's graph path (run.cuda_graphs, graphs.py): the StageStep's F, B and S captured
as CUDA graphs over static MicroBatch buffers, one per kind and micro-batch size. The functions
captured are pipeline_step.StageStep's own; only where the inputs come from differs from the eager
path (device-to-device copies into static buffers instead of fresh tensors)."""
from __future__ import annotations

import torch

from .pipeline_step import MicroBatch


class PipelineGraphs:
    """Captured steps of one stage. step: its StageStep; cache: a graphs.GraphCache (captured or
    emulated); beta_t: the device scalar of the penalty coefficient 0.5 beta / N the engine fills
    once per epoch."""

    def __init__(self, step, cache, device):
        self.step, self.cache, self.device = step, cache, device
        self.beta_t = torch.zeros((), dtype=torch.float32, device=device)

    @property
    def enabled(self) -> bool:
        """Whether the stage runs through graphs (captured or emulated)."""
        return self.cache.enabled

    @property
    def entries(self) -> dict:
        """The captured (kind, size) entries."""
        return self.cache.entries

    def state(self) -> list:
        """What the captured steps update in place (restored after a capture's warm-up runs)."""
        return self.step.stage.state() + self.step.sums.state()

    def begin_epoch(self, beta: float) -> None:
        """Drop the captures if the state moved in memory, and fill this epoch's penalty coefficient."""
        self.cache.validate(self.state())
        st = self.step.stage
        self.beta_t.fill_(0.5 * beta / max(st.out_numel, 1))

    def epoch_inputs(self, mbs: list, draws) -> tuple:
        """The epoch's sample ids (and rank 0's augmentation draws: draws(j, n) -> (offsets, flips) or
        None) on the device in one copy each, with each micro-batch's offset into them: a replay's
        inputs are then device-to-device slices."""
        starts = [0]
        for idx in mbs:
            starts.append(starts[-1] + len(idx))
        ids = torch.cat(mbs).to(self.device) if mbs else None
        off = flip = None
        pairs = [draws(j, len(idx)) for j, idx in enumerate(mbs)]
        if pairs and pairs[0] is not None:
            off = torch.cat([o for o, _ in pairs]).to(self.device)
            flip = torch.cat([f for _, f in pairs]).to(self.device)
        return ids, starts, off, flip

    def _static(self, kind: str, n: int) -> MicroBatch:
        """The static MicroBatch of (kind, n): buffers a replay's inputs are copied into."""
        st, dev, f32 = self.step.stage, self.device, torch.float32
        mb = MicroBatch()
        if kind == "S":
            return mb
        if st.first or st.last:
            mb.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        if st.first and self.step.augment is not None:
            mb.off = torch.zeros(n, 2, dtype=torch.int64, device=dev)
            mb.flip = torch.zeros(n, dtype=torch.bool, device=dev)
        if not st.first:
            mb.a = torch.zeros((n,) + tuple(st.in_shape), dtype=f32, device=dev)
        if kind == "B" and not st.last:
            mb.p = torch.zeros((n,) + tuple(st.out_shape), dtype=f32, device=dev)
            mb.anchor = torch.zeros_like(mb.p)
        return mb

    def _make(self, kind: str, n: int, scale: float | None):
        """(static MicroBatch, StepGraph) of F, B or S for micro-batches of n samples (B: of a batch of
        scale x n samples, a constant of the capture)."""
        mb, step = self._static(kind, n), self.step
        mb.scale = scale
        fns = {"F": lambda: (step.forward(mb),),
               "B": lambda: (step.backward(mb, self.beta_t)[0],),
               "S": lambda: step.update() or ()}
        return mb, self.cache.step(fns[kind], self.state)

    def replay(self, kind: str, inputs, j, n: int, scale: float | None = None, **tensors):
        """Load micro-batch j's inputs (its slice of the epoch's `inputs`, and `tensors` by field name)
        into the static buffers of (kind, n, scale) and replay its step; returns the step's outputs.
        (A partial last batch's micro-batch has its own scale, and so its own capture.)"""
        mb, graph = self.cache.get((kind, n, scale), lambda: self._make(kind, n, scale))
        if mb.ids is not None:
            ids, starts, off, flip = inputs
            lo = starts[j]
            mb.ids.copy_(ids[lo:lo + n])
            if mb.off is not None:
                mb.off.copy_(off[lo:lo + n])
                mb.flip.copy_(flip[lo:lo + n])
        for name, t in tensors.items():
            buf = getattr(mb, name)
            if buf is not None:
                if t is None:  # a replay over a stale buffer would train on the previous micro-batch
                    raise ValueError(f"graph step {kind} of micro-batch {j}: no {name} given")
                buf.copy_(t)
        return graph()
