"""Checkpoints: atomic save, safe load, strict backbone loading.

Our format is a dict with "format" = FORMAT, "backbone" (name), "model_kwargs" (build_backbone
keyword arguments), "model" (the backbone's state dict) and step-specific entries (banks,
settings, provenance; optimizer and RNG states in resume files). Files are read with
`weights_only=True`, so a checkpoint never executes code on load; a file that needs more is
refused with our own message (never the advice to load it with `weights_only=False`).
A write that fails for lack of space raises `iicrepro.io.OutOfSpace`; the temporary files of a
killed write are removed by `remove_stale_temps` when the run starts again.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

from iicrepro.errors import UserError
from iicrepro.io import atomic_path, remove_stale_temps

FORMAT = "iicrepro-checkpoint-v1"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
PICKLE_MAGIC = b"\x80"  # a pickle of protocol 2 or later (the legacy torch.save format)


def plain(value: Any) -> Any:
    """Settings (dict subclasses) and other JSON-able values as plain dicts, lists and scalars,
    the types a weights-only load accepts."""
    return json.loads(json.dumps(value, default=str))


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """torch.save into a temporary sibling, renamed onto `path` only when complete."""
    import torch

    path = Path(path)
    with atomic_path(path, suffix=".pt", needed=_tensor_bytes(state)) as tmp, open(tmp, "wb") as f:
        # Through a Python file, so a full disk surfaces as OSError(ENOSPC) behind torch's error.
        torch.save(state, f)
    return path


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a (nested) state: about the size of its checkpoint file."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def clean_run_folder(*folders: str | Path) -> None:
    """Remove the temporary files a killed run left in its folders (e.g. `.last.pt.*.pt.tmp`)."""
    for folder in folders:
        remove_stale_temps(folder)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint` (weights only; tensors on `map_location`)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise UserError(_unreadable(path, exc)) from None  # torch's text advises unsafe loading
    if not isinstance(state, dict):
        raise UserError(
            f"{path} holds a {type(state).__name__}, not a checkpoint: iicrepro checkpoints are "
            f"dicts (format {FORMAT!r}) written by `iicrepro pretrain` or `finetune`"
        )
    return state


def _unreadable(path: Path, exc: BaseException) -> str:
    """Why a file does not load with weights_only=True, in our words: torch's own message
    suggests weights_only=False, which would run whatever code the file holds."""
    with open(path, "rb") as f:
        head = f.read(4)
    rerun = "delete it and rerun the step that writes it"
    if isinstance(exc, pickle.UnpicklingError) and (
        head[:4] == ZIP_MAGIC or head[:1] == PICKLE_MAGIC
    ):
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (such as {found.group(1)})" if found else ""
        return (
            f"{path} cannot be read: it holds Python objects{what} besides tensors and plain "
            "values, e.g. a whole pickled model; they are not loaded, since unpickling them could run any code. "
            "Save the model's state_dict() instead; convert an upstream IIC/VCOP file with "
            "`iicrepro import-upstream`"
        )
    if head[:4] == ZIP_MAGIC or isinstance(exc, EOFError):
        return f"checkpoint {path} cannot be read: it is damaged or incomplete; {rerun}"
    return (
        f"{path} cannot be read: it is not a PyTorch checkpoint (it starts with neither a zip "
        f"nor a pickle header: {head!r}); {rerun}"
    )


def describe(state: dict) -> str:
    """What a loaded dict is, for errors about checkpoints that are not ours."""
    import torch

    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        first = next(iter(state))
        return f"a bare state dict ({len(state)} tensors, the first {first!r})"
    keys = ", ".join(repr(k) for k in list(state)[:6]) + (", ..." if len(state) > 6 else "")
    return f"a dict with the keys {keys or 'none'}"


def load_model_checkpoint(path: str | Path) -> dict:
    """One of our checkpoints with a backbone (format, backbone, model_kwargs, model), or a
    UserError that says what the file holds instead and what is expected."""
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != FORMAT or not {"backbone", "model"} <= set(ckpt):
        raise UserError(
            f"{path} is {describe(ckpt)}, not an iicrepro checkpoint: expected a dict with "
            f"format {FORMAT!r}, 'backbone', 'model_kwargs' and 'model', as `iicrepro pretrain` "
            "writes; convert an upstream IIC/VCOP file with `iicrepro import-upstream`"
        )
    return ckpt


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

    ckpt = load_model_checkpoint(path)
    load_state_strict(model, ckpt["model"], source=str(path))
    return ckpt
