"""Memory banks and the InfoNCE loss of IIC (spec 7; upstream `lib/NCEAverage.py`).

Three banks of N x D rows, one per stream: view 1, view 2 and intra-negatives. For the view-1
feature of video y the positive is the view-2 bank row y; the negatives are K random view-2 rows
(inter-negatives) and the intra-negative rows of y and of the same K videos. Symmetrically for
view 2 against the view-1 bank. Without intra-negatives (`intra=False`) this is the two-bank CMC
baseline (spec 7.9).

Several processes (DDP): `DistributedMemoryBank` keeps the banks identical on every rank, with
`concat_all_gather` beside it (as MoCo keeps its gather beside the builder); `memory_bank(world,
...)` picks the one a job needs.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def chance_loss(k: int, intra: bool = True) -> float:
    """Loss of uniform logits: 2 ln(2K + 2) with intra-negatives, 2 ln(K + 1) without (spec 7.5)."""
    return 2 * math.log(2 * k + 2 if intra else k + 1)


class MemoryBank(nn.Module):
    """Banks as buffers (saved in the state dict), logits and the momentum update.

    `normalize_features` L2-normalises f1, f2 and fn before the dot products and the update: a
    named deviation (off upstream, spec 7.1) that keeps unnormalised small-data runs from dying.
    """

    def __init__(
        self,
        n: int,
        dim: int,
        *,
        k: int,
        t: float,
        momentum: float,
        intra: bool = True,
        normalize_features: bool = False,
    ):
        super().__init__()
        self.n, self.dim, self.k, self.t, self.momentum = n, dim, k, t, momentum
        self.intra, self.normalize_features = intra, normalize_features
        s = 1.0 / math.sqrt(dim / 3)  # Uniform(-s, s) init as CMC/upstream (spec 7.2)
        names = ["memory_v1", "memory_v2"] + (["memory_neg"] if intra else [])
        for name in names:
            self.register_buffer(name, torch.rand(n, dim).mul_(2 * s).add_(-s))

    def chance_loss(self) -> float:
        return chance_loss(self.k, self.intra)

    def sample_indices(self, index: torch.Tensor, generator=None) -> torch.Tensor:
        """B x (K+1) rows, uniform over {0..N-1} with replacement, column 0 = the sample's own
        row (spec 7.3). Negatives may include the anchor or batch mates, as upstream."""
        device = generator.device if generator is not None else self.memory_v1.device
        idx = torch.randint(0, self.n, (len(index), self.k + 1), device=device, generator=generator)
        idx = idx.to(self.memory_v1.device)
        idx[:, 0] = index.to(idx.device)
        return idx

    def forward(
        self,
        f1: torch.Tensor,
        f2: torch.Tensor,
        index: torch.Tensor,
        fn: torch.Tensor | None = None,
        generator=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits B x (2K+2) per view (B x (K+1) for CMC), divided by T; then update the banks.

        Layout (spec 7.4): [positive, K inter-negatives, own intra-negative, K intra-negatives].
        Rows are gathered before this step's update and carry no gradient; only f1 and f2 do.
        """
        if self.intra and fn is None:
            raise ValueError("this memory bank has an intra-negative bank: pass fn")
        if not self.intra and fn is not None:
            raise ValueError("this memory bank has no intra-negative bank (intra=False)")
        # Banks and logits stay fp32 even inside a bf16 autocast region.
        with torch.autocast(device_type=f1.device.type, enabled=False):
            f1, f2 = self._prepare(f1), self._prepare(f2)
            fn = self._prepare(fn.detach()) if fn is not None else None
            idx = self.sample_indices(index, generator)
            w1 = self.memory_v1[idx]  # advanced indexing copies: unaffected by the update
            w2 = self.memory_v2[idx]
            logits1 = torch.bmm(w2, f1.unsqueeze(2)).squeeze(2)
            logits2 = torch.bmm(w1, f2.unsqueeze(2)).squeeze(2)
            if self.intra:
                wn = self.memory_neg[idx]
                logits1 = torch.cat([logits1, torch.bmm(wn, f1.unsqueeze(2)).squeeze(2)], 1)
                logits2 = torch.cat([logits2, torch.bmm(wn, f2.unsqueeze(2)).squeeze(2)], 1)
            self.update(index, f1, f2, fn)
        return logits1 / self.t, logits2 / self.t

    def _prepare(self, f: torch.Tensor) -> torch.Tensor:
        f = f.float()
        return F.normalize(f, dim=1) if self.normalize_features else f

    @torch.no_grad()
    def update(self, index, f1, f2, fn=None) -> None:
        """row <- normalize(m * row + (1 - m) * f) for each sample's own row (spec 7.6)."""
        index = index.to(self.memory_v1.device)
        pairs = [(self.memory_v1, f1), (self.memory_v2, f2)]
        if self.intra:
            pairs.append((self.memory_neg, fn))
        for bank, f in pairs:
            row = bank.index_select(0, index).mul_(self.momentum)
            row.add_(f.detach().float(), alpha=1 - self.momentum)
            bank.index_copy_(0, index, F.normalize(row, dim=1))

    def extra_repr(self) -> str:
        return (
            f"n={self.n}, dim={self.dim}, k={self.k}, t={self.t}, momentum={self.momentum}, "
            f"intra={self.intra}, normalize_features={self.normalize_features}"
        )


# ---------------------------------------------------------------------------- several processes
class DistributedMemoryBank(MemoryBank):
    """A MemoryBank that stays identical on every rank of a DDP job (same buffers, same state
    dict), so W ranks with B / W clips each compute what one process with batch B computes.

    Negative indices are drawn for the global batch and sliced (the RNG state is the same on
    every rank); the update gathers every rank's features and indices and applies them all.
    `world` is any object with `rank` and `size` (``train.distributed.World``).
    """

    def __init__(self, *args, world, **kwargs):
        super().__init__(*args, **kwargs)
        self.world = world

    def sample_indices(self, index: torch.Tensor, generator=None) -> torch.Tensor:
        b, r = len(index), self.world.rank
        whole = torch.zeros(b * self.world.size, dtype=torch.long, device=index.device)
        idx = super().sample_indices(whole, generator)[r * b : (r + 1) * b].clone()
        idx[:, 0] = index.to(idx.device)
        return idx

    @torch.no_grad()
    def update(self, index, f1, f2, fn=None) -> None:
        feats = [f.detach().float() for f in (f1, f2, fn) if f is not None]
        packed = concat_all_gather(torch.cat(feats, dim=1))
        index = concat_all_gather(index.to(packed.device))
        super().update(index, *packed.split(self.dim, dim=1))


def memory_bank(world, *args, **kwargs) -> MemoryBank:
    """MemoryBank(*args, **kwargs), or its distributed twin when `world` is a process group."""
    if world.distributed:
        return DistributedMemoryBank(*args, world=world, **kwargs)
    return MemoryBank(*args, **kwargs)


def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """Rank-ordered concatenation along dim 0 of every rank's `t` (same shape on all ranks)."""
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------- loss
def nce_loss(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with target 0 (the positive) for each view, summed (spec 7.5)."""
    target = torch.zeros(len(logits1), dtype=torch.long, device=logits1.device)
    return F.cross_entropy(logits1.float(), target) + F.cross_entropy(logits2.float(), target)


@torch.no_grad()
def positive_rank1(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """Fraction of anchors (both views) whose positive logit is the largest."""
    hits = torch.cat([logits1.argmax(1), logits2.argmax(1)]) == 0
    return hits.float().mean()
