"""TV-L1 flow benchmark: frames per second at the stored size (128x171) and accuracy of faster
settings against OpenCV's defaults, and of the torch engine against OpenCV, on a synthetic video
with known motion.

The video: a photograph shipped with matplotlib panning by a sub-pixel step per frame, with a
square cut from elsewhere in the photograph moving the other way on top, both rendered by
bilinear warping, so the true flow of every pixel is known. End-point error (EPE, px at 128x171)
is measured away from the border and the square's edges (where content appears or disappears),
against the known motion and against the default settings' flow. Usage:

    .venv/bin/python benchmarks/flow_bench.py [--pairs 24] [--workers 2]   # OpenCV settings
    .venv/bin/python benchmarks/flow_bench.py --engines [--device cuda]    # torch vs OpenCV

`--engines` times both engines with the default settings (frames/s and CPU-ms per flow frame
with 1 and 2 threads; with `--device cuda` also the torch engine on the GPU at several batch
sizes) and scores the torch engine's flow against OpenCV's and against the true motion. Where
OpenCV is not importable (the GPU image), the frames and OpenCV's flow come from the reference
file `benchmarks/data/flow-reference.npz`, written here by `--save-reference`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from iicrepro.data.flow import dequantize, displacement_scale, quantize

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
REFERENCE = Path(__file__).with_name("data") / "flow-reference.npz"
MILLI = 1000  # the reference file stores displacements as int16 in 1/1000 px


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

    from iicrepro.data.flow import compute_flow, tvl1

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


# ----------------------------------------------------------------------- torch vs OpenCV
def save_reference(path: Path, pairs: int) -> None:
    """Grey frames, true motion, mask and OpenCV's flow (default settings) in one small file."""
    frames, gt, mask = video(pairs + 1)
    ref, wall, cpu = _timed(({}, 1, frames))
    path.parent.mkdir(parents=True, exist_ok=True)
    milli = {k: np.rint(v * MILLI).astype(np.int16) for k, v in (("opencv", ref), ("gt", gt))}
    import cv2

    grey = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])  # what TV-L1 sees
    np.savez_compressed(path, frames=grey, mask=np.packbits(mask), **milli,
                        opencv_cpu_ms=cpu / pairs * 1000)  # fmt: skip
    print(
        f"wrote {path} ({path.stat().st_size} bytes): {pairs} pairs, OpenCV {cpu / pairs * 1000:.0f} CPU-ms/frame"
    )


def load_reference(path: Path) -> tuple[np.ndarray, ...]:
    """(frames, true flow, mask, OpenCV's flow) from `save_reference`'s file."""
    z = np.load(path)
    frames = z["frames"]
    mask = np.unpackbits(z["mask"])[: (len(frames) - 1) * SIZE[0] * SIZE[1]].astype(bool)
    mask = mask.reshape(len(frames) - 1, *SIZE)
    return frames, z["gt"] / np.float32(MILLI), mask, z["opencv"] / np.float32(MILLI)


def _torch_timed(frames: np.ndarray, threads: int, device: str, batch: int):
    """(flow, wall s, CPU s) of the torch engine, default settings, after one warm-up pair."""
    import torch

    from iicrepro.data.tvl1 import video_flow

    torch.set_num_threads(threads)
    video_flow(frames[:2], device=device)  # warm-up: kernels, allocator
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    flow = video_flow(frames, device=device, batch=batch)
    return flow, time.perf_counter() - t0, time.process_time() - c0


def gpu_rates(frames: np.ndarray, device: str, batches: list[int], seconds: float) -> dict:
    """Flow frames/s of the torch engine on `device` per batch size: the video's pairs repeated
    to fill each batch, timed over at least `seconds` after a warm-up batch."""
    import torch

    from iicrepro.data.tvl1 import flow_pairs, gray

    g = gray(torch.from_numpy(frames).to(device))
    out = {}
    for b in batches:
        idx = torch.arange(b, device=device) % (len(g) - 1)
        i0, i1 = g[idx], g[idx + 1]
        try:
            with torch.no_grad():
                flow_pairs(i0, i1)
                torch.cuda.synchronize()
                n, t0 = 0, time.perf_counter()
                while n == 0 or time.perf_counter() - t0 < seconds:
                    flow_pairs(i0, i1)
                    torch.cuda.synchronize()
                    n += b
                dt = time.perf_counter() - t0
            out[b] = {
                "frames_per_s": n / dt,
                "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20,
            }
        except torch.cuda.OutOfMemoryError:
            out[b] = {"error": "out of memory"}
            break
        finally:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return out


def engines(args: argparse.Namespace) -> dict:
    try:  # rendering the video and OpenCV's flow need both
        import cv2  # noqa: F401
        import matplotlib  # noqa: F401

        live = args.reference is None
    except ImportError:
        live = False
    if live:
        frames, gt, mask = video(args.pairs + 1)
        ref, w, c = _timed(({}, 1, frames))
        opencv = {
            "threads_1": {"fps_wall": args.pairs / w, "cpu_ms_per_frame": c / args.pairs * 1000}
        }
        _, w, c = _timed(({}, 2, frames))
        opencv["threads_2"] = {
            "fps_wall": args.pairs / w,
            "cpu_ms_per_frame": c / args.pairs * 1000,
        }
    else:
        frames, gt, mask, ref = load_reference(args.reference or REFERENCE)
        k = min(args.pairs, len(ref))  # --pairs: the first k pairs of the file
        frames, gt, mask, ref = frames[: k + 1], gt[:k], mask[:k], ref[:k]
        opencv = {"from_reference_file": str(args.reference or REFERENCE)}
    n = len(frames) - 1
    result = {"pairs": n, "size": list(SIZE), "opencv": opencv, "opencv_live": live,
              "load": os.getloadavg()[0], "cpus": os.cpu_count(),
              "epe_opencv_vs_true": epe(ref, gt, mask)}  # fmt: skip
    torch_cpu = {}
    for threads in args.threads:
        flow, w, c = _torch_timed(frames, threads, "cpu", n)
        torch_cpu[f"threads_{threads}"] = {"fps_wall": n / w, "cpu_ms_per_frame": c / n * 1000}
    result["torch_cpu"] = torch_cpu
    result["epe_torch_vs_opencv"] = epe(flow, ref, mask)
    result["epe_torch_vs_opencv_all_px"] = float(np.linalg.norm(flow - ref, axis=-1).mean())
    result["epe_torch_vs_true"] = epe(flow, gt, mask)
    if args.device != "cpu":
        import torch

        result["device_name"] = torch.cuda.get_device_name(args.device)
        flow, _, _ = _torch_timed(frames, 1, args.device, n)
        result["epe_torch_gpu_vs_opencv"] = epe(flow, ref, mask)
        result["epe_torch_gpu_vs_opencv_all_px"] = float(np.linalg.norm(flow - ref, axis=-1).mean())
        result["epe_torch_gpu_vs_true"] = epe(flow, gt, mask)
        result["torch_gpu"] = gpu_rates(frames, args.device, args.batches, args.seconds)
        best = max((r.get("frames_per_s", 0) for r in result["torch_gpu"].values()), default=0)
        result["torch_gpu_frames_per_s"] = best
        result["gpu_hours_ucf101"] = UCF101_FRAMES / best / 3600 if best else None
        result["gpu_hours_hmdb51"] = HMDB51_FRAMES / best / 3600 if best else None
    return result


def print_engines(r: dict) -> None:
    print(f"{r['pairs']} flow frames at {r['size'][0]}x{r['size'][1]}, default settings, "
          f"cpus={r['cpus']}, load={r['load']:.1f}")  # fmt: skip
    if r["opencv_live"]:
        for k, v in r["opencv"].items():
            print(
                f"opencv {k}: {v['fps_wall']:.2f} fps wall, {v['cpu_ms_per_frame']:.0f} CPU-ms/frame"
            )
    for k, v in r["torch_cpu"].items():
        print(
            f"torch cpu {k}: {v['fps_wall']:.2f} fps wall, {v['cpu_ms_per_frame']:.0f} CPU-ms/frame"
        )
    print(f"EPE (px, scored pixels): torch vs opencv {r['epe_torch_vs_opencv']:.4f} "
          f"(all pixels {r['epe_torch_vs_opencv_all_px']:.4f}); vs true motion: opencv "
          f"{r['epe_opencv_vs_true']:.4f}, torch {r['epe_torch_vs_true']:.4f}")  # fmt: skip
    if "torch_gpu" in r:
        print(f"{r['device_name']}: EPE vs opencv {r['epe_torch_gpu_vs_opencv']:.4f}, "
              f"vs true {r['epe_torch_gpu_vs_true']:.4f}")  # fmt: skip
        for b, v in r["torch_gpu"].items():
            print(f"  batch {b}: {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=12, help="flow frames per measurement")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--engines", action="store_true", help="torch engine vs OpenCV (see above)")
    ap.add_argument("--device", default="cpu", help="--engines: also time torch here (cuda)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="--engines, CPU")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024], help="GPU")
    ap.add_argument("--seconds", type=float, default=5.0, help="GPU: timing per batch size")
    ap.add_argument("--reference", type=Path, help="frames + OpenCV flow file (default: live)")
    ap.add_argument("--save-reference", type=Path, metavar="FILE")
    ap.add_argument("--json", type=Path, help="--engines: also write the results here")
    args = ap.parse_args()
    if args.save_reference:
        save_reference(args.save_reference, args.pairs)
        return
    if args.engines:
        r = engines(args)
        print_engines(r)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(r, indent=2, default=str) + "\n")
        return
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
