"""Motion-only synthetic dataset as real .avi files in the UCF101 layout (`iicrepro synthesize`).

Dataset "C" of the synthetic recipe (shared notes, synthetic-recipe.md): one textured rectangle per
video on a fixed background; the class is only the motion. Appearance nuisances (orientation, size,
aspect, texture, +-5 px position, phases) are drawn per video before, and independently of, the
motion. The recipe's lengths are px at 48x48 and scale with the frame size; angles, zoom factors
and periods in frames do not.

``synthetic.shortcut`` (0 = dataset C) adds the appearance shortcut that intra-negatives exist to
block: each video draws its own two object colours and background colour from its own random
stream, independently of its class, up to ``shortcut`` of the way from the fixed colours to any
RGB colour. Appearance then identifies a video but says nothing about its motion, so a cross-view
pretext can be solved by colour alone. Geometry and motion stay those of dataset C, video by video.

The output imitates UCF101 so the real pipeline runs on it unchanged (spec 2.1):
``synthetic_videos.zip`` holds ``SyntheticMotion/<Class>/v_<Class>_gXX_cYY.avi`` (mpeg4/XVID),
``synthetic_splits.zip`` holds ``synthTrainTestlist/`` with classInd.txt, trainlist0N.txt and
testlist0N.txt in UCF101's format (CRLF). Split s tests a rotating block of ``test_groups`` groups.
Every video has its own random stream from (seed, class, group, clip), so the archives are
byte-identical for a seed whatever the generation order or the number of workers.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iicrepro.errors import UserError

# settings name -> UCF101-style CamelCase class (folder and file-name token)
CLASS_NAMES = {
    "right": "Right",
    "left": "Left",
    "down": "Down",
    "up": "Up",
    "rotate_cw": "RotateCW",
    "rotate_ccw": "RotateCCW",
    "zoom_in": "ZoomIn",
    "zoom_out": "ZoomOut",
    "oscillate": "Oscillate",
    "blink": "Blink",
}
VIDEO_TOP, SPLIT_TOP = "SyntheticMotion", "synthTrainTestlist"
VIDEOS_ZIP, SPLITS_ZIP = "synthetic_videos.zip", "synthetic_splits.zip"
RECIPE = "synthetic-recipe dataset C, v1"  # change when the rendering changes: forces regeneration

# Recipe, dataset C. Lengths in px at REFERENCE_SIZE x REFERENCE_SIZE.
REFERENCE_SIZE = 48
BACKGROUND, RAMP = 0.5, 0.075  # mid-grey with a fixed horizontal ramp of +-0.075
YELLOW, DARK_BLUE = (0.9, 0.9, 0.15), (0.15, 0.15, 0.6)
HALF_LENGTH, ASPECT, POSITION = (9.0, 12.0), (1.3, 2.0), 5.0
TEXTURE_PERIOD = (3.5, 6.0)
SPEED = (1.2, 2.0)  # px per frame
ANGULAR_SPEED = (0.15, 0.30)  # rad per frame
ZOOM = (1.04, 1.07)  # factor per frame
OSCILLATION_AMPLITUDE, OSCILLATION_PERIOD = (4.0, 7.0), (6.0, 10.0)
BLINK_PERIOD, BLINK_DUTY = (4.0, 8.0), 4 / 7  # visible about 57 % of the time
SUPERSAMPLE = 3  # 3x3 samples per pixel: smooth edges and sub-pixel motion
# Shortcut colours: each object colour differs from the background, and the two from each other,
# by at least this much in some channel, so the object and its texture stay visible.
MIN_CONTRAST = 0.3

# Encoding: UCF101-like mpeg4/XVID in AVI, near-lossless quantiser, short GOP.
QSCALE, GOP = 1, 8  # mpeg4 quantiser (1 = best) and keyframe interval of the .avi files
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Appearance:
    """Per-video nuisances, independent of the class. Lengths in px of the rendered frame."""

    center: tuple[float, float]  # (x, y) at mid-video
    half_length: float
    aspect: float
    angle: float  # orientation at mid-video, rad; increasing = clockwise on screen (y down)
    texture: str  # 'stripes' | 'checker'
    period: float
    texture_angle: float  # stripes only
    phase: tuple[float, float]  # texture phase in periods


@dataclass(frozen=True)
class Colours:
    """The object's two texture colours and the background grey (RGB in [0, 1])."""

    first: tuple[float, float, float] = YELLOW
    second: tuple[float, float, float] = DARK_BLUE
    background: tuple[float, float, float] = (BACKGROUND,) * 3


FIXED_COLOURS = Colours()


@dataclass(frozen=True)
class Motion:
    """The class: how the pose changes with frame offset tau from mid-video."""

    kind: str
    rate: float = 0.0  # px/frame (translations), rad/frame (rotations), factor/frame (zooms)
    amplitude: float = 0.0  # oscillate, px
    period: float = 1.0  # oscillate, blink, frames
    phase: float = 0.0  # oscillate (rad), blink (fraction of a period)


def scale_of(width: int, height: int) -> float:
    return min(width, height) / REFERENCE_SIZE


def sample_appearance(rng: np.random.Generator, width: int, height: int) -> Appearance:
    s = scale_of(width, height)
    cx, cy = np.array([width / 2, height / 2]) + rng.uniform(-POSITION, POSITION, 2) * s
    return Appearance(
        center=(float(cx), float(cy)),
        half_length=rng.uniform(*HALF_LENGTH) * s,
        aspect=rng.uniform(*ASPECT),
        angle=rng.uniform(0, math.pi),
        texture=("stripes", "checker")[rng.integers(2)],
        period=rng.uniform(*TEXTURE_PERIOD) * s,
        texture_angle=rng.uniform(0, math.pi),
        phase=(float(rng.uniform()), float(rng.uniform())),
    )


def sample_colours(rng: np.random.Generator, spread: float) -> Colours:
    """Per-video colours `spread` of the way from the fixed ones to uniform random RGB colours,
    redrawn until object, texture and background differ by MIN_CONTRAST (0 = the fixed colours)."""
    if spread <= 0:
        return FIXED_COLOURS
    base = np.array([YELLOW, DARK_BLUE, FIXED_COLOURS.background])
    for _ in range(1000):
        c = base + spread * (rng.uniform(0.0, 1.0, (3, 3)) - base)
        gaps = [np.abs(c[0] - c[2]).max(), np.abs(c[1] - c[2]).max(), np.abs(c[0] - c[1]).max()]
        if min(gaps) >= MIN_CONTRAST:
            break
    else:  # unreachable for spread in (0, 1]: the fixed colours already differ by > 0.3
        c = base
    first, second, background = (tuple(float(v) for v in row) for row in c)
    return Colours(first, second, background)


def sample_motion(kind: str, rng: np.random.Generator, width: int, height: int) -> Motion:
    s = scale_of(width, height)
    if kind in ("right", "left", "down", "up"):
        return Motion(kind, rate=rng.uniform(*SPEED) * s)
    if kind in ("rotate_cw", "rotate_ccw"):
        return Motion(kind, rate=rng.uniform(*ANGULAR_SPEED))
    if kind in ("zoom_in", "zoom_out"):
        return Motion(kind, rate=rng.uniform(*ZOOM))
    if kind == "oscillate":
        return Motion(
            kind,
            amplitude=rng.uniform(*OSCILLATION_AMPLITUDE) * s,
            period=rng.uniform(*OSCILLATION_PERIOD),
            phase=rng.uniform(0, 2 * math.pi),
        )
    if kind == "blink":
        return Motion(kind, period=rng.uniform(*BLINK_PERIOD), phase=rng.uniform())
    raise UserError(f"unknown synthetic motion {kind!r}; known: {', '.join(CLASS_NAMES)}")


def pose(motion: Motion, tau: float) -> tuple[float, float, float, float, bool]:
    """(dx, dy, dangle, zoom, visible) at frame offset tau from mid-video; image y points down."""
    k, r = motion.kind, motion.rate
    dx = dy = dangle = 0.0
    zoom, visible = 1.0, True
    if k in ("right", "left"):
        dx = r * tau if k == "right" else -r * tau
    elif k in ("down", "up"):
        dy = r * tau if k == "down" else -r * tau
    elif k in ("rotate_cw", "rotate_ccw"):
        dangle = r * tau if k == "rotate_cw" else -r * tau
    elif k in ("zoom_in", "zoom_out"):
        zoom = r**tau if k == "zoom_in" else r**-tau
    elif k == "oscillate":
        dx = motion.amplitude * math.sin(2 * math.pi * tau / motion.period + motion.phase)
    elif k == "blink":
        visible = (tau / motion.period + motion.phase) % 1.0 < BLINK_DUTY
    return dx, dy, dangle, zoom, visible


def _texture(a: Appearance, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """True where the object's own coordinates (u, v) show the first colour."""
    if a.texture == "stripes":
        w = (u * math.cos(a.texture_angle) + v * math.sin(a.texture_angle)) / a.period
        return (w + a.phase[0]) % 1.0 < 0.5
    cells = np.floor(u / a.period + a.phase[0]) + np.floor(v / a.period + a.phase[1])
    return cells % 2 == 0


def draw(
    appearance: Appearance,
    motion: Motion,
    rng: np.random.Generator,
    *,
    width: int,
    height: int,
    frames: int,
    noise: float,
    colours: Colours = FIXED_COLOURS,
) -> np.ndarray:
    """Render one video as uint8 (T, H, W, 3); `rng` supplies the pixel noise only."""
    a, ss = appearance, SUPERSAMPLE
    x = (np.arange(width * ss) + 0.5) / ss
    y = (np.arange(height * ss) + 0.5) / ss
    xx, yy = np.meshgrid(x, y)
    ramp = RAMP * (2 * (np.arange(width) + 0.5) / width - 1)
    background = np.array(colours.background)[None, None, :] + ramp[None, :, None]
    background = np.broadcast_to(background, (height, width, 3))
    yellow, blue = np.array(colours.first), np.array(colours.second)
    mid = (frames - 1) / 2  # all motion is defined around mid-video
    out = np.empty((frames, height, width, 3), np.float64)
    for t in range(frames):
        dx, dy, dangle, zoom, visible = pose(motion, t - mid)
        if not visible:
            out[t] = background
            continue
        cos, sin = math.cos(a.angle + dangle) / zoom, math.sin(a.angle + dangle) / zoom
        px, py = xx - (a.center[0] + dx), yy - (a.center[1] + dy)
        u, v = cos * px + sin * py, cos * py - sin * px  # the object's own coordinates
        inside = (np.abs(u) <= a.half_length) & (np.abs(v) <= a.half_length / a.aspect)
        first = inside & _texture(a, u, v)
        # fraction of each pixel's samples covered by the object / by its first colour
        cover = inside.reshape(height, ss, width, ss).mean(axis=(1, 3))[..., None]
        part = first.reshape(height, ss, width, ss).mean(axis=(1, 3))[..., None]
        out[t] = part * yellow + (cover - part) * blue + (1 - cover) * background
    if noise > 0:
        out += rng.normal(0.0, noise, out.shape)
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def render_video(
    motion: str,
    rng: np.random.Generator,
    *,
    width: int,
    height: int,
    frames: int,
    noise: float,
    colours: Colours = FIXED_COLOURS,
) -> np.ndarray:
    """One video of class `motion` as uint8 (T, H, W, 3); deterministic given `rng`.

    The appearance is drawn first, so it does not depend on the class.
    """
    appearance = sample_appearance(rng, width, height)
    params = sample_motion(motion, rng, width, height)
    return draw(
        appearance, params, rng, width=width, height=height, frames=frames, noise=noise,
        colours=colours,
    )  # fmt: skip


def video_rng(
    seed: int, motion: str, group: int, clip: int, stream: int = 0
) -> np.random.Generator:
    """The random stream of one video, independent of generation order and of the class list.

    Stream 0 draws geometry, motion and noise; stream 1 the shortcut colours, so that turning the
    shortcut on changes a video's colours and nothing else.
    """
    key = (zlib.crc32(motion.encode()), group, clip) + ((stream,) if stream else ())
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def video_name(motion: str, group: int, clip: int) -> str:
    """'<Class>/v_<Class>_gXX_cYY.avi', UCF101's naming (group and clip 1-based)."""
    name = CLASS_NAMES[motion]
    return f"{name}/v_{name}_g{group:02d}_c{clip:02d}.avi"


def write_avi(path: Path, video: np.ndarray, fps: int) -> None:
    """uint8 (T, H, W, 3) -> .avi, mpeg4 with the XVID tag like UCF101, fixed low quantiser,
    area-averaged chroma (the least colour error on the fine two-colour textures), one encoder
    thread (a deterministic bitstream)."""
    from iicrepro.data.videos import write_video

    write_video(
        path, video, fps=fps, gop=GOP, quantiser=QSCALE, chroma_interpolation="AREA", threads=1
    )


def tested_groups(split: int, groups: int, test_groups: int) -> list[int]:
    """1-based groups tested by `split`: a block of `test_groups` shifted per split, wrapping."""
    return [((split - 1) * test_groups + k) % groups + 1 for k in range(test_groups)]


def split_files(synthetic: Any) -> dict[str, str]:
    """File name -> text of UCF101-format split files (CRLF, 1-based labels) for `synthetic`."""
    crlf = "\r\n"
    classes = list(synthetic["classes"])
    files = {
        "classInd.txt": "".join(f"{i} {CLASS_NAMES[c]}{crlf}" for i, c in enumerate(classes, 1))
    }
    for s in (1, 2, 3):
        test = set(tested_groups(s, synthetic["groups"], synthetic["test_groups"]))
        train_lines, test_lines = [], []
        for label, motion in enumerate(classes, 1):
            for g in range(1, synthetic["groups"] + 1):
                for c in range(1, synthetic["videos_per_group"] + 1):
                    name = video_name(motion, g, c)
                    if g in test:
                        test_lines.append(f"{name}{crlf}")
                    else:
                        train_lines.append(f"{name} {label}{crlf}")
        files[f"trainlist0{s}.txt"] = "".join(train_lines)
        files[f"testlist0{s}.txt"] = "".join(test_lines)
    return files


def _render_group(job: tuple[dict, str, int, str]) -> int:
    """Worker: render and write every clip of one (class, group)."""
    synthetic, motion, group, root = job
    for clip in range(1, synthetic["videos_per_group"] + 1):
        rng = video_rng(synthetic["seed"], motion, group, clip)
        colour_rng = video_rng(synthetic["seed"], motion, group, clip, stream=1)
        video = render_video(
            motion,
            rng,
            width=synthetic["width"],
            height=synthetic["height"],
            frames=synthetic["frames"],
            noise=synthetic["noise"],
            colours=sample_colours(colour_rng, synthetic.get("shortcut", 0.0)),
        )
        path = Path(root) / VIDEO_TOP / video_name(motion, group, clip)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_avi(path, video, synthetic["fps"])
    return synthetic["videos_per_group"]


def write_zip(path: Path, members: dict[str, Path | bytes], compress: bool) -> None:
    """A deterministic zip: sorted members, fixed timestamps and permissions; written atomically."""
    from iicrepro.io import atomic_path

    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
            info.create_system = 3  # unix, whatever the host
            info.external_attr = 0o644 << 16
            data = members[name]
            zf.writestr(info, data if isinstance(data, bytes) else data.read_bytes())


def _record(synthetic: Any) -> dict:
    return {"recipe": RECIPE, "settings": {k: synthetic[k] for k in sorted(synthetic)}}


def up_to_date(out: Path, synthetic: Any) -> bool:
    """True when SHA256SUMS and synthetic.json match these settings and the archives."""
    from iicrepro.io import read_json, sha256_file

    sums, record = out / "SHA256SUMS", out / "synthetic.json"
    if not (sums.is_file() and record.is_file()):
        return False
    try:
        if read_json(record) != _record(synthetic):
            return False
    except ValueError:
        return False
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if not (out / name).is_file() or sha256_file(out / name) != digest:
            return False
    return True


def _validate(synthetic: Any) -> None:
    unknown = [c for c in synthetic["classes"] if c not in CLASS_NAMES]
    if unknown:
        raise UserError(f"synthetic.classes: unknown {unknown}; known: {', '.join(CLASS_NAMES)}")
    if synthetic["test_groups"] >= synthetic["groups"]:
        raise UserError(
            f"synthetic.test_groups ({synthetic['test_groups']}) must be smaller than "
            f"synthetic.groups ({synthetic['groups']}), or no group is left for training."
        )


def generate(synthetic: Any, out: Path, *, workers: int = 1, force: bool = False) -> bool:
    """Write the archives, SHA256SUMS and synthetic.json into `out`; False if already up to date."""
    from iicrepro.io import sha256_file, write_json, write_text

    synthetic = {k: synthetic[k] for k in synthetic}
    _validate(synthetic)
    out = Path(out)
    if not force and up_to_date(out, synthetic):
        return False
    out.mkdir(parents=True, exist_ok=True)
    (out / "SHA256SUMS").unlink(missing_ok=True)  # the completion marker goes first, comes last
    work = Path(tempfile.mkdtemp(prefix=".synthesize-", dir=out))
    total = len(synthetic["classes"]) * synthetic["groups"] * synthetic["videos_per_group"]
    try:
        jobs = [
            (synthetic, motion, group, str(work))
            for motion in synthetic["classes"]
            for group in range(1, synthetic["groups"] + 1)
        ]
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                list(pool.map(_render_group, jobs))
        else:
            for job in jobs:
                _render_group(job)
        videos = {p.relative_to(work).as_posix(): p for p in (work / VIDEO_TOP).rglob("*.avi")}
        write_zip(out / VIDEOS_ZIP, videos, compress=False)  # mpeg4 does not deflate further
        lists = {f"{SPLIT_TOP}/{k}": v.encode() for k, v in split_files(synthetic).items()}
        write_zip(out / SPLITS_ZIP, lists, compress=True)
    except Exception as exc:
        if _is_out_of_space(exc):
            raise _out_of_space(out, work, total, exc) from exc
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(out / "synthetic.json", _record(synthetic))
    sums = "".join(f"{sha256_file(out / n)}  {n}\n" for n in (SPLITS_ZIP, VIDEOS_ZIP))
    write_text(out / "SHA256SUMS", sums)
    return True


def _is_out_of_space(exc: BaseException) -> bool:
    from iicrepro.io import is_out_of_space

    return is_out_of_space(exc)


def _out_of_space(out: Path, work: Path, total: int, exc: BaseException) -> Exception:
    """One error for a full disk, with an estimate of the space the dataset needs: the videos
    (at the mean size of those written) twice, as loose files and in the archive."""
    from iicrepro.io import out_of_space

    sizes = [p.stat().st_size for p in work.rglob("*.avi") if p.is_file()]
    needed = int(2 * total * np.mean(sizes)) if sizes else None
    shutil.rmtree(work, ignore_errors=True)  # first: the message reports the free space without it
    return out_of_space(out, needed, exc, f"for {total} videos and their archive")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: <paths.data>/synthetic-source)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="parallel rendering processes (the output does not depend on it)",
    )
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")


def main(args) -> int:
    from iicrepro import layout
    from iicrepro.cli import settings_from_args

    settings = settings_from_args(args)
    out = args.out if args.out is not None else layout.synthetic_source(settings)
    syn = settings.synthetic
    start = time.perf_counter()
    if not generate(syn, out, workers=max(1, args.workers), force=args.force):
        print(f"synthetic dataset in {out} is up to date")
        return 0
    n = len(syn.classes) * syn.groups * syn.videos_per_group
    print(f"wrote {n} videos to {out / VIDEOS_ZIP} in {time.perf_counter() - start:.1f} s")
    return 0
