"""Strict loading of state dicts and `iicrepro import-upstream` (spec 11).

Upstream's fine-tuning loads the pretrained backbone with `strict=False`, so a checkpoint whose
entry names do not match (another backbone, a `module.` prefix) is silently ignored and the
network trains from random weights (upstream issues #10, #11). Here every load is strict: a
missing, unexpected or mis-shaped entry stops with the full list and the likely cause.

Upstream files are pickles. They are read with `torch.load(weights_only=True)`, which only
rebuilds tensors and plain containers, plus `argparse.Namespace` (the `opt` entry of
self-supervised checkpoints); arbitrary pickled objects could run code when loaded. A file that
needs more is refused unless the user passes `--trust-pickle`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from iicrepro.errors import UserError
from iicrepro.io import atomic_path, sha256_file
from iicrepro.models import BACKBONES, build_backbone

FORMAT = "iicrepro-checkpoint-v1"
HEAD_PREFIX = "linear."
DATAPARALLEL_PREFIX = "module."


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape)


def _guess_backbones(keys: set[str]) -> list[str]:
    """Backbones whose entry names (head aside) are exactly `keys` minus any head entries."""
    import torch

    body = {k for k in keys if not k.startswith(HEAD_PREFIX)}
    found = []
    for name in BACKBONES:
        with torch.device("meta"):
            if set(build_backbone(name).state_dict()) == body:
                found.append(name)
    return found


def _likely_cause(state_dict: Mapping, missing, unexpected, mismatched) -> str:
    head = [k for k in (*missing, *unexpected) if k.startswith(HEAD_PREFIX)]
    if unexpected and all(k.startswith(DATAPARALLEL_PREFIX) for k in unexpected):
        return "the file was saved from nn.DataParallel; strip the 'module.' prefix from its names"
    if any(k.startswith("base_network.") for k in unexpected):
        return "this looks like a VCOP pretext checkpoint ('base_network.*'), not an IIC backbone"
    if head and len(head) == len(missing) + len(unexpected) and not mismatched:
        if any(k in unexpected for k in head):
            return (
                "the file has a classification head (linear.*) but the model was built without one"
            )
        return "the model has a classification head (linear.*) the file lacks; build it without one"
    if mismatched and not missing and not unexpected:
        if all(k.startswith(HEAD_PREFIX) for k in mismatched):
            return "the number of classes differs from the file's head"
        return "the channel counts differ: wrong model width (upstream files are width 1.0)"
    guesses = _guess_backbones(set(state_dict))
    cause = "the entry names belong to another architecture: wrong --backbone"
    if guesses:
        cause += f" (the file's names match backbone {', '.join(guesses)})"
    return cause


def load_state_strict(model, state_dict: Mapping, *, source: str) -> None:
    """Load `state_dict` into `model` only if names and shapes match exactly; otherwise raise
    UserError listing every missing, unexpected and mis-shaped entry (never a partial load)."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state_dict]
    unexpected = [k for k in state_dict if k not in ours]
    mismatched = [k for k in ours if k in state_dict and _shape(ours[k]) != _shape(state_dict[k])]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit backbone {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing from the file ({len(missing)}):")
            lines += [f"    {k} {_shape(ours[k])}" for k in missing]
        if unexpected:
            lines.append(f"  unexpected in the file ({len(unexpected)}):")
            lines += [f"    {k} {_shape(state_dict[k])}" for k in unexpected]
        if mismatched:
            lines.append(f"  wrong shape ({len(mismatched)}):")
            lines += [
                f"    {k}: file {_shape(state_dict[k])}, model {_shape(ours[k])}"
                for k in mismatched
            ]
        lines.append(f"Likely cause: {_likely_cause(state_dict, missing, unexpected, mismatched)}.")
        lines.append("Nothing was loaded (a partial load would silently train from scratch).")
        raise UserError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def load_file(path: str | Path, *, trust_pickle: bool = False):
    """torch.load on the CPU; weights only unless the user trusts the file (module docstring)."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()]
        detail = next((ln for ln in lines if ln.startswith("WeightsUnpickler")), lines[-1])
        detail = detail.split(" was not an allowed")[0][:300]
        raise UserError(
            f"{path} holds pickled objects beyond tensors and plain containers ({detail}). "
            "Loading it could run arbitrary code; if you trust its source, rerun with "
            "--trust-pickle"
        ) from None


def _upstream_state(obj, path: Path) -> dict:
    """The state dict inside an upstream file: `obj['model']` (self-supervised checkpoints and
    fine-tuning snapshots) or the file itself (the released fine-tuned model)."""
    import torch

    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not (
        isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise UserError(
            f"{path} is not an upstream IIC checkpoint: expected a state dict or a dict with "
            f"'model', found {keys}"
        )
    if all(k.startswith(DATAPARALLEL_PREFIX) for k in obj):
        obj = {k[len(DATAPARALLEL_PREFIX) :]: v for k, v in obj.items()}
    return dict(obj)


def import_upstream(
    path: str | Path, backbone: str, out: str | Path, *, trust_pickle: bool = False
) -> dict:
    """Convert an upstream checkpoint into this project's format; returns what was written
    (without the tensors' values mattering to the caller: `model` and `head` hold them)."""
    import torch

    path = Path(path)
    state = _upstream_state(load_file(path, trust_pickle=trust_pickle), path)
    head_keys = [k for k in state if k.startswith(HEAD_PREFIX)]
    num_classes = None
    if head_keys:
        head_ref = state.get(HEAD_PREFIX + "weight", state[head_keys[0]])
        num_classes = int(head_ref.shape[0])
    model = build_backbone(backbone, num_classes=num_classes)
    load_state_strict(model, state, source=str(path))
    loaded = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = {
        "format": FORMAT,
        "backbone": backbone,
        "model_kwargs": {"width": 1.0, "small_input": False, "num_classes": num_classes},
        "model": {k: v for k, v in loaded.items() if not k.startswith(HEAD_PREFIX)},
        "head": {k: v for k, v in loaded.items() if k.startswith(HEAD_PREFIX)} or None,
        "source": {
            "path": str(path),
            "sha256": sha256_file(path),
            "kind": "upstream-finetuned" if head_keys else "upstream-ssl",
        },
    }
    with atomic_path(out, suffix=".pt") as tmp:
        torch.save(ckpt, tmp)
    return ckpt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="upstream checkpoint (ckpt_epoch_*.pth or fine-tuned .pt)")
    parser.add_argument("--backbone", required=True, choices=BACKBONES, help="its architecture")
    parser.add_argument("--out", required=True, help="where to write the converted checkpoint")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow arbitrary pickled objects (only for files from a trusted source)",
    )


def main(args: argparse.Namespace) -> int:
    ckpt = import_upstream(args.file, args.backbone, args.out, trust_pickle=args.trust_pickle)
    src = ckpt["source"]
    head = ckpt["model_kwargs"]["num_classes"]
    print(
        f"{src['kind']} {args.backbone} checkpoint ({len(ckpt['model'])} backbone entries"
        f"{f', {head}-class head' if head else ', no head'}; sha256 {src['sha256'][:12]}) "
        f"-> {args.out}"
    )
    return 0
