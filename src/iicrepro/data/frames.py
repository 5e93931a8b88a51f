"""`iicrepro frames`: decode every video once into a per-video frame store.

Each video is decoded with PyAV at its native frame rate, every frame resized to `frames.size`
(H x W, fixed, not aspect-preserving, bilinear: spec 3.4) and written as ONE file per video:
millions of per-frame files are slow for DVC and cluster file systems.

Store layout (root = ``layout.frame_store(settings, dataset)``)::

    videos/<Class>/<name>.jpgs   codec jpeg: the video's frames as JPEGs in one file (format below)
    videos/<Class>/<name>.npy    codec raw: a plain uint8 .npy array (T, H, W, C)
    index.csv                    video,frames,height,width,codec,bytes (video = key, see video_key)
    failures.csv                 video,reason,status,detail (one row per issue)
    decode-log.jsonl             one line per stored video with its issues, so a resumed run keeps them

The ``.jpgs`` format: the line ``IICJPGS1``, a one-line JSON header
``{"frames": T, "height": H, "width": W, "channels": C, "offsets": [o_0, ..., o_T]}``, then the T
JPEG images back to back; image i is bytes ``o_i:o_{i+1}`` counted from the end of the header, so a
reader seeks straight to the frames it needs. Frames are encoded with Pillow (4:2:0 chroma, like
ordinary JPEG frame dumps) and decoded with OpenCV (libjpeg-turbo). A window of a .npy file is one
positioned read at its byte offset (np.load(path, mmap_mode="r") opens the same file).

Failure policy. The step never stops for a bad video and never drops one silently:
* ``missing``: the manifest names a file that is not there (excluded).
* ``unreadable``: the container cannot be opened or has no video stream (excluded).
* ``corrupt``: not a single frame decodes (excluded).
* ``truncated``: decoding stopped early: at a packet the demuxer flags as damaged (the cut-off last
  packet of a truncated file; the decoder would conceal it as a garbage frame), at a decode error,
  or with more than TRUNCATION_TOLERANCE frames fewer than the container header announces. The
  frames before the break are consecutive; they are kept (status ``kept``) when there are at least
  `frames.min_frames` of them.
* ``metadata``: tags are not valid UTF-8 (PyAV raises UnicodeDecodeError on some HMDB51 files); the
  file is reopened with the undecodable bytes ignored and the video is kept.
* ``too_short``: fewer than `frames.min_frames` frames (spec 3.1: length = frames - 1 must hold a
  clip); excluded.
* ``crash`` / ``error``: decoding killed its worker process / raised an unexpected exception
  (excluded; the other videos go on).
An excluded video has no file; a rerun tries it again. Downstream steps drop it with `usable`.
A full disk (or quota) is not a fault of a video: the step stops with one `OutOfSpace` error that
says how much more the missing videos need, and leaves the store without index.csv.

Resuming: files are renamed into place only when complete, so a video whose file exists with the
configured frame size is skipped; index.csv and failures.csv are rebuilt from the files and the log.
index.csv is removed while a run changes the store and written last, so it exists only when it
lists exactly the complete files; temporary files of a killed run are removed on the next.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from iicrepro.errors import UserError
from iicrepro.io import atomic_path, is_out_of_space, out_of_space, remove_stale_temps

log = logging.getLogger(__name__)

CODECS = {"jpeg": ".jpgs", "raw": ".npy"}
MAGIC = b"IICJPGS1\n"
INDEX_COLUMNS = ["video", "frames", "height", "width", "codec", "bytes"]
FAILURE_COLUMNS = ["video", "reason", "status", "detail"]
LOG_NAME = "decode-log.jsonl"
# Container headers are not always exact, so a one-frame shortfall is not called truncation.
TRUNCATION_TOLERANCE = 1


def video_key(video: str) -> str:
    """Store key of a manifest `video` path: the same path without its extension."""
    return str(PurePosixPath(video).with_suffix(""))


def video_file(root: str | Path, key: str, codec: str) -> Path:
    return Path(root) / "videos" / f"{key}{CODECS[codec]}"


# --------------------------------------------------------------------------------- file format
class _Encoder:
    """Collects one video's frames (JPEG-encoded on arrival for `jpeg`) and writes its file."""

    def __init__(self, codec: str, jpeg_quality: int):
        if codec not in CODECS:
            raise UserError(f"frames.codec {codec!r} is unknown; use one of {', '.join(CODECS)}")
        self.codec, self.quality = codec, jpeg_quality
        self.parts: list = []
        self.shape: tuple[int, int, int] | None = None

    def add(self, frame: np.ndarray) -> None:
        if frame.ndim == 2:
            frame = frame[..., None]
        if frame.dtype != np.uint8 or frame.shape[-1] not in (1, 3):
            raise ValueError(
                f"frames must be uint8 HxWx1 or HxWx3, got {frame.dtype} {frame.shape}"
            )
        self.shape = self.shape or frame.shape
        if frame.shape != self.shape:
            raise ValueError(f"frame shape {frame.shape} differs from the first {self.shape}")
        self.parts.append(_encode_jpeg(frame, self.quality) if self.codec == "jpeg" else frame)

    def __len__(self) -> int:
        return len(self.parts)

    def write(self, path: Path) -> None:
        height, width, channels = self.shape
        needed = sum(len(b) if isinstance(b, bytes) else b.nbytes for b in self.parts)
        with atomic_path(path, needed=needed) as tmp, open(tmp, "wb") as f:
            if self.codec == "raw":
                # np.save's own write reports a full disk as a short write without errno;
                # Python's file write raises OSError(ENOSPC). Same bytes as np.save.
                frames = np.ascontiguousarray(np.stack(self.parts))
                np.lib.format.write_array_header_1_0(
                    f, np.lib.format.header_data_from_array_1_0(frames)
                )
                f.write(frames.data)
            else:
                offsets = np.cumsum([0] + [len(b) for b in self.parts]).tolist()
                header = {"frames": len(self.parts), "height": height, "width": width}
                header |= {"channels": channels, "offsets": offsets}
                f.write(MAGIC + json.dumps(header, separators=(",", ":")).encode() + b"\n")
                f.writelines(self.parts)


def _encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame).save(
        buf, format="JPEG", quality=quality
    )
    return buf.getvalue()


def save_frames(
    root: str | Path, key: str, frames: np.ndarray, codec: str, jpeg_quality: int = 90
) -> Path:
    """Write one video's uint8 frames (T, H, W, C) or (T, H, W) into a store, atomically.

    Also used by the flow step, whose u and v sub-stores are frame stores of 1-channel frames.
    """
    enc = _Encoder(codec, jpeg_quality)
    for frame in np.asarray(frames):
        enc.add(frame)
    path = video_file(root, key, codec)
    enc.write(path)
    _remove_other_codecs(root, key, codec)
    return path


def _remove_other_codecs(root: str | Path, key: str, codec: str) -> None:
    for other in CODECS:
        if other != codec:
            video_file(root, key, other).unlink(missing_ok=True)


def read_header(path: str | Path) -> dict:
    """frames, height, width, channels and data_start (+ JPEG offsets) of a stored video."""
    path = Path(path)
    with open(path, "rb") as f:
        if path.suffix == ".npy":
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0
            shape, fortran, dtype = (read if major == 1 else np.lib.format.read_array_header_2_0)(f)
            if len(shape) != 4 or fortran or dtype != np.uint8:
                raise ValueError(f"{path} is not a uint8 (T, H, W, C) C-order array")
            frames, height, width, channels = shape
            return dict(frames=frames, height=height, width=width, channels=channels) | {
                "data_start": f.tell()
            }
        if f.readline() != MAGIC:
            raise ValueError(f"{path} is not a frame file (no {MAGIC!r} line)")
        header = json.loads(f.readline())
        header["data_start"] = f.tell()
        return header


def write_index(root: str | Path, keys: Iterable[str], codec: str) -> pd.DataFrame:
    """index.csv of the stored videos among `keys` (read from their file headers), atomically."""
    rows = []
    for key in keys:
        path = video_file(root, key, codec)
        if path.is_file():
            h = read_header(path)
            rows.append([key, h["frames"], h["height"], h["width"], codec, path.stat().st_size])
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS).sort_values("video", ignore_index=True)
    with atomic_path(Path(root) / "index.csv") as tmp:
        index.to_csv(tmp, index=False)
    return index


# ------------------------------------------------------------------------------- random access
class FrameStore:
    """Random access to a frame store: reads only the bytes of the requested frames."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index = self.root / "index.csv"
        if not index.is_file():
            raise UserError(f"{index} not found: build the frame store first (`iicrepro frames`)")
        df = pd.read_csv(index, dtype={"video": str, "codec": str}, keep_default_na=False)
        self._info = {
            r.video: (int(r.frames), int(r.height), int(r.width), r.codec) for r in df.itertuples()
        }
        self._headers: dict[str, dict] = {}  # per video, read on first access

    def keys(self) -> list[str]:
        return list(self._info)

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def __len__(self) -> int:
        return len(self._info)

    def num_frames(self, key: str) -> int:
        return self._entry(key)[0]

    def frame_size(self, key: str) -> tuple[int, int]:
        """(height, width) of the video's stored frames."""
        return self._entry(key)[1:3]

    def path(self, key: str) -> Path:
        return video_file(self.root, key, self._entry(key)[3])

    def read(self, key: str, start: int, length: int) -> np.ndarray:
        """Frames start .. start+length-1 as uint8 (length, H, W, C); C = 3 (RGB) or 1."""
        frames, _, _, codec = self._entry(key)
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > frames:
            raise IndexError(f"{key}: frames {start}..{start + length - 1} outside 0..{frames - 1}")
        h = self._headers.get(key)
        if h is None:
            h = self._headers[key] = read_header(self.path(key))
        if codec == "raw":
            return self._read_raw(key, h, start, length)
        return self._read_jpeg(key, h, start, length)

    def read_all(self, key: str) -> np.ndarray:
        return self.read(key, 0, self.num_frames(key))

    def _entry(self, key: str) -> tuple[int, int, int, str]:
        try:
            return self._info[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in the frame store {self.root}") from None

    def _read_raw(self, key: str, h: dict, start: int, length: int) -> np.ndarray:
        # The .npy file loads with np.load(mmap_mode="r") too; one positioned read is faster.
        out = np.empty((length, h["height"], h["width"], h["channels"]), np.uint8)
        with open(self.path(key), "rb", buffering=0) as f:
            f.seek(h["data_start"] + start * out[0].nbytes)
            if f.readinto(out) != out.nbytes:
                raise OSError(f"{self.path(key)} is shorter than its header says")
        return out

    def _read_jpeg(self, key: str, h: dict, start: int, length: int) -> np.ndarray:
        import cv2

        off, channels = h["offsets"], h["channels"]
        with open(self.path(key), "rb") as f:
            f.seek(h["data_start"] + off[start])
            buf = f.read(off[start + length] - off[start])
        out = np.empty((length, h["height"], h["width"], channels), np.uint8)
        flag = cv2.IMREAD_COLOR_RGB if channels == 3 else cv2.IMREAD_GRAYSCALE
        for i in range(length):
            lo, hi = off[start + i] - off[start], off[start + i + 1] - off[start]
            img = cv2.imdecode(np.frombuffer(buf, np.uint8, hi - lo, lo), flag)
            out[i] = img.reshape(out.shape[1:])
        return out


def usable(
    manifest: pd.DataFrame, store: FrameStore, min_frames: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a manifest into videos the store holds with >= min_frames frames, and the rest.

    Both frames are re-indexed from 0 (a kept row's position is its memory-bank row).
    """
    keys = manifest["video"].map(video_key)
    ok = np.array([k in store and store.num_frames(k) >= min_frames for k in keys], dtype=bool)
    kept, excluded = manifest[ok].reset_index(drop=True), manifest[~ok].reset_index(drop=True)
    if len(excluded):
        log.warning(
            "%d of %d videos excluded (not decoded or fewer than %d frames); see %s",
            len(excluded), len(manifest), min_frames, store.root / "failures.csv",
        )  # fmt: skip
    return kept, excluded


# ------------------------------------------------------------------------------------ decoding
def decode_video(
    src: Path, size: tuple[int, int], codec: str, jpeg_quality: int, min_frames: int
) -> tuple[_Encoder | None, list[tuple[str, str]]]:
    """Decode and resize one video. Returns (frames to store or None, issues); never raises for
    a bad file."""
    import av

    height, width = size
    if not src.is_file():
        return None, [("missing", f"{src} does not exist")]
    issues: list[tuple[str, str]] = []
    try:
        try:
            container = av.open(str(src))
        except UnicodeDecodeError as exc:
            issues.append(("metadata", f"tags are not valid UTF-8 ({exc.reason}); ignored them"))
            container = av.open(str(src), metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        return None, [*issues, ("unreadable", _describe(exc))]
    enc, error = _Encoder(codec, jpeg_quality), ""
    with container:
        if not container.streams.video:
            return None, [*issues, ("unreadable", "no video stream")]
        stream = container.streams.video[0]
        expected = stream.frames  # from the container header; 0 when unknown

        def add(frames: Iterable) -> None:
            for frame in frames:
                rgb = frame.to_ndarray(
                    width=width, height=height, format="rgb24", interpolation="BILINEAR"
                )
                enc.add(rgb)

        # Stop at the first damaged packet: the decoder would conceal it as a garbage frame (the
        # last packet of a truncated file is flagged corrupt). The frames before it are kept.
        try:
            for packet in container.demux(stream):
                if packet.is_corrupt:
                    error = f"damaged packet after frame {len(enc)}"
                    break
                add(packet.decode())
            if error:
                add(stream.decode(None))  # flush the frames the decoder still holds
        except (av.error.FFmpegError, UnicodeDecodeError, OSError) as exc:
            error = _describe(exc)
    n = len(enc)
    if n == 0:
        return None, [*issues, ("corrupt", f"no frame decodes ({error or 'empty stream'})")]
    if error or (expected and n < expected - TRUNCATION_TOLERANCE):
        why = error or "stream ended early"
        issues.append(("truncated", f"decoded {n} of {expected or '?'} frames ({why})"))
    if n < min_frames:
        return None, [*issues, ("too_short", f"{n} frames < frames.min_frames={min_frames}")]
    return enc, issues


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class _Task:
    key: str
    src: Path
    out: Path
    size: tuple[int, int]
    codec: str
    jpeg_quality: int
    min_frames: int


def _run_task(task: _Task) -> tuple[str, int, list[tuple[str, str]]]:
    """Worker: decode one video and store it; returns (key, frames stored, issues)."""
    try:
        enc, issues = decode_video(
            task.src, task.size, task.codec, task.jpeg_quality, task.min_frames
        )
        if enc is None:
            for codec in CODECS:  # a file from other settings must not stay in the index
                video_file(task.out, task.key, codec).unlink(missing_ok=True)
            return task.key, 0, issues
        # Log before the file appears: a stored file then always has its issues on record.
        line = json.dumps({"video": task.key, "frames": len(enc), "issues": issues}) + "\n"
        fd = os.open(task.out / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        enc.write(video_file(task.out, task.key, task.codec))
        _remove_other_codecs(task.out, task.key, task.codec)
        return task.key, len(enc), issues
    except Exception as exc:  # a bad video must never stop the step; it is reported instead
        if is_out_of_space(exc):  # ... but a full disk is no fault of the video: stop
            raise
        return task.key, 0, [("error", _describe(exc))]


def _read_log(path: Path) -> dict[str, list]:
    """Issues of each logged video (last line wins; a torn last line is ignored)."""
    logged: dict[str, list] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            logged[rec["video"]] = [tuple(i) for i in rec["issues"]]
    return logged


def _is_complete(path: Path, size: tuple[int, int]) -> bool:
    try:
        h = read_header(path)
    except (OSError, ValueError):
        return False
    return (h["height"], h["width"]) == tuple(size)


def _results(tasks: list[_Task], workers: int, progress: bool) -> Iterator:
    from tqdm import tqdm

    bar = dict(total=len(tasks), unit="video", desc="decode", disable=not progress)
    if workers <= 1 or len(tasks) <= 1:
        yield from tqdm(map(_run_task, tasks), **bar)
    else:
        yield from tqdm(isolated_map(_run_task, tasks, workers, _crashed), **bar)


def _crashed(task: _Task) -> tuple[str, int, list[tuple[str, str]]]:
    return task.key, 0, [("crash", "decoding this video killed the worker process")]


def isolated_map(fn, items: list, workers: int, on_crash) -> Iterator:
    """Yield fn(item) computed in `workers` processes, in completion order. An item whose call
    kills its process (e.g. a decoder segfault) yields on_crash(item) instead: the unfinished
    items are bisected over fresh pools until the culprit runs alone."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    # spawn: the parent may hold torch/OpenMP threads, which fork would copy in a broken state.
    ctx, batches = mp.get_context("spawn"), [list(items)]
    while batches:
        batch = batches.pop()
        done: set[int] = set()
        pool = ProcessPoolExecutor(min(workers, len(batch)), mp_context=ctx)
        try:
            futures = {pool.submit(fn, item): i for i, item in enumerate(batch)}
            for future in as_completed(futures):
                result = future.result()
                done.add(futures[future])
                yield result
        except BrokenProcessPool:
            left = [item for i, item in enumerate(batch) if i not in done]
            if len(left) == 1:
                yield on_crash(left[0])
            else:
                batches += [left[len(left) // 2 :], left[: len(left) // 2]]
        finally:  # on an interrupt, do not wait for the queued videos
            pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class Summary:
    decoded: int  # stored by this run
    skipped: int  # already complete in the store
    failed: int  # not in the store (see failures.csv)
    with_issues: int  # stored, but listed in failures.csv (truncated, metadata)
    index: Path
    failures: Path


def build_store(
    videos_root: str | Path,
    videos: Iterable[str],
    out: str | Path,
    *,
    size: tuple[int, int],
    codec: str,
    jpeg_quality: int = 90,
    min_frames: int = 2,
    workers: int = 1,
    progress: bool = True,
) -> Summary:
    """Decode every video (manifest paths under `videos_root`) not yet stored into `out`."""
    if codec not in CODECS:
        raise UserError(f"frames.codec {codec!r} is unknown; use one of {', '.join(CODECS)}")
    videos_root, out, size = Path(videos_root), Path(out), (int(size[0]), int(size[1]))
    videos = list(dict.fromkeys(videos))
    keys = [video_key(v) for v in videos]
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, recursive=True)  # left by a killed run
    tasks, skipped = [], []
    for video, key in zip(videos, keys, strict=True):
        if _is_complete(video_file(out, key, codec), size):
            skipped.append(key)
        else:
            tasks.append(
                _Task(key, videos_root / video, out, size, codec, jpeg_quality, min_frames)
            )
    if tasks:  # the index no longer describes the store until this run rewrites it
        (out / "index.csv").unlink(missing_ok=True)
    results = {}
    try:
        for key, n, issues in _results(tasks, workers, progress):
            results[key] = (n, issues)
    except Exception as exc:
        if is_out_of_space(exc):
            raise _store_full(out, keys, codec, exc) from exc
        raise

    logged = _read_log(out / LOG_NAME)
    rows = []
    for key in keys:
        if key in results:
            n, issues = results[key]
        else:  # skipped: stored by an earlier run, whose issues are in the log
            n, issues = 1, logged.get(key, [])
        status = "kept" if n else "excluded"
        rows += [[key, reason, status, detail] for reason, detail in issues]
    failures = pd.DataFrame(rows, columns=FAILURE_COLUMNS)
    with atomic_path(out / "failures.csv") as tmp:
        failures.to_csv(tmp, index=False)
    index = write_index(out, keys, codec)
    failed = len(keys) - len(index)
    summary = Summary(
        decoded=len(index) - len(skipped),
        skipped=len(skipped),
        failed=failed,
        with_issues=failures.loc[failures.status == "kept", "video"].nunique(),
        index=out / "index.csv",
        failures=out / "failures.csv",
    )
    if keys and not len(index):
        raise UserError(f"no video could be decoded (all {failed} failed); see {summary.failures}")
    return summary


def _store_full(out: Path, keys: list[str], codec: str, exc: BaseException) -> UserError:
    """The step's one error for a full disk: what is stored, and about how much more the videos
    not yet stored need (at the mean size of the stored ones)."""
    files = (video_file(out, key, codec) for key in keys)
    sizes = [f.stat().st_size for f in files if f.is_file()]
    missing = len(keys) - len(sizes)
    needed = int(np.mean(sizes) * missing) if sizes else None
    base = out_of_space(
        getattr(exc, "path", None) or out, needed, exc, f"for the {missing} videos not stored"
    )
    return type(base)(
        f"{base} The frame store {out} holds {len(sizes)} of {len(keys)} videos; it has no "
        "index.csv until a run finishes.",
        base.path,
        base.errno,
    )


# ------------------------------------------------------------------------------------------ CLI
def manifest_videos(manifests: Path) -> list[str]:
    """The union of the `video` column of every split*.csv in `manifests` (first-seen order)."""
    files = sorted(Path(manifests).glob("split*.csv"))
    if not files:
        raise UserError(f"no split*.csv in {manifests}: run `iicrepro splits DATASET` first")
    videos: dict[str, None] = {}
    for f in files:
        df = pd.read_csv(f, dtype=str, keep_default_na=False)
        if "video" not in df.columns:
            raise UserError(f"{f} has no 'video' column; rebuild it with `iicrepro splits`")
        videos |= dict.fromkeys(df["video"])
    return list(videos)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="dataset name, e.g. ucf101, hmdb51, synthetic")
    parser.add_argument("--videos", type=Path, help="video root (default: the extracted dataset)")
    parser.add_argument("--manifests", type=Path, help="folder of split*.csv (default: layout)")
    parser.add_argument("--out", type=Path, help="frame store folder (default: layout)")
    parser.add_argument("--workers", type=int, help="decode processes (default: frames.workers)")


def main(args: argparse.Namespace) -> int:
    from iicrepro import layout
    from iicrepro.cli import settings_from_args

    settings = settings_from_args(args)
    cfg = settings.frames
    if args.videos is None:
        from iicrepro.data.sources import video_root

        args.videos = video_root(settings, args.dataset)
    if not Path(args.videos).is_dir():
        raise UserError(
            f"video folder {args.videos} not found: run `iicrepro extract {args.dataset}` "
            "or pass --videos"
        )
    videos = manifest_videos(args.manifests or layout.manifests(settings, args.dataset))
    summary = build_store(
        args.videos,
        videos,
        args.out or layout.frame_store(settings, args.dataset),
        size=tuple(cfg.size),
        codec=cfg.codec,
        jpeg_quality=cfg.jpeg_quality,
        min_frames=cfg.min_frames,
        workers=args.workers or cfg.workers,
    )
    print(
        f"frames {args.dataset}: decoded {summary.decoded}, already stored {summary.skipped}, "
        f"failed {summary.failed} (see {summary.failures}); "
        f"{summary.with_issues} stored with issues listed there"
    )
    return 0
