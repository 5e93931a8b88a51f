"""R3D-10: 3D ResNet with one basic block per stage, as in upstream `models/r3d.py` (spec 8).

Stem 3x7x7 stride (1,2,2) + BN + ReLU, then stages `conv2`..`conv5` of one block each; stages
3-5 halve T, H and W in their first convolution and project the shortcut with a 1x1x1
convolution + BN. Convolutions have no bias. Module names (`temporal_spatial_conv`,
`downsampleconv`, `block1`, ...) are upstream's, so upstream files load strictly. R(2+1)D
(`r21d.py`) reuses this macro structure with a factorised convolution.

`small_input` (synthetic 8x40x40 clips): a 3x3x3 stem with stride (1,2,2) and spatial stride 2
in the first stage, which then gets a projection shortcut (see notes/synthetic-recipe.md).
"""

from __future__ import annotations

import torch
from torch import nn

from iicrepro.models.base import Backbone, scaled


class SpatioTemporalConv(nn.Module):
    """A full 3D convolution (upstream keeps the wrapper so R3D and R(2+1)D share block code)."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.temporal_spatial_conv = nn.Conv3d(
            cin, cout, kernel_size, stride=stride, padding=padding, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal_spatial_conv(x)


class SpatioTemporalResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, add the (projected) shortcut, ReLU."""

    def __init__(self, conv, cin: int, cout: int, kernel_size: int = 3, stride=1):
        super().__init__()
        padding = kernel_size // 2
        self.downsample = stride != 1 or cin != cout
        if self.downsample:  # registered first, as upstream does (entry order)
            self.downsampleconv = conv(cin, cout, 1, stride=stride)
            self.downsamplebn = nn.BatchNorm3d(cout)
        self.conv1 = conv(cin, cout, kernel_size, stride=stride, padding=padding)
        self.bn1 = nn.BatchNorm3d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = conv(cout, cout, kernel_size, padding=padding)
        self.bn2 = nn.BatchNorm3d(cout)
        self.outrelu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.relu1(self.bn1(self.conv1(x)))
        res = self.bn2(self.conv2(res))
        if self.downsample:
            x = self.downsamplebn(self.downsampleconv(x))
        return self.outrelu(x + res)


class SpatioTemporalResLayer(nn.Module):
    """One stage: `block1` (may downsample) plus `layer_size - 1` blocks in `blocks`."""

    def __init__(self, conv, cin: int, cout: int, kernel_size: int, layer_size: int, stride=1):
        super().__init__()
        self.block1 = SpatioTemporalResBlock(conv, cin, cout, kernel_size, stride)
        self.blocks = nn.ModuleList(
            SpatioTemporalResBlock(conv, cout, cout, kernel_size) for _ in range(layer_size - 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x)
        for block in self.blocks:
            x = block(x)
        return x


class R3D(Backbone):
    conv = SpatioTemporalConv

    def __init__(
        self,
        width: float = 1.0,
        small_input: bool = False,
        num_classes: int | None = None,
        layer_sizes: tuple[int, int, int, int] = (1, 1, 1, 1),
    ):
        super().__init__()
        c2, c3, c4, c5 = (scaled(c, width) for c in (64, 128, 256, 512))
        if small_input:
            self.conv1 = self.conv(3, c2, 3, stride=(1, 2, 2), padding=1)
            first_stride = (1, 2, 2)
        else:
            self.conv1 = self.conv(3, c2, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3))
            first_stride = 1
        self.bn1 = nn.BatchNorm3d(c2)
        self.relu1 = nn.ReLU()
        self.conv2 = SpatioTemporalResLayer(self.conv, c2, c2, 3, layer_sizes[0], first_stride)
        self.conv3 = SpatioTemporalResLayer(self.conv, c2, c3, 3, layer_sizes[1], stride=2)
        self.conv4 = SpatioTemporalResLayer(self.conv, c3, c4, 3, layer_sizes[2], stride=2)
        self.conv5 = SpatioTemporalResLayer(self.conv, c4, c5, 3, layer_sizes[3], stride=2)
        self._add_head(c5, num_classes)

    def conv_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.conv5(self.conv4(self.conv3(self.conv2(x))))
