"""The action-recognition test (spec 11) and `iicrepro evaluate`.

Protocol. Every usable test video of the split gives ``clips.eval_clips`` centre-cropped clips
(`data.datasets.evaluation_clips`, starts at linspace(clip_len/2, length - clip_len/2, n)); the
classifier scores each clip in eval mode, and a video is scored by averaging its clips' logits
*before* the softmax and taking the argmax; this is not a majority vote over clip predictions.
Clip accuracy (every clip scored on its own) is reported beside it, although upstream did not
report it. Accuracies are percentages. Inputs may be numpy arrays or torch tensors.

`iicrepro finetune` runs this test on its best-validation model; `iicrepro evaluate` runs it on any
classifier checkpoint as it is: a fine-tuning run's ``best.pt`` or an upstream fine-tuned model
converted by `iicrepro import-upstream` (its own head), so released weights can be checked.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from iicrepro import io, layout
from iicrepro.errors import UserError

VIEWS = ("rgb", "residual", "u", "v")


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check(clip_logits, labels) -> tuple[np.ndarray, np.ndarray]:
    logits = _as_numpy(clip_logits).astype(np.float64, copy=False)
    labels = _as_numpy(labels).astype(np.int64, copy=False).reshape(-1)
    if logits.ndim != 3:
        raise ValueError(f"clip_logits must be (videos, clips, classes), got shape {logits.shape}")
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} videos of logits but {labels.shape[0]} labels")
    if logits.shape[0] == 0:
        raise ValueError("no videos to score")
    return logits, labels


def video_predictions(clip_logits) -> np.ndarray:
    """Predicted class per video: argmax of the logits averaged over the video's clips."""
    logits = _as_numpy(clip_logits).astype(np.float64, copy=False)
    return logits.mean(axis=1).argmax(axis=1)


def video_accuracy(clip_logits, labels) -> float:
    """Video-level top-1 (%) from clip logits of shape (V, N, C) and labels of shape (V,)."""
    logits, labels = _check(clip_logits, labels)
    return float(100.0 * np.mean(video_predictions(logits) == labels))


def clip_accuracy(clip_logits, labels) -> float:
    """Clip-level top-1 (%): each of the V*N clips scored against its video's label."""
    logits, labels = _check(clip_logits, labels)
    hits = logits.argmax(axis=2) == labels[:, None]
    return float(100.0 * hits.mean())


# --------------------------------------------------------------------------------- the test
def clip_logits(model, loader, view: str, residual_scaled: bool, device):
    """Clip logits (V, N, C) and labels of every video of an evaluation loader, in eval mode."""
    import torch

    from iicrepro.method.views import batch_input

    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in loader:
            b, n = batch["video"].shape[:2]
            x = batch_input(batch, view, device, residual_scaled=residual_scaled, clips=True)
            logits.append(model(x).float().reshape(b, n, -1).cpu().numpy())
            labels.append(np.asarray(batch["label"]))
    return np.concatenate(logits), np.concatenate(labels)


def test_videos(settings: Any, model, data: dict, view: str, device, *, seed: int = 0) -> dict:
    """The test of spec 11 on ``data`` (`datasets.finetuning_data`: its test videos and stores):
    writes nothing, returns the clip logits, labels, video predictions and both accuracies."""
    import torch

    from iicrepro.data.datasets import evaluation_clips
    from iicrepro.devices import pin_memory

    f = settings["finetune"]
    clips = evaluation_clips(settings, data["test"], data["store"], data["flows"])
    loader = torch.utils.data.DataLoader(
        clips, batch_size=f["batch_size"], shuffle=False, num_workers=f["workers"],
        generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory(device),
    )  # fmt: skip
    residual_scaled = f["residual"] == "rescaled"  # spec 3.3: unscaled since upstream 6632296
    logits, labels = clip_logits(model, loader, view, residual_scaled, device)
    return {
        "logits": logits,
        "labels": labels,
        "predictions": video_predictions(logits),
        "top1": video_accuracy(logits, labels),
        "clip_top1": clip_accuracy(logits, labels),
        "clips": int(logits.shape[0] * logits.shape[1]),
    }


def write_predictions(path: Path, videos, result: dict) -> None:
    """test_predictions.csv: video,label,prediction, one row per test video."""
    rows = zip(videos, result["labels"], result["predictions"], strict=True)
    lines = ["video,label,prediction"] + [f"{v},{y},{p}" for v, y, p in rows]
    io.write_text(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------------------- iicrepro evaluate
def classifier_from_checkpoint(checkpoint: str | Path):
    """The classifier (backbone + head) a checkpoint holds, loaded strictly: our fine-tuning
    ``best.pt`` (head inside "model") or an `import-upstream` file (head under "head")."""
    from iicrepro.checkpoint import load_model_checkpoint
    from iicrepro.models import build_backbone
    from iicrepro.models.upstream import load_state_strict

    ckpt = load_model_checkpoint(checkpoint)
    kwargs = dict(ckpt.get("model_kwargs") or {})
    if not kwargs.get("num_classes"):
        raise UserError(
            f"{checkpoint} holds a {ckpt['backbone']} backbone without a classification head: "
            "fine-tune it first (`iicrepro finetune`), or import an upstream fine-tuned model"
        )
    model = build_backbone(ckpt["backbone"], **kwargs)
    state = {**ckpt["model"], **(ckpt.get("head") or {})}
    load_state_strict(model, state, source=str(checkpoint))
    return model, ckpt


def evaluate(
    settings: Any,
    checkpoint: str | Path,
    dataset: str,
    split: int,
    view: str,
    *,
    out: str | Path | None = None,
    device: str | None = None,
) -> Path:
    """Run the test on a classifier checkpoint as it is; returns the output folder."""
    from iicrepro.data.datasets import (
        flow_stores,
        frame_store,
        load_manifest,
        num_classes,
        usable_subset,
    )
    from iicrepro.devices import pick_device

    if view not in VIEWS:
        raise UserError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise UserError(f"checkpoint {checkpoint} not found")
    out = Path(out) if out else layout.evaluate_dir(settings, dataset, split, checkpoint)
    device = pick_device(device)
    model, ckpt = classifier_from_checkpoint(checkpoint)
    store, manifest = frame_store(settings, dataset), load_manifest(settings, dataset, split)
    classes = num_classes(settings, dataset, manifest)
    if model.num_classes != classes:
        raise UserError(
            f"{checkpoint} has a {model.num_classes}-class head but {dataset} has {classes} "
            "classes: evaluate it on the dataset it was fine-tuned on"
        )
    flows = flow_stores(settings, dataset, view)
    test, counts = usable_subset(settings, manifest, store, "test", flows=flows)
    data = {"test": test, "store": store, "flows": flows}
    result = test_videos(settings, model.to(device), data, view, device)
    write_predictions(out / "test_predictions.csv", test["video"], result)
    metrics = {
        "top1": result["top1"], "clip_top1": result["clip_top1"], "backbone": ckpt["backbone"],
        "view": view, "dataset": dataset, "split": split, "num_classes": classes,
        "residual": settings["finetune"]["residual"],
        "counts": {"test": len(test), "test_list": counts,
                   "test_clips": result["clips"]},
        "checkpoint": {"path": str(checkpoint), "sha256": io.sha256_file(checkpoint),
                       "source": ckpt.get("source")},
        "provenance": io.provenance(
            settings, [checkpoint, layout.manifest(settings, dataset, split)], step="evaluate"
        ),
    }  # fmt: skip
    io.write_json(out / "metrics.json", metrics)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True,
        help="classifier checkpoint: a fine-tuning best.pt or an import-upstream file with a head",
    )  # fmt: skip
    parser.add_argument("--dataset", required=True, help="ucf101, hmdb51 or synthetic")
    parser.add_argument("--split", type=int, required=True, choices=(1, 2, 3))
    parser.add_argument("--view", required=True, choices=VIEWS, help="input modality")
    parser.add_argument("--out", default=None, help="output folder (default: layout)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")


def main(args: argparse.Namespace) -> int:
    from iicrepro.cli import settings_from_args

    out = evaluate(
        settings_from_args(args), args.checkpoint, args.dataset, args.split, args.view,
        out=args.out, device=args.device,
    )  # fmt: skip
    m = io.read_json(out / "metrics.json")
    print(f"test top1 {m['top1']:.2f} (clip {m['clip_top1']:.2f}) on {m['counts']['test']} videos")
    print(f"wrote {out / 'metrics.json'}")
    return 0
