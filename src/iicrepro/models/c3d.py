"""C3D with BatchNorm, as in upstream `models/c3d.py` (spec 8).

Eight 3x3x3 convolutions (bias, padding 1, stride 1), each followed by BatchNorm and ReLU; max
pools after conv1 (1,2,2) and after conv2, conv3b, conv4b (2,2,2); no pool5. Entry names
(`conv3a`, `bn3a`, ...) are upstream's, so upstream files load strictly.

`small_input` leaves C3D unchanged: its stem is already a 3x3x3 stride-1 convolution, and an
8x40x40 clip already reaches a 1x2x2 map after pool4, as the small R3D of the synthetic recipe does.
"""

from __future__ import annotations

import torch
from torch import nn

from iicrepro.models.base import Backbone, scaled

# (unit name, output channels at width 1, pool after the unit or None)
LAYOUT = (
    ("1", 64, (1, 2, 2)),
    ("2", 128, (2, 2, 2)),
    ("3a", 256, None),
    ("3b", 256, (2, 2, 2)),
    ("4a", 512, None),
    ("4b", 512, (2, 2, 2)),
    ("5a", 512, None),
    ("5b", 512, None),
)


class C3D(Backbone):
    def __init__(
        self, width: float = 1.0, small_input: bool = False, num_classes: int | None = None
    ):
        super().__init__()
        self.small_input = small_input  # no architectural change, see the module docstring
        self.units: list[tuple[str, bool]] = []
        cin = 3
        for name, channels, pool in LAYOUT:
            cout = scaled(channels, width)
            setattr(self, f"conv{name}", nn.Conv3d(cin, cout, kernel_size=3, padding=1))
            setattr(self, f"bn{name}", nn.BatchNorm3d(cout))
            setattr(self, f"relu{name}", nn.ReLU())
            if pool is not None:
                setattr(self, f"pool{name[0]}", nn.MaxPool3d(kernel_size=pool, stride=pool))
            self.units.append((name, pool is not None))
            cin = cout
        self._add_head(cin, num_classes)

    def conv_map(self, x: torch.Tensor) -> torch.Tensor:
        for name, pooled in self.units:
            conv, bn, relu = (getattr(self, f"{kind}{name}") for kind in ("conv", "bn", "relu"))
            x = relu(bn(conv(x)))
            if pooled:
                x = getattr(self, f"pool{name[0]}")(x)
        return x
