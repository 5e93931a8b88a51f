"""TV-L1 flow store: known motion gives the right u / v, aligned with the frames; failures are
reported; runs resume; chunks merge; the clip Datasets read the stored components."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from iicrepro import cli
from iicrepro.data import flow
from iicrepro.data.clips import EvalClips, PretrainClips
from iicrepro.data.flow import FlowConfig, compute, dequantize, quantize
from iicrepro.data.frames import FrameStore, save_frames, write_index
from iicrepro.errors import UserError

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
SIZE = 64  # frames are SIZE x SIZE
SQUARE = (20, 44)  # rows / first columns of the square
CFG = FlowConfig(reference_short_side=256)  # OpenCV defaults; scale 256 / 64 = 4


def square_video(shifts: list[int], seed: int = 0) -> np.ndarray:
    """RGB frames of a textured 24x24 square at column offset shifts[t] on a static textured
    background (a flat one gives TV-L1 no data term, so the square's motion spreads into it)."""
    import cv2

    rng = np.random.default_rng(seed)

    def texture(size, lo, hi):
        t = cv2.GaussianBlur(rng.uniform(0, 255, (size, size)).astype(np.float32), (0, 0), 1.0)
        t = (t - t.min()) / (t.max() - t.min())
        return (lo + (hi - lo) * t).astype(np.uint8)[..., None]

    background, square = texture(SIZE, 40, 120), texture(24, 130, 250)
    out = np.repeat(np.repeat(background[None], len(shifts), 0), 3, 3)
    lo, hi = SQUARE
    for t, dx in enumerate(shifts):
        out[t, lo:hi, lo + dx : hi + dx] = square
    return out


def frame_store(root: Path, videos: dict[str, np.ndarray], codec: str = "raw") -> Path:
    for key, frames in videos.items():
        save_frames(root, key, frames, codec)
    write_index(root, list(videos), codec)
    return root


def interior(x: np.ndarray, dx: int = 0) -> np.ndarray:
    """The square's inside, away from its edges, at column offset dx."""
    lo, hi = SQUARE
    return x[..., lo + 4 : hi - 4, lo + dx + 4 : hi + dx - 4]


def test_square_moving_right_gives_positive_u_and_zero_v(tmp_path):
    store = frame_store(tmp_path / "frames", {"Right/v_sq": square_video([0, 2, 4, 6, 8])})
    s = compute(store, tmp_path / "flow", CFG, progress=False)
    assert (s.computed, s.skipped, s.failed) == (1, 0, 0)
    u = FrameStore(tmp_path / "flow/u").read_all("Right/v_sq")[..., 0]
    v = FrameStore(tmp_path / "flow/v").read_all("Right/v_sq")[..., 0]
    assert u.shape == v.shape == (4, SIZE, SIZE)  # T - 1 flow frames
    for k in range(4):
        uk, vk = interior(u[k], 2 * k), interior(v[k], 2 * k)
        assert np.median(uk) > 128 and np.abs(np.median(vk).astype(int) - 128) <= 1
        # 2 px at 64 px = 8 px at the 256 reference: level 128 + 8 * 255 / 40 = 179
        assert abs(np.median(dequantize(uk, 20, 4.0)) - 2.0) < 0.2
        assert abs(np.median(dequantize(vk, 20, 4.0))) < 0.1
    assert np.abs(u[:, :8, :8].astype(int) - 128).max() <= 3  # static background: < 0.12 px


def test_quantisation_round_trips_within_one_level():
    rng = np.random.default_rng(0)
    for scale in (1.0, 2.0, 256 / 48):
        d = rng.uniform(-20 / scale, 20 / scale, 10_000).astype(np.float32)
        q = quantize(d, 20, scale)
        assert q.dtype == np.uint8
        level = 40 / 255 / scale
        assert np.abs(dequantize(q, 20, scale) - d).max() <= level / 2 + 1e-5
    levels = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(quantize(dequantize(levels, 20, 2.0), 20, 2.0), levels)
    np.testing.assert_array_equal(quantize([0.0, 25.0, -25.0, 1e6], 20), [128, 255, 0, 255])
    assert quantize([10.0], 20, 2.0)[0] == 255  # 10 px at half the reference size = the bound


def test_flow_k_lies_between_frames_k_and_k_plus_1(tmp_path):
    shifts = [0, 0, 0, 0, 3, 3, 3, 3]  # moves only between frames 3 and 4
    store = frame_store(tmp_path / "frames", {"A/v_jump": square_video(shifts, seed=1)})
    compute(store, tmp_path / "flow", CFG, progress=False)
    u = FrameStore(tmp_path / "flow/u").read_all("A/v_jump")[..., 0].astype(int)
    assert len(u) == 7
    moved = [np.median(interior(u[k], shifts[k])) - 128 for k in range(7)]
    assert moved[3] > 60  # 3 px at 64 px = 12 reference px = 76 levels
    assert all(abs(m) <= 2 for k, m in enumerate(moved) if k != 3), moved


def test_short_and_unreadable_videos_are_reported_not_fatal(tmp_path):
    videos = {"A/v_good": square_video([0, 2, 4]), "A/v_one": square_video([0])}
    videos["B/v_bad"] = square_video([0, 1, 2])
    store = frame_store(tmp_path / "frames", videos)
    (store / "videos/B/v_bad.npy").write_bytes(b"\x93NUMPY garbage")  # a damaged store entry
    out = tmp_path / "flow"
    s = compute(store, out, CFG, progress=False)
    assert (s.computed, s.failed) == (1, 2)
    fails = pd.read_csv(out / "failures.csv")
    assert list(fails.columns) == ["video", "reason", "status", "detail"]
    got = {(v, r, st) for v, r, st in fails[["video", "reason", "status"]].values}
    assert got == {("A/v_one", "too_short", "excluded"), ("B/v_bad", "unreadable", "excluded")}
    for comp in ("u", "v"):
        assert FrameStore(out / comp).keys() == ["A/v_good"]
    index = pd.read_csv(out / "index.csv")
    assert list(index.columns) == flow.INDEX_COLUMNS
    assert index.values.tolist()[0][:5] == ["A/v_good", 2, SIZE, SIZE, "raw"]
    again = compute(store, out, CFG, progress=False)  # failures are retried and still reported
    assert (again.computed, again.skipped, again.failed) == (0, 1, 2)
    pd.testing.assert_frame_equal(pd.read_csv(out / "failures.csv"), fails)


def test_nothing_computable_is_an_error(tmp_path):
    store = frame_store(tmp_path / "frames", {"A/v_one": square_video([0])})
    with pytest.raises(UserError, match="no video has flow"):
        compute(store, tmp_path / "flow", CFG, progress=False)


def files(out: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("[uv]/videos/*/*.*")}


def test_resume_skips_stored_videos_and_redoes_changed_settings(tmp_path):
    videos = {f"A/v_{i}": square_video([0, 1, 2], seed=i) for i in range(3)}
    store = frame_store(tmp_path / "frames", videos)
    out = tmp_path / "flow"
    cfg = FlowConfig(tvl1={"nscales": 2, "warps": 2})
    compute(store, out, cfg, progress=False)
    before = files(out)
    assert len(before) == 6
    s = compute(store, out, cfg, progress=False)
    assert (s.computed, s.skipped) == (0, 3) and files(out) == before  # nothing rewritten

    (out / "v/videos/A/v_1.npy").unlink()  # e.g. interrupted before the v file was renamed
    s = compute(store, out, cfg, progress=False)
    assert (s.computed, s.skipped) == (1, 2)
    after = files(out)
    assert after[out / "u/videos/A/v_0.npy"] == before[out / "u/videos/A/v_0.npy"]
    assert after[out / "u/videos/A/v_1.npy"] != before[out / "u/videos/A/v_1.npy"]

    s = compute(store, out, FlowConfig(tvl1={"nscales": 2, "warps": 1}), progress=False)
    assert (s.computed, s.skipped) == (3, 0)  # other settings: every video again


def test_cli_chunks_then_merge_equal_one_run_and_feed_the_clip_datasets(tmp_path, capsys):
    videos = {f"C{i % 2}/v_{i}": square_video([0, 2, 4, 6, 8], seed=i) for i in range(5)}
    store = frame_store(tmp_path / "frames", videos, codec="jpeg")
    out, one = tmp_path / "flow", tmp_path / "one"

    def argv(out):
        a = ["flow", "synthetic", "--params", str(PARAMS), "--preset", "demo", "--frames"]
        a += [str(store), "--out", str(out), "--set", "frames.codec=jpeg"]
        a += ["--set", "flow.tvl1.epsilon=0.1", "--set", "flow.tvl1.warps=2"]
        return a + ["--set", "flow.workers=1"]  # one process: a spawned pool starts slowly

    base = argv(out)

    assert cli.main([*base, "--chunk", "0/2", "--workers", "2"]) == 0
    assert "computed 3" in capsys.readouterr().out and not (out / "index.csv").exists()
    assert cli.main([*base, "--merge"]) == 1  # chunk 1/2 has not run
    assert "2 of 5 videos" in capsys.readouterr().err
    assert cli.main([*base, "--chunk", "1/2"]) == 0
    assert cli.main([*base, "--merge"]) == 0
    assert "merged 5 videos, 0 failures" in capsys.readouterr().out
    index = pd.read_csv(out / "index.csv")
    assert index.video.tolist() == sorted(videos) and set(index.codec) == {"jpeg"}
    assert cli.main([*base, "--chunk", "2/2"]) == 1
    # a chunk with other settings: the combined index is withdrawn until the next merge
    assert cli.main([*base, "--set", "flow.tvl1.warps=1", "--chunk", "1/2"]) == 0
    assert not (out / "index.csv").exists()
    assert cli.main([*base, "--set", "flow.tvl1.warps=1", "--merge"]) == 1

    assert cli.main(argv(one)) == 0
    for comp in ("u", "v"):
        a, b = FrameStore(out / comp), FrameStore(one / comp)
        assert a.keys() == b.keys() == sorted(videos)
        np.testing.assert_array_equal(a.read_all("C1/v_3"), b.read_all("C1/v_3"))

    # the clip Datasets: same frame indices as RGB, own crop, grey replicated to 3 channels
    manifest = pd.DataFrame({"video": [f"{k}.avi" for k in videos], "label": [0] * 5})
    u = FrameStore(out / "u")
    clips = EvalClips(
        manifest, FrameStore(store), clip_len=3, crop=SIZE, num_clips=2, flow_stores={"u": u}
    )
    sample = clips[3]
    assert sample["flow"].shape == sample["video"].shape == (2, 3, 3, SIZE, SIZE)
    assert torch.equal(sample["flow"][:, 0], sample["flow"][:, 2])
    np.testing.assert_array_equal(sample["flow"][1, 0].numpy(), u.read("C1/v_3", 1, 3)[..., 0])
    torch.manual_seed(0)
    train = PretrainClips(manifest, FrameStore(store), clip_len=3, crop=48, flow_stores={"u": u})
    assert train[0]["flow"].shape == (3, 3, 48, 48)
