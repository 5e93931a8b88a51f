"""Device choice and the per-device speed settings (cuDNN autotuning, bf16 autocast, pinning)."""

from __future__ import annotations

import contextlib

import torch

from iicrepro.errors import UserError


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given (e.g. 'cpu', 'cuda:1'), else CUDA when available, else the CPU."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(
                f"device {name!r} requested but CUDA is not available; use --device cpu"
            )
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def configure(device: torch.device) -> None:
    """cuDNN autotuning on CUDA (fixed input shapes); CPU runs keep deterministic kernels."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False


def autocast(device: torch.device, amp: str):
    """bf16 autocast for the backbone forwards on CUDA when `amp == 'bf16'`; else a no-op.

    The memory banks and the loss run in fp32 regardless (see method.memory_bank)."""
    if amp == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pin_memory(device: torch.device) -> bool:
    """Page-locked host batches make the host-to-GPU copy asynchronous; useless on the CPU."""
    return device.type == "cuda"
