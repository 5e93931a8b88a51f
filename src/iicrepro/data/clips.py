"""Torch Datasets of clips read from a frame store (spec 3.4, 4, 10, 11).

A video's `length` is its number of frames - 1: the last RGB frame is never used, so the same
indices stay valid in the flow stores, which hold one frame fewer (spec 3.1, 3.2).

Samples are dicts; clips are uint8 tensors C x T x crop x crop (C, T, H, W). Conversion to float,
the residual view and the intra-negative are computed batched on the training device
(`iicrepro.method`), so the per-sample work here is a read and a crop.

Crops are drawn ONCE per clip and shared by all its frames (spec 3.4: upstream lost this with
torchvision >= 0.8, giving every frame its own crop). A flow clip uses the RGB clip's frame indices
with its own crop, as upstream's re-seeded RandomCrop did. All randomness comes from torch's RNG, so
DataLoader worker seeding makes it reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from iicrepro.data.frames import FrameStore, video_key
from iicrepro.errors import UserError

FLOW_VIEWS = ("u", "v")


def eval_starts(length: int, clip_len: int, num_clips: int) -> np.ndarray:
    """Start frames of the evaluation clips: centres linspace(clip_len/2, length - clip_len/2, n),
    start = floor(centre - clip_len/2) (spec 10: linspace(8, length-8, 10) for 16-frame clips)."""
    centres = np.linspace(clip_len / 2, length - clip_len / 2, num_clips)
    return np.floor(centres - clip_len / 2).astype(np.int64)


def centre_offset(size: int, crop: int) -> int:
    """CenterCrop's offset, rounded as torchvision rounds it."""
    return int(round((size - crop) / 2.0))


class _Clips(Dataset):
    """Shared set-up: the manifest's videos, their store keys and labels, size checks."""

    def __init__(
        self,
        manifest_df: pd.DataFrame,
        store: FrameStore,
        *,
        clip_len: int,
        crop: int,
        flow_stores: Mapping[str, FrameStore] | None = None,
    ):
        self.store, self.clip_len, self.crop = store, int(clip_len), int(crop)
        self.keys = [video_key(v) for v in manifest_df["video"]]
        self.labels = [int(x) for x in manifest_df["label"]]
        self.flow_view, self.flow = None, None
        if flow_stores:
            if len(flow_stores) != 1 or next(iter(flow_stores)) not in FLOW_VIEWS:
                raise ValueError(f"flow_stores takes one of {FLOW_VIEWS}, got {list(flow_stores)}")
            self.flow_view, self.flow = next(iter(flow_stores.items()))
        self._check()

    def _check(self) -> None:
        stores = [("frame", self.store)]
        if self.flow is not None:
            stores.append((f"{self.flow_view} flow", self.flow))
        for what, store in stores:
            missing = [k for k in self.keys if k not in store]
            if missing:
                raise UserError(
                    f"{len(missing)} videos (e.g. {missing[0]}) are not in the {what} store "
                    f"{store.root}; filter the manifest with iicrepro.data.frames.usable"
                )
            sizes = {store.frame_size(k) for k in self.keys}
            small = [s for s in sizes if min(s) < self.crop]
            if small:
                raise UserError(
                    f"the {what} store {store.root} holds {small[0][0]}x{small[0][1]} frames, "
                    f"smaller than the {self.crop}x{self.crop} crop: set frames.size >= "
                    "clips.crop in params.yaml and rebuild the store"
                )
        short = [k for k in self.keys if self.length(k) < self.clip_len]
        if short:
            raise UserError(
                f"{len(short)} videos (e.g. {short[0]}) have fewer than {self.clip_len} usable "
                f"frames (length = frames - 1); filter the manifest with "
                f"iicrepro.data.frames.usable(..., min_frames={self.clip_len + 1})"
            )

    def __len__(self) -> int:
        return len(self.keys)

    def length(self, key: str) -> int:
        """Usable frames of a video (spec 3.1): the last RGB frame is never read."""
        n = self.store.num_frames(key)
        if self.flow is not None:
            n = min(n, self.flow.num_frames(key) + 1)
        return n - 1

    def _clip(
        self, store: FrameStore, key: str, start: int, offsets: tuple[int, int] | None
    ) -> torch.Tensor:
        """Frames start..start+clip_len-1, cropped at (y, x) (None: centre), as uint8 C,T,H,W with
        C = 3 (a 1-channel flow component is replicated, as upstream's RGB JPEG loader did)."""
        frames = store.read(key, start, self.clip_len)
        c = self.crop
        y, x = offsets or (centre_offset(frames.shape[1], c), centre_offset(frames.shape[2], c))
        # Crop, transpose and replicate as views, then ONE copy (numpy copies strided uint8
        # several times faster than torch's permute().contiguous()).
        clip = frames[:, y : y + c, x : x + c].transpose(3, 0, 1, 2)
        if clip.shape[0] == 1:
            clip = np.broadcast_to(clip, (3, *clip.shape[1:]))
        return torch.from_numpy(np.ascontiguousarray(clip))

    def _random_offsets(self, store: FrameStore, key: str) -> tuple[int, int]:
        """One crop position for a whole clip (spec 3.4)."""
        height, width = store.frame_size(key)
        y = int(torch.randint(height - self.crop + 1, ()))
        x = int(torch.randint(width - self.crop + 1, ()))
        return y, x


class PretrainClips(_Clips):
    """One random clip per video per epoch (spec 4): start ~ Uniform{0..length-clip_len}, one
    random crop for all its frames; the flow clip (if any) has the same frames, its own crop.

    Sample: {"video": uint8 3,T,crop,crop, "label", "index" (= memory-bank row)} (+ "flow").
    """

    def __getitem__(self, index: int) -> dict:
        key = self.keys[index]
        start = int(torch.randint(self.length(key) - self.clip_len + 1, ()))
        offsets = self._random_offsets(self.store, key)
        sample = {
            "video": self._clip(self.store, key, start, offsets),
            "label": self.labels[index],
            "index": index,
        }
        if self.flow is not None:
            flow_offsets = self._random_offsets(self.flow, key)
            sample["flow"] = self._clip(self.flow, key, start, flow_offsets)
        return sample


class TrainClips(PretrainClips):
    """Fine-tuning training and validation clips (spec 11): the same sampling as pretraining,
    one random clip and crop per video per epoch, used with the labels."""


class EvalClips(_Clips):
    """`num_clips` clips per video at `eval_starts`, centre-cropped (spec 10, 11).

    Sample: {"video": uint8 N,3,T,crop,crop, "label", "index"} (+ "flow").
    """

    def __init__(self, manifest_df, store, *, clip_len, crop, num_clips, flow_stores=None):
        super().__init__(manifest_df, store, clip_len=clip_len, crop=crop, flow_stores=flow_stores)
        self.num_clips = int(num_clips)

    def __getitem__(self, index: int) -> dict:
        key = self.keys[index]
        starts = eval_starts(self.length(key), self.clip_len, self.num_clips)
        sample = {
            "video": torch.stack([self._clip(self.store, key, s, None) for s in starts]),
            "label": self.labels[index],
            "index": index,
        }
        if self.flow is not None:
            sample["flow"] = torch.stack([self._clip(self.flow, key, s, None) for s in starts])
        return sample
