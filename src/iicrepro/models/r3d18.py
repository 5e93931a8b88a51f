"""R3D-18 ("Res18-3D" in the upstream README): torchvision's video ResNet `r3d_18`, layers 2,2,2,2.

The upstream repository does not contain this model (spec 8); torchvision's layout is the
reference. Its modules are adopted under torchvision's own names (`stem`, `layer1`..`layer4`), so a
torchvision r3d_18 state dict without `fc.*` loads strictly; torchvision's pool and `fc` head are
replaced by the shared pooled/`linear` interface. Weights are never downloaded; initialisation is
torchvision's (Kaiming normal convolutions), the model's reference initialisation.

`small_input`: a 3x3x3 stem with stride (1,2,2) and spatial stride 2 in `layer1`, whose first
block then gets a 1x1x1 projection shortcut, as in the other ResNets here.
"""

from __future__ import annotations

import torch
from torch import nn

from iicrepro.errors import UserError
from iicrepro.models.base import Backbone


def _conv(cin: int, cout: int, kernel_size: int, stride, padding: int) -> nn.Conv3d:
    conv = nn.Conv3d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
    return conv


class R3D18(Backbone):
    def __init__(
        self, width: float = 1.0, small_input: bool = False, num_classes: int | None = None
    ):
        if width != 1.0:
            raise UserError(
                f"backbone r3d18 exists only at width 1.0 (got {width}); "
                "use r3d for a narrower 3D ResNet, or set model.width: 1.0"
            )
        super().__init__()
        from torchvision.models.video import r3d_18

        net = r3d_18(weights=None)
        self.stem = net.stem
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        if small_input:
            self.stem[0] = _conv(3, 64, 3, stride=(1, 2, 2), padding=1)
            block = self.layer1[0]
            block.conv1[0] = _conv(64, 64, 3, stride=(1, 2, 2), padding=1)
            block.downsample = nn.Sequential(
                _conv(64, 64, 1, stride=(1, 2, 2), padding=0), nn.BatchNorm3d(64)
            )
        self._add_head(512, num_classes)

    def conv_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
