"""Multi-GPU pretraining with DistributedDataParallel under `torchrun` (spec 7, 9).

Upstream trained on one GPU with batch 16 (spec 9). Here `pretrain.batch_size` stays the GLOBAL
batch: each of W ranks loads B / W clips, and every piece is arranged so that W ranks compute what
one process with batch B computes (up to float rounding):

* BatchNorm statistics span the global batch: torch's SyncBatchNorm on CUDA, `GlobalBatchNorm`
  on the CPU (gloo), where SyncBatchNorm refuses to run. BN then sees B clips per stream, as on
  upstream's single GPU (spec 7.1).
* The memory banks stay identical on every rank: logits use the banks as they were before the
  step; then every rank gathers all ranks' features and indices and applies the same update
  (spec 7.6). See `method.memory_bank.DistributedMemoryBank`.
* Per-step random draws (negative indices, intra-negative frames) are drawn for the whole global
  batch from the main process's RNG, which is identical on every rank, and each rank keeps its own
  rows (`method.intra_negative.intra_negative_of_rank`). Clip sampling therefore always runs in DataLoader workers (their seeds differ per rank), so
  nothing rank-specific touches the main process's RNG.
* `RankBatchSampler` deals each global batch of the single-process shuffled order out to the
  ranks; the loader generator advances as in one process, so resuming needs no `set_epoch`.
* Only rank 0 logs and writes files (`World.main`).

Launch: ``torchrun --standalone --nproc-per-node=G -m iicrepro.cli pretrain ...`` (nccl on CUDA,
gloo on the CPU).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
from dataclasses import dataclass

import torch
from torch import nn

from iicrepro.errors import UserError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place in the job. `backend` is None when no process group is used."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over ranks (identity in one process); for logged metrics."""
        if not self.distributed:
            return t
        import torch.distributed as dist

        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.size

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()


SINGLE = World()


def launched() -> bool:
    """Started by torchrun (or another launcher that sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    return all(k in os.environ for k in ENV)


def is_main_process() -> bool:
    """Rank 0, or not launched as a job at all (for code that has no World at hand)."""
    return os.environ.get("RANK", "0") == "0"


def init(device_name: str | None = None) -> tuple[World, torch.device]:
    """Join the process group a launcher describes, else run alone.

    Under torchrun the CUDA device is cuda:LOCAL_RANK (backend nccl); a CPU job uses gloo. A
    process group is created even for one process, so `--nproc-per-node=1` exercises the DDP path.
    """
    from iicrepro.devices import pick_device

    device = pick_device(device_name)
    if not launched():
        return SINGLE, device
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=rank, world_size=size, device_id=device if backend == "nccl" else None
        )
    return World(rank, size, local_rank, backend), device


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_batch_size(batch_size: int, world: World) -> int:
    """Clips per rank for the global `batch_size`."""
    if batch_size % world.size:
        raise UserError(
            f"pretrain.batch_size={batch_size} (the global batch) is not divisible by the "
            f"{world.size} processes; choose a multiple of {world.size}"
        )
    return batch_size // world.size


# ------------------------------------------------------------------------------------- sampling
class RankBatchSampler(torch.utils.data.Sampler):
    """This rank's share of one process's shuffled order (drop_last, spec 4).

    The order is drawn exactly as `DataLoader(shuffle=True, generator=g)` draws it in one process;
    global batch i (positions iB .. iB+B-1) gives rank r positions iB + r*b .. iB + (r+1)*b - 1.
    Gathering the ranks' batches in rank order therefore restores the single-process batch.
    """

    def __init__(self, n: int, batch_size: int, world: World, generator: torch.Generator):
        self.n, self.batch_size, self.world, self.generator = n, batch_size, world, generator
        self.rank_batch = rank_batch_size(batch_size, world)

    def __len__(self) -> int:
        return (self.n // self.batch_size) * self.rank_batch

    def __iter__(self):
        order = iter(torch.utils.data.RandomSampler(range(self.n), generator=self.generator))
        lo = self.world.rank * self.rank_batch
        for _ in range(self.n // self.batch_size):
            batch = list(itertools.islice(order, self.batch_size))
            yield from batch[lo : lo + self.rank_batch]
        for _ in order:  # drain it, as BatchSampler(drop_last=True) does: same generator draws
            pass


def seed_worker(worker_id: int, rank: int) -> None:
    """DataLoader worker init: worker seeds differ per rank (torch seeds them base + worker_id
    with a base that is the same on every rank)."""
    import random

    import numpy as np

    seed = (torch.initial_seed() + 1_000_003 * rank) % 2**63
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def data_loader(dataset, world: World, *, batch_size: int, workers: int, generator, pin_memory):
    """This rank's pretraining loader: its rows of each global batch, at least one worker."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=rank_batch_size(batch_size, world),
        sampler=RankBatchSampler(len(dataset), batch_size, world, generator),
        drop_last=True,
        num_workers=max(1, workers),
        generator=generator,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(seed_worker, rank=world.rank),
    )


# ----------------------------------------------------------------------------------- batchnorm
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the union of all ranks' batches, for the CPU (torch's SyncBatchNorm is
    CUDA-only). Train mode: two-pass global mean and biased variance normalise; the running
    variance gets the unbiased one, as BatchNorm does. Eval mode is plain BatchNorm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.shape[1] * dist.get_world_size()
        mean = _AllReduceSum.apply(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1 / int(self.num_batches_tracked)
                )
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / max(n - 1, 1), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer by a GlobalBatchNorm sharing its parameters and buffers
    (the optimizer's parameter references stay valid, the state dict keys stay the same)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlobalBatchNorm
    ):
        new = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, global_batchnorm(child))
    return module


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The module the step calls: `model` itself alone; in a process group, its BatchNorm layers
    synchronised (in place: `model` keeps its state dict keys) and the model wrapped in DDP.
    Buffers are not broadcast: synchronised BN keeps them identical on every rank."""
    if not world.distributed:
        return model
    if device.type == "cuda":
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        synced = global_batchnorm(model)
    if synced is not model:
        raise ValueError("the model itself is a BatchNorm layer; wrap a network instead")
    ddp_class = nn.parallel.DistributedDataParallel
    # no buffer broadcast before each forward (newer torch names the option differently)
    quiet = "forward_sync_buffers" in inspect.signature(ddp_class).parameters
    buffers = {"forward_sync_buffers" if quiet else "broadcast_buffers": False}
    ids = [device.index] if device.type == "cuda" else None
    return ddp_class(model, device_ids=ids, output_device=ids[0] if ids else None, **buffers)
