"""`iicrepro bench`: a shrunken run of every part writes the result file; the MFU arithmetic and
the FLOP counts behind it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from iicrepro import bench, config, devices, io, layout
from iicrepro.cli import main as cli_main

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def positive(x) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_quick_bench_writes_every_measurement(tmp_path, capsys):
    argv = [
        "bench", "--params", str(PARAMS), "--set", f"paths.results={tmp_path / 'results'}",
        "--set", "tracking.enabled=false", "--quick", "--device", "cpu", "--backbones", "r3d",
        "--videos", "2", "--frames", "20", "--workers", "1", "--loader-batches", "2",
        "--loader-batch-size", "2", "--steps", "1", "--tmp", str(tmp_path),
    ]  # fmt: skip
    assert cli_main(argv) == 0
    out = layout.bench_json(config.load(PARAMS, None, [f"paths.results={tmp_path / 'results'}"]))
    assert out == tmp_path / "results" / "bench.json"
    r = io.read_json(out)
    assert r["errors"] == {} and r["device"] == "cpu" and "CPU" in r["device_name"]
    for key in ("loader_samples_per_s", "loader_flow_samples_per_s",
                "baseline_loader_samples_per_s", "loader_speedup_vs_jpeg"):  # fmt: skip
        assert positive(r[key]), key
    assert r["loader_speedup_vs_jpeg"] == pytest.approx(
        r["loader_samples_per_s"] / r["baseline_loader_samples_per_s"]
    )
    loader = r["loader"]
    assert loader["ours"]["samples"] == 2 * 2 and loader["baseline"]["samples"] == 2  # timed only
    assert positive(r["train_samples_per_s"]["r3d"])
    train = r["train"]["r3d"]
    assert train["batch_size"] == bench.QUICK.train_batch and math.isfinite(train["loss"])
    # FLOPs of the quick clip at width 0.25 (counted, not the full-size table value)
    assert train["forward_gflops_per_clip"] == pytest.approx(
        devices.forward_flops("r3d", bench.QUICK.clip, 0.25) / 1e9
    )
    assert r["mfu"]["r3d"] is None and r["peak_bf16_tflops"] is None  # no known peak for a CPU
    assert r["amp_agreement"]["r3d"] == {"skipped": "bf16 autocast is used on CUDA only"}
    assert positive(r["retrieval_videos_per_s"]["r3d"])
    assert r["retrieval"]["r3d"]["videos"] == 2 and r["retrieval"]["r3d"]["clips_per_video"] == 10
    assert positive(r["memory"]["cpu_max_rss_mib"]["self"])
    assert r["provenance"]["settings"]["paths"]["results"] == str(tmp_path / "results")
    assert r["data_seconds"]["build_store"] > 0 and r["codec"] == "jpeg"
    printed = capsys.readouterr().out
    assert "speedup vs JPEG files" in printed and f"wrote {out}" in printed
    assert not list(tmp_path.glob("iicrepro-bench-*"))  # the generated data is removed


def test_flop_counts_match_the_published_per_clip_figures():
    """FlopCounterMode on the meta device vs the per-clip GFLOPs used for MFU (16x112x112)."""
    assert devices.forward_flops("r3d") / 1e9 == pytest.approx(39.8, abs=0.05)
    assert devices.forward_flops("r21d") / 1e9 == pytest.approx(42.7, abs=0.05)
    # half the frames, half the FLOPs (every layer's output has half the time steps)
    assert devices.forward_flops("r3d", (8, 112, 112)) == pytest.approx(
        devices.forward_flops("r3d") / 2, rel=0.01
    )


def test_mfu_arithmetic_and_peak_lookup():
    # 100 clips/s of R3D (39.8 GFLOP per forward, 7 forwards per sample) on a 989 TFLOP/s chip
    assert devices.mfu(100.0, 39.8e9, 989.0) == pytest.approx(100 * 7 * 39.8e9 / 989e12)
    assert devices.mfu(100.0, 39.8e9, 989.0) == pytest.approx(0.02817, abs=1e-5)
    assert devices.mfu(100.0, 39.8e9, None) is None
    assert devices.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert devices.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert devices.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert devices.peak_bf16_tflops("x86_64 CPU, 2 cores") is None
    # IIC (residual + repeat) is the 7 of the benchmark; CMC has no intra-negative forward; the
    # degenerate rgb view trains one anchor.
    assert devices.forwards_per_sample("residual", "repeat") == devices.FORWARDS_PER_SAMPLE == 7
    assert devices.forwards_per_sample("u", "none") == 6
    assert devices.forwards_per_sample("rgb", "shuffle") == 4
    assert bench.mfu is devices.mfu  # the benchmark and pretraining share one estimate


def test_pretraining_epoch_line_shows_mfu_where_it_is_known():
    import torch

    from iicrepro.train import distributed as ddp
    from iicrepro.train.pretrain import epoch_line, mfu_estimate

    s = config.load(PARAMS, "demo")
    row = {"epoch": 3, "loss": 7.5, "positive_rank1": 0.25, "lr": 0.03, "samples_per_s": 120.0,
           "seconds": 1.5}  # fmt: skip
    cpu = mfu_estimate(s, "r3d", "residual", "repeat", torch.device("cpu"), ddp.SINGLE)
    line = epoch_line("r3d-residual-repeat-s0", row, 30, 9.74, cpu)
    assert line.endswith("120 clips/s, 1.5 s") and "MFU" not in line  # no bf16 peak on a CPU
    flops = devices.forward_flops("r3d", (8, 40, 40), 0.125, True)  # the demo's clip and model
    line = epoch_line("run", row, 30, 9.74, lambda sps: devices.mfu(sps, flops, 989.0))
    assert line.endswith(f", MFU {120 * 7 * flops / 989e12:.1%}")
