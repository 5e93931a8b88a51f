"""Views: uint8 -> [0, 1], residual frames with the circular shift and both scalings (spec 3.3)."""

from __future__ import annotations

import pytest
import torch

from iicrepro.method.views import make_view, residual, to_unit


def clip_of(values: list[float]) -> torch.Tensor:
    """1 x 3 x T x 2 x 2 clip whose frame t is the constant values[t] (channel c adds c/10)."""
    t = torch.tensor(values).view(1, 1, -1, 1, 1)
    return (t + torch.tensor([0.0, 0.1, 0.2]).view(1, 3, 1, 1, 1)).expand(1, 3, -1, 2, 2)


def test_to_unit_scales_uint8_and_leaves_floats():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    u = to_unit(x)
    assert u.dtype == torch.float32
    assert torch.allclose(u, torch.tensor([0.0, 0.2, 1.0]))
    assert to_unit(u) is u


def test_residual_unscaled_with_wrap_around():
    x = clip_of([0.1, 0.4, 0.2, 0.9])
    r = residual(x, scaled=False)
    # frame 0 is x_0 - x_{T-1} (upstream's circular shift), the rest x_t - x_{t-1}
    expected = torch.tensor([0.1 - 0.9, 0.4 - 0.1, 0.2 - 0.4, 0.9 - 0.2])
    assert r.shape == x.shape
    for c in range(3):  # the colour offset cancels: channels are kept, each differenced
        assert torch.allclose(r[0, c, :, 0, 0], expected, atol=1e-6)
    assert r.min() < 0  # no clamping, no absolute value


def test_residual_scaled_is_half_of_r_plus_one():
    x = torch.rand(2, 3, 5, 4, 4)
    r = residual(x, scaled=False)
    s = residual(x, scaled=True)
    assert torch.allclose(s, (r + 1) / 2)
    assert s.min() >= 0 and s.max() <= 1
    assert torch.allclose(r[:, :, 0], x[:, :, 0] - x[:, :, -1])
    assert torch.allclose(r[:, :, 3], x[:, :, 3] - x[:, :, 2])


def test_residual_of_static_clip_is_zero_motion():
    x = torch.rand(1, 3, 1, 6, 6).expand(1, 3, 8, 6, 6)
    assert torch.count_nonzero(residual(x, scaled=False)) == 0
    assert torch.allclose(residual(x, scaled=True), torch.full_like(x, 0.5))


def test_make_view_dispatch():
    x = torch.rand(2, 3, 4, 5, 5)
    assert make_view(x, "rgb") is x
    assert torch.equal(make_view(x, "residual"), residual(x, True))
    assert torch.equal(make_view(x, "residual", residual_scaled=False), residual(x, False))
    flow = torch.randint(0, 256, (2, 3, 4, 5, 5), dtype=torch.uint8)
    assert torch.allclose(make_view(x, "u", flow=flow), flow.float() / 255)
    assert torch.allclose(make_view(x, "v", flow={"v": flow}), flow.float() / 255)
    with pytest.raises(ValueError, match="flow"):
        make_view(x, "u")
    with pytest.raises(ValueError, match="unknown view"):
        make_view(x, "depth")
