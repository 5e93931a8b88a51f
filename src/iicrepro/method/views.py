"""The two views of a clip (spec 3.3, 5): RGB, residual frames, or an optical-flow component.

View 1 is always the RGB clip; view 2 is built from the very same cropped clip (residual) or read
from the flow store (u / v, grey images replicated to 3 channels by the data pipeline).
"""

from __future__ import annotations

import torch

VIEWS = ("rgb", "residual", "u", "v")


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1] (upstream's ToTensor; no mean/std normalisation,
    spec 3.4). A floating tensor is returned unchanged, so calling it twice is harmless."""
    if x.is_floating_point():
        return x
    return x.to(torch.float32).div_(255.0)


def residual(x: torch.Tensor, scaled: bool) -> torch.Tensor:
    """Residual frames r_t = x_t - x_{t-1} along the time axis (dim -3 of ... x 3 x T x H x W).

    The shift is circular, so the first frame is x_0 - x_{T-1}: a wrap-around artefact upstream
    keeps (spec 3.3, 14.2). `scaled` gives (r + 1) / 2 in [0, 1], the pretraining and retrieval
    form; unscaled r in [-1, 1] is the fine-tuning form (upstream since 6632296). No clamping,
    no absolute value, colour channels kept.
    """
    # x - roll(x, 1) along time, assembled from two slices: the same values, several times
    # faster on the CPU (BENCHMARKS.md "Input pipeline and training throughput").
    r = torch.cat([x[..., :1, :, :] - x[..., -1:, :, :], x[..., 1:, :, :] - x[..., :-1, :, :]], -3)
    return r.add_(1).div_(2) if scaled else r


def make_view(
    rgb: torch.Tensor,
    view: str,
    *,
    flow: torch.Tensor | dict | None = None,
    residual_scaled: bool = True,
) -> torch.Tensor:
    """The clip a backbone sees for `view`: rgb | residual | u | v.

    `rgb` is the float clip in [0, 1]. For u / v, `flow` is the flow clip of that component
    (uint8 or already in [0, 1]), or a dict holding it under the component's name.
    """
    if view == "rgb":
        return rgb
    if view == "residual":
        return residual(rgb, residual_scaled)
    if view in ("u", "v"):
        if isinstance(flow, dict):
            flow = flow.get(view)
        if flow is None:
            raise ValueError(f"view {view!r} needs the flow clip of that component")
        return to_unit(flow)
    raise ValueError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")


def batch_input(
    batch: dict, view: str, device, *, residual_scaled: bool, clips: bool = False
) -> torch.Tensor:
    """The model input of a loader batch on `device`: uint8 -> [0, 1] -> `view`. With `clips`,
    samples hold several clips each (evaluation) and are stacked flat, video by video."""

    def unit(x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(0, 1) if clips else x
        return to_unit(x.to(device, non_blocking=True))

    flow = batch.get("flow")
    return make_view(
        unit(batch["video"]), view, flow=None if flow is None else unit(flow),
        residual_scaled=residual_scaled,
    )  # fmt: skip
