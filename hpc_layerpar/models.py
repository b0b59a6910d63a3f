"""Pre-activation CIFAR ResNets and WideResNets as a flat sequence [stem, blocks..., head]; no MPI."""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


# The networks' activation. ReLU is the model; SiLU is the tests' smooth stand-in: a comparison of two
# computations of the same math at 1e-5 over many steps is ill-posed at a kink (a pre-activation
# within rounding of 0 takes its sign from the summation order, and one gradient entry jumps by dy).
ACTIVATIONS = {"relu": F.relu, "silu": F.silu}


class Stem(nn.Module):
    """The network's first element: a 3x3 convolution to the base width (the first block pre-activates it)."""
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)

    def forward(self, x):
        """The 3x3 convolution of x."""
        return self.conv(x)


class PreActBlock(nn.Module):
    """x + f(x) with f = conv(act(bn(conv(act(bn(x)))))), act ReLU unless set; a 1x1 projection where
    the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, act: str = "relu"):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.bn1 = _norm(norm, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x):
        """x + f(x); where the shape changes, the shortcut is the 1x1 projection of act(bn1(x))."""
        o = self.act(self.bn1(x))
        # Pre-activation ResNets feed the projection from the activated input (He et al. 2016).
        sc = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(self.act(self.bn2(o)))
        return o + sc


class Head(nn.Module):
    """The last element: norm and the activation, global average pooling, then a linear classifier."""
    def __init__(self, channels: int, classes: int, norm: str, act: str = "relu"):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.bn = _norm(norm, channels)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        """Class logits (B, classes) of the feature maps x."""
        x = self.act(self.bn(x))
        # a mean over H x W rather than adaptive_avg_pool2d: the same average, and its backward on
        # CUDA has a deterministic kernel (adaptive pooling's raises under run.deterministic)
        return self.fc(x.mean(dim=(2, 3)))


class LayerSequence(nn.Module):
    """G = H o B_{N-1} o ... o B_0 o S as a flat ModuleList, with per-element costs and shapes.

    `shapes[i]` is the per-sample input shape (C, H, W) of element i; `shapes[-1]` the logits'.
    `costs[i]` estimates multiply-accumulates per sample of element i (forward), the input to
    the stage partitioner."""

    def __init__(self, elements, shapes, costs, name):
        super().__init__()
        self.elements = nn.ModuleList(elements)
        self.shapes = [tuple(s) for s in shapes]
        self.costs = [int(c) for c in costs]
        self.name = name
        self.compute_dtype = torch.float32  # run.precision: bf16 autocasts every forward
        self.channels_last = False  # on GPUs: NHWC activations and weights (the fast cuDNN layout)

    def __len__(self):
        return len(self.elements)

    def forward(self, x, start: int = 0, end: int | None = None):
        """Apply elements start..end-1 to x (the whole network by default): a stage's part of the network.

        With compute_dtype bfloat16 the elements run under autocast (weights stay float32, the
        master copy the optimizer updates) and the result comes back as float32, so losses,
        penalties, messages and auxiliary variables keep their precision (run.precision)."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compute_dtype == torch.float32:
            for el in self.elements[start:end]:
                x = el(x)
            return x
        # no weight-cast cache: each weight is used once per forward, and a cache that outlives a
        # CUDA graph capture would hand the graph freed memory
        with torch.autocast(x.device.type, dtype=self.compute_dtype, cache_enabled=False):
            for el in self.elements[start:end]:
                x = el(x)
        return x.float()

    def element_params(self, i: int):
        """The parameters of element i, as a list."""
        return list(self.elements[i].parameters())


def place_model(model: LayerSequence, device: torch.device, precision: str = "fp32") -> LayerSequence:
    """Move the model to its device with the run's compute precision; on CUDA devices weights and
    activations take the channels_last layout (cuDNN's fast path; results equal up to rounding)."""
    model.to(device)
    model.compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model


def _conv_macs(cin, cout, k, hout, wout):
    return cin * cout * k * k * hout * wout


def build_model(arch: str, depth: int, width: int = 1, *, in_channels: int, image_size: int,
                num_classes: int, base_width: int = 16, norm: str = "batch", act: str = "relu") -> LayerSequence:
    """ResNet-(6n+2) (3 groups of n pre-activation blocks, widths w, 2w, 4w) or WRN-(6n+4)-k
    (widths 16k, 32k, 64k after a 16-channel stem). Resolution halves at groups 2 and 3. act: the
    activation (ACTIVATIONS)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}: use one of {sorted(ACTIVATIONS)}")
    if arch == "resnet":
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n, widths = (depth - 2) // 6, [base_width, 2 * base_width, 4 * base_width]
        name = f"resnet{depth}"
    elif arch == "wrn":
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n, widths = (depth - 4) // 6, [base_width * width, 2 * base_width * width, 4 * base_width * width]
        name = f"wrn{depth}-{width}"
    else:
        raise ValueError(f"unknown arch {arch!r}")
    if image_size % 4:
        raise ValueError(f"image size {image_size} must be divisible by 4 (two stride-2 stages)")
    elements, shapes, costs = [], [], []
    h = image_size
    stem = Stem(in_channels, base_width)
    elements.append(stem)
    shapes.append((in_channels, h, h))
    costs.append(_conv_macs(in_channels, base_width, 3, h, h))
    cin = base_width
    for g, cout in enumerate(widths):
        for b in range(n):
            stride = 2 if (g > 0 and b == 0) else 1
            shapes.append((cin, h, h))
            h //= stride
            blk = PreActBlock(cin, cout, stride, norm, act)
            c = _conv_macs(cin, cout, 3, h, h) + _conv_macs(cout, cout, 3, h, h)
            if blk.shortcut is not None:
                c += _conv_macs(cin, cout, 1, h, h)
            elements.append(blk)
            costs.append(c + 4 * cout * h * h)  # + BN/ReLU/add
            cin = cout
    shapes.append((cin, h, h))
    elements.append(Head(cin, num_classes, norm, act))
    costs.append(cin * num_classes + 3 * cin * h * h)
    shapes.append((num_classes,))
    model = LayerSequence(elements, shapes, costs, name)
    _init(model)
    return model


def _init(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.01)
            nn.init.zeros_(mod.bias)


_INIT_LOCK = threading.Lock()  # the global RNG: virtual ranks (threads) of a simulation build in turn


def model_from_config(mcfg, *, in_channels: int, image_size: int, num_classes: int, seed: int):
    """Every rank builds the same network from the same seed, so no initial broadcast is needed."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(mcfg.arch, mcfg.depth, mcfg.width, in_channels=in_channels,
                           image_size=image_size, num_classes=num_classes,
                           base_width=mcfg.base_width, norm=mcfg.norm)


def smallest_map(model) -> int:
    """H x W of the network's smallest feature map (BatchNorm statistics average over batch x it)."""
    return min(int(s[1]) * int(s[2]) for s in model.shapes if len(s) == 3)


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter entries of model."""
    return sum(p.numel() for p in model.parameters())
