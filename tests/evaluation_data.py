"""A tiny labelled dataset, frame store and checkpoint for the retrieval and fine-tuning tests.

Three motion classes (a bright square moving right, down, or blinking) on a noisy grey background,
48x48 frames, 10 frames per video, stored in a real raw frame store with a real manifest. One
training video is listed but never decoded, as a video whose decoding failed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from iicrepro import config, layout
from iicrepro.data.frames import save_frames, write_index

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
DATASET = "synthetic"
CLASSES = ("right", "down", "blink")
FRAMES = 10
SIZE = 48
TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 2
MISSING = "right/v_right_g99_c00.avi"  # listed in the manifest, absent from the store
MODEL_KWARGS = {"width": 0.125, "small_input": True}


def overrides(tmp_path: Path, **extra) -> list[str]:
    """`--set` overrides of the demo preset: paths under tmp_path, tiny clips, fast loops."""
    sets = {
        "paths.data": str(tmp_path / "data"),
        "paths.results": str(tmp_path / "results"),
        "tracking.enabled": "false",
        "frames.min_frames": "9",
        "data.max_excluded_fraction": "0.2",  # tests leave out one video of a subset (>= 6)
        "clips.eval_clips": "2",
        "retrieval.batch_size": "5",
        "retrieval.workers": "0",
        "pretrain.batch_size": "4",
        "finetune.epochs": "2",
        "finetune.batch_size": "4",
        "finetune.checkpoint_every": "1",
        "finetune.val_size.synthetic": "3",
        "finetune.workers": "0",
    }
    sets.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in sets.items()]


def settings(tmp_path: Path, **extra):
    return config.load(PARAMS, "demo", overrides(tmp_path, **extra))


def video(label: int, seed: int) -> np.ndarray:
    """uint8 (T, H, W, 3): a textured square whose motion depends on the class."""
    rng = np.random.default_rng(seed)
    frames = np.full((FRAMES, SIZE, SIZE, 3), 0.5) + rng.normal(0, 0.02, (FRAMES, SIZE, SIZE, 3))
    y0, x0 = rng.integers(8, 20, size=2)
    for t in range(FRAMES):
        dy, dx = {0: (0, 2 * t), 1: (2 * t, 0), 2: (0, 0)}[label]
        if label == 2 and t % 2:
            continue  # blink: visible every other frame
        frames[t, y0 + dy : y0 + dy + 10, x0 + dx : x0 + dx + 10] = (0.9, 0.8, 0.2)
    return (np.clip(frames, 0, 1) * 255).astype(np.uint8)


def build_dataset(s) -> pd.DataFrame:
    """Manifest split 1 (+ classes.csv) and the raw frame store of the tiny dataset."""
    rows = []
    for label, name in enumerate(CLASSES):
        for i in range(TRAIN_PER_CLASS + TEST_PER_CLASS):
            subset = "train" if i < TRAIN_PER_CLASS else "test"
            rows.append([f"{name}/v_{name}_g{i + 1:02d}_c00.avi", name, label, subset])
    manifest = pd.DataFrame(rows, columns=["video", "class", "label", "subset"])
    manifest.loc[len(manifest)] = [MISSING, "right", 0, "train"]
    path = layout.manifest(s, DATASET, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(path, index=False)
    classes = pd.DataFrame({"label": range(len(CLASSES)), "class": CLASSES})
    classes.to_csv(path.with_name("classes.csv"), index=False)

    store = layout.frame_store(s, DATASET)
    keys = []
    for i, row in manifest.iterrows():
        if row["video"] != MISSING:
            key = row["video"].removesuffix(".avi")
            save_frames(store, key, video(int(row["label"]), seed=i), "raw")
            keys.append(key)
    write_index(store, keys, "raw")
    return manifest


def write_checkpoints(s, seed: int = 0, *, backbone: str = "r3d") -> Path:
    """checkpoint.pt and init.pt in the pretraining run folder: the same random weights here
    (the tests check the evaluation code paths, not what pretraining learns)."""
    import torch

    from iicrepro.checkpoint import backbone_state, save_checkpoint
    from iicrepro.models import build_backbone

    run_dir = layout.pretrain_dir(s, backbone, "residual", "repeat", seed)
    torch.manual_seed(seed)
    model = build_backbone(backbone, **MODEL_KWARGS)
    state = backbone_state(model, backbone, MODEL_KWARGS)
    save_checkpoint(run_dir / "init.pt", state)
    save_checkpoint(run_dir / "checkpoint.pt", state)
    return run_dir


def build_flow(s, component: str, skip: str) -> None:
    """A flow component store (1-channel frames, one fewer than RGB) lacking the video `skip`."""
    manifest = pd.read_csv(layout.manifest(s, DATASET, 1))
    root = layout.flow_store(s, DATASET) / component
    keys = []
    for i, row in manifest.iterrows():
        if row["video"] not in (MISSING, skip):
            key = row["video"].removesuffix(".avi")
            grey = video(int(row["label"]), seed=i)[1:].mean(axis=3).astype(np.uint8)
            save_frames(root, key, grey, "raw")
            keys.append(key)
    write_index(root, keys, "raw")
