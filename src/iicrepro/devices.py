"""Device choice and the per-device speed settings (cuDNN autotuning, bf16 autocast, pinning)."""

from __future__ import annotations

import contextlib
from functools import cache

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


# ------------------------------------------------------------------------ model FLOPs utilisation
# A training sample costs 3 forwards (view 1, view 2, intra-negative) and the backward of two of
# them, a backward costing about 2 forwards: 3 + 2 * 2 = 7 forward passes (`forwards_per_sample`).
FORWARDS_PER_SAMPLE = 7
# Dense bf16 peak (TFLOP/s) by device name; the first matching substring wins (NVIDIA datasheets).
PEAK_BF16_TFLOPS = (
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),
    ("A100", 312.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a known accelerator, else None (MFU is then not estimated)."""
    name = device_name.upper()
    return next((v for key, v in PEAK_BF16_TFLOPS if key in name), None)


@cache
def forward_flops(
    backbone: str,
    clip: tuple[int, int, int] = (16, 112, 112),
    width: float = 1.0,
    small_input: bool = False,
) -> int:
    """FLOPs of one clip's forward (a multiply-add = 2), counted by torch's FlopCounterMode on the
    meta device (shapes only, no arithmetic)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from iicrepro.models import build_backbone

    with torch.device("meta"):
        model = build_backbone(backbone, width=width, small_input=small_input)
        x = torch.empty(1, 3, *clip)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def forwards_per_sample(view: str, intra_negative: str) -> int:
    """Forward-pass equivalents of one pretraining sample: the anchors (view 1, and view 2 unless
    it is the RGB clip itself) forward and backward (2 forwards), the intra-negative forward."""
    anchors = 1 if view == "rgb" else 2
    return 3 * anchors + (0 if intra_negative == "none" else 1)


def mfu(
    samples_per_s: float,
    flops_per_clip: float,
    peak_tflops: float | None,
    forwards: int = FORWARDS_PER_SAMPLE,
) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's bf16 peak."""
    if not peak_tflops or not samples_per_s:
        return None
    return samples_per_s * forwards * flops_per_clip / (peak_tflops * 1e12)
