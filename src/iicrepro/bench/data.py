"""The benchmark's workload: how much each part does (`Profile`), and the data it reads, written
by the benchmark itself: UCF101-like videos (320x240, 25 fps, mpeg4/XVID, through the shared
`data.videos.write_video`), our frame store built by the real `frames.build_store`, a stand-in u
flow store, and upstream's JPEG-per-frame layout (`bench.upstream`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STORE_SIZE = (128, 171)  # H x W of the frame store (spec 3.4)


@dataclass(frozen=True)
class Profile:
    """How much work each part does."""

    videos: int  # generated videos
    frames: int  # frames per video
    loader_batch: int
    loader_batches: int  # timed batches, ours
    baseline_batches: int  # timed batches, upstream-style
    train_batch: int
    steps: int  # timed training steps
    warmup: int
    clip: tuple[int, int, int]  # T, H, W of the training and retrieval clips
    width: float  # channel multiplier (r3d18 exists at 1.0 only)
    bank: int  # memory-bank rows
    k: int  # negatives
    eval_videos: int
    eval_batch: int
    eval_clips: int


# FULL: the paper's sizes (batch 16, 16x112x112 clips, K=1024, UCF101's 9537 bank rows).
FULL = Profile(24, 100, 16, 40, 8, 16, 10, 3, (16, 112, 112), 1.0, 9537, 1024, 16, 8, 10)
# QUICK: a CPU run of about a minute on two cores; the loader still reads 16x112x112 clips from
# the 128x171 store, the networks get narrower and smaller clips.
QUICK = Profile(6, 40, 8, 16, 4, 2, 2, 1, (8, 56, 56), 0.25, 256, 128, 4, 2, 10)


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth multi-scale colour texture (float, 0..255), bigger than a frame so it can pan."""
    from PIL import Image

    out = np.full((height, width, 3), 128.0, np.float32)
    for cells, amplitude in ((6, 80.0), (24, 45.0), (96, 20.0)):
        small = rng.uniform(-1, 1, (max(2, cells * 3 // 4), cells, 3)).astype(np.float32)
        for c in range(3):
            layer = Image.fromarray(small[..., c]).resize((width, height), Image.BILINEAR)
            out[..., c] += amplitude * np.asarray(layer)
    return np.clip(out, 0, 255)


def write_videos(root: Path, n: int, n_frames: int, seed: int = 0) -> list[str]:
    """`n` UCF101-like videos (320x240, 25 fps, mpeg4/XVID .avi, GOP 12): a camera panning over
    a texture with light sensor noise. Returns manifest-style paths '<Class>/<name>.avi'."""
    from iicrepro.data.videos import write_video

    rng, names = np.random.default_rng(seed), []
    for i in range(n):
        tex = _texture(rng, 360, 480)
        vy, vx = rng.uniform(-0.9, 0.9, 2)
        name = f"Bench/v_Bench_g01_c{i + 1:02d}.avi"
        write_video(root / name, _pan(tex, vy, vx, n_frames, rng), bit_rate=1_500_000)
        names.append(name)
    return names


def _pan(tex: np.ndarray, vy: float, vx: float, n_frames: int, rng: np.random.Generator):
    """320x240 frames of a camera panning over `tex` at (vy, vx) px/frame, with sensor noise."""
    for t in range(n_frames):
        y, x = _bounce(60 + vy * t, 120), _bounce(80 + vx * t, 160)
        frame = tex[y : y + 240, x : x + 320] + rng.normal(0, 3, (240, 320, 3))
        yield np.clip(frame, 0, 255).astype(np.uint8)


def _bounce(p: float, span: int) -> int:
    """`p` reflected back into 0..span (the camera turns at the texture's edges)."""
    q = p % (2 * span)
    return int(q if q <= span else 2 * span - q)


def _grey_motion(frames: np.ndarray, sign: int) -> np.ndarray:
    """Stand-in flow component: 128 + sign * (grey frame difference), one frame fewer, like
    TV-L1 flow (spec 3.2). Reading it costs what reading real flow costs."""
    grey = frames.astype(np.int16).mean(axis=3)
    return np.clip(128 + sign * (grey[1:] - grey[:-1]), 0, 255).astype(np.uint8)


@dataclass
class BenchData:
    names: list[str]  # manifest-style video paths
    manifest: Any  # DataFrame video,label
    store: Path  # our RGB frame store
    flow_u: Path  # our u store
    jpeg_tree: Path  # upstream-style JPEG-per-frame layout
    seconds: dict


def prepare_data(root: Path, profile: Profile, codec: str, workers: int) -> BenchData:
    """Videos, our stores (the real `build_store`) and the upstream-style JPEG tree."""
    import av
    import pandas as pd

    from iicrepro.bench.upstream import write_jpeg_tree
    from iicrepro.data.frames import FrameStore, build_store, save_frames, video_key, write_index

    seconds = {}
    t0 = time.perf_counter()
    names = write_videos(root / "videos", profile.videos, profile.frames)
    seconds["write_videos"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    build_store(
        root / "videos", names, root / "store", size=STORE_SIZE, codec=codec, jpeg_quality=90,
        min_frames=17, workers=workers, progress=False,
    )  # fmt: skip
    seconds["build_store"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    store, keys = FrameStore(root / "store"), [video_key(n) for n in names]
    for key in keys:
        save_frames(root / "flow_u", key, _grey_motion(store.read_all(key), 1), codec)
    write_index(root / "flow_u", keys, codec)
    seconds["build_flow_store"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for name in names:  # upstream's frames: decoded at full size, short side 256, JPEG files
        with av.open(str(root / "videos" / name)) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        write_jpeg_tree(frames, root / "jpegs", Path(name).stem)
    seconds["build_jpeg_tree"] = time.perf_counter() - t0

    manifest = pd.DataFrame({"video": names, "label": 0})
    return BenchData(names, manifest, root / "store", root / "flow_u", root / "jpegs", seconds)
