"""`iicrepro bench`: input pipeline, training step, retrieval and memory benchmarks.

One run, on videos it writes itself (real .avi files, 320x240 at 25 fps like UCF101):

* loader: pretraining samples/s, a sample being the view-1 clip, the view-2 clip and the
  intra-negative, ready on the device. Ours reads uint8 RGB clips from a frame store made by the
  real `frames.build_store` (jpeg codec at 128x171, spec 3.4) and forms the residual view and the
  intra-negative batched on the device; the flow variant also reads a u store. The baseline
  (`bench.upstream`) reads one JPEG file per frame with PIL and transforms frame by frame, RGB + u
  + v per sample, as upstream did. Both use the same DataLoader settings and device step.
* train: samples/s of the real pretraining step (`train.pretrain.train_step`: three forwards,
  the backward of the two anchors, memory banks) per backbone, with an MFU estimate; optionally
  the largest batch that fits (doubling until CUDA runs out of memory) and channels-last 3D.
* amp: the bf16 loss beside the fp32 loss on the same batch, weights and banks (CUDA).
* retrieval: videos/s of retrieval feature extraction (EvalClips + retrieval_features).
* memory: CUDA peak allocated per backbone, CPU max RSS of this process and its children.

Writes `layout.bench_json` (results/bench.json; --out overrides) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any

from iicrepro import io, layout
from iicrepro.bench.data import FULL, QUICK, Profile, prepare_data
from iicrepro.bench.table import table
from iicrepro.bench.timing import (
    _cores,
    _free_cuda,
    amp_agreement,
    bench_retrieval,
    bench_train,
    cpu_max_rss_mib,
    device_name,
    largest_batch,
    run_loaders,
)
from iicrepro.devices import FORWARDS_PER_SAMPLE, forward_flops, mfu, peak_bf16_tflops
from iicrepro.errors import UserError

__all__ = ["FULL", "QUICK", "Profile", "add_arguments", "forward_flops", "main", "mfu",
           "peak_bf16_tflops", "run", "table"]  # fmt: skip

PARTS = ("loader", "train", "amp", "retrieval")
BACKBONES = ("c3d", "r3d", "r21d", "r3d18")


def _guard(errors: dict, name: str):
    """Run a part; a failure is recorded under `errors` and the other parts go on."""

    @contextlib.contextmanager
    def ctx():
        try:
            yield
        except Exception as exc:  # a benchmark part must not hide the others' results
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"bench: {name} failed: {errors[name]}")

    return ctx()


def run(settings: Any, args: argparse.Namespace, result: dict) -> None:
    """All requested parts, recorded into `result` as each measurement completes (so an
    interrupted run still leaves what it measured)."""
    import torch

    from iicrepro.devices import configure, pick_device

    profile = QUICK if args.quick else FULL
    if args.videos:
        profile = _replace(profile, videos=args.videos)
    if args.frames:
        profile = _replace(profile, frames=args.frames)
    if args.steps:
        profile = _replace(profile, steps=args.steps)
    if args.batch_size:
        profile = _replace(profile, train_batch=args.batch_size)
    if args.loader_batches:
        profile = _replace(profile, loader_batches=args.loader_batches,
                           baseline_batches=max(1, args.loader_batches // 4))  # fmt: skip
    if args.loader_batch_size:
        profile = _replace(profile, loader_batch=args.loader_batch_size)
    device = pick_device(args.device)
    configure(device)  # cuDNN autotuning on CUDA, as pretraining uses
    workers = args.workers if args.workers is not None else min(8, _cores())
    amp = args.amp or settings["pretrain"]["amp"]
    peak = peak_bf16_tflops(device_name(device)) if device.type == "cuda" else None
    result |= {
        "device": str(device), "device_name": device_name(device), "quick": args.quick,
        "cpu_cores": _cores(), "torch": torch.__version__, "workers": workers, "amp": amp,
        "peak_bf16_tflops": peak, "forwards_per_sample": FORWARDS_PER_SAMPLE,
        "profile": profile.__dict__, "parts": list(args.parts), "errors": {},
    }  # fmt: skip
    errors = result["errors"]

    with tempfile.TemporaryDirectory(prefix="iicrepro-bench-", dir=args.tmp) as tmp:
        data = None
        if {"loader", "retrieval"} & set(args.parts):
            with _guard(errors, "data"):
                data = prepare_data(Path(tmp), profile, args.codec, min(8, max(1, workers)))
                result["data_seconds"] = data.seconds
                result["codec"] = args.codec
        if "loader" in args.parts and data is not None:
            with _guard(errors, "loader"):
                result["loader"] = run_loaders(data, profile, workers, device)
                result["loader_samples_per_s"] = result["loader"]["ours"]["samples_per_s"]
                result["loader_flow_samples_per_s"] = result["loader"]["ours_flow"]["samples_per_s"]
                result["baseline_loader_samples_per_s"] = result["loader"]["baseline"][
                    "samples_per_s"
                ]
                result["loader_speedup_vs_jpeg"] = result["loader"]["speedup_vs_jpeg"]
        if "amp" in args.parts:
            result["amp_agreement"] = {}
            for name in args.backbones:
                with _guard(errors, f"amp {name}"):
                    result["amp_agreement"][name] = amp_agreement(
                        name, batch_size=min(profile.train_batch, 8), device=device,
                        profile=profile,
                    )  # fmt: skip
        if "train" in args.parts:
            result["train"], result["train_samples_per_s"], result["mfu"] = {}, {}, {}
            kw = {"steps": profile.steps, "warmup": profile.warmup, "device": device,
                  "profile": profile, "amp": amp, "compile": args.compile}  # fmt: skip
            for name in args.backbones:
                entry = result["train"][name] = {}
                try:
                    entry |= bench_train(name, batch_size=profile.train_batch, **kw)
                    entry["mfu"] = mfu(entry["train_samples_per_s"],
                                       entry["forward_gflops_per_clip"] * 1e9, peak)  # fmt: skip
                    result["train_samples_per_s"][name] = entry["train_samples_per_s"]
                    result["mfu"][name] = entry["mfu"]
                    if args.channels_last and device.type == "cuda":
                        cl = bench_train(name, batch_size=profile.train_batch,
                                         channels_last=True, **kw)  # fmt: skip
                        cl["speedup"] = cl["train_samples_per_s"] / entry["train_samples_per_s"]
                        entry["channels_last"] = cl
                    if args.max_batch and device.type == "cuda":
                        fewer = kw | {"steps": max(3, profile.steps // 3), "warmup": 2}
                        entry["max_batch"] = {}
                        largest_batch(name, profile.train_batch * 2, args.max_batch_limit,
                                      args.max_batch_seconds, record=entry["max_batch"],
                                      peak=peak, **fewer)  # fmt: skip
                except Exception as exc:  # one backbone's failure must not hide the others
                    entry["error"] = f"{type(exc).__name__}: {exc}"
                    errors[f"train {name}"] = entry["error"]
                _free_cuda()
        if "retrieval" in args.parts and data is not None:
            result["retrieval"], result["retrieval_videos_per_s"] = {}, {}
            for name in args.backbones:
                with _guard(errors, f"retrieval {name}"):
                    r = bench_retrieval(name, data, profile=profile, workers=workers,
                                        device=device)  # fmt: skip
                    result["retrieval"][name] = r
                    result["retrieval_videos_per_s"][name] = r["videos_per_s"]
                _free_cuda()


def finish(result: dict, settings: Any) -> dict:
    """Memory figures and provenance, added last (also to an interrupted run's result)."""
    result["memory"] = {"cpu_max_rss_mib": cpu_max_rss_mib()}
    if result.get("device", "").startswith("cuda"):
        result["memory"]["cuda_peak_mib"] = {
            k: v.get("peak_cuda_mib") for k, v in result.get("train", {}).items()
        }
    result["provenance"] = io.provenance(settings)
    return result


class Terminated(BaseException):
    """SIGTERM (e.g. from `timeout`): unwinds past the per-part guards to write the result."""


def _on_sigterm(signum, frame):
    raise Terminated("terminated by SIGTERM")


def _replace(profile: Profile, **changes) -> Profile:
    from dataclasses import replace

    return replace(profile, **changes)


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a ~1 min CPU run (smaller work)")
    parser.add_argument(
        "--out", type=Path, help="result file (default: layout, results/bench.json)"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: cores, max 8)")
    parser.add_argument("--amp", choices=("none", "bf16"), help="default: pretrain.amp")
    parser.add_argument("--codec", choices=("jpeg", "raw"), default="jpeg",
                        help="our frame store's codec (default jpeg, the paper-size setting)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, help="training batch (default 16; quick 2)")
    parser.add_argument("--steps", type=int, help="timed training steps")
    parser.add_argument("--videos", type=int, help="generated videos")
    parser.add_argument("--frames", type=int, help="frames per generated video (>= 17)")
    parser.add_argument("--loader-batches", type=int, help="timed loader batches (ours)")
    parser.add_argument("--loader-batch-size", type=int, help="loader batch (default 16; quick 8)")
    parser.add_argument("--channels-last", action="store_true",
                        help="CUDA: also time channels-last 3D")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--max-batch", action="store_true",
                        help="CUDA: find the largest batch that fits by doubling")  # fmt: skip
    parser.add_argument("--max-batch-limit", type=int, default=1024)
    parser.add_argument("--max-batch-seconds", type=float, default=60.0,
                        help="stop doubling after this long per backbone")  # fmt: skip
    parser.add_argument("--tmp", type=Path, help="folder for the generated data (default: TMPDIR)")


def main(args: argparse.Namespace) -> int:
    from iicrepro.cli import settings_from_args

    settings = settings_from_args(args)
    if args.frames is not None and args.frames < 17:
        raise UserError("--frames must be at least 17 (16-frame clips, the last frame unused)")
    if args.workers is not None and args.workers < 0:
        raise UserError("--workers must be >= 0")
    import signal

    out = args.out or layout.bench_json(settings)
    result: dict = {"errors": {}}
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run(settings, args, result)
    except Terminated as exc:
        result["errors"]["interrupted"] = str(exc)
    except KeyboardInterrupt:
        result["errors"]["interrupted"] = "KeyboardInterrupt"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        io.write_json(out, finish(result, settings))  # an interrupted run keeps what it measured
        print(table(result))
        print(f"bench: wrote {out}")
    return 1 if result["errors"] else 0
