"""Clip Datasets on a store whose pixels encode their own position and frame index."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from iicrepro.data.clips import EvalClips, PretrainClips, TrainClips, eval_starts
from iicrepro.data.frames import FrameStore, save_frames, write_index
from iicrepro.errors import UserError

H, W, CLIP, CROP = 20, 31, 8, 12
FRAMES = {"A/v_long": 40, "B/v_short": 12}  # lengths 39 and 11
MANIFEST = pd.DataFrame({"video": ["A/v_long.avi", "B/v_short.avi"], "label": [3, 7]})


def coded(frames: int) -> np.ndarray:
    """(T, H, W, 3): R = x, G = y, B = frame index."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(H), np.arange(W), indexing="ij")
    return np.stack([x, y, t], axis=-1).astype(np.uint8)


def make_store(root, frames_less=0, gray=False) -> FrameStore:
    for key, n in FRAMES.items():
        video = coded(n - frames_less)
        save_frames(root, key, video[..., 2] if gray else video, "raw")
    write_index(root, FRAMES, "raw")
    return FrameStore(root)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stores")
    # flow stores hold one frame fewer than the RGB store (flow k is between frames k and k+1)
    return {
        "rgb": make_store(tmp / "rgb"),
        "flow": make_store(tmp / "u", frames_less=1),
        "gray": make_store(tmp / "v", frames_less=1, gray=True),
    }


def decode_clip(clip: torch.Tensor) -> tuple[int, int, int]:
    """(start frame, y, x) of a coded 3,T,c,c clip, asserting it is ONE crop of consecutive
    frames."""
    c = clip.shape[-1]
    t0, y0, x0 = int(clip[2, 0, 0, 0]), int(clip[1, 0, 0, 0]), int(clip[0, 0, 0, 0])
    expected = torch.from_numpy(coded(t0 + clip.shape[1])[t0:, y0 : y0 + c, x0 : x0 + c])
    assert torch.equal(clip, expected.permute(3, 0, 1, 2)), "not one crop of consecutive frames"
    return t0, y0, x0


def test_pretrain_clip_is_one_crop_of_consecutive_frames(stores):
    ds = PretrainClips(MANIFEST, stores["rgb"], clip_len=CLIP, crop=CROP)
    assert len(ds) == 2
    torch.manual_seed(0)
    draws = []
    for _ in range(300):
        sample = ds[0]
        assert sample["video"].shape == (3, CLIP, CROP, CROP)
        assert sample["video"].dtype == torch.uint8
        assert (sample["label"], sample["index"]) == (3, 0)
        draws.append(decode_clip(sample["video"]))
    starts, ys, xs = (set(d) for d in zip(*draws, strict=True))
    # start ~ Uniform{0 .. length - clip_len}: the last frame (39) is never used
    assert starts == set(range(0, 39 - CLIP + 1))
    assert ys == set(range(H - CROP + 1)) and xs == set(range(W - CROP + 1))
    assert ds[1]["label"] == 7 and decode_clip(ds[1]["video"])[0] <= 11 - CLIP


def test_flow_clip_has_the_same_frames_and_its_own_crop(stores):
    ds = PretrainClips(
        MANIFEST, stores["rgb"], clip_len=CLIP, crop=CROP, flow_stores={"u": stores["flow"]}
    )
    torch.manual_seed(1)
    same_crop = 0
    for _ in range(50):
        sample = ds[0]
        t_rgb, *rgb_crop = decode_clip(sample["video"])
        t_flow, *flow_crop = decode_clip(sample["flow"])
        assert t_flow == t_rgb
        same_crop += rgb_crop == flow_crop
    assert same_crop < 10  # drawn independently: rarely equal

    gray = PretrainClips(
        MANIFEST, stores["rgb"], clip_len=CLIP, crop=CROP, flow_stores={"v": stores["gray"]}
    )
    sample = gray[0]
    flow, start = sample["flow"], int(sample["video"][2, 0, 0, 0])
    assert flow.shape == (3, CLIP, CROP, CROP)
    assert torch.equal(flow[0], flow[1]) and torch.equal(flow[0], flow[2])  # gray replicated
    assert flow[0, :, 0, 0].tolist() == list(range(start, start + CLIP))


def test_sampling_is_reproducible_from_torch_seed(stores):
    ds = PretrainClips(
        MANIFEST, stores["rgb"], clip_len=CLIP, crop=CROP, flow_stores={"u": stores["flow"]}
    )
    torch.manual_seed(7)
    a = [ds[0] for _ in range(5)]
    torch.manual_seed(7)
    b = [ds[0] for _ in range(5)]
    assert all(
        torch.equal(x["video"], y["video"]) and torch.equal(x["flow"], y["flow"])
        for x, y in zip(a, b, strict=True)
    )
    assert len({decode_clip(x["video"]) for x in a}) > 1


def test_eval_starts_follow_upstream_formula():
    for length in (16, 17, 100, 187):
        upstream = [int(c - 8) for c in np.linspace(8, length - 8, 10)]
        assert eval_starts(length, 16, 10).tolist() == upstream
    assert eval_starts(39, 8, 5).tolist() == [0, 7, 15, 23, 31]


def test_eval_clips_are_centre_crops_at_spec_starts(stores):
    ds = EvalClips(
        MANIFEST,
        stores["rgb"],
        clip_len=CLIP,
        crop=CROP,
        num_clips=5,
        flow_stores={"u": stores["flow"]},
    )
    sample = ds[0]
    video, flow = sample["video"], sample["flow"]
    assert video.shape == flow.shape == (5, 3, CLIP, CROP, CROP)
    assert (sample["label"], sample["index"]) == (3, 0)
    frames = torch.from_numpy(coded(40)).permute(0, 3, 1, 2)  # T,C,H,W
    for n, start in enumerate(eval_starts(39, CLIP, 5)):
        expected = TF.center_crop(frames[start : start + CLIP], [CROP, CROP]).permute(1, 0, 2, 3)
        assert torch.equal(video[n], expected) and torch.equal(flow[n], expected)
    short = ds[1]["video"]
    assert [int(c[2, 0, 0, 0]) for c in short] == eval_starts(11, CLIP, 5).tolist()


def test_train_clips_batch_with_labels(stores):
    ds = TrainClips(MANIFEST, stores["rgb"], clip_len=CLIP, crop=CROP)
    batch = next(iter(DataLoader(ds, batch_size=2, shuffle=False)))
    assert batch["video"].shape == (2, 3, CLIP, CROP, CROP) and batch["video"].dtype == torch.uint8
    assert batch["label"].tolist() == [3, 7] and batch["index"].tolist() == [0, 1]
    for clip in batch["video"]:
        decode_clip(clip)


def test_unusable_stores_raise_clear_errors(stores):
    with pytest.raises(UserError, match="smaller than the 24x24 crop"):
        PretrainClips(MANIFEST, stores["rgb"], clip_len=CLIP, crop=24)
    with pytest.raises(UserError, match="fewer than 12 usable frames"):
        EvalClips(MANIFEST, stores["rgb"], clip_len=12, crop=CROP, num_clips=2)
    missing = pd.DataFrame({"video": ["A/v_long.avi", "C/v_gone.avi"], "label": [0, 1]})
    with pytest.raises(UserError, match="not in the frame store"):
        PretrainClips(missing, stores["rgb"], clip_len=CLIP, crop=CROP)
