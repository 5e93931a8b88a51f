"""Tiny real video files for tests, written with PyAV, and ways to damage them."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from iicrepro.data.videos import write_video  # the project's one writer: .avi XVID, .mp4 h264

__all__ = ["broken_metadata_copy", "decode_resized", "moving_pattern", "truncated_copy",
           "write_video"]  # fmt: skip


def moving_pattern(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colour pattern drifting a few pixels per frame (compresses well, every frame
    differs)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy = rng.uniform(0.05, 0.1, 2)
    phase = rng.uniform(0, 2 * np.pi, 3)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        for c in range(3):
            wave = np.sin(fx * (x - 2 * t) + fy * y + phase[c])
            out[t, ..., c] = (127.5 + 100 * wave).astype(np.uint8)
    return out


def decode_resized(path: str | Path, height: int, width: int) -> np.ndarray:
    """Reference decode: every frame of the first video stream, bilinear-resized, (T, H, W, 3)."""
    with av.open(str(path), metadata_errors="ignore") as container:
        return np.stack(
            [
                f.to_ndarray(width=width, height=height, format="rgb24", interpolation="BILINEAR")
                for f in container.decode(video=0)
            ]
        )


def truncated_copy(src: str | Path, dst: str | Path, keep_frames: int) -> Path:
    """Copy the file up to the middle of the packet of frame `keep_frames`, like an interrupted
    download: frames 0 .. keep_frames-1 are intact, the next packet is cut."""
    with av.open(str(src)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    cut = packets[keep_frames].pos + packets[keep_frames].size // 2
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_bytes(Path(src).read_bytes()[:cut])
    return Path(dst)


def broken_metadata_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy an .avi with the value of its INFO/ISFT tag (the writing software) made invalid UTF-8,
    which makes a plain `av.open` raise UnicodeDecodeError, as some HMDB51 files do."""
    data = bytearray(Path(src).read_bytes())
    at = data.find(b"ISFT")
    assert at >= 0, f"{src} has no ISFT tag"
    data[at + 8 : at + 12] = b"\xff\xfe\xc3\x28"  # bytes no UTF-8 decoder accepts
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)
