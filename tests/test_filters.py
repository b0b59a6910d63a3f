"""The DS filter pair (ALGORITHM.md s.2): both upsamplers keep D U = I; the smooth one reconstructs
smooth states more closely than repeating blocks, which is why it is the default."""
import pytest
import torch

from hpc_layerpar.filters import DSFilter


@pytest.mark.parametrize("up", ["smooth", "nearest"])
@pytest.mark.parametrize("s", [2, 4])
def test_down_undoes_up_and_constants_survive(up, s):
    f = DSFilter(s, up)
    a = torch.randn(3, 5, 8, 12, generator=torch.Generator().manual_seed(s))
    assert f.up(a).shape == (3, 5, 8 * s, 12 * s)
    assert torch.allclose(f.down(f.up(a)), a, atol=1e-5)
    c = torch.full((2, 3, 4, 4), 0.7)
    assert torch.allclose(f.up(c), torch.full((2, 3, 4 * s, 4 * s), 0.7), atol=1e-6)


def test_smooth_reconstructs_a_smooth_state_closer_than_nearest():
    h = torch.linspace(-1, 1, 28)
    x = (torch.sin(2 * h)[:, None] + 0.5 * h[None, :] + 0.3 * torch.outer(h, h)).expand(2, 4, 28, 28)
    err = {}
    for up in ("smooth", "nearest"):
        f = DSFilter(2, up)
        err[up] = float((f.up(f.down(x)) - x).norm() / x.norm())
    assert err["smooth"] < 0.5 * err["nearest"], err


def test_unknown_upsampler_is_refused():
    with pytest.raises(ValueError, match="upsampler"):
        DSFilter(2, "bicubic")
