"""One PyAV writer for every video file the project makes: the synthetic dataset and the
rehearsal's stand-ins, the benchmarks' UCF101-like videos and the tests' tiny videos.

``.avi`` is mpeg4 with the XVID tag, as UCF101 and HMDB51 ship; ``.mp4`` is h264 (even width and
height). Pixels are yuv420p.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import numpy as np

CODECS = {".avi": ("mpeg4", "XVID"), ".mp4": ("h264", None)}
PIX_FMT = "yuv420p"
FF_QP2LAMBDA = 118  # libavcodec's quantiser -> lambda scale (global_quality = q * FF_QP2LAMBDA)


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    *,
    fps: int = 25,
    gop: int = 12,
    bit_rate: int | None = None,
    quantiser: int | None = None,
    chroma_interpolation: str | None = None,
    threads: int | None = None,
) -> Path:
    """Encode uint8 RGB frames (each H x W x 3; an array T x H x W x 3 or any iterable) to `path`.

    `bit_rate` (bits/s) or a fixed `quantiser` (mpeg4 qscale, 1 = best) set the quality, else the
    codec's default; `chroma_interpolation` (e.g. "AREA") converts RGB to yuv420p with that
    filter; `threads=1` makes the bitstream deterministic.
    """
    import av

    path = Path(path)
    if path.suffix not in CODECS:
        raise ValueError(f"{path}: write .avi or .mp4, not {path.suffix!r}")
    codec, tag = CODECS[path.suffix]
    frames = iter(frames)
    first = next(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = PIX_FMT
        ctx = stream.codec_context
        if tag:
            ctx.codec_tag = tag
        ctx.gop_size = gop
        if threads is not None:
            ctx.thread_count = threads
        if quantiser is not None:
            ctx.qscale = True
            ctx.global_quality = quantiser * FF_QP2LAMBDA
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        for frame in itertools.chain([first], frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if chroma_interpolation:
                vf = vf.reformat(format=PIX_FMT, interpolation=chroma_interpolation)
            container.mux(stream.encode(vf))
        container.mux(stream.encode(None))
    return path
