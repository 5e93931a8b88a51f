"""`iicrepro flow`: TV-L1 optical flow of every frame-store video, u and v stored apart (spec 3.2).

Flow k lies between frames k and k+1, so a video of T frames has T-1 flow frames and the clip
indices of the RGB frames are valid for flow too (spec 3.1). The flow is Dual TV-L1 (settings
`flow.tvl1`, defaults = OpenCV's) on the grey frames of the frame store, i.e. at the resolution the
pipeline trains on (`frames.size`, 128x171), computed by one of two engines (`flow.engine`):
`opencv`, `cv2.optflow.DualTVL1OpticalFlow` one pair at a time on CPUs, or `torch`, the same
algorithm in PyTorch (`data.tvl1`), `flow.batch` pairs at a time on `flow.device` (a GPU). Both
go through the same scaling, clipping, quantisation and storage below.

Quantisation (spec 3.2). Upstream's flow JPEGs (twostreamfusion, gpu_flow) were computed on frames
with short side 256, clipped to +-20 px there and mapped linearly to 0..255; the loader then resized
the images to 128x171 without touching their values. So a stored value means "px at short side 256".
Here displacements are computed at the stored resolution and multiplied by
``flow.reference_short_side / min(H, W)`` (2.0 at 128x171) before clipping to +-`flow.bound`, which
gives the same value scale as upstream's data (for 4:3 videos upstream's horizontal factor was
341/171 = 1.994, 0.3 % off). ``reference_short_side: null`` clips at the stored resolution instead.
Level q stands for ``(q * 2 * bound / 255 - bound) / scale`` px; zero motion is level 128.

Store layout (root = ``layout.flow_store(settings, dataset)``)::

    u/  v/           one frame store per component (FrameStore format of `frames`: 1-channel
                     frames, codec and JPEG quality of `frames.codec` / `frames.jpeg_quality`),
                     each with its own index.csv, so `FrameStore(root / "u")` reads it
    index.csv        video,frames,height,width,codec,u_bytes,v_bytes: written last, when every
                     video has a result (the step's completion marker)
    failures.csv     video,reason,status,detail: `too_short` (fewer than 2 frames), `unreadable`
                     (the frame-store entry cannot be read), `error` (the flow computation
                     raised), `crash` (it killed its worker process)
    flow-log*.jsonl  one line per processed video: frames, source bytes, settings fingerprint,
                     issues, time; a chunk writes its own file

A full disk (or quota) is no fault of a video: the step stops with one `OutOfSpace` error, and
index.csv stays removed until a run (or `--merge`) completes.

Resuming: a video is skipped when its log record has the current settings fingerprint and the
current frame-file size, and both component files hold T-1 frames of the frame size. Changing a
`flow` setting or the codec therefore recomputes everything; a failed video is retried. A record
is written only after both files are in place, so an interrupted video is recomputed.

Cluster fan-out: ``--chunk i/n`` (0 <= i < n) processes every n-th video of the sorted keys from
the i-th on and writes only its log; after all chunks, ``--merge`` writes the indexes and
failures.csv (it refuses while a video has no result). A run without --chunk does both. E.g.::

    sbatch --array=0-31 -c 4 --wrap \\
        'iicrepro flow ucf101 --workers 4 --chunk $SLURM_ARRAY_TASK_ID/32'
    iicrepro flow ucf101 --merge     # after the array job
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from iicrepro import steps
from iicrepro.data.frames import (
    CODECS,
    FAILURE_COLUMNS,
    FrameStore,
    isolated_map,
    read_header,
    save_frames,
    video_file,
    write_index,
)
from iicrepro.errors import UserError
from iicrepro.io import atomic_path, is_out_of_space, out_of_space, remove_stale_temps

COMPONENTS = ("u", "v")
INDEX_COLUMNS = ["video", "frames", "height", "width", "codec", "u_bytes", "v_bytes"]
LOG_GLOB = "flow-log*.jsonl"
# settings name -> DualTVL1OpticalFlow setter
TVL1_SETTERS = {
    "tau": "setTau",
    "lambda": "setLambda",
    "theta": "setTheta",
    "nscales": "setScalesNumber",
    "warps": "setWarpingsNumber",
    "epsilon": "setEpsilon",
    "inner_iterations": "setInnerIterations",
    "outer_iterations": "setOuterIterations",
    "scale_step": "setScaleStep",
    "gamma": "setGamma",
    "median_filtering": "setMedianFiltering",
}


# ----------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class FlowConfig:
    """Everything that decides the stored flow values, plus where and how fast it is computed
    (threads per process; the torch engine's device and batch)."""

    tvl1: Mapping[str, float] = field(default_factory=dict)  # unset keys keep OpenCV's defaults
    bound: float = 20.0
    reference_short_side: int | None = 256
    codec: str = "raw"
    jpeg_quality: int = 90
    threads: int = 1
    engine: str = "opencv"
    device: str = "auto"
    batch: int = 64

    @classmethod
    def from_settings(cls, settings: Any) -> FlowConfig:
        f, fr = settings["flow"], settings["frames"]
        return cls(
            tvl1=dict(f["tvl1"]),
            bound=float(f["bound"]),
            reference_short_side=f["reference_short_side"],
            codec=fr["codec"],
            jpeg_quality=int(fr["jpeg_quality"]),
            threads=int(f["threads"]),
            engine=f["engine"],
            device=f["device"],
            batch=int(f["batch"]),
        )

    def fingerprint(self) -> str:
        """Hash of the settings that change the stored files (`steps.Flow`; not threads, device
        or batch)."""
        return steps.Flow.of(self).fingerprint()


def displacement_scale(height: int, width: int, reference_short_side: int | None) -> float:
    """Factor from px at the stored resolution to px at the reference resolution (module doc)."""
    return 1.0 if reference_short_side is None else reference_short_side / min(height, width)


def quantize(flow: np.ndarray, bound: float, scale: float = 1.0) -> np.ndarray:
    """Displacements (px) -> uint8: scaled, clipped to +-bound, mapped linearly to 0..255 and
    rounded, as gpu_flow did (spec 3.2); 0 px -> 128."""
    d = np.clip(np.asarray(flow, np.float32) * scale, -bound, bound)
    return np.rint((d + bound) * (255.0 / (2 * bound))).astype(np.uint8)


def dequantize(q: np.ndarray, bound: float, scale: float = 1.0) -> np.ndarray:
    """Inverse of `quantize` within half a level: uint8 -> displacement (px, stored resolution)."""
    return (np.asarray(q, np.float32) * (2 * bound / 255.0) - bound) / scale


# -------------------------------------------------------------------------------- computation
def tvl1(params: Mapping[str, float]):
    """A DualTVL1OpticalFlow with OpenCV's defaults overridden by `params` (names: TVL1_SETTERS)."""
    import cv2

    unknown = set(params) - set(TVL1_SETTERS)
    if unknown:
        raise UserError(
            f"flow.tvl1: unknown setting(s) {sorted(unknown)}; use {list(TVL1_SETTERS)}"
        )
    algo = cv2.optflow.DualTVL1OpticalFlow_create()
    for name, value in params.items():
        getattr(algo, TVL1_SETTERS[name])(value)
    return algo


def compute_flow(frames: np.ndarray, algo) -> np.ndarray:
    """TV-L1 flow of consecutive frames: uint8 (T, H, W, C) -> float32 (T-1, H, W, 2), [..., 0] = u
    (x, right positive), [..., 1] = v (y, down positive); flow k is from frame k to k+1."""
    import cv2

    frames = np.asarray(frames)
    if frames.ndim == 4 and frames.shape[-1] == 3:
        gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    else:
        gray = [np.ascontiguousarray(f.reshape(f.shape[:2])) for f in frames]
    out = np.empty((max(len(gray) - 1, 0), *gray[0].shape, 2), np.float32)
    for k in range(len(out)):
        out[k] = algo.calc(gray[k], gray[k + 1], None)
    return out


def torch_device(name: str) -> str:
    """`flow.device` -> a torch device name: auto = cuda when available, else cpu."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"flow.device={name}: CUDA is not available here; use cpu or auto")
    return name


def engine(cfg: FlowConfig) -> Callable[[np.ndarray], np.ndarray]:
    """The flow of `cfg.engine` as a function uint8 frames (T, H, W[, C]) -> float32
    (T-1, H, W, 2), see `compute_flow`. Sets this process's threads (cfg.threads)."""
    if cfg.engine == "opencv":
        import cv2

        cv2.setNumThreads(cfg.threads)
        return partial(compute_flow, algo=tvl1(cfg.tvl1))
    if cfg.engine == "torch":
        import torch

        from iicrepro.data.tvl1 import TVL1Params, video_flow

        torch.set_num_threads(cfg.threads)
        params = TVL1Params.from_settings(cfg.tvl1)
        return partial(video_flow, params=params, device=torch_device(cfg.device), batch=cfg.batch)
    raise UserError(f"flow.engine={cfg.engine!r}: use opencv or torch")


def flow_components(
    frames: np.ndarray, flow_of: Callable[[np.ndarray], np.ndarray], cfg: FlowConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Quantised u and v, each uint8 (T-1, H, W); `flow_of` is an `engine`."""
    flow = flow_of(frames)
    scale = displacement_scale(*flow.shape[1:3], cfg.reference_short_side)
    q = quantize(flow, cfg.bound, scale)
    return q[..., 0], q[..., 1]


# ------------------------------------------------------------------------------------- workers
@dataclass(frozen=True)
class _Job:
    frame_root: Path
    out: Path
    cfg: FlowConfig


_CACHE: dict = {}  # per process: the frame store and the flow engine of the current job


def _work(job: _Job, key: str) -> tuple[str, int, list[tuple[str, str]]]:
    """Flow of one video into the u and v stores; returns (key, flow frames, issues). Raises only
    OutOfSpace: a bad video is reported, and its stale files are removed."""
    if _CACHE.get("job") != job:
        _CACHE.update(job=job, store=FrameStore(job.frame_root), engine=engine(job.cfg))
    store = _CACHE["store"]
    try:
        frames = store.read_all(key)
    except Exception as exc:  # missing, truncated or undecodable store file
        return _fail(job, key, "unreadable", f"{store.path(key)}: {_describe(exc)}")
    if len(frames) < 2:
        return _fail(job, key, "too_short", f"{len(frames)} frame(s): flow needs 2")
    try:
        u, v = flow_components(frames, _CACHE["engine"], job.cfg)
        for comp, data in zip(COMPONENTS, (u, v), strict=True):
            save_frames(job.out / comp, key, data, job.cfg.codec, job.cfg.jpeg_quality)
    except Exception as exc:
        if is_out_of_space(exc):  # a full disk stops the step; it is no fault of this video
            raise
        return _fail(job, key, "error", _describe(exc))
    return key, len(u), []


def _work_item(item: tuple[_Job, str]):
    return _work(*item)


def _crashed(item: tuple[_Job, str]):
    return _fail(*item, "crash", "computing this video's flow killed the worker process")


def _fail(job: _Job, key: str, reason: str, detail: str):
    for comp in COMPONENTS:  # files from other settings must not stay in the index
        for codec in CODECS:
            video_file(job.out / comp, key, codec).unlink(missing_ok=True)
    return key, 0, [(reason, detail)]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _results(job: _Job, keys: list[str], workers: int, progress: bool) -> Iterator:
    from tqdm import tqdm

    bar = dict(total=len(keys), unit="video", desc="tv-l1 flow", disable=not progress)
    if workers > 1 and len(keys) > 1:
        # spawned processes (frames.isolated_map); a crash is reported for its video only
        items = [(job, k) for k in keys]
        yield from tqdm(isolated_map(_work_item, items, workers, _crashed), **bar)
        return
    _CACHE.clear()  # the frame store may have changed since the last call in this process
    __import__("cv2" if job.cfg.engine == "opencv" else "torch")  # its threads are restored
    before = _threads()
    try:
        yield from tqdm((_work(job, k) for k in keys), **bar)
    finally:
        _threads(before)
        _CACHE.clear()


def _threads(restore: tuple[int | None, int | None] | None = None) -> tuple:
    """This process's (OpenCV, torch) threads of the libraries already imported, or set them."""
    import sys

    cv2, torch = sys.modules.get("cv2"), sys.modules.get("torch")
    if restore is None:
        return (cv2 and cv2.getNumThreads(), torch and torch.get_num_threads())
    if cv2 and restore[0]:
        cv2.setNumThreads(restore[0])
    if torch and restore[1]:
        torch.set_num_threads(restore[1])
    return restore


# ---------------------------------------------------------------------------- bookkeeping
def _read_logs(out: Path) -> dict[str, dict]:
    """The latest record of each video over all log files (a torn last line is ignored)."""
    records: dict[str, dict] = {}
    for path in sorted(out.glob(LOG_GLOB)):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            old = records.get(rec["video"])
            if old is None or rec["time"] >= old["time"]:
                records[rec["video"]] = rec
    return records


def _source(store: FrameStore, key: str) -> tuple[int, int, int, int]:
    """(frames, height, width, file bytes) of a frame-store video; bytes -1 if the file is gone."""
    try:
        size = store.path(key).stat().st_size
    except OSError:
        size = -1
    return (store.num_frames(key), *store.frame_size(key), size)


def _status(rec: dict | None, source: tuple, out: Path, key: str, cfg: FlowConfig) -> str:
    """'done' (stored and current), 'failed' (current failure record) or 'pending'."""
    if rec is None or rec["config"] != cfg.fingerprint() or rec["source_bytes"] != source[3]:
        return "pending"
    if rec["frames"] == 0:
        return "failed"
    want = (source[0] - 1, source[1], source[2])
    for comp in COMPONENTS:
        try:
            h = read_header(video_file(out / comp, key, cfg.codec))
        except (OSError, ValueError):
            return "pending"
        if (h["frames"], h["height"], h["width"]) != want:
            return "pending"
    return "done"


@dataclass(frozen=True)
class Summary:
    computed: int  # flow stored by this run
    skipped: int  # already stored with the current settings
    failed: int  # no flow (see failures.csv)
    index: Path | None  # None for a chunk: `--merge` writes it
    failures: Path | None


def parse_chunk(text: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise UserError(f"--chunk {text!r} must be i/n with 0 <= i < n, e.g. 0/8 ... 7/8")
    return i, n


def chunk_keys(keys: Iterable[str], chunk: tuple[int, int]) -> list[str]:
    """The chunk's videos: every n-th of the sorted keys from the i-th on (interleaved, so each
    chunk gets a similar mix of classes and lengths)."""
    i, n = chunk
    return sorted(keys)[i::n]


def compute(
    frame_root: str | Path,
    out: str | Path,
    cfg: FlowConfig,
    *,
    workers: int = 1,
    chunk: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> Summary:
    """Flow of every video of the frame store (or of one chunk) not yet stored with `cfg`.

    Without chunking the indexes and failures.csv are written too (`merge`)."""
    store = FrameStore(frame_root)
    out = Path(out)
    for comp in COMPONENTS:
        (out / comp).mkdir(parents=True, exist_ok=True)
    keys = chunk_keys(store.keys(), chunk)
    records = _read_logs(out)
    sources = {k: _source(store, k) for k in keys}
    todo = [k for k in keys if _status(records.get(k), sources[k], out, k, cfg) != "done"]
    job = _Job(Path(frame_root), out, cfg)
    log_name = (
        "flow-log.jsonl" if chunk == (0, 1) else f"flow-log.chunk{chunk[0]}of{chunk[1]}.jsonl"
    )
    remove_stale_temps(out, recursive=True)  # left by a killed run
    if todo:  # the combined index no longer describes the store until `merge` rewrites it
        (out / "index.csv").unlink(missing_ok=True)
    failed = 0
    try:
        with open(out / log_name, "a") as logf:
            for key, n, issues in _results(job, todo, workers, progress):
                failed += n == 0
                rec = {"video": key, "frames": n, "source_bytes": sources[key][3]}
                rec |= {"config": cfg.fingerprint(), "issues": issues, "time": time.time()}
                logf.write(json.dumps(rec) + "\n")  # after the files: a record means "complete"
                logf.flush()
    except Exception as exc:
        if is_out_of_space(exc) and not isinstance(exc, UserError):
            raise out_of_space(out / log_name, exc=exc) from exc
        raise
    computed, skipped = len(todo) - failed, len(keys) - len(todo)
    if chunk != (0, 1):
        return Summary(computed, skipped, failed, None, None)
    merge(frame_root, out, cfg)
    return Summary(computed, skipped, failed, out / "index.csv", out / "failures.csv")


def merge(
    frame_root: str | Path, out: str | Path, cfg: FlowConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write u/index.csv, v/index.csv, failures.csv and index.csv (last) from the stored files and
    the logs; refuses while a video of the frame store has no current result."""
    store, out = FrameStore(frame_root), Path(out)
    records = _read_logs(out)
    status = {k: _status(records.get(k), _source(store, k), out, k, cfg) for k in store}
    pending = sorted(k for k, s in status.items() if s == "pending")
    if pending:
        raise UserError(
            f"{len(pending)} of {len(status)} videos (e.g. {pending[0]}) have no flow with the "
            f"current settings in {out}: run the missing chunks (or `iicrepro flow` without "
            "--chunk) before --merge"
        )
    done = sorted(k for k, s in status.items() if s == "done")
    rows = [
        [k, reason, "excluded", detail]
        for k in sorted(status)
        if status[k] == "failed"
        for reason, detail in records[k]["issues"]
    ]
    failures = pd.DataFrame(rows, columns=FAILURE_COLUMNS)
    with atomic_path(out / "failures.csv") as tmp:
        failures.to_csv(tmp, index=False)
    u, v = (write_index(out / comp, done, cfg.codec) for comp in COMPONENTS)
    assert u["video"].tolist() == v["video"].tolist() == done
    index = u.rename(columns={"bytes": "u_bytes"}).assign(v_bytes=v["bytes"].to_numpy())
    with atomic_path(out / "index.csv") as tmp:
        index.to_csv(tmp, index=False)
    if status and not len(index):
        raise UserError(
            f"no video has flow (all {len(failures)} failed); see {out / 'failures.csv'}"
        )
    return index, failures


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="dataset name, e.g. ucf101, hmdb51, synthetic")
    parser.add_argument("--frames", type=Path, help="frame store folder (default: layout)")
    parser.add_argument("--out", type=Path, help="flow store folder (default: layout)")
    parser.add_argument("--workers", type=int, help="flow processes (default: flow.workers)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument(
        "--chunk",
        metavar="I/N",
        help="process only chunk I of N (0-based), e.g. a Slurm array task",
    )
    g.add_argument("--merge", action="store_true", help="after all chunks: write the indexes")


def main(args: argparse.Namespace) -> int:
    from iicrepro import layout
    from iicrepro.cli import settings_from_args

    settings = settings_from_args(args)
    cfg = FlowConfig.from_settings(settings)
    frame_root = args.frames or layout.frame_store(settings, args.dataset)
    out = args.out or layout.flow_store(settings, args.dataset)
    if args.merge:
        index, failures = merge(frame_root, out, cfg)
        print(f"flow {args.dataset}: merged {len(index)} videos, {len(failures)} failures "
              f"(see {Path(out) / 'failures.csv'})")  # fmt: skip
        return 0
    chunk = parse_chunk(args.chunk)
    s = compute(frame_root, out, cfg, workers=args.workers or settings.flow.workers, chunk=chunk)
    where = f"see {s.failures}" if s.failures else "run --merge after the last chunk"
    print(f"flow {args.dataset}{f' chunk {args.chunk}' if args.chunk else ''}: computed "
          f"{s.computed}, already stored {s.skipped}, failed {s.failed} ({where})")  # fmt: skip
    return 0
