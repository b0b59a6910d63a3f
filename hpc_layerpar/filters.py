"""The DS filter pair: D = s x s average pooling (stride s); U = upsampling by s with D U = I, either
smooth (bilinear interpolation whose s x s block means are corrected back to the coarse values: the
default) or nearest (each coarse value repeated over its block, version 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

FACTORS = (1, 2, 4)
UPSAMPLERS = ("smooth", "nearest")


class DSFilter:
    """The DS filter pair for factor s (1, 2 or 4): down() is s x s average pooling, up() the upsampler
    `up` (smooth or nearest; both linear, both with down(up(a)) = a)."""
    def __init__(self, s: int, up: str = "smooth"):
        if s not in FACTORS:
            raise ValueError(f"DS factor must be one of {FACTORS}, got {s}")
        if up not in UPSAMPLERS:
            raise ValueError(f"DS upsampler must be one of {UPSAMPLERS}, got {up!r}")
        self.s = s
        self.smooth = up == "smooth"

    @classmethod
    def of(cls, pcfg) -> "DSFilter":
        """The filter a run's parallel config asks for (parallel.ds, parallel.ds_up)."""
        return cls(pcfg.ds, pcfg.ds_up)

    def coarse_shape(self, shape: tuple) -> tuple:
        """(C, H // s, W // s): the per-sample shape of a boundary's message after down()."""
        c, h, w = shape
        return (c, h // self.s, w // self.s)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """x average-pooled over s x s windows with stride s; x itself for s = 1."""
        return x if self.s == 1 else F.avg_pool2d(x, self.s, stride=self.s)

    def _repeat(self, a: torch.Tensor) -> torch.Tensor:
        """Each value over an s x s block (one broadcast copy: faster than two repeat_interleaves)."""
        n, c, h, w = a.shape
        s = self.s
        return a[:, :, :, None, :, None].expand(n, c, h, s, w, s).reshape(n, c, h * s, w * s)

    def up(self, a: torch.Tensor) -> torch.Tensor:
        """a upsampled by s; a itself for s = 1. smooth: b = bilinear(a) plus the repeated block
        error a - down(b), so that down(up(a)) = a exactly. Why smooth: the stage behind the filter
        trains on up(down(x)) instead of x; on Fashion-MNIST's ResNet-20 states the smooth
        reconstruction is 0.02-0.06 closer to x (relative error) at every boundary than repeating,
        and the final SPH accuracy at K = 4 rose with it (ALGORITHM.md s.2)."""
        if self.s == 1:
            return a
        if not self.smooth:
            return self._repeat(a)
        b = F.interpolate(a, scale_factor=self.s, mode="bilinear", align_corners=False)
        return b + self._repeat(a - self.down(b))


def divides(s: int, shape) -> bool:
    """Whether the filter of factor s can halve (quarter) an activation of per-sample shape (C, H, W)."""
    return shape[1] % s == 0 and shape[2] % s == 0


def check_boundaries(s: int, boundary_shapes: list) -> None:
    """s must divide H and W at every boundary; the message says which boundary fails and what to do.
    Raises ValueError (train.py turns it into a ConfigError on every rank)."""
    if s not in FACTORS:
        raise ValueError(f"parallel.ds={s} is not one of {', '.join(map(str, FACTORS))}.")
    for k, shape in enumerate(boundary_shapes, start=1):
        c, h, w = shape
        if not divides(s, shape):
            ok = [f for f in FACTORS if all(divides(f, sh) for sh in boundary_shapes)]
            raise ValueError(
                f"parallel.ds={s} does not divide the {h}x{w} activations at boundary {k} (input of stage "
                f"{k}, shape {c}x{h}x{w}). Use parallel.ds in {ok}, or fewer ranks so that no stage starts "
                "at that resolution.")
