"""The one data path: usable videos decided once for every step, exclusions counted and capped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from iicrepro import config, layout
from iicrepro.data import datasets
from iicrepro.data.frames import FAILURE_COLUMNS, save_frames, write_index
from iicrepro.errors import UserError

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
DATASET = "synthetic"
LONG, SHORT = 12, 10  # frames of the ordinary videos and of the one short video
CORRUPT, SHORT_VIDEO, NO_FLOW = "b/v_b_g19_c00.avi", "a/v_a_g18_c00.avi", "b/v_b_g17_c00.avi"


def settings(tmp_path: Path, **extra):
    sets = {"paths.data": str(tmp_path / "data"), "paths.results": str(tmp_path / "results"),
            "frames.min_frames": 9, "clips.crop": 16, "pretrain.batch_size": 4,
            "finetune.val_size.synthetic": 4, **extra}  # fmt: skip
    return config.load(PARAMS, "demo", [f"{k}={v}" for k, v in sets.items()])


def build(s) -> None:
    """20 training and 10 test videos over two classes: one failed decoding (corrupt, listed in
    failures.csv), one is SHORT frames long; the u flow store lacks NO_FLOW."""
    rows = [[f"{c}/v_{c}_g{i:02d}_c00.avi", c, label, "train" if i < 20 else "test"]
            for i in range(30) for label, c in [(i % 2, "ab"[i % 2])]]  # fmt: skip
    manifest = pd.DataFrame(rows, columns=["video", "class", "label", "subset"])
    path = layout.manifest(s, DATASET, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(path, index=False)
    rng = np.random.default_rng(0)
    store, flow = layout.frame_store(s, DATASET), layout.flow_store(s, DATASET) / "u"
    keys, flow_keys = [], []
    for video in manifest["video"]:
        if video == CORRUPT:
            continue
        key = video.removesuffix(".avi")
        n = SHORT if video == SHORT_VIDEO else LONG
        save_frames(store, key, rng.integers(0, 255, (n, 20, 20, 3), dtype=np.uint8), "raw")
        keys.append(key)
        if video != NO_FLOW:
            save_frames(flow, key, rng.integers(0, 255, (n - 1, 20, 20, 1), dtype=np.uint8), "raw")
            flow_keys.append(key)
    write_index(store, keys, "raw")
    write_index(flow, flow_keys, "raw")
    failures = [[CORRUPT.removesuffix(".avi"), "corrupt", "excluded", "no frame decodes"]]
    pd.DataFrame(failures, columns=FAILURE_COLUMNS).to_csv(store / "failures.csv", index=False)


def videos(clips) -> list[str]:
    return sorted(clips.keys)


def test_one_rule_for_pretraining_recalibration_and_finetuning(tmp_path):
    s = settings(tmp_path, **{"data.max_excluded_fraction": 0.2})
    build(s)
    assert datasets.min_frames(s) == 9  # frames.min_frames; clips.length 8 needs 9 as well
    clips, _, counts = datasets.pretraining_set(s, "residual")
    assert len(clips) == 19 and counts["excluded_by_reason"] == {"corrupt": 1}
    assert counts["listed"] == 20 and counts["excluded"] == 1

    # Longer clips: the short video (length SHORT - 1 = 9) no longer holds one; every step drops
    # it the same way (pretraining used to fail on it while evaluation filtered it quietly).
    s = settings(tmp_path, **{"data.max_excluded_fraction": 0.2, "clips.length": SHORT})
    assert datasets.min_frames(s) == SHORT + 1
    clips, _, counts = datasets.pretraining_set(s, "residual")
    assert counts["excluded_by_reason"] == {"corrupt": 1, "too_short": 1}
    assert SHORT_VIDEO.removesuffix(".avi") not in clips.keys and len(clips) == 18
    assert videos(datasets.recalibration_set(s, "residual")) == videos(clips)
    data = datasets.finetuning_data(s, DATASET, 1, "residual", seed=0)
    assert sorted([*data["train"]["video"], *data["val"]["video"]]) == sorted(
        k + ".avi" for k in clips.keys
    )
    assert data["counts"]["train_list"]["excluded_by_reason"] == counts["excluded_by_reason"]

    # A u view also needs the flow of each video.
    clips, _, counts = datasets.pretraining_set(s, "u")
    assert counts["excluded_by_reason"] == {"corrupt": 1, "no_flow": 1, "too_short": 1}
    assert counts["excluded"] == 3 and counts["used"] == len(clips) == 17


def test_more_exclusions_than_allowed_stop_the_step(tmp_path):
    s = settings(tmp_path)  # data.max_excluded_fraction: 0.01 (params.yaml)
    build(s)
    assert s.data.max_excluded_fraction == 0.01
    with pytest.raises(UserError, match=r"1 of 20 train videos .*1 corrupt.*max_excluded_fraction"):
        datasets.pretraining_set(s, "residual")
    # The test subset (10 videos, none excluded) passes on its own.
    manifest = datasets.load_manifest(s, DATASET, 1)
    kept, counts = datasets.usable_subset(s, manifest, datasets.frame_store(s, DATASET), "test")
    assert len(kept) == 10 and counts["excluded"] == 0 and counts["excluded_by_reason"] == {}
    s = settings(tmp_path, **{"data.max_excluded_fraction": 0.05})  # 1 of 20 = 5 % is allowed
    assert len(datasets.pretraining_set(s, "residual")[0]) == 19


def test_missing_inputs_name_the_step_that_makes_them(tmp_path):
    s = settings(tmp_path)
    with pytest.raises(UserError, match="iicrepro splits synthetic"):
        datasets.load_manifest(s, DATASET, 1)
    with pytest.raises(UserError, match="iicrepro flow synthetic"):
        datasets.flow_stores(s, DATASET, "v")
    assert datasets.flow_stores(s, DATASET, "residual") is None
