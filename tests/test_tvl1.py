"""The torch TV-L1 engine against OpenCV's DualTVL1OpticalFlow: its pieces, its flow on videos
with known motion (the flow benchmark's and synthetic ones) and under non-default settings,
batching, and the `flow.engine: torch` path of `iicrepro flow`."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from project import Project
from test_flow import frame_store, interior, square_video

from iicrepro.data import tvl1
from iicrepro.data.flow import FlowConfig, compute, compute_flow, dequantize, engine
from iicrepro.data.flow import tvl1 as opencv_tvl1
from iicrepro.data.frames import FrameStore
from iicrepro.data.synthetic import render_video
from iicrepro.errors import UserError

LEVEL = 40 / 255 / 2  # one quantisation level at 128x171 (bound 20 at short side 256), px
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "flow_bench.py"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    cv2.setNumThreads(1)


def flow_bench():
    spec = importlib.util.spec_from_file_location("flow_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def both(frames: np.ndarray, settings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(OpenCV's flow, the torch engine's flow) of consecutive frames."""
    settings = settings or {}
    ref = compute_flow(frames, opencv_tvl1(settings))
    got = tvl1.video_flow(frames, tvl1.TVL1Params.from_settings(settings))
    return ref, got


def epe(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    d = np.linalg.norm(a - b, axis=-1)
    return float((d if mask is None else d[mask]).mean())


# -------------------------------------------------------------------------------- the pieces
def test_pieces_match_opencv():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, 40, 53)).astype(np.float32)
    t = torch.from_numpy(x)
    down = tvl1.resize_linear(t, (32, 42), (1.25, 1.25))[1].numpy()
    np.testing.assert_allclose(down, cv2.resize(x[1], None, fx=0.8, fy=0.8), atol=1e-3)
    up = tvl1.resize_linear(t, (50, 66))[1].numpy()
    np.testing.assert_allclose(up, cv2.resize(x[1], (66, 50)), atol=1e-2)
    for k in (3, 5):
        np.testing.assert_array_equal(tvl1.median_filter(t, k)[1].numpy(), cv2.medianBlur(x[1], k))
    u1, u2 = (rng.normal(0, 4, x.shape).astype(np.float32) for _ in range(2))  # some far outside
    yy, xx = np.mgrid[: x.shape[1], : x.shape[2]].astype(np.float32)
    want = cv2.remap(x[1], xx + u1[1], yy + u2[1], cv2.INTER_CUBIC)
    got = tvl1.remap_cubic(t[:, None], torch.from_numpy(u1), torch.from_numpy(u2))[1, 0]
    np.testing.assert_allclose(got.numpy(), want, atol=2e-3)
    rgb = rng.integers(0, 256, (2, 30, 31, 3), dtype=np.uint8)
    grey = tvl1.gray(torch.from_numpy(rgb)).numpy()
    np.testing.assert_array_equal(grey[0], cv2.cvtColor(rgb[0], cv2.COLOR_RGB2GRAY))


# ------------------------------------------------------------------------------- accuracy
def test_flow_bench_video_matches_opencv_and_the_true_motion():
    fb = flow_bench()
    frames, gt, mask = fb.video(3)  # 2 pairs at 128x171, default settings
    ref, got = both(frames)
    assert epe(got, ref, mask) <= LEVEL
    assert epe(got, ref) <= LEVEL  # also at the borders and the square's edges
    err_cv, err_torch = epe(ref, gt, mask), epe(got, gt, mask)
    assert err_cv < 0.1  # the benchmark's known accuracy (BENCHMARKS.md): a sane reference
    assert abs(err_torch - err_cv) <= 0.1 * err_cv, (err_torch, err_cv)


def test_reference_file_of_the_gpu_check_holds_opencvs_flow():
    """The GPU machine has no OpenCV: it scores the torch engine against this file's flow."""
    fb = flow_bench()
    frames, gt, mask, ref = fb.load_reference(fb.REFERENCE)
    assert frames.shape[1:] == fb.SIZE and len(ref) == len(gt) == len(mask) == len(frames) - 1
    got = tvl1.video_flow(frames[:2])
    assert epe(got, ref[:1], mask[:1]) <= LEVEL
    assert abs(epe(got, gt[:1], mask[:1]) - epe(ref[:1], gt[:1], mask[:1])) <= 0.1 * epe(
        ref[:1], gt[:1], mask[:1]
    )


def test_textured_square_matches_opencv_and_the_true_motion():
    shifts = [0, 2, 3, 5]
    frames = square_video(shifts, seed=3)
    ref, got = both(frames)
    assert epe(got, ref) <= LEVEL
    true = [np.stack([np.full((16, 16), b - a), np.zeros((16, 16))], -1) for a, b in
            zip(shifts, shifts[1:], strict=False)]  # fmt: skip
    err = {}
    for name, f in (("opencv", ref), ("torch", got)):
        inside = [interior(np.moveaxis(f[k], -1, 0), shifts[k]) for k in range(len(f))]
        err[name] = epe(np.moveaxis(np.stack(inside), 1, -1), np.stack(true))
    assert err["opencv"] < 0.3
    assert abs(err["torch"] - err["opencv"]) <= 0.1 * err["opencv"] + 1e-3, err


@pytest.mark.parametrize("motion", ["rotate_cw", "zoom_in", "oscillate", "right"])
def test_synthetic_dataset_videos_match_opencv(motion):
    # Flat regions make TV-L1 sensitive to float rounding: OpenCV against itself with the input
    # perturbed by 1e-6 differs by 0.01-0.08 px EPE on these 48x48 videos (BENCHMARKS.md).
    frames = render_video(motion, np.random.default_rng(5), width=48, height=48, frames=3, noise=0)
    ref, got = both(frames)
    assert epe(got, ref) <= LEVEL


@pytest.mark.parametrize(
    "settings",
    [
        {"nscales": 3, "warps": 2, "epsilon": 0.05, "scale_step": 0.6},
        {"median_filtering": 3, "inner_iterations": 10, "outer_iterations": 3, "tau": 0.2},
        {"median_filtering": 1, "lambda": 0.3, "theta": 0.5, "warps": 3},
        {"gamma": 0.2, "nscales": 2, "epsilon": 0.02},
    ],
)
def test_non_default_settings_match_opencv(settings):
    frames = square_video([0, 2, 3], seed=7)
    ref, got = both(frames, settings)
    assert epe(got, ref) <= LEVEL, settings


def test_pyramid_stops_below_16_px_like_opencv():
    frames = square_video([0, 1, 2], seed=2)[:, 8:48, 8:44]  # 40x36: 3 levels of 0.8 only
    ref, got = both(frames, {"nscales": 8})
    assert epe(got, ref) <= LEVEL


# ------------------------------------------------------------------------------- batching
def test_batched_pairs_stop_on_their_own_like_single_pairs():
    frames = [
        square_video([0, d, 2 * d], seed=s)[:, 12:52, 12:52] for s, d in ((0, 1), (1, 3), (2, 0))
    ]
    grey = tvl1.gray(torch.from_numpy(np.concatenate([f[:2] for f in frames])))
    i0, i1 = grey[0::2], grey[1::2]  # three unlike pairs: they converge at different iterations
    p = tvl1.TVL1Params(epsilon=0.05)
    batched = tvl1.flow_pairs(i0, i1, p)
    masked = tvl1.flow_pairs(i0, i1, p, check_every=7)  # the CUDA way: masked between checks
    for k in range(3):
        alone = tvl1.flow_pairs(i0[k : k + 1], i1[k : k + 1], p)[0]
        torch.testing.assert_close(batched[k], alone, atol=1e-4, rtol=0)
        torch.testing.assert_close(masked[k], alone, atol=1e-4, rtol=0)
    video = tvl1.video_flow(frames[1], p, batch=1)  # batches split the video's pairs
    np.testing.assert_allclose(video, tvl1.video_flow(frames[1], p, batch=8), atol=1e-4)


def test_bad_settings_are_refused():
    with pytest.raises(UserError, match="unknown setting"):
        tvl1.TVL1Params.from_settings({"warp": 3})
    with pytest.raises(UserError, match="odd size"):
        tvl1.TVL1Params.from_settings({"median_filtering": 4})
    with pytest.raises(UserError, match="flow.engine='cuda': use opencv or torch"):
        engine(FlowConfig(engine="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    frames = square_video([0, 2, 3, 5], seed=4)
    cpu = tvl1.video_flow(frames)
    cuda = tvl1.video_flow(frames, device="cuda")
    assert epe(cuda, cpu) <= 0.01


# ---------------------------------------------------------------------------- iicrepro flow
def test_flow_step_with_the_torch_engine(tmp_path):
    videos = {"A/v_a": square_video([0, 2, 4], seed=1), "A/v_b": square_video([0, 1, 1], seed=2)}
    store = frame_store(tmp_path / "frames", videos)
    cv_cfg = FlowConfig(tvl1={"epsilon": 0.05})
    torch_cfg = FlowConfig(tvl1={"epsilon": 0.05}, engine="torch", device="cpu", batch=1)
    assert torch_cfg.fingerprint() != cv_cfg.fingerprint()
    assert FlowConfig(tvl1={"epsilon": 0.05}, threads=2).fingerprint() == cv_cfg.fingerprint()
    compute(store, tmp_path / "cv", cv_cfg, progress=False)
    out = tmp_path / "flow"
    s = compute(store, out, torch_cfg, progress=False)
    assert (s.computed, s.failed) == (2, 0)
    for key in videos:
        stored = []
        for root in (tmp_path / "cv", out):
            q = [FrameStore(root / comp).read_all(key)[..., 0] for comp in ("u", "v")]
            stored.append(dequantize(np.stack(q, -1), 20, 256 / 64))
        assert stored[0].shape == stored[1].shape == (2, 64, 64, 2)
        # early stopping (epsilon 0.05) makes single pixels sensitive to rounding, not the mean
        assert epe(*stored) <= LEVEL
    # the opencv store is not reused: another engine recomputes every video
    s = compute(store, tmp_path / "cv", torch_cfg, progress=False)
    assert (s.computed, s.skipped) == (2, 0)
    assert math.isclose(torch.get_num_threads(), 1)  # the caller's threads are restored


# ------------------------------------------------------------------------------ the workflow
def test_torch_engine_flow_chunks_are_gpu_jobs_under_the_slurm_profile(tmp_path):
    project = Project.create(tmp_path / "p", demo={"flow": {"engine": "torch"}}, preset="demo-flow")
    dry = project.snakemake(
        "-n", "--profile", "workflow/profiles/slurm", "--set-scatter", "flow=2", timeout=180
    ).stdout
    jobs = re.findall(r"rule (\w+):\n(?:    .*\n)*?    resources: (.*)", dry)
    chunks = [res for rule, res in jobs if rule == "flow_chunk_gpu"]
    assert len(chunks) == 2 and not any(rule == "flow_chunk" for rule, _ in jobs)
    assert all("slurm_partition=gpu" in res and "gpu=1" in res for res in chunks), chunks
    merge = [res for rule, res in jobs if rule == "flow"]
    assert merge and "slurm_partition=cpu" in merge[0]
