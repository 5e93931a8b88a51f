"""R(2+1)D-10, as in upstream `models/r21d.py` (spec 8): R3D-10 with every 3D convolution factorised.

A k_t x k x k convolution becomes a spatial 1 x k x k convolution (in -> M channels, spatial
stride) + BN + ReLU + a temporal k_t x 1 x 1 convolution (M -> out, temporal stride), with
M = floor(k_t k^2 in out / (k^2 in + k_t out)), so the parameter count stays that of the 3D
convolution. Upstream quirks kept (spec 8, 14.13): the stem factorises a 3x7x7 kernel (M = 83)
although its comment says 1x7x7, and the 1x1x1 shortcut projections are factorised too
(M = 42/85/170, with BN + ReLU inside).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.utils import _triple

from iicrepro.models.r3d import R3D


def mid_channels(kernel_size, cin: int, cout: int) -> int:
    kt, kh, kw = _triple(kernel_size)
    return (kt * kh * kw * cin * cout) // (kh * kw * cin + kt * cout)


class SpatioTemporalConv(nn.Module):
    """(2+1)D convolution: spatial conv, BN, ReLU, temporal conv (no bias, as upstream)."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        st, sh, sw = _triple(stride)
        pt, ph, pw = _triple(padding)
        mid = mid_channels((kt, kh, kw), cin, cout)
        self.spatial_conv = nn.Conv3d(
            cin, mid, (1, kh, kw), stride=(1, sh, sw), padding=(0, ph, pw), bias=False
        )
        self.bn = nn.BatchNorm3d(mid)
        self.relu = nn.ReLU()
        self.temporal_conv = nn.Conv3d(
            mid, cout, (kt, 1, 1), stride=(st, 1, 1), padding=(pt, 0, 0), bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal_conv(self.relu(self.bn(self.spatial_conv(x))))


class R21D(R3D):
    conv = SpatioTemporalConv
