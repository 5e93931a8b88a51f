"""The videos a step trains or evaluates on, and the clip datasets over them.

One path for pretraining, retrieval, BN recalibration and fine-tuning::

    manifest (splits)  ->  usable videos  ->  frame store (+ flow store)  ->  clip Dataset

Usable videos are decided here once, by one rule: a video is used when the frame store holds at
least ``max(frames.min_frames, clips.length + 1)`` frames of it (length = frames - 1 must hold one
clip, spec 3.1) and, for a u / v view, the flow store holds it too (one frame fewer, spec 3.1).
Every left-out video is counted by reason (the frame store's failures.csv reason: ``missing``,
``unreadable``, ``corrupt``, ``crash``, ``error``; or ``too_short``, ``no_flow``) and the counts go
into the step's metrics.json. A step that would leave out more than ``data.max_excluded_fraction``
of the listed videos stops with an error instead of training or testing on the rest.
"""

from __future__ import annotations

from typing import Any

from iicrepro import layout
from iicrepro.errors import UserError

FLOW_VIEWS = ("u", "v")


# ------------------------------------------------------------------------------------ manifest
def load_manifest(settings: Any, dataset: str, split: int):
    import pandas as pd

    path = layout.manifest(settings, dataset, split)
    if not path.is_file():
        raise UserError(f"manifest {path} not found: run `iicrepro splits {dataset}` first")
    return pd.read_csv(path)


def num_classes(settings: Any, dataset: str, manifest) -> int:
    """Classes of a dataset: classes.csv when the splits step wrote one, else the manifest's."""
    import pandas as pd

    classes_csv = layout.manifests(settings, dataset) / "classes.csv"
    if classes_csv.is_file():
        return len(pd.read_csv(classes_csv))
    return int(manifest["label"].max()) + 1


# -------------------------------------------------------------------------------------- stores
def frame_store(settings: Any, dataset: str):
    from iicrepro.data.frames import FrameStore

    return FrameStore(layout.frame_store(settings, dataset))


def flow_stores(settings: Any, dataset: str, view: str) -> dict | None:
    """The flow component store a u / v view reads ({view: FrameStore}, as the clip datasets take
    it); None for the other views."""
    if view not in FLOW_VIEWS:
        return None
    from iicrepro.data.frames import FrameStore

    root = layout.flow_store(settings, dataset) / view
    if not (root / "index.csv").is_file():
        raise UserError(f"flow store {root} not found: run `iicrepro flow {dataset}` first")
    return {view: FrameStore(root)}


# ------------------------------------------------------------------------------- usable videos
def min_frames(settings: Any) -> int:
    """Frames a video needs to be used: the frame step's minimum, and one clip (spec 3.1)."""
    return max(int(settings["frames"]["min_frames"]), int(settings["clips"]["length"]) + 1)


def _failure_reasons(store) -> dict[str, str]:
    """The frame step's reason for every video it could not store (failures.csv)."""
    import pandas as pd

    path = store.root / "failures.csv"
    if not path.is_file():
        return {}
    failures = pd.read_csv(path, dtype=str, keep_default_na=False)
    excluded = failures[failures["status"] == "excluded"]
    return dict(zip(excluded["video"], excluded["reason"], strict=True))


def usable_subset(
    settings: Any, manifest, store, subset: str, *, flows=None, batch_size=None, drop_last=False
):
    """Usable videos of one subset (see the module doc) and the counts of what was left out.

    Returns (kept, counts). A kept video's position is its row (its memory-bank row in
    pretraining). `drop_last` reproduces upstream's loader dropping the last partial batch
    (spec 10.2); those videos are counted apart, not as exclusions. Raises UserError when more
    than ``data.max_excluded_fraction`` of the listed videos are left out, or none is kept.
    """
    from iicrepro.data.frames import usable, video_key

    need = min_frames(settings)
    listed = manifest[manifest["subset"] == subset].reset_index(drop=True)
    kept, excluded = usable(listed, store, need)
    reasons = _failure_reasons(store) if len(excluded) else {}
    by_reason: dict[str, int] = {}
    for video in excluded["video"]:
        key = video_key(video)
        reason = "too_short" if key in store else reasons.get(key, "missing")
        by_reason[reason] = by_reason.get(reason, 0) + 1
    no_flow = []
    for flow in (flows or {}).values():  # flow has one frame fewer than RGB (spec 3.1)
        kept, missing = usable(kept, flow, need - 1)
        no_flow += [str(v) for v in missing["video"]]
    if no_flow:
        by_reason["no_flow"] = len(no_flow)
    dropped = len(kept) % batch_size if drop_last and batch_size else 0
    kept = kept.iloc[: len(kept) - dropped].reset_index(drop=True)
    counts = {
        "listed": len(listed),
        "used": len(kept),
        "excluded": len(excluded) + len(no_flow),
        "excluded_decode": len(excluded),
        "excluded_flow": len(no_flow),
        "excluded_by_reason": dict(sorted(by_reason.items())),
        "dropped_last_batch": dropped,
        "min_frames": need,
        "excluded_videos": [str(v) for v in excluded["video"]] + no_flow,
    }
    if len(kept) == 0:
        raise UserError(
            f"no usable {subset} videos ({len(listed)} listed, {len(excluded)} not decoded or "
            f"shorter than {need} frames, {len(no_flow)} without flow): check the frame store "
            "(iicrepro frames), the flow store (iicrepro flow), frames.min_frames and clips.length"
        )
    check_excluded(settings, counts, f"{subset} videos of {store.root}")
    return kept, counts


def check_excluded(settings: Any, counts: dict, what: str) -> None:
    """Stop when more than ``data.max_excluded_fraction`` of the listed videos were left out."""
    limit = float(settings["data"]["max_excluded_fraction"])
    listed, excluded = counts["listed"], counts["excluded"]
    if listed and excluded / listed > limit:
        reasons = ", ".join(f"{n} {r}" for r, n in counts["excluded_by_reason"].items())
        raise UserError(
            f"{excluded} of {listed} {what} cannot be used ({reasons}; a video needs "
            f"{counts['min_frames']} frames): more than data.max_excluded_fraction={limit:g}. "
            "Fix the frame store (see its failures.csv; rerun `iicrepro frames`/`iicrepro flow` "
            "after freeing disk space or replacing broken files), or raise "
            "data.max_excluded_fraction in params.yaml to accept the loss"
        )


# ------------------------------------------------------------------------------- clip datasets
def pretraining_set(settings: Any, view: str):
    """The pretraining clips (spec 4: train subset, one clip per video per epoch), the input
    files for provenance and the video counts. A kept video's position is its memory-bank row."""
    from iicrepro.data.clips import PretrainClips

    p, c = settings["pretrain"], settings["clips"]
    store = frame_store(settings, p["dataset"])
    flows = flow_stores(settings, p["dataset"], view)
    manifest = load_manifest(settings, p["dataset"], p["split"])
    kept, counts = usable_subset(settings, manifest, store, "train", flows=flows)
    clips = PretrainClips(kept, store, clip_len=c["length"], crop=c["crop"], flow_stores=flows)
    inputs = [layout.manifest(settings, p["dataset"], p["split"]), store.root / "index.csv"]
    return clips, inputs, counts


def recalibration_set(settings: Any, view: str):
    """BN recalibration clips: the pretraining dataset's usable training videos, sampled as in
    fine-tuning (one random clip and crop per video), with the flow of a u / v view."""
    from iicrepro.data.clips import TrainClips

    p, c = settings["pretrain"], settings["clips"]
    store = frame_store(settings, p["dataset"])
    flows = flow_stores(settings, p["dataset"], view)
    manifest = load_manifest(settings, p["dataset"], p["split"])
    kept, _ = usable_subset(settings, manifest, store, "train", flows=flows)
    return TrainClips(kept, store, clip_len=c["length"], crop=c["crop"], flow_stores=flows)


def evaluation_clips(settings: Any, videos, store, flows=None):
    """``clips.eval_clips`` centre-cropped clips per video (retrieval, the recognition test)."""
    from iicrepro.data.clips import EvalClips

    c = settings["clips"]
    return EvalClips(
        videos, store, clip_len=c["length"], crop=c["crop"], num_clips=c["eval_clips"],
        flow_stores=flows,
    )  # fmt: skip


def hold_out(train, val_size: int, seed: int):
    """Seeded split of the train list into (train, validation), like torch random_split."""
    import torch

    if val_size >= len(train):
        raise UserError(
            f"finetune.val_size ({val_size}) must be smaller than the {len(train)} usable training "
            "videos: lower finetune.val_size for this dataset"
        )
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    val, rest = sorted(perm[:val_size]), sorted(perm[val_size:])
    return train.iloc[rest].reset_index(drop=True), train.iloc[val].reset_index(drop=True)


def finetuning_data(settings: Any, dataset: str, split: int, view: str, seed: int) -> dict:
    """Usable videos of one split for fine-tuning (spec 11): train minus a seeded validation
    subset, validation, test; their stores, the number of classes and the counts."""
    val_size = settings["finetune"]["val_size"].get(dataset)
    if val_size is None:
        raise UserError(f"finetune.val_size has no entry for {dataset}: add one in params.yaml")
    store = frame_store(settings, dataset)
    manifest = load_manifest(settings, dataset, split)
    flows = flow_stores(settings, dataset, view)
    train_all, train_counts = usable_subset(settings, manifest, store, "train", flows=flows)
    test, test_counts = usable_subset(settings, manifest, store, "test", flows=flows)
    train, val = hold_out(train_all, val_size, seed)
    counts = {"train": len(train), "val": len(val), "test": len(test),
              "train_list": train_counts, "test_list": test_counts}  # fmt: skip
    return {"store": store, "flows": flows, "train": train, "val": val, "test": test,
            "classes": num_classes(settings, dataset, manifest), "counts": counts}  # fmt: skip


def training_clips(settings: Any, videos, store, flows=None):
    """Fine-tuning training / validation clips: one random clip and crop per video per epoch."""
    from iicrepro.data.clips import TrainClips

    c = settings["clips"]
    return TrainClips(videos, store, clip_len=c["length"], crop=c["crop"], flow_stores=flows)
