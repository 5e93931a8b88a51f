"""The synthetic motion dataset: rendering, real .avi files, UCF101-format splits, archives."""

from __future__ import annotations

import hashlib
import math
import re
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from iicrepro import cli, config
from iicrepro.data import splits, synthetic
from iicrepro.errors import UserError

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TINY = ["synthetic.groups=2", "synthetic.videos_per_group=2", "synthetic.test_groups=1"]
SIZE = {"width": 48, "height": 48, "frames": 17}


def object_mask(frame: np.ndarray) -> np.ndarray:
    """Object pixels: yellow and dark blue have R far from B, the grey background has R == B."""
    return np.abs(frame[..., 0].astype(int) - frame[..., 2].astype(int)) > 40


def centroids(video: np.ndarray) -> list[tuple[float, float] | None]:
    """(x, y) of the object per frame, None where it is hidden or touches the border."""
    out = []
    for frame in video:
        m = object_mask(frame)
        border = m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()
        ys, xs = np.nonzero(m)
        out.append(None if border or len(xs) == 0 else (xs.mean() + 0.5, ys.mean() + 0.5))
    return out


def orientation(frame: np.ndarray) -> float:
    """Long-axis angle from the mask's second moments; increasing = clockwise (y points down)."""
    ys, xs = np.nonzero(object_mask(frame))
    x, y = xs - xs.mean(), ys - ys.mean()
    return 0.5 * math.atan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean())


def render(kind: str, seed: int, **size):
    rng = np.random.default_rng(seed)
    size = {**SIZE, **size}
    appearance = synthetic.sample_appearance(rng, size["width"], size["height"])
    motion = synthetic.sample_motion(kind, rng, size["width"], size["height"])
    video = synthetic.draw(appearance, motion, rng, noise=0.0, **size)
    return appearance, motion, video


@pytest.mark.parametrize(
    ("kind", "direction"), [("right", (1, 0)), ("left", (-1, 0)), ("down", (0, 1)), ("up", (0, -1))]
)
def test_translation_moves_by_the_configured_speed(kind, direction):
    for seed in range(3):
        _, motion, video = render(kind, seed)
        assert 1.2 <= motion.rate <= 2.0
        track = [(t, p) for t, p in enumerate(centroids(video)) if p is not None and 4 <= t <= 12]
        assert len(track) >= 5
        ts, pts = zip(*track, strict=True)
        step = np.polyfit(ts, np.array(pts), 1)[0]  # (dx, dy) per frame
        assert step @ np.array(direction) == pytest.approx(motion.rate, abs=0.15)
        assert abs(step @ np.array(direction[::-1])) < 0.15  # no drift across the motion


def test_geometry_scales_with_frame_size():
    small, motion_small, _ = render("right", 5, frames=3)
    big, motion_big, video = render("right", 5, frames=3, width=96, height=96)
    assert big.half_length == pytest.approx(2 * small.half_length)
    assert motion_big.rate == pytest.approx(2 * motion_small.rate)
    assert big.center == pytest.approx((2 * small.center[0], 2 * small.center[1]))
    assert video.shape == (3, 96, 96, 3)


@pytest.mark.parametrize(("kind", "sign"), [("rotate_cw", 1), ("rotate_ccw", -1)])
def test_rotation_direction_and_rate(kind, sign):
    _, motion, video = render(kind, 1)
    turns = np.diff([orientation(f) for f in video[6:11]])
    turns = (turns + math.pi / 2) % math.pi - math.pi / 2  # axis angles are defined modulo pi
    assert 0.15 <= motion.rate <= 0.30
    assert np.mean(turns) == pytest.approx(sign * motion.rate, abs=0.04)


@pytest.mark.parametrize(("kind", "grows"), [("zoom_in", True), ("zoom_out", False)])
def test_zoom_changes_the_area_by_the_factor_squared(kind, grows):
    _, motion, video = render(kind, 2)
    areas = [object_mask(f).sum() for f in video[6:11]]
    ratio = (areas[-1] / areas[0]) ** (1 / 8)  # per-frame linear factor over 4 frames
    expected = motion.rate if grows else 1 / motion.rate
    assert ratio == pytest.approx(expected, abs=0.01)


def test_oscillation_and_blink():
    a, motion, video = render("oscillate", 3)
    xs = np.array([p[0] if p else np.nan for p in centroids(video)])
    mid = (len(video) - 1) / 2
    want = [a.center[0] + synthetic.pose(motion, t - mid)[0] for t in range(len(video))]
    ok = ~np.isnan(xs)
    assert ok.sum() >= 10 and np.abs(xs[ok] - np.array(want)[ok]).max() < 0.4

    a, motion, video = render("blink", 4)
    visible = np.array([object_mask(f).any() for f in video])
    assert 0.3 < visible.mean() < 0.8 and not visible.all()
    background = video[~visible]
    assert (background == background[0]).all()  # hidden frames show the bare background
    pts = [p for p in centroids(video) if p is not None]
    assert np.ptp(np.array(pts), axis=0).max() < 0.05  # blinks in place


def test_appearance_is_drawn_independently_of_the_class():
    # The same stream gives the same object at mid-video whatever the motion: the class is only
    # in how the object moves.
    still = ["right", "left", "down", "up", "rotate_cw", "rotate_ccw", "zoom_in", "zoom_out"]
    for seed in range(3):
        mids = [
            synthetic.render_video(k, np.random.default_rng(seed), noise=0.0, **SIZE)[8]
            for k in still
        ]
        assert all((m == mids[0]).all() for m in mids)
        assert object_mask(mids[0]).sum() > 50


def test_render_is_deterministic_and_noisy():
    a = synthetic.render_video("up", synthetic.video_rng(0, "up", 1, 1), noise=0.005, **SIZE)
    b = synthetic.render_video("up", synthetic.video_rng(0, "up", 1, 1), noise=0.005, **SIZE)
    c = synthetic.render_video("up", synthetic.video_rng(0, "up", 1, 2), noise=0.005, **SIZE)
    assert a.dtype == np.uint8 and a.shape == (17, 48, 48, 3)
    assert (a == b).all() and not (a == c).all()
    clean = synthetic.render_video("up", synthetic.video_rng(0, "up", 1, 1), noise=0.0, **SIZE)
    assert 0.2 < np.abs(a.astype(int) - clean).mean() < 2  # sigma 0.005 = 1.3 grey levels


def test_split_files_rotate_test_groups():
    assert synthetic.tested_groups(1, 8, 3) == [1, 2, 3]
    assert synthetic.tested_groups(2, 8, 3) == [4, 5, 6]
    assert synthetic.tested_groups(3, 8, 3) == [7, 8, 1]
    files = synthetic.split_files(
        {"classes": ["right", "rotate_ccw"], "groups": 4, "videos_per_group": 2, "test_groups": 1}
    )
    assert files["classInd.txt"] == "1 Right\r\n2 RotateCCW\r\n"
    assert files["trainlist01.txt"].startswith("Right/v_Right_g02_c01.avi 1\r\n")
    assert "RotateCCW/v_RotateCCW_g04_c02.avi 2\r\n" in files["trainlist01.txt"]
    assert files["testlist02.txt"] == "".join(
        f"{c}/v_{c}_g02_c0{i}.avi\r\n" for c in ("Right", "RotateCCW") for i in (1, 2)
    )


def test_invalid_settings():
    base = {"classes": ["right", "left"], "groups": 2, "test_groups": 2}
    with pytest.raises(UserError, match="test_groups"):
        synthetic.generate(base, Path("unused"))


def tiny_settings(seed: int):
    return config.load(PARAMS, "demo", [*TINY, f"synthetic.seed={seed}"]).synthetic


def decode(data: bytes) -> tuple[np.ndarray, object]:
    import io

    import av

    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        info = (stream.codec_context.name, stream.codec_context.codec_tag, stream.average_rate)
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)]), info


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Seed 0 through the CLI (1 worker) and through generate (2 workers), and seed 1."""
    root = tmp_path_factory.mktemp("synthetic")
    argv = ["synthesize", "--params", str(PARAMS), "--preset", "demo", "--out", str(root / "a")]
    argv += [a for t in TINY for a in ("--set", t)] + ["--workers", "1"]
    assert cli.main(argv) == 0
    assert synthetic.generate(tiny_settings(0), root / "b", workers=2)
    assert synthetic.generate(tiny_settings(1), root / "c", workers=1)
    return root, argv


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def test_same_seed_gives_identical_archives_and_frames(datasets):
    root, _ = datasets
    for name in (synthetic.VIDEOS_ZIP, synthetic.SPLITS_ZIP, "SHA256SUMS"):
        assert (root / "a" / name).read_bytes() == (root / "b" / name).read_bytes()
    a, c = members(root / "a" / synthetic.VIDEOS_ZIP), members(root / "c" / synthetic.VIDEOS_ZIP)
    assert sorted(a) == sorted(c)
    name = "SyntheticMotion/ZoomIn/v_ZoomIn_g02_c01.avi"
    frames_a, _ = decode(a[name])
    frames_b, _ = decode(members(root / "b" / synthetic.VIDEOS_ZIP)[name])
    frames_c, _ = decode(c[name])
    assert (frames_a == frames_b).all()
    assert np.abs(frames_a.astype(int) - frames_c).mean() > 1  # another seed, another video
    assert (root / "a" / synthetic.VIDEOS_ZIP).read_bytes() != (
        root / "c" / synthetic.VIDEOS_ZIP
    ).read_bytes()


def test_archive_layout_and_checksums(datasets):
    root, _ = datasets
    videos = members(root / "a" / synthetic.VIDEOS_ZIP)
    assert list(videos) == sorted(videos)
    pattern = re.compile(r"^SyntheticMotion/(\w+)/v_(\w+)_g0[12]_c0[12]\.avi$")
    per_class = Counter()
    for name in videos:
        m = pattern.match(name)
        assert m and m[1] == m[2], name
        per_class[m[1]] += 1
    assert per_class == {c: 4 for c in synthetic.CLASS_NAMES.values()}  # balanced
    lists = members(root / "a" / synthetic.SPLITS_ZIP)
    assert sorted(lists) == sorted(
        f"synthTrainTestlist/{f}"
        for f in ["classInd.txt"]
        + [f"{k}list0{s}.txt" for k in ("train", "test") for s in (1, 2, 3)]
    )
    for text in lists.values():
        assert text.endswith(b"\r\n") and b"\n" not in text.replace(b"\r\n", b"")
    sums = (root / "a" / "SHA256SUMS").read_text().splitlines()
    for line in sums:
        digest, name = line.split("  ")
        assert hashlib.sha256((root / "a" / name).read_bytes()).hexdigest() == digest
    assert len(sums) == 2


def test_videos_are_ucf101_like_and_close_to_the_render(datasets):
    root, _ = datasets
    s = tiny_settings(0)
    data = members(root / "a" / synthetic.VIDEOS_ZIP)["SyntheticMotion/Left/v_Left_g01_c02.avi"]
    frames, (codec, tag, fps) = decode(data)
    assert (codec, tag, fps) == ("mpeg4", "XVID", s.fps)
    rendered = synthetic.render_video(
        "left",
        synthetic.video_rng(0, "left", 1, 2),
        width=s.width,
        height=s.height,
        frames=s.frames,
        noise=s.noise,
    )
    assert frames.shape == rendered.shape == (17, 48, 48, 3)
    # yuv420p halves the chroma resolution of the two-colour texture; luma is near lossless
    assert np.abs(frames.astype(int) - rendered).mean() < 8


def test_splits_parse_with_the_ucf101_parser(datasets, tmp_path):
    root, _ = datasets
    for name in (synthetic.SPLITS_ZIP, synthetic.VIDEOS_ZIP):
        with zipfile.ZipFile(root / "a" / name) as zf:
            zf.extractall(tmp_path / "x")
    parsed = splits.build(
        "synthetic", tmp_path / "x", tmp_path / "manifests", tmp_path / "x" / "SyntheticMotion"
    )
    assert parsed.classes == list(synthetic.CLASS_NAMES.values())
    for s, tested in {1: "g01", 2: "g02", 3: "g01"}.items():
        train, test = parsed.subset(s, "train"), parsed.subset(s, "test")
        assert len(train) == len(test) == 20
        assert all(f"_{tested}_" in e.video for e in test)
        assert not any(f"_{tested}_" in e.video for e in train)
        assert Counter(e.label for e in train) == {i: 2 for i in range(10)}
    assert (tmp_path / "manifests" / "split3.csv").is_file()


def test_frame_zero_brightness_does_not_identify_the_class(datasets):
    root, _ = datasets
    means = {}
    for name, data in members(root / "a" / synthetic.VIDEOS_ZIP).items():
        frames, _ = decode(data)
        means.setdefault(name.split("/")[1], []).append(frames[0].mean())
    per_class = np.array([np.mean(v) for v in means.values()])
    assert np.ptp(per_class) < 3  # grey levels; the object is ~10 % of a frame


def test_regeneration_is_skipped_until_something_changes(datasets, capsys):
    root, argv = datasets
    before = (root / "a" / synthetic.VIDEOS_ZIP).stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert (root / "a" / synthetic.VIDEOS_ZIP).stat().st_mtime_ns == before
    assert synthetic.up_to_date(root / "a", tiny_settings(0))
    assert not synthetic.up_to_date(root / "a", tiny_settings(1))  # other settings
    (root / "c" / synthetic.SPLITS_ZIP).write_bytes(b"damaged")
    assert not synthetic.up_to_date(root / "c", tiny_settings(1))  # checksum mismatch


def shortcut_colours(spread: float, videos: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """(colour vectors, class labels) of `videos` videos per class, as generate() draws them."""
    feats, labels = [], []
    for label, kind in enumerate(synthetic.CLASS_NAMES):
        for v in range(videos):
            rng = synthetic.video_rng(0, kind, 1 + v // 10, 1 + v % 10, stream=1)
            c = synthetic.sample_colours(rng, spread)
            feats.append(np.concatenate([c.first, c.second, c.background]))
            labels.append(label)
    return np.array(feats), np.array(labels)


def test_shortcut_colours_identify_the_video_but_not_its_class():
    feats, labels = shortcut_colours(1.0)
    dist = np.abs(feats[:, None] - feats[None]).max(axis=2)
    np.fill_diagonal(dist, np.inf)
    assert dist.min() > 0.01  # every video has its own colours
    # Leave-one-out nearest neighbour on the colours: chance (10 %) for the class...
    nearest = labels[dist.argmin(axis=1)]
    assert (nearest == labels).mean() < 0.2
    # ...while object, texture and background stay apart, so the motion stays visible.
    first, second, background = feats[:, :3], feats[:, 3:6], feats[:, 6:]
    for a, b in ((first, background), (second, background), (first, second)):
        assert np.abs(a - b).max(axis=1).min() >= synthetic.MIN_CONTRAST
    # spread 0 is dataset C; a smaller spread keeps the colours near the fixed ones
    assert synthetic.sample_colours(np.random.default_rng(0), 0.0) == synthetic.FIXED_COLOURS
    half, _ = shortcut_colours(0.3, videos=3)
    fixed = np.concatenate([synthetic.YELLOW, synthetic.DARK_BLUE, [synthetic.BACKGROUND] * 3])
    assert np.abs(half - fixed).max() <= 0.3 * 0.9 + 1e-9


def test_shortcut_changes_the_colours_and_nothing_else():
    kw = {**SIZE, "noise": 0.0}
    plain = synthetic.render_video("rotate_cw", synthetic.video_rng(0, "rotate_cw", 1, 1), **kw)
    colours = synthetic.sample_colours(synthetic.video_rng(0, "rotate_cw", 1, 1, stream=1), 1.0)
    shortcut = synthetic.render_video(
        "rotate_cw", synthetic.video_rng(0, "rotate_cw", 1, 1), colours=colours, **kw
    )
    # The same object in the same place in every frame (pixels off the background), new colours.
    ramp = synthetic.RAMP * (2 * (np.arange(48) + 0.5) / 48 - 1)

    def off_background(video, background):
        expected = np.rint((np.array(background)[None, :] + ramp[:, None]) * 255)
        return np.abs(video.astype(int) - expected[None, None]).max(axis=3) > 20

    mask = off_background(plain, synthetic.FIXED_COLOURS.background)
    assert mask.sum() > 1000
    assert (mask == off_background(shortcut, colours.background)).mean() > 0.97
    assert np.abs(plain.astype(int) - shortcut).mean() > 20


def test_shortcut_setting_reaches_the_archives(datasets, tmp_path):
    root, _ = datasets
    s = config.load(PARAMS, "demo", [*TINY, "synthetic.shortcut=1.0"]).synthetic
    assert synthetic.generate(s, tmp_path / "shortcut", workers=1)
    assert not synthetic.up_to_date(tmp_path / "shortcut", tiny_settings(0))
    a = members(root / "a" / synthetic.VIDEOS_ZIP)
    b = members(tmp_path / "shortcut" / synthetic.VIDEOS_ZIP)
    name = "SyntheticMotion/Up/v_Up_g01_c01.avi"
    plain, _ = decode(a[name])
    coloured, _ = decode(b[name])
    assert np.abs(plain.astype(int) - coloured).mean() > 10
    with pytest.raises(config.ConfigError, match="synthetic.shortcut"):
        config.load(PARAMS, "demo", ["synthetic.shortcut=2"])
