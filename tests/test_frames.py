"""Frame store: decode real tiny videos once, read frame windows back, report damaged videos."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from videos import (
    broken_metadata_copy,
    decode_resized,
    moving_pattern,
    truncated_copy,
    write_video,
)

from iicrepro import cli
from iicrepro.data import frames
from iicrepro.data.frames import FrameStore, build_store, save_frames, usable, write_index
from iicrepro.errors import UserError
from iicrepro.io import OutOfSpace

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
SIZE = (24, 32)  # H, W of the stored frames (videos are 48 x 64)
GOOD = ["ClassA/v_a1.avi", "ClassB/v_b1.mp4"]


@pytest.fixture
def videos(tmp_path) -> Path:
    root = tmp_path / "videos"
    write_video(root / GOOD[0], moving_pattern(20, 48, 64, seed=0))
    write_video(root / GOOD[1], moving_pattern(20, 48, 64, seed=1))
    return root


def build(root, videos, out, **kw):
    opts = dict(size=SIZE, codec="raw", min_frames=17, progress=False) | kw
    return build_store(root, videos, out, **opts)


def stats(out: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (out / "videos").rglob("*.*")}


def test_raw_store_equals_pyav_decode(videos, tmp_path):
    out = tmp_path / "store"
    summary = build(videos, GOOD, out)
    assert (summary.decoded, summary.skipped, summary.failed) == (2, 0, 0)
    assert sorted(p.relative_to(out) for p in (out / "videos").rglob("*") if p.is_file()) == [
        Path("videos/ClassA/v_a1.npy"),
        Path("videos/ClassB/v_b1.npy"),
    ]  # one file per video
    store = FrameStore(out)
    assert sorted(store.keys()) == ["ClassA/v_a1", "ClassB/v_b1"]
    for video in GOOD:
        key = frames.video_key(video)
        ref = decode_resized(videos / video, *SIZE)
        assert store.num_frames(key) == len(ref) == 20
        np.testing.assert_array_equal(store.read_all(key), ref)
        np.testing.assert_array_equal(store.read(key, 5, 7), ref[5:12])
    index = pd.read_csv(out / "index.csv")
    assert list(index.columns) == frames.INDEX_COLUMNS
    row = index.set_index("video").loc["ClassB/v_b1"]
    assert (row.frames, row.height, row.width, row.codec) == (20, 24, 32, "raw")
    assert row.bytes == (out / "videos/ClassB/v_b1.npy").stat().st_size


def test_jpeg_store_is_one_indexed_file_close_to_decode(videos, tmp_path):
    out = tmp_path / "store"
    build(videos, GOOD, out, codec="jpeg", jpeg_quality=90)
    path = out / "videos/ClassA/v_a1.jpgs"
    with open(path, "rb") as f:
        assert f.readline() == frames.MAGIC
        header = json.loads(f.readline())
        data_start = f.tell()
    assert header["frames"] == 20 and len(header["offsets"]) == 21
    assert data_start + header["offsets"][-1] == path.stat().st_size
    store = FrameStore(out)
    ref = decode_resized(videos / GOOD[0], *SIZE).astype(int)
    window = store.read("ClassA/v_a1", 13, 7)
    assert window.shape == (7, 24, 32, 3) and window.dtype == np.uint8
    err = np.abs(window.astype(int) - ref[13:20]).mean()
    assert err < 4, err  # JPEG q90 on smooth content
    # and it is the requested window: the neighbouring one is much further away
    assert np.abs(window.astype(int) - ref[12:19]).mean() > 2 * err


@pytest.mark.parametrize("codec", ["raw", "jpeg"])
def test_save_frames_gray_roundtrip(tmp_path, codec):
    gray = moving_pattern(6, 16, 24)[..., 0]  # (T, H, W): a flow component
    save_frames(tmp_path, "ClassA/v_x", gray, codec)
    index = write_index(tmp_path, ["ClassA/v_x", "ClassA/absent"], codec)
    assert index.video.tolist() == ["ClassA/v_x"]
    got = FrameStore(tmp_path).read("ClassA/v_x", 1, 4)
    assert got.shape == (4, 16, 24, 1)
    tol = 0 if codec == "raw" else 4
    assert np.abs(got[..., 0].astype(int) - gray[1:5]).mean() <= tol


def test_resume_skips_complete_files(videos, tmp_path):
    out = tmp_path / "store"
    build(videos, GOOD, out, codec="jpeg")
    before = stats(out)
    summary = build(videos, GOOD, out, codec="jpeg")
    assert (summary.decoded, summary.skipped) == (0, 2)
    assert stats(out) == before  # nothing rewritten

    (out / "videos/ClassB/v_b1.jpgs").unlink()  # e.g. interrupted before this file was renamed
    summary = build(videos, GOOD, out, codec="jpeg")
    assert (summary.decoded, summary.skipped) == (1, 1)
    assert stats(out)[out / "videos/ClassA/v_a1.jpgs"] == before[out / "videos/ClassA/v_a1.jpgs"]
    assert len(FrameStore(out)) == 2

    summary = build(videos, GOOD, out, codec="jpeg", size=(16, 24))  # new size: decode again
    assert (summary.decoded, summary.skipped) == (2, 0)
    assert FrameStore(out).read("ClassA/v_a1", 0, 1).shape == (1, 16, 24, 3)


def test_damaged_videos_are_reported_and_the_rest_is_stored(tmp_path):
    root, src = tmp_path / "videos", tmp_path / "src"
    write_video(root / "A/v_good.avi", moving_pattern(30, 48, 64, seed=2))
    full = write_video(src / "long.avi", moving_pattern(60, 48, 64, seed=3))
    truncated_copy(full, root / "A/v_cut_kept.avi", keep_frames=40)
    truncated_copy(full, root / "A/v_cut_short.avi", keep_frames=8)
    broken_metadata_copy(
        write_video(src / "meta.avi", moving_pattern(20, 48, 64)), root / "B/v_meta.avi"
    )
    (root / "B/v_junk.avi").write_bytes(np.random.default_rng(0).bytes(3000))
    write_video(root / "B/v_short.avi", moving_pattern(10, 48, 64))
    names = ["v_good", "v_cut_kept", "v_cut_short", "v_meta", "v_junk", "v_short", "v_missing"]
    manifest = [f"{'A' if n in names[:3] else 'B'}/{n}.avi" for n in names]
    out = tmp_path / "store"

    summary = build(root, manifest, out)

    store = FrameStore(out)
    assert sorted(store.keys()) == ["A/v_cut_kept", "A/v_good", "B/v_meta"]
    assert (summary.decoded, summary.failed, summary.with_issues) == (3, 4, 2)
    fails = pd.read_csv(out / "failures.csv")
    assert list(fails.columns) == frames.FAILURE_COLUMNS
    got = {(v.split("/")[1], r, s) for v, r, s in fails[["video", "reason", "status"]].values}
    assert got == {
        ("v_cut_kept", "truncated", "kept"),
        ("v_cut_short", "truncated", "excluded"),
        ("v_cut_short", "too_short", "excluded"),
        ("v_meta", "metadata", "kept"),
        ("v_junk", "unreadable", "excluded"),
        ("v_short", "too_short", "excluded"),
        ("v_missing", "missing", "excluded"),
    }
    # the kept part of a truncated file: consecutive, undamaged frames from the start
    assert store.num_frames("A/v_cut_kept") == 40
    np.testing.assert_array_equal(store.read_all("A/v_cut_kept"), decode_resized(full, *SIZE)[:40])
    np.testing.assert_array_equal(
        store.read_all("B/v_meta"), decode_resized(src / "meta.avi", *SIZE)
    )

    # a resumed run keeps the issues of stored videos and retries the excluded ones
    again = build(root, manifest, out)
    assert (again.decoded, again.skipped, again.failed) == (0, 3, 4)
    pd.testing.assert_frame_equal(pd.read_csv(out / "failures.csv"), fails)


def test_cli_decodes_union_of_manifests_and_reports(videos, tmp_path, capsys):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    rows = [(GOOD[0], "ClassA", 0, "train"), (GOOD[1], "ClassB", 1, "test")]
    cols = ["video", "class", "label", "subset"]
    pd.DataFrame(rows, columns=cols).to_csv(manifests / "split1.csv", index=False)
    rows2 = [*rows, ("ClassB/v_gone.avi", "ClassB", 1, "train")]
    pd.DataFrame(rows2, columns=cols).to_csv(manifests / "split2.csv", index=False)
    out = tmp_path / "store"
    argv = ["frames", "synthetic", "--params", str(PARAMS), "--set", "frames.size=[24, 32]"]
    argv += ["--set", "frames.codec=jpeg", "--videos", str(videos)]
    argv += ["--manifests", str(manifests), "--out", str(out), "--workers", "2"]

    assert cli.main(argv) == 0

    printed = capsys.readouterr().out
    assert "decoded 2, already stored 0, failed 1" in printed and "failures.csv" in printed
    index = pd.read_csv(out / "index.csv")
    assert index.video.tolist() == ["ClassA/v_a1", "ClassB/v_b1"]
    assert set(index.codec) == {"jpeg"} and set(index.height) == {24}
    assert pd.read_csv(out / "failures.csv").reason.tolist() == ["missing"]


def test_nothing_decodable_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no video could be decoded"):
        build(tmp_path, ["A/v_none.avi"], tmp_path / "store")
    assert pd.read_csv(tmp_path / "store/failures.csv").reason.tolist() == ["missing"]


def test_usable_excludes_failed_and_short_videos(videos, tmp_path, caplog):
    out = tmp_path / "store"
    build(videos, GOOD, out)
    store = FrameStore(out)
    manifest = pd.DataFrame(
        {"video": [GOOD[0], "ClassA/v_failed.avi", GOOD[1]], "label": [0, 0, 1]}
    )
    with caplog.at_level(logging.WARNING):
        kept, excluded = usable(manifest, store, min_frames=17)
    assert kept.video.tolist() == [GOOD[0], GOOD[1]] and kept.index.tolist() == [0, 1]
    assert excluded.video.tolist() == ["ClassA/v_failed.avi"]
    assert "1 of 3 videos excluded" in caplog.text and "failures.csv" in caplog.text
    kept, excluded = usable(manifest, store, min_frames=21)  # 20-frame videos are too short
    assert kept.empty and len(excluded) == 3


def test_store_read_errors(videos, tmp_path):
    with pytest.raises(UserError, match="iicrepro frames"):
        FrameStore(tmp_path / "nothing")
    build(videos, GOOD, tmp_path / "store")
    store = FrameStore(tmp_path / "store")
    with pytest.raises(IndexError):
        store.read("ClassA/v_a1", 15, 6)
    with pytest.raises(KeyError, match="not in the frame store"):
        store.read("ClassA/v_zz", 0, 1)


def _die_on_three(x: int) -> int:
    if x == 3:
        os._exit(7)  # like a decoder segfault
    return 10 * x


def test_isolated_map_reports_the_item_that_kills_its_process():
    got = list(frames.isolated_map(_die_on_three, [1, 3, 2, 4], 2, lambda x: f"crash {x}"))
    assert sorted(got, key=str) == [10, 20, 40, "crash 3"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_stops_the_step_instead_of_failing_each_video(videos, tmp_path, workers):
    # Without a small file system: the decode log (written by each worker before its video's
    # file) is a link to /dev/full, so every worker hits a real ENOSPC.
    out = tmp_path / "store"
    build(videos, GOOD[:1], out)
    assert (out / "index.csv").is_file()
    (out / frames.LOG_NAME).unlink()
    (out / frames.LOG_NAME).symlink_to("/dev/full")
    with pytest.raises(OutOfSpace) as info:
        build(videos, GOOD, out, workers=workers)
    msg = str(info.value)
    assert f"no space left on device writing {out}" in msg and "holds 1 of 2 videos" in msg
    assert "about" in msg and "needed for the 1 videos not stored" in msg  # the mean stored size
    assert not (out / "index.csv").exists()  # nothing lists the unstored video
    assert not (out / "failures.csv").exists() or pd.read_csv(out / "failures.csv").empty
    assert sorted(p.name for p in (out / "videos").rglob("*") if p.is_file()) == ["v_a1.npy"]
