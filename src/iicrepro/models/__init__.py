"""Backbone registry and `iicrepro models` (spec 8).

Every backbone takes B x 3 x T x H x W clips and offers `forward` (pooled feature, or logits when
built with `num_classes`), `features`, `conv_map` and `retrieval_features`; see `models.base`.
Entry names are upstream's, so upstream checkpoints load strictly (`models.upstream`).
This module stays free of torch at import time; backbones are imported when built.
"""

from __future__ import annotations

import argparse
import importlib

from iicrepro.errors import UserError

BACKBONES = ("c3d", "r3d", "r21d", "r3d18")

_CLASSES = {
    "c3d": ("iicrepro.models.c3d", "C3D"),
    "r3d": ("iicrepro.models.r3d", "R3D"),
    "r21d": ("iicrepro.models.r21d", "R21D"),
    "r3d18": ("iicrepro.models.r3d18", "R3D18"),
}


def build_backbone(
    name: str, *, width: float = 1.0, small_input: bool = False, num_classes: int | None = None
):
    """A freshly initialised backbone (PyTorch default initialisation; no weights are loaded)."""
    if name not in _CLASSES:
        raise UserError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if not width > 0:
        raise UserError(f"model width must be positive (got {width})")
    if num_classes is not None and num_classes < 1:
        raise UserError(f"num_classes must be at least 1 (got {num_classes})")
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(module), cls)(
        width=width, small_input=small_input, num_classes=num_classes
    )


def count_parameters(module) -> int:
    """Learnable parameters, BatchNorm affine included (buffers are not parameters)."""
    return sum(p.numel() for p in module.parameters())


def describe(
    name: str, *, width: float = 1.0, small_input: bool = False, clip=(16, 112, 112)
) -> dict:
    """Parameter counts and output shapes for one clip, computed on the meta device (no memory,
    no arithmetic), so even C3D at 112x112 is described instantly."""
    import torch

    with torch.device("meta"):
        model = build_backbone(name, width=width, small_input=small_input).eval()
        with_head = build_backbone(name, width=width, small_input=small_input, num_classes=101)
        x = torch.empty(1, 3, *clip)
        conv_map = tuple(model.conv_map(x).shape[1:])
        retrieval = model.retrieval_features(x).shape[1]
    return {
        "backbone": name,
        "params": count_parameters(model),
        "params_head101": count_parameters(with_head),
        "out_dim": model.out_dim,
        "conv_map": conv_map,
        "retrieval_dim": retrieval,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (default 1.0)")
    parser.add_argument(
        "--small-input", action="store_true", help="the 3x3x3 stem variant for small clips"
    )
    parser.add_argument(
        "--clip",
        type=int,
        nargs=3,
        default=(16, 112, 112),
        metavar=("T", "H", "W"),
        help="clip size for the shape columns (default 16 112 112, the paper's)",
    )


def main(args: argparse.Namespace) -> int:
    clip = tuple(args.clip)
    header = ("backbone", "params", "params+head101", "out_dim", "conv map", "retrieval dim")
    rows = [header]
    for name in BACKBONES:
        try:
            d = describe(name, width=args.width, small_input=args.small_input, clip=clip)
        except UserError as exc:  # r3d18 exists at width 1 only
            rows.append((name, "n/a", "n/a", "n/a", "n/a", str(exc).split(";")[0]))
            continue
        rows.append(
            (
                name,
                f"{d['params']:,}",
                f"{d['params_head101']:,}",
                str(d["out_dim"]),
                "x".join(map(str, d["conv_map"])),
                str(d["retrieval_dim"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print(f"width {args.width}, small_input {args.small_input}, clip 3x{'x'.join(map(str, clip))}")
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0
