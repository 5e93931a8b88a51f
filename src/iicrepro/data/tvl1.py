"""Dual TV-L1 optical flow in PyTorch, batched over frame pairs, on CUDA or the CPU.

The algorithm and its settings are those of OpenCV's `cv2.optflow.DualTVL1OpticalFlow` (Zach,
Pock and Bischof 2007; Sanchez, Meinhardt-Llopis and Facciolo 2013), step by step, so that the
`torch` engine of `iicrepro flow` stores the same flow as the `opencv` engine (`data.flow`):

* grey images as float 0..255; a pyramid of `nscales` levels, each level the previous one resized
  by `scale_step` (bilinear, output size rounded), stopping early below 16 px;
* from the coarsest level, zero flow; per level the dual variables start at zero and the flow is
  refined over `warps` warps; between levels the flow is resized bilinearly and divided by
  `scale_step`;
* per warp, I1 and its centred gradient are warped by the current flow (bicubic, a = -0.75,
  zero outside the image, as `cv2.remap` of OpenCV 5), then up to
  `outer_iterations` times: median filter of the flow (`median_filtering`, replicated border),
  then up to `inner_iterations` of: the thresholding step (v), the primal update (u = v + theta
  div p) and the dual update (p); both loops stop once the squared change of the flow summed over
  the image is at most epsilon^2 x pixels;
* `gamma` > 0 adds the illumination term (a third primal and dual variable).

Each pair of a batch stops on epsilon on its own, exactly as it would alone: pairs that have
converged leave the working batch (on CUDA they are masked between the checks, which keeps the
device from waiting for the host every iteration).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from iicrepro.errors import UserError

_FLOAT_EPS = float(np.finfo(np.float32).eps)
_CUBIC_A = -0.75
_MIN_SIZE = 16  # a pyramid level smaller than this in either side is not used
# cv2.COLOR_RGB2GRAY on uint8 (OpenCV 5): Y = (9798 R + 19235 G + 3735 B + 2^14) >> 15
_GRAY = (9798, 19235, 3735)


@dataclass(frozen=True)
class TVL1Params:
    """`flow.tvl1` settings (names as in params.yaml; defaults = OpenCV's)."""

    tau: float = 0.25
    lambda_: float = 0.15
    theta: float = 0.3
    nscales: int = 5
    warps: int = 5
    epsilon: float = 0.01
    inner_iterations: int = 30
    outer_iterations: int = 10
    scale_step: float = 0.8
    gamma: float = 0.0
    median_filtering: int = 5

    @classmethod
    def from_settings(cls, tvl1: Mapping[str, Any]) -> TVL1Params:
        names = {f.name.rstrip("_"): f.name for f in fields(cls)}
        unknown = set(tvl1) - set(names)
        if unknown:
            raise UserError(f"flow.tvl1: unknown setting(s) {sorted(unknown)}; use {sorted(names)}")
        p = cls(**{names[k]: v for k, v in tvl1.items()})
        if p.median_filtering > 1 and p.median_filtering % 2 == 0:
            raise UserError(
                f"flow.tvl1.median_filtering={p.median_filtering}: the median filter needs an "
                "odd size (OpenCV: 3 or 5), or 1 for none"
            )
        if not 0 < p.scale_step < 1:
            raise UserError(f"flow.tvl1.scale_step={p.scale_step} must lie in (0, 1)")
        return p


# ------------------------------------------------------------------------------ image helpers
def gray(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames (..., H, W, 3) RGB or (..., H, W[, 1]) grey -> float32 grey (..., H, W) 0..255,
    the same integers as `cv2.cvtColor(f, cv2.COLOR_RGB2GRAY)`."""
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8, got {frames.dtype}")
    if frames.shape[-1] == 3:
        w = torch.tensor(_GRAY, dtype=torch.int32, device=frames.device)
        y = (frames.to(torch.int32) * w).sum(-1)
        return ((y + (1 << 14)) >> 15).to(torch.float32)
    if frames.shape[-1] == 1:
        frames = frames[..., 0]
    return frames.to(torch.float32)


def _linear_taps(n_out: int, n_in: int, scale: float, device) -> tuple[torch.Tensor, ...]:
    """Source indices and weights of bilinear resizing along one axis (pixel centres aligned,
    source position clamped to the image), as cv2.resize INTER_LINEAR; scale = in / out."""
    pos = ((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(pos)
    frac = pos - i0
    frac[i0 < 0] = 0.0
    i0 = np.clip(i0, 0, n_in - 1).astype(np.int64)
    frac[i0 >= n_in - 1] = 0.0
    i1 = np.minimum(i0 + 1, n_in - 1)
    t = (torch.from_numpy(a).to(device) for a in (i0, i1, frac))
    return tuple(t)


def resize_linear(
    x: torch.Tensor, size: tuple[int, int], scale: tuple[float, float] | None = None
) -> torch.Tensor:
    """Bilinear resize of (..., H, W) to `size`; `scale` = (in/out) per axis (default: the size
    ratio; cv2.resize with fx, fy given uses 1 / fx instead)."""
    (h, w), (oh, ow) = x.shape[-2:], size
    sy, sx = scale or (h / oh, w / ow)
    y0, y1, fy = _linear_taps(oh, h, sy, x.device)
    x0, x1, fx = _linear_taps(ow, w, sx, x.device)
    rows = x[..., y0, :] * (1 - fy)[:, None] + x[..., y1, :] * fy[:, None]
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


def centered_gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the central difference; at the border half the one-sided difference."""
    p = F.pad(x[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    return 0.5 * (p[:, 1:-1, 2:] - p[:, 1:-1, :-2]), 0.5 * (p[:, 2:, 1:-1] - p[:, :-2, 1:-1])


def forward_gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences; zero in the last column (x) and the last row (y)."""
    return F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1)), F.pad(
        x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1)
    )


def divergence(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Backward differences, the values before the first row / column taken as zero."""
    return (p1 - F.pad(p1[..., :, :-1], (1, 0))) + (p2 - F.pad(p2[..., :-1, :], (0, 0, 1, 0)))


@cache
def _median_network(n: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs (i, j), i < j, that leave the median of n values at position
    n // 2: Batcher's odd-even merge sort for the next power of two, without the comparators
    on the padding (+inf, never moved) and those the median does not depend on."""
    size = 1 << max(n - 1, 1).bit_length()
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    pairs = [(i, j) for i, j in pairs if j < n]
    needed, kept = {n // 2}, []
    for i, j in reversed(pairs):
        if i in needed or j in needed:
            kept.append((i, j))
            needed |= {i, j}
    return tuple(reversed(kept))


def median_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Median of each size x size window of (..., H, W), border replicated (cv2.medianBlur);
    a sorting network of elementwise min / max over the shifted images."""
    r, (h, w) = size // 2, x.shape[-2:]
    p = F.pad(x.reshape(-1, 1, h, w), (r, r, r, r), mode="replicate")[:, 0]
    v = [p[:, i : i + h, j : j + w] for i in range(size) for j in range(size)]
    for i, j in _median_network(size * size):
        v[i], v[j] = torch.minimum(v[i], v[j]), torch.maximum(v[i], v[j])
    return v[size * size // 2].reshape(x.shape)


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """(..., 4) bicubic weights (a = -0.75) of the taps at -1, 0, 1, 2 for fractions t."""
    a = _CUBIC_A
    c0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    c1 = ((a + 2) * t - (a + 3)) * t * t + 1
    c2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    return torch.stack([c0, c1, c2, 1 - c0 - c1 - c2], -1)


def remap_cubic(src: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """src (B, C, H, W) sampled at (x + u1, y + u2): bicubic from the 4x4 neighbours, zero
    outside the image (cv2.remap INTER_CUBIC, BORDER_CONSTANT)."""
    b, c, h, w = src.shape
    pad = 5  # positions are clamped to where every tap lies in the zero border
    ys = torch.arange(h, device=src.device, dtype=torch.float32)[:, None]
    xs = torch.arange(w, device=src.device, dtype=torch.float32)
    px, py = (xs + u1).clamp(1 - pad, w + 1), (ys + u2).clamp(1 - pad, h + 1)
    fx, fy = px.floor(), py.floor()
    wx, wy = _cubic_weights(px - fx), _cubic_weights(py - fy)  # (B, H, W, 4)
    wp = w + 2 * pad
    flat = F.pad(src, (pad, pad, pad, pad)).reshape(b, c, -1)
    base = ((fy.long() - 1 + pad) * wp + (fx.long() - 1 + pad)).reshape(b, 1, -1)
    out = src.new_zeros(b, c, h, w)
    for i in range(4):
        row = torch.zeros_like(out)
        for j in range(4):
            idx = (base + (i * wp + j)).expand(b, c, -1)
            row += flat.gather(2, idx).reshape(b, c, h, w) * wx[:, None, ..., j]
        out += row * wy[:, None, ..., i]
    return out


# --------------------------------------------------------------------------------- iterations
def _iteration(u: torch.Tensor, q: torch.Tensor, c: torch.Tensor, p: TVL1Params):
    """One inner iteration, all flow components at once: u = (u1, u2[, u3]) (B, K, H, W), the
    dual variables q (B, K, 2, H, W) = ((p11, p12), (p21, p22)[, (p31, p32)]), the constants of
    the warp c = (I1wx, I1wy[, gamma], grad, rho_c) (B, K + 2, H, W). Thresholding step, primal
    and dual updates; returns the new u and q and each pair's squared change of u summed over
    the image (OpenCV's stopping error)."""
    l_t, taut = p.lambda_ * p.theta, p.tau / p.theta
    k = u.shape[1]
    g, grad, rho_c = c[:, :k], c[:, k], c[:, k + 1]
    rho = rho_c + (g[:, 0] * u[:, 0] + g[:, 1] * u[:, 1])
    if k == 3:
        rho = rho + g[:, 2] * u[:, 2]
    lg = l_t * grad
    flat = grad <= _FLOAT_EPS
    fi = torch.where(flat, 0.0, -rho / torch.where(flat, 1.0, grad))
    step = torch.where(rho < -lg, l_t, torch.where(rho > lg, -l_t, fi))  # thresholding operator
    new = (u + step[:, None] * g) + p.theta * divergence(q[:, :, 0], q[:, :, 1])
    err = (new - u).square().sum((1, 2, 3))
    gx, gy = forward_gradient(new)
    norm = 1.0 + taut * torch.hypot(gx, gy)
    q = (q + taut * torch.stack([gx, gy], 2)) / norm[:, :, None]
    return new, q, err


def _warp(u, q, i0, i1_grads, p: TVL1Params, check_every: int):
    """One warp of every pair: warp I1 and its gradient by u, then the outer / inner iterations
    until each pair meets epsilon. Returns the updated u and q (see `_iteration`)."""
    warped = remap_cubic(i1_grads, u[:, 0], u[:, 1])  # I1w, I1wx, I1wy
    i1w, ix, iy = warped.unbind(1)
    c = [ix, iy] + ([torch.full_like(ix, p.gamma)] if u.shape[1] == 3 else [])
    c = torch.stack(c + [ix * ix + iy * iy, i1w - ix * u[:, 0] - iy * u[:, 1] - i0], 1)
    eps = np.float32(p.epsilon * p.epsilon * i0.shape[-2] * i0.shape[-1])
    todo = torch.arange(len(u), device=u.device)  # pairs of the working batch
    wu, wq, wc = u, q, c
    live = torch.ones(len(u), dtype=torch.bool, device=u.device)  # of the working batch
    since = 0
    for _outer in range(p.outer_iterations):
        if p.median_filtering > 1:
            med = median_filter(wu[:, :2], p.median_filtering)
            med = torch.where(live[:, None, None, None], med, wu[:, :2])
            wu = torch.cat([med, wu[:, 2:]], 1)
        for inner in range(p.inner_iterations):
            nu, nq, err = _iteration(wu, wq, wc, p)
            if check_every == 1:
                wu, wq = nu, nq
            else:  # pairs that met epsilon since the last check keep their state
                wu = torch.where(live[:, None, None, None], nu, wu)
                wq = torch.where(live[:, None, None, None, None], nq, wq)
            live = live & (err > eps)
            since += 1
            if since < check_every and inner < p.inner_iterations - 1:
                continue
            since = 0
            if bool(live.all()):
                continue
            u, q = u.index_copy(0, todo, wu), q.index_copy(0, todo, wq)  # finished pairs
            todo, wu, wq, wc, live = todo[live], wu[live], wq[live], wc[live], live[live]
            if not len(todo):
                return u, q
    return u.index_copy(0, todo, wu), q.index_copy(0, todo, wq)


def flow_pairs(
    i0: torch.Tensor,
    i1: torch.Tensor,
    params: TVL1Params = TVL1Params(),
    *,
    check_every: int | None = None,
) -> torch.Tensor:
    """TV-L1 flow from i0 to i1, float32 grey 0..255 (B, H, W) -> (B, H, W, 2) in px,
    [..., 0] = x (right), [..., 1] = y (down). check_every: inner iterations between the checks
    of which pairs have converged (default 1 on the CPU, 5 on CUDA; the result is the same)."""
    if i0.shape != i1.shape or i0.ndim != 3:
        raise ValueError(f"need two (B, H, W) batches of one shape, got {i0.shape}, {i1.shape}")
    if min(i0.shape[-2:]) < 3:
        raise ValueError(f"frames of {tuple(i0.shape[-2:])} px are too small for TV-L1")
    check_every = check_every or (1 if i0.device.type == "cpu" else 5)
    pyr0, pyr1 = [i0.float()], [i1.float()]
    for _ in range(1, params.nscales):
        h, w = pyr0[-1].shape[-2:]
        size = (int(np.rint(h * params.scale_step)), int(np.rint(w * params.scale_step)))
        if min(size) < _MIN_SIZE:
            break
        inv = (1.0 / params.scale_step,) * 2
        pyr0.append(resize_linear(pyr0[-1], size, inv))
        pyr1.append(resize_linear(pyr1[-1], size, inv))
    k = 3 if params.gamma != 0 else 2
    u = None  # u1, u2[, u3] (B, k, H, W) at the current level
    for level in range(len(pyr0) - 1, -1, -1):
        a, b = pyr0[level], pyr1[level]
        if u is None:
            u = a.new_zeros(len(a), k, *a.shape[-2:])
        else:
            u = resize_linear(u, a.shape[-2:])
            u[:, :2] *= np.float32(1.0 / params.scale_step)  # u3 is not a displacement
        q = a.new_zeros(len(a), k, 2, *a.shape[-2:])  # dual variables start at zero per level
        bx, by = centered_gradient(b)
        grads = torch.stack([b, bx, by], 1)
        for _ in range(params.warps):
            u, q = _warp(u, q, a, grads, params, check_every)
    flow = u
    return flow[:, :2].permute(0, 2, 3, 1).contiguous()


def video_flow(
    frames: np.ndarray | torch.Tensor,
    params: TVL1Params = TVL1Params(),
    *,
    device: str | torch.device = "cpu",
    batch: int = 64,
) -> np.ndarray:
    """Flow of consecutive frames like `data.flow.compute_flow`: uint8 (T, H, W, C) or (T, H, W)
    -> float32 (T-1, H, W, 2), flow k from frame k to k+1; `batch` pairs at a time on `device`."""
    frames = torch.as_tensor(np.asarray(frames))
    if frames.ndim == 3:
        frames = frames[..., None]
    out = np.empty((max(len(frames) - 1, 0), *frames.shape[1:3], 2), np.float32)
    with torch.no_grad():
        for start in range(0, len(out), batch):
            g = gray(frames[start : start + batch + 1].to(device))
            out[start : start + len(g) - 1] = flow_pairs(g[:-1], g[1:], params).cpu().numpy()
    return out
