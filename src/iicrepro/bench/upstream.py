"""An upstream-style pretraining loader, rebuilt for benchmarks only.

Upstream IIC read one JPEG file per frame (the twostreamfusion dumps, short side 256), and for every
sample decoded the RGB, u and v frames of a 16-frame window (48 JPEG decodes), each resized to
128x171, cropped to 112 and converted to a float tensor frame by frame (spec 3.1, 3.4, 4). This
module lays the same videos out that way and loads them that way, so `iicrepro bench` can compare
our frame store against it on identical data.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

FRAME_NAME = "frame{:06d}.jpg"


def write_jpeg_tree(frames: np.ndarray, root: Path, video_id: str, short_side: int = 256) -> None:
    """Write `frames` (T,H,W,3 uint8) as upstream's layout: jpegs_256/<id>/frame000001.jpg ...

    The u and v folders hold one frame fewer, as TV-L1 flow does (flow k lies between RGB frames k
    and k+1); their content (grey levels of the frame difference) only has to cost the same to read.
    """
    from PIL import Image

    t, h, w, _ = frames.shape
    scale = short_side / min(h, w)
    size = (round(w * scale), round(h * scale))
    rgb_dir = root / "jpegs_256" / video_id
    rgb_dir.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).resize(size, Image.BILINEAR).save(
            rgb_dir / FRAME_NAME.format(i + 1), quality=90
        )
    grey = frames.astype(np.int16).mean(axis=3)
    for comp, sign in (("u", 1), ("v", -1)):
        d = root / "tvl1_flow" / comp / video_id
        d.mkdir(parents=True, exist_ok=True)
        for i in range(t - 1):
            flow = np.clip(128 + sign * (grey[i + 1] - grey[i]), 0, 255).astype(np.uint8)
            Image.fromarray(flow).resize(size, Image.BILINEAR).save(
                d / FRAME_NAME.format(i + 1), quality=90
            )


class UpstreamStyleClips:
    """torch-Dataset-compatible: per sample, RGB + u + v 16-frame clips decoded from JPEG files,
    transformed frame by frame with PIL (Resize((128,171)) -> RandomCrop(112) -> ToTensor) after
    re-seeding Python's `random` once per frame, the way upstream kept crops consistent."""

    def __init__(self, root: Path, video_ids: list[str], clip_len: int = 16, crop: int = 112):
        self.root, self.ids, self.clip_len, self.crop = Path(root), list(video_ids), clip_len, crop
        self.lengths = [
            len(list((self.root / "jpegs_256" / v).glob("frame*.jpg"))) - 1 for v in self.ids
        ]

    def __len__(self) -> int:
        return len(self.ids)

    def _transform(self, img):
        import torch

        img = img.resize((171, 128), 2)  # PIL bilinear, fixed 128x171 as upstream
        i = random.randint(0, 128 - self.crop)
        j = random.randint(0, 171 - self.crop)
        img = img.crop((j, i, j + self.crop, i + self.crop))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)

    def __getitem__(self, index: int):
        import torch
        from PIL import Image

        vid, length = self.ids[index], self.lengths[index]
        start = random.randint(0, length - self.clip_len)
        seed = random.randint(0, 2**31)
        clips: dict[str, list] = {"rgb": [], "u": [], "v": []}
        for f in range(start, start + self.clip_len):
            name = FRAME_NAME.format(f + 1)
            random.seed(seed)  # upstream's trick: one seed per clip, re-applied for every frame
            for key, folder in (
                ("rgb", self.root / "jpegs_256" / vid),
                ("u", self.root / "tvl1_flow" / "u" / vid),
                ("v", self.root / "tvl1_flow" / "v" / vid),
            ):
                clips[key].append(self._transform(Image.open(folder / name).convert("RGB")))
        out = {k: torch.stack(v, dim=1) for k, v in clips.items()}
        out["index"] = index
        return out
