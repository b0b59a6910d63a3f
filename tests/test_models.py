import pytest
import torch

from hpc_layerpar.models import build_model, count_parameters


@pytest.mark.parametrize("arch,depth,width,published", [
    ("resnet", 20, 1, 0.27e6), ("resnet", 56, 1, 0.85e6), ("resnet", 110, 1, 1.7e6),
    ("wrn", 28, 10, 36.5e6)])
def test_parameter_counts_match_published(arch, depth, width, published):
    m = build_model(arch, depth, width, in_channels=3, image_size=32, num_classes=10)
    # published counts are given to 2-3 significant digits; projections add under 1%
    assert abs(count_parameters(m) - published) / published < 0.02


@pytest.mark.parametrize("c,size,classes", [(1, 8, 10), (1, 28, 10), (3, 32, 100)])
def test_shapes_for_digits_mnist_cifar(c, size, classes):
    m = build_model("resnet", 20, in_channels=c, image_size=size, num_classes=classes)
    assert len(m) == 1 + 9 + 1
    x = torch.randn(2, c, size, size)
    for i, el in enumerate(m.elements):
        assert tuple(x.shape[1:]) == m.shapes[i]
        x = el(x)
    assert tuple(x.shape) == (2, classes) and m.shapes[-1] == (classes,)
    assert m.shapes[-2] == (64, size // 4, size // 4)
    assert all(cost > 0 for cost in m.costs)


def test_slices_compose_to_the_whole_network():
    m = build_model("wrn", 16, 2, in_channels=3, image_size=32, num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        whole = m(x)
        mid = m(m(x, 0, 4), 4, None)
    assert torch.allclose(whole, mid)


def test_no_norm_variant_has_no_batchnorm():
    m = build_model("resnet", 8, in_channels=1, image_size=8, num_classes=4, norm="none")
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())


def test_silu_variant_has_no_kink_and_bad_activation_is_refused():
    """act="silu" (the tests' smooth stand-in) changes only the activation: same parameters, a
    different function; an unknown activation is refused by name."""
    torch.manual_seed(0)
    a = build_model("resnet", 8, in_channels=1, image_size=8, num_classes=4)
    b = build_model("resnet", 8, in_channels=1, image_size=8, num_classes=4, act="silu")
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 1, 8, 8)
    assert not torch.allclose(a(x), b(x))
    assert b.elements[1].act is torch.nn.functional.silu and b.elements[-1].act is torch.nn.functional.silu
    with pytest.raises(ValueError, match="'tanh'.*relu"):
        build_model("resnet", 8, in_channels=1, image_size=8, num_classes=4, act="tanh")


def test_bad_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        build_model("resnet", 21, in_channels=3, image_size=32, num_classes=10)


def test_bf16_compute_autocasts_and_returns_float32_close_to_fp32():
    """run.precision=bf16: the forward runs in bfloat16 (it differs from float32), returns float32
    close to it, and gradients reach the float32 weights."""
    torch.manual_seed(0)
    m = build_model("resnet", 8, in_channels=1, image_size=8, num_classes=4)
    x = torch.randn(16, 1, 8, 8)
    ref = m(x)
    m.compute_dtype = torch.bfloat16
    out = m(x)
    part = m(m(x, 0, 2), 2)
    assert out.dtype == torch.float32 and part.dtype == torch.float32
    assert not torch.equal(out, ref), "bf16 compute must actually change the arithmetic"
    assert torch.allclose(out, ref, rtol=0.05, atol=0.05)
    out.sum().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in m.parameters())
