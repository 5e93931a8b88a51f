"""The interface every backbone shares: pooled feature, optional linear head, retrieval features.

A backbone subclass builds its layers under upstream's entry names and implements `conv_map`
(the last block's map). Everything after the last block is defined once here (spec 8, 10).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def scaled(channels: int, width: float) -> int:
    """Channel count under the width multiplier (rounded, at least 1)."""
    return max(1, int(round(channels * width)))


class Backbone(nn.Module):
    """Input B x 3 x T x H x W; `out_dim` channels in the last block's map."""

    out_dim: int
    num_classes: int | None

    def _add_head(self, out_dim: int, num_classes: int | None) -> None:
        """Global average pool, then one Linear named `linear` (upstream's `with_classifier`)."""
        self.out_dim = out_dim
        self.num_classes = num_classes
        self.pool = nn.AdaptiveAvgPool3d(1)
        if num_classes is not None:
            self.linear = nn.Linear(out_dim, num_classes)

    def conv_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's map, B x out_dim x T' x H' x W'."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled feature B x out_dim (no projection, no normalisation; spec 1)."""
        return self.pool(self.conv_map(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature, or logits B x num_classes when the model has a head."""
        h = self.features(x)
        return self.linear(h) if self.num_classes is not None else h

    def retrieval_features(self, x: torch.Tensor, conv_pool: bool = True) -> torch.Tensor:
        """Flattened conv map; with `conv_pool`, max-pooled (1,2,2) first (upstream `return_conv`,
        spec 8/10: 512x2x7x7 -> 512x2x3x3 -> 9216-d for a 16x112x112 clip)."""
        h = self.conv_map(x)
        if conv_pool:
            h = F.max_pool3d(h, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        return h.flatten(1)
