"""Frame store benchmark: decode throughput, bytes per frame, random 16-frame window latency.

Writes UCF101-like videos (320x240, 25 fps, mpeg4/XVID .avi, GOP 12) that pan across a photograph
shipped with matplotlib, decodes them into a frame store at 128x171 with both codecs, then times
random 16-frame windows read from each store against decoding the same window from the .avi with a
PyAV seek. Usage:

    .venv/bin/python benchmarks/frames_bench.py [--videos 20] [--frames 100] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from iicrepro.data.frames import FrameStore, build_store, video_key
from iicrepro.data.videos import write_video

SIZE = (128, 171)


def photo() -> np.ndarray:
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def write_videos(root: Path, n: int, n_frames: int, seed: int = 0) -> list[str]:
    """Each video: a 320x240 window panning across the photo at its own speed, light noise."""
    img, rng, names = photo(), np.random.default_rng(seed), []
    for i in range(n):
        name = f"Pan/v_pan_g{i:02d}.avi"
        y0, x0 = rng.integers(0, img.shape[0] - 240 - 60), rng.integers(0, img.shape[1] - 320 - 90)
        vy, vx = rng.uniform(-0.5, 0.5), rng.uniform(0.3, 0.9)

        def frames(y0=y0, x0=x0, vy=vy, vx=vx):
            for t in range(n_frames):
                y, x = int(y0 + 30 + vy * t), int(x0 + vx * t)
                frame = img[y : y + 240, x : x + 320].astype(np.int16)
                frame += rng.normal(0, 2, frame.shape).astype(np.int16)
                yield np.clip(frame, 0, 255).astype(np.uint8)

        write_video(root / name, frames(), bit_rate=1_500_000)
        names.append(name)
    return names


def pyav_window(path: Path, start: int, length: int) -> np.ndarray:
    """Decode frames start..start+length-1 by seeking to the keyframe before `start`."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        pts = int(start / (stream.average_rate * stream.time_base))
        c.seek(pts, stream=stream, backward=True)
        out = []
        for frame in c.decode(stream):
            index = round(frame.pts * stream.time_base * stream.average_rate)
            if index >= start:
                out.append(
                    frame.to_ndarray(
                        width=SIZE[1], height=SIZE[0], format="rgb24", interpolation="BILINEAR"
                    )
                )
                if len(out) == length:
                    break
        return np.stack(out)


def latency_ms(fn, windows) -> tuple[float, float]:
    """Median wall-clock ms per call, and mean CPU ms per call (robust to a busy machine)."""
    times, cpu0 = [], time.thread_time()
    for key, start in windows:
        t0 = time.perf_counter()
        fn(key, start)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times)), (time.thread_time() - cpu0) * 1000 / len(windows)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the decode workers)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=20)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reads", type=int, default=200, help="random windows timed per method")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = write_videos(tmp / "videos", args.videos, args.frames)
        total = args.videos * args.frames
        avi_bytes = sum((tmp / "videos" / n).stat().st_size for n in names)
        print(f"{args.videos} videos x {args.frames} frames, 320x240 mpeg4/XVID, "
              f"{avi_bytes / total:.0f} bytes/frame as .avi; store {SIZE[0]}x{SIZE[1]}, "
              f"{args.workers} workers, cpus={os.cpu_count()}, load={os.getloadavg()[0]:.1f}")  # fmt: skip
        stores = {}
        for codec in ("jpeg", "raw"):
            out = tmp / codec
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            build_store(tmp / "videos", names, out, size=SIZE, codec=codec, jpeg_quality=90,
                        min_frames=17, workers=args.workers, progress=False)  # fmt: skip
            dt, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            stores[codec] = store = FrameStore(out)
            nbytes = sum(store.path(k).stat().st_size for k in store)
            print(f"decode -> {codec:4s}: {total / dt:5.0f} frames/s wall ({dt:.2f} s), "
                  f"{total / cpu:5.0f} frames per CPU-second, {nbytes / total:6.0f} bytes/frame")  # fmt: skip
        keys = stores["raw"].keys()
        key = keys[0]
        err = np.abs(stores["jpeg"].read_all(key).astype(int) - stores["raw"].read_all(key))
        print(f"jpeg q90 vs raw: mean abs error {err.mean():.2f} (0-255 scale)")

        rng = np.random.default_rng(1)
        windows = [
            (keys[i], int(s))
            for i, s in zip(
                rng.integers(0, len(keys), args.reads),
                rng.integers(0, args.frames - 1 - 16 + 1, args.reads),
                strict=True,
            )
        ]
        src = {video_key(n): tmp / "videos" / n for n in names}
        np.testing.assert_array_equal(
            pyav_window(src[key], 37, 16), stores["raw"].read(key, 37, 16)
        )  # the seek path decodes the same frames
        print("random 16-frame window (ms: median wall / mean CPU):")
        for name, fn in [
            ("store jpeg", lambda k, s: stores["jpeg"].read(k, s, 16)),
            ("store raw", lambda k, s: stores["raw"].read(k, s, 16)),
            ("pyav seek .avi", lambda k, s: pyav_window(src[k], s, 16)),
        ]:
            med, mean = latency_ms(fn, windows)
            print(f"  {name:15s} {med:7.2f} / {mean:7.2f}")
        import pandas as pd  # here: spawned decode workers re-import this script's top level

        from iicrepro.data.clips import PretrainClips

        print("PretrainClips sample, 3x16x112x112 uint8 (ms: median wall / mean CPU):")
        manifest = pd.DataFrame({"video": names, "label": 0})
        for codec, store in stores.items():
            ds = PretrainClips(manifest, store, clip_len=16, crop=112)
            med, mean = latency_ms(lambda k, s, ds=ds: ds[keys.index(k)], windows)
            print(f"  store {codec:9s} {med:7.2f} / {mean:7.2f}")


if __name__ == "__main__":
    main()
