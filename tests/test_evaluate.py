"""`iicrepro evaluate`: the recognition test (spec 11) on a classifier checkpoint as it is, e.g. an
upstream fine-tuned model imported with its own head."""

from __future__ import annotations

import evaluation_data as data
import numpy as np
import pandas as pd
import pytest
import torch

from iicrepro import cli, io, layout
from iicrepro.data.frames import FrameStore
from iicrepro.errors import UserError
from iicrepro.models import build_backbone
from iicrepro.models.upstream import import_upstream


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    s = data.settings(tmp)
    data.build_dataset(s)
    return {"tmp": tmp, "settings": s}


def upstream_finetuned(path, num_classes: int, seed: int = 0) -> dict:
    """A released-style fine-tuned file: the bare state dict of a DataParallel-wrapped R3D with a
    `num_classes` head (spec/upstream-checkpoint-keys.tsv names), random weights."""
    torch.manual_seed(seed)
    state = build_backbone("r3d", num_classes=num_classes).state_dict()
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in state.items()}  # fmt: skip
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    return state


def expected_predictions(s, state: dict) -> dict[str, int]:
    """The test computed by hand: eval_clips centre crops at linspace(T/2, length - T/2, n)
    (length = frames - 1), unscaled residual x_t - x_{t-1} (circular), clip logits averaged."""
    model = build_backbone("r3d", num_classes=3)
    model.load_state_dict(state)
    model.eval()
    c = s.clips
    store = FrameStore(layout.frame_store(s, data.DATASET))
    manifest = pd.read_csv(layout.manifest(s, data.DATASET, 1))
    out = {}
    for video in manifest[manifest.subset == "test"]["video"]:
        key = video.removesuffix(".avi")
        frames = store.read(key, 0, store.num_frames(key))
        length = len(frames) - 1
        centres = np.linspace(c.length / 2, length - c.length / 2, c.eval_clips)
        y = x = round((frames.shape[1] - c.crop) / 2)
        clips = []
        for start in np.floor(centres - c.length / 2).astype(int):
            clip = torch.from_numpy(
                frames[start : start + c.length, y : y + c.crop, x : x + c.crop]
            )
            clip = clip.permute(3, 0, 1, 2).float() / 255
            clips.append(clip - torch.roll(clip, 1, dims=1))
        with torch.no_grad():
            logits = model(torch.stack(clips)).mean(0)
        out[video] = int(logits.argmax())
    return out


@pytest.mark.slow
def test_evaluates_an_imported_upstream_finetuned_model_with_its_own_head(tiny):
    s, tmp = tiny["settings"], tiny["tmp"]
    state = upstream_finetuned(tmp / "r3d_ucf101.pt", num_classes=3)
    import_upstream(tmp / "r3d_ucf101.pt", "r3d", tmp / "imported.pt")
    argv = ["evaluate", "--params", str(data.PARAMS), "--preset", "demo"]
    for item in data.overrides(tmp):
        argv += ["--set", item]
    argv += ["--checkpoint", str(tmp / "imported.pt"), "--dataset", data.DATASET, "--split", "1",
             "--view", "residual", "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0

    out = layout.evaluate_dir(s, data.DATASET, 1, tmp / "imported.pt")
    assert out == tmp / "results" / "evaluate" / "synthetic" / "split1" / "imported"
    m = io.read_json(out / "metrics.json")
    preds = pd.read_csv(out / "test_predictions.csv")
    expected = expected_predictions(s, state)
    assert dict(zip(preds["video"], preds["prediction"], strict=True)) == expected
    hits = [expected[v] == y for v, y in zip(preds["video"], preds["label"], strict=True)]
    assert m["top1"] == pytest.approx(100 * np.mean(hits))
    assert m["counts"]["test"] == 6 and m["counts"]["test_clips"] == 6 * s.clips.eval_clips
    assert m["checkpoint"]["source"]["kind"] == "upstream-finetuned" and m["num_classes"] == 3


def test_a_checkpoint_without_a_fitting_head_is_refused(tiny, tmp_path):
    s = tiny["settings"]
    upstream_finetuned(tmp_path / "ft51.pt", num_classes=51)
    import_upstream(tmp_path / "ft51.pt", "r3d", tmp_path / "ft51-imported.pt")
    with pytest.raises(UserError, match="51-class head but synthetic has 3 classes"):
        from iicrepro.evaluate.recognition import evaluate

        evaluate(s, tmp_path / "ft51-imported.pt", data.DATASET, 1, "residual", device="cpu")
    run_dir = data.write_checkpoints(s)  # a pretrained backbone: no head at all
    with pytest.raises(UserError, match="without a classification head"):
        evaluate(s, run_dir / "checkpoint.pt", data.DATASET, 1, "rgb", device="cpu")
