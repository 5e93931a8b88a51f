"""Checkpoints: atomic save, safe load, strict backbone loading.

Our format is a dict with "format" = FORMAT, "backbone" (name), "model_kwargs" (build_backbone
keyword arguments), "model" (the backbone's state dict) and step-specific entries (banks,
settings, provenance; optimizer and RNG states in resume files). Files are read with
`weights_only=True`, so a checkpoint never executes code on load.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

from iicrepro.errors import UserError
from iicrepro.io import atomic_path

FORMAT = "iicrepro-checkpoint-v1"


def plain(value: Any) -> Any:
    """Settings (dict subclasses) and other JSON-able values as plain dicts, lists and scalars,
    the types a weights-only load accepts."""
    return json.loads(json.dumps(value, default=str))


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """torch.save into a temporary sibling, renamed onto `path` only when complete."""
    import torch

    path = Path(path)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint` (weights only; tensors on `map_location`)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise UserError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
            "delete it and rerun the step that writes it"
        ) from exc
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def backbone_state(model, backbone: str, model_kwargs: dict, **extra: Any) -> dict:
    """Our checkpoint dict for a backbone (state dict copied to the CPU) plus `extra` entries."""
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "backbone": backbone,
        "model_kwargs": dict(model_kwargs),
        "model": weights,
        **extra,
    }


def load_backbone(model, path: str | Path) -> dict:
    """Load the backbone weights of one of our checkpoints into `model` strictly.

    Missing, unexpected or mis-shaped entries raise UserError (never strict=False, the
    upstream fine-tuning pitfall of spec 11). Returns the whole checkpoint dict."""
    from iicrepro.models.upstream import load_state_strict

    ckpt = load_checkpoint(path)
    if ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise UserError(
            f"{path} is not an iicrepro checkpoint (format {ckpt.get('format')!r}); convert "
            "upstream files with `iicrepro import-upstream`"
        )
    load_state_strict(model, ckpt["model"], source=str(path))
    return ckpt
