"""TV-L1 flow benchmark: frames per second at the stored size (128x171) and accuracy of faster
settings against OpenCV's defaults, on a synthetic video with known motion.

The video: a photograph shipped with matplotlib panning by a sub-pixel step per frame, with a
square cut from elsewhere in the photograph moving the other way on top, both rendered by
bilinear warping, so the true flow of every pixel is known. End-point error (EPE, px at 128x171)
is measured away from the border and the square's edges (where content appears or disappears),
against the known motion and against the default settings' flow. Usage:

    .venv/bin/python benchmarks/flow_bench.py [--pairs 24] [--workers 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import numpy as np

from iicrepro.data.flow import compute_flow, dequantize, displacement_scale, quantize, tvl1

SIZE = (128, 171)
BACKGROUND, SQUARE = (0.8, -0.35), (-2.2, 1.1)  # px per frame (x, y) at 128x171
SQUARE_AT, SQUARE_SIZE, MARGIN = (40, 60), 40, 6
SETTINGS = {  # name -> flow.tvl1 overrides (the rest are OpenCV's defaults)
    "default (5 scales, 5 warps)": {},
    "3 scales, 5 warps": {"nscales": 3},
    "5 scales, 2 warps": {"warps": 2},
    "3 scales, 2 warps": {"nscales": 3, "warps": 2},
    "5 scales, 1 warp": {"warps": 1},
    "3 scales, 1 warp": {"nscales": 3, "warps": 1},
    "epsilon 0.05": {"epsilon": 0.05},
    "epsilon 0.1": {"epsilon": 0.1},
    "3 scales, 2 warps, epsilon 0.05": {"nscales": 3, "warps": 2, "epsilon": 0.05},
}
UCF101_FRAMES, HMDB51_FRAMES = 2.5e6, 0.64e6


def photo() -> np.ndarray:
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def shifted(img: np.ndarray, x0: float, y0: float, h: int, w: int) -> np.ndarray:
    """The h x w window of `img` whose top-left corner is at sub-pixel (x0, y0), bilinear."""
    import cv2

    m = np.float32([[1, 0, x0], [0, 1, y0]])  # output (x, y) samples img at (x + x0, y + y0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)


def video(frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB frames (T, H, W, 3), true flow (T-1, H, W, 2) and a mask of pixels to score."""
    import cv2

    img = cv2.resize(photo(), (342, 400), interpolation=cv2.INTER_AREA)  # ~ UCF101 detail at 128
    h, w = SIZE
    (bx, by), (sx, sy), s = BACKGROUND, SQUARE, SQUARE_SIZE
    out = np.empty((frames, h, w, 3), np.uint8)
    gt = np.empty((frames - 1, h, w, 2), np.float32)
    mask = np.ones((frames - 1, h, w), bool)
    for t in range(frames):
        # the camera pans by (bx, by): content moves by (bx, by) in the image
        frame = shifted(img, 60 - bx * t, 100 - by * t, h, w)
        y, x = SQUARE_AT[0] + sy * t, SQUARE_AT[1] + sx * t
        yi, xi = int(np.floor(y)), int(np.floor(x))
        patch = shifted(img, 150 - (x - xi), 200 - (y - yi), s, s)  # sub-pixel placement
        frame[yi : yi + s, xi : xi + s] = patch
        out[t] = frame
        if t < frames - 1:
            gt[t] = (bx, by)
            gt[t, yi : yi + s, xi : xi + s] = (sx, sy)
            mask[t, : MARGIN + 3] = mask[t, -MARGIN - 3 :] = False
            mask[t, :, : MARGIN + 3] = mask[t, :, -MARGIN - 3 :] = False
            mask[t, yi - MARGIN : yi + s + MARGIN, xi - MARGIN : xi + MARGIN] = False
            mask[t, yi - MARGIN : yi + s + MARGIN, xi + s - MARGIN : xi + s + MARGIN] = False
            mask[t, yi - MARGIN : yi + MARGIN, xi - MARGIN : xi + s + MARGIN] = False
            mask[t, yi + s - MARGIN : yi + s + MARGIN, xi - MARGIN : xi + s + MARGIN] = False
    return out, gt, mask


def epe(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.linalg.norm(a - b, axis=-1)[mask].mean())


def _timed(args: tuple[dict, int, np.ndarray]) -> tuple[np.ndarray, float, float]:
    """(flow, wall seconds, CPU seconds of this process, all its threads)."""
    import cv2

    params, threads, frames = args
    cv2.setNumThreads(threads)
    algo = tvl1(params)
    t0, c0 = time.perf_counter(), time.process_time()
    flow = compute_flow(frames, algo)
    return flow, time.perf_counter() - t0, time.process_time() - c0


def parallel_fps(params: dict, frames: np.ndarray, workers: int) -> float:
    """Aggregate flow frames per second of `workers` processes (1 OpenCV thread each)."""
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_timed, [(params, 1, frames[:2])] * workers)  # warm-up: imports
        t0 = time.perf_counter()
        pool.map(_timed, [(params, 1, frames)] * workers)
        dt = time.perf_counter() - t0
    return workers * (len(frames) - 1) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=12, help="flow frames per measurement")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    frames, gt, mask = video(args.pairs + 1)
    print(f"{args.pairs} flow frames at {SIZE[0]}x{SIZE[1]}, cpus={os.cpu_count()}, "
          f"load={os.getloadavg()[0]:.1f}; background {BACKGROUND} px/frame, square {SQUARE}")  # fmt: skip

    # CPU seconds are what CPU-hours need and stay meaningful on a shared machine; wall-clock
    # figures show what threads and processes buy when the cores are free.
    n = args.pairs
    ref, w1, c1 = _timed(({}, 1, frames))
    _, w2, c2 = _timed(({}, 2, frames))
    scale = displacement_scale(*SIZE, 256)
    stored = dequantize(quantize(ref, 20, scale), 20, scale)
    print(f"default settings, 1 process: 1 OpenCV thread {n / w1:.1f} fps wall, "
          f"{c1 / n * 1000:.0f} CPU-ms/frame; 2 threads {n / w2:.1f} fps wall, "
          f"{c2 / n * 1000:.0f} CPU-ms/frame")  # fmt: skip
    print(f"quantisation (bound 20 at short side 256): EPE stored vs float "
          f"{epe(stored, ref, mask):.3f} px")  # fmt: skip
    print()
    print(f"| settings | CPU-ms per frame | fps per core | fps wall, {args.workers} processes | "
          "EPE vs true motion (px) | EPE vs default (px) | CPU-h UCF101 | CPU-h HMDB51 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, params in SETTINGS.items():
        flow, _, cpu = (ref, w1, c1) if not params else _timed((params, 1, frames))
        per_core = n / cpu
        print(f"| {name} | {cpu / n * 1000:.0f} | {per_core:.1f} | "
              f"{parallel_fps(params, frames, args.workers):.1f} | {epe(flow, gt, mask):.3f} | "
              f"{epe(flow, ref, mask):.3f} | {UCF101_FRAMES / per_core / 3600:.0f} | "
              f"{HMDB51_FRAMES / per_core / 3600:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
