"""Intra-negatives: the anchor clip with its temporal structure destroyed (spec 6).

Built per sample from view 1 (the RGB clip), never from view 2. Random draws use the torch RNG
(an explicit `generator`, or the global one of the clip's device) so a run is reproducible and
its RNG state can be checkpointed.
"""

from __future__ import annotations

import torch

KINDS = ("repeat", "shuffle", "none")
CHUNKS = 4  # shuffle splits the clip into 4 consecutive chunks (spec 6)


def _randint(low: int, high: int, n: int, x: torch.Tensor, generator) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randint(low, high, (n,), device=device, generator=generator).to(x.device)


def _take_frames(x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """out[b, :, i] = x[b, :, frames[b, i]] for x of shape B x C x T x H x W."""
    # Whole frames by advanced indexing over (batch, time): ~3x faster than a gather on the CPU.
    rows = torch.arange(x.shape[0], device=x.device).view(-1, 1)
    return x.transpose(1, 2)[rows, frames].transpose(1, 2).contiguous()


def repeat_frame(x: torch.Tensor, generator=None) -> torch.Tensor:
    """One random frame t ~ U{0..T-1} per sample, repeated T times: same appearance, no motion."""
    b, t = x.shape[0], x.shape[2]
    frames = _randint(0, t, b, x, generator).view(b, 1).expand(b, t)
    return _take_frames(x, frames)


def shuffle_chunks(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Swap exactly one pair of the 4 consecutive chunks per sample: a ~ U{0..3}, b = (a + d)
    mod 4 with d ~ U{1,2,3}; the order inside each chunk is kept (spec 6: upstream's single swap,
    not the full permutation of the paper's figure, spec 14.6)."""
    b, t = x.shape[0], x.shape[2]
    if t % CHUNKS:
        raise ValueError(f"shuffle needs a clip length divisible by {CHUNKS}, got {t}")
    size = t // CHUNKS
    a = _randint(0, CHUNKS, b, x, generator)
    other = (a + _randint(1, CHUNKS, b, x, generator)) % CHUNKS
    order = torch.arange(CHUNKS, device=x.device).repeat(b, 1)
    rows = torch.arange(b, device=x.device)
    order[rows, a], order[rows, other] = other, a
    frames = (order.unsqueeze(2) * size + torch.arange(size, device=x.device)).flatten(1)
    return _take_frames(x, frames)


def intra_negative(x: torch.Tensor, kind: str, generator=None) -> torch.Tensor | None:
    """The intra-negative clips of a batch B x 3 x T x H x W: repeat | shuffle | none (-> None)."""
    if kind == "repeat":
        return repeat_frame(x, generator)
    if kind == "shuffle":
        return shuffle_chunks(x, generator)
    if kind == "none":
        return None
    raise ValueError(f"unknown intra-negative {kind!r}; choose one of {', '.join(KINDS)}")


def intra_negative_of_rank(x: torch.Tensor, kind: str, rank: int = 0, size: int = 1):
    """The intra-negatives of one rank's clips in a job of `size` processes, drawn as one process
    would draw them for the whole global batch (spec 6): frame orders are picked for B * size
    stand-in clips of frame numbers, and this rank applies its rows to its B clips. The same RNG
    state on every rank gives every rank its share of one draw."""
    if size == 1:
        return intra_negative(x, kind)
    b, c, t = x.shape[:3]
    numbers = torch.arange(t, device=x.device).view(1, 1, t, 1, 1)
    order = intra_negative(numbers.expand(b * size, 1, t, 1, 1), kind)
    if order is None:
        return None
    order = order[rank * b : (rank + 1) * b].view(b, 1, t, 1, 1)
    return torch.gather(x, 2, order.expand(b, c, t, *x.shape[3:]))
