"""`iicrepro bench`: input pipeline, training step, retrieval and memory benchmarks.

One run, on videos it writes itself (real .avi files, 320x240 at 25 fps like UCF101):

* loader: pretraining samples/s, a sample being the view-1 clip, the view-2 clip and the
  intra-negative, ready on the device. Ours reads uint8 RGB clips from a frame store made by the
  real `frames.build_store` (jpeg codec at 128x171, spec 3.4) and forms the residual view and the
  intra-negative batched on the device; the flow variant also reads a u store. The baseline
  (`bench_upstream`) reads one JPEG file per frame with PIL and transforms frame by frame, RGB + u
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
import gc
import os
import platform
import resource
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from iicrepro import io, layout
from iicrepro.errors import UserError

PARTS = ("loader", "train", "amp", "retrieval")
BACKBONES = ("c3d", "r3d", "r21d", "r3d18")
STORE_SIZE = (128, 171)  # H x W of the frame store (spec 3.4)
# A training sample costs 3 forwards (view 1, view 2, intra-negative) and the backward of two of
# them, a backward costing about 2 forwards: 3 + 2 * 2 = 7 forward passes.
FORWARDS_PER_SAMPLE = 7
# Dense bf16 peak (TFLOP/s) by device name; the first matching substring wins (NVIDIA datasheets).
PEAK_BF16_TFLOPS = (
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),
    ("A100", 312.0),
)
AMP_RTOL = 0.02  # bf16 vs fp32 loss, relative


@dataclass(frozen=True)
class Profile:
    """How much work each part does."""

    videos: int  # generated videos
    frames: int  # frames per video
    loader_batch: int
    loader_batches: int  # timed batches, ours
    baseline_batches: int  # timed batches, upstream-style
    train_batch: int
    steps: int  # timed training steps
    warmup: int
    clip: tuple[int, int, int]  # T, H, W of the training and retrieval clips
    width: float  # channel multiplier (r3d18 exists at 1.0 only)
    bank: int  # memory-bank rows
    k: int  # negatives
    eval_videos: int
    eval_batch: int
    eval_clips: int


# FULL: the paper's sizes (batch 16, 16x112x112 clips, K=1024, UCF101's 9537 bank rows).
FULL = Profile(24, 100, 16, 40, 8, 16, 10, 3, (16, 112, 112), 1.0, 9537, 1024, 16, 8, 10)
# QUICK: a CPU run of about a minute on two cores; the loader still reads 16x112x112 clips from
# the 128x171 store, the networks get narrower and smaller clips.
QUICK = Profile(6, 40, 8, 16, 4, 2, 2, 1, (8, 56, 56), 0.25, 256, 128, 4, 2, 10)


# ------------------------------------------------------------------------------------- helpers
def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a known accelerator, else None (MFU is then not estimated)."""
    name = device_name.upper()
    return next((v for key, v in PEAK_BF16_TFLOPS if key in name), None)


@cache
def forward_flops(
    backbone: str, clip: tuple[int, int, int] = (16, 112, 112), width: float = 1.0
) -> int:
    """FLOPs of one clip's forward (a multiply-add = 2), counted by torch's FlopCounterMode on the
    meta device (shapes only, no arithmetic)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from iicrepro.models import build_backbone

    with torch.device("meta"):
        model = build_backbone(backbone, width=width)
        x = torch.empty(1, 3, *clip)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def mfu(samples_per_s: float, flops_per_clip: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's bf16 peak."""
    if not peak_tflops or not samples_per_s:
        return None
    return samples_per_s * FORWARDS_PER_SAMPLE * flops_per_clip / (peak_tflops * 1e12)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {_cores()} cores"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _mib(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def cpu_max_rss_mib() -> dict:
    """Peak resident memory of this process and of its largest finished child (loader workers,
    decoders); ru_maxrss is in KiB on Linux."""
    return {
        "self": _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "children": _mib(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024),
    }


def _width_for(backbone: str, width: float) -> float:
    return 1.0 if backbone == "r3d18" else width  # r3d18 exists at width 1.0 only


# ---------------------------------------------------------------------------------------- data
def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth multi-scale colour texture (float, 0..255), bigger than a frame so it can pan."""
    from PIL import Image

    out = np.full((height, width, 3), 128.0, np.float32)
    for cells, amplitude in ((6, 80.0), (24, 45.0), (96, 20.0)):
        small = rng.uniform(-1, 1, (max(2, cells * 3 // 4), cells, 3)).astype(np.float32)
        for c in range(3):
            layer = Image.fromarray(small[..., c]).resize((width, height), Image.BILINEAR)
            out[..., c] += amplitude * np.asarray(layer)
    return np.clip(out, 0, 255)


def write_videos(root: Path, n: int, frames: int, seed: int = 0) -> list[str]:
    """`n` UCF101-like videos (320x240, 25 fps, mpeg4/XVID .avi, GOP 12): a camera panning over
    a texture with light sensor noise. Returns manifest-style paths '<Class>/<name>.avi'."""
    import av

    rng, names = np.random.default_rng(seed), []
    for i in range(n):
        tex = _texture(rng, 360, 480)
        vy, vx = rng.uniform(-0.9, 0.9, 2)
        name = f"Bench/v_Bench_g01_c{i + 1:02d}.avi"
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=25)
            stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
            stream.codec_context.codec_tag, stream.codec_context.gop_size = "XVID", 12
            stream.bit_rate = 1_500_000
            for t in range(frames):
                y, x = _bounce(60 + vy * t, 120), _bounce(80 + vx * t, 160)
                frame = tex[y : y + 240, x : x + 320] + rng.normal(0, 3, (240, 320, 3))
                frame = np.clip(frame, 0, 255).astype(np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        names.append(name)
    return names


def _bounce(p: float, span: int) -> int:
    """`p` reflected back into 0..span (the camera turns at the texture's edges)."""
    q = p % (2 * span)
    return int(q if q <= span else 2 * span - q)


def _grey_motion(frames: np.ndarray, sign: int) -> np.ndarray:
    """Stand-in flow component: 128 + sign * (grey frame difference), one frame fewer, like
    TV-L1 flow (spec 3.2). Reading it costs what reading real flow costs."""
    grey = frames.astype(np.int16).mean(axis=3)
    return np.clip(128 + sign * (grey[1:] - grey[:-1]), 0, 255).astype(np.uint8)


@dataclass
class BenchData:
    names: list[str]  # manifest-style video paths
    manifest: Any  # DataFrame video,label
    store: Path  # our RGB frame store
    flow_u: Path  # our u store
    jpeg_tree: Path  # upstream-style JPEG-per-frame layout
    seconds: dict


def prepare_data(root: Path, profile: Profile, codec: str, workers: int) -> BenchData:
    """Videos, our stores (the real `build_store`) and the upstream-style JPEG tree."""
    import av
    import pandas as pd

    from iicrepro.bench_upstream import write_jpeg_tree
    from iicrepro.data.frames import FrameStore, build_store, save_frames, video_key, write_index

    seconds = {}
    t0 = time.perf_counter()
    names = write_videos(root / "videos", profile.videos, profile.frames)
    seconds["write_videos"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    build_store(
        root / "videos", names, root / "store", size=STORE_SIZE, codec=codec, jpeg_quality=90,
        min_frames=17, workers=workers, progress=False,
    )  # fmt: skip
    seconds["build_store"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    store, keys = FrameStore(root / "store"), [video_key(n) for n in names]
    for key in keys:
        save_frames(root / "flow_u", key, _grey_motion(store.read_all(key), 1), codec)
    write_index(root / "flow_u", keys, codec)
    seconds["build_flow_store"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for name in names:  # upstream's frames: decoded at full size, short side 256, JPEG files
        with av.open(str(root / "videos" / name)) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        write_jpeg_tree(frames, root / "jpegs", Path(name).stem)
    seconds["build_jpeg_tree"] = time.perf_counter() - t0

    manifest = pd.DataFrame({"video": names, "label": 0})
    return BenchData(names, manifest, root / "store", root / "flow_u", root / "jpegs", seconds)


# -------------------------------------------------------------------------------------- loader
def _device_step(batch: dict, device, view: str) -> int:
    """What the training step does with a batch before the backbone: uint8 (or float) to the
    device, view 2 and the intra-negative, batched. Returns the number of samples."""
    from iicrepro.method.intra_negative import intra_negative
    from iicrepro.method.views import make_view, to_unit

    rgb = batch["video"] if "video" in batch else batch["rgb"]
    x = to_unit(rgb.to(device, non_blocking=True))
    flow = batch.get("flow")
    flow = flow.to(device, non_blocking=True) if flow is not None else None
    make_view(x, view, flow=flow)
    intra_negative(x, "repeat")
    return len(x)


def bench_loader(
    dataset, *, view: str, batch_size: int, batches: int, workers: int, device
) -> dict:
    """Samples/s through a DataLoader with `workers` processes and the device step, after
    `workers + 1` untimed batches (worker start-up, first prefetches)."""
    import torch

    skip = workers + 1
    cpu0 = _cpu_seconds()
    sampler = torch.utils.data.RandomSampler(
        dataset, replacement=True, num_samples=(skip + batches) * batch_size,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    count, start = 0, None
    for i, batch in enumerate(loader):
        if i == skip:
            _sync(device)
            start = time.perf_counter()
        n = _device_step(batch, device, view)
        count += n if i >= skip else 0
    _sync(device)
    seconds = time.perf_counter() - start
    # CPU time of this process and its finished workers over the whole run (start-up included):
    # unlike samples/s it does not depend on what else the machine is running.
    cpu_ms = 1000 * (_cpu_seconds() - cpu0) / ((skip + batches) * batch_size)
    return {
        "samples_per_s": count / seconds,
        "samples": count,
        "seconds": round(seconds, 3),
        "cpu_ms_per_sample": round(cpu_ms, 2),
        "batch_size": batch_size,
        "workers": workers,
    }


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished child processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_loaders(data: BenchData, profile: Profile, workers: int, device) -> dict:
    import torch

    from iicrepro.bench_upstream import UpstreamStyleClips
    from iicrepro.data.clips import PretrainClips
    from iicrepro.data.frames import FrameStore

    store = FrameStore(data.store)
    ours = PretrainClips(data.manifest, store, clip_len=16, crop=112)
    flow = PretrainClips(
        data.manifest, store, clip_len=16, crop=112, flow_stores={"u": FrameStore(data.flow_u)}
    )
    baseline = UpstreamStyleClips(data.jpeg_tree, [Path(n).stem for n in data.names])
    kw = {"batch_size": profile.loader_batch, "workers": workers, "device": device}
    # On a CPU "device" the batched device step shares the cores with the workers: one
    # intra-op thread, so OpenMP threads do not spin against the workers (both pipelines alike).
    threads = torch.get_num_threads()
    if device.type == "cpu" and workers:
        torch.set_num_threads(1)
    try:
        out = {
            "ours": bench_loader(ours, view="residual", batches=profile.loader_batches, **kw),
            "ours_flow": bench_loader(flow, view="u", batches=profile.loader_batches, **kw),
            "baseline": bench_loader(
                baseline, view="residual", batches=profile.baseline_batches, **kw
            ),
        }
    finally:
        torch.set_num_threads(threads)
    out["speedup_vs_jpeg"] = out["ours"]["samples_per_s"] / out["baseline"]["samples_per_s"]
    out["flow_speedup_vs_jpeg"] = (
        out["ours_flow"]["samples_per_s"] / out["baseline"]["samples_per_s"]
    )
    out["cpu_time_ratio_vs_jpeg"] = (
        out["baseline"]["cpu_ms_per_sample"] / out["ours"]["cpu_ms_per_sample"]
    )
    return out


# --------------------------------------------------------------------------------------- train
def bench_train(
    backbone: str,
    *,
    batch_size: int,
    steps: int,
    warmup: int,
    device,
    profile: Profile,
    amp: str = "none",
    channels_last: bool = False,
    compile: bool = False,
) -> dict:
    """Samples/s of `train_step` on one batch kept on the device (the loader is measured
    separately), with the paper's SGD and memory-bank settings; peak CUDA memory."""
    import torch

    from iicrepro.method.memory_bank import MemoryBank
    from iicrepro.models import build_backbone
    from iicrepro.train.pretrain import StepContext, train_step

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    width = _width_for(backbone, profile.width)
    model = build_backbone(backbone, width=width).to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    rows = max(profile.bank, batch_size)
    bank = MemoryBank(rows, model.out_dim, k=profile.k, t=0.07, momentum=0.5).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    step_model = torch.compile(model) if compile else model
    ctx = StepContext(step_model, bank, optimizer, device, "residual", "repeat", amp)
    video = torch.randint(0, 256, (batch_size, 3, *profile.clip), dtype=torch.uint8, device=device)

    def step(i: int):
        index = (torch.arange(batch_size, device=device) + i * batch_size) % rows
        return train_step(ctx, {"video": video, "index": index})

    for i in range(warmup):  # cuDNN autotuning, compilation, allocator warm-up
        step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        loss, _ = step(warmup + i)
    _sync(device)
    seconds = time.perf_counter() - start
    flops = forward_flops(backbone, tuple(profile.clip), width)
    result = {
        "batch_size": batch_size,
        "train_samples_per_s": steps * batch_size / seconds,
        "step_ms": 1000 * seconds / steps,
        "loss": float(loss),
        "forward_gflops_per_clip": flops / 1e9,
        "width": width,
        "amp": amp,
        "channels_last": channels_last,
        "compile": compile,
    }
    if device.type == "cuda":
        result["peak_cuda_mib"] = _mib(torch.cuda.max_memory_allocated(device))
    return result


def _free_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch(
    backbone: str, start: int, limit: int, budget_s: float, *, record: dict, peak=None, **kw
) -> dict:
    """Double the batch from `start` until CUDA runs out of memory (or `limit`, or `budget_s`
    seconds). `record` holds, as the search goes, the last batch that ran with its throughput
    and MFU."""
    best, batch, began, stop = None, start, time.perf_counter(), "limit"
    record.update(largest=None, stopped_by="running", tried_up_to=batch)
    while batch <= limit:
        record["tried_up_to"] = batch
        oom = False
        try:
            result = bench_train(backbone, batch_size=batch, **kw)
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError, or cuDNN/cuBLAS allocations
            if not is_oom(exc):
                raise
            oom = True
        _free_cuda()  # after the except block: the traceback no longer pins the tensors
        if oom:
            stop = "out of memory"
            break
        result["mfu"] = mfu(result["train_samples_per_s"],
                            result["forward_gflops_per_clip"] * 1e9, peak)  # fmt: skip
        best, batch = result, batch * 2
        record["largest"] = best
        if time.perf_counter() - began > budget_s:
            stop = "time budget"
            break
    record.update(stopped_by=stop)
    return record


def is_oom(exc: BaseException) -> bool:
    """CUDA ran out of memory: the allocator's error or a cuDNN/cuBLAS allocation failure."""
    import torch

    text = str(exc)
    return isinstance(exc, torch.cuda.OutOfMemoryError) or any(
        s in text for s in ("out of memory", "ALLOC_FAILED", "NOT_ENOUGH_WORKSPACE")
    )


def amp_agreement(backbone: str, *, batch_size: int, device, profile: Profile) -> dict:
    """The step's loss in bf16 autocast and in fp32 (TF32 off) on the same batch, weights, bank
    state and random draws. Loss and banks are fp32 in both (method.memory_bank)."""
    import copy

    import torch

    from iicrepro.method.memory_bank import MemoryBank
    from iicrepro.models import build_backbone
    from iicrepro.train.pretrain import StepContext, train_step

    if device.type != "cuda":
        return {"skipped": "bf16 autocast is used on CUDA only"}
    torch.manual_seed(0)
    width = _width_for(backbone, profile.width)
    model = build_backbone(backbone, width=width).to(device).train()
    bank = MemoryBank(profile.bank, model.out_dim, k=profile.k, t=0.07, momentum=0.5).to(device)
    video = torch.randint(0, 256, (batch_size, 3, *profile.clip), dtype=torch.uint8, device=device)
    batch = {"video": video, "index": torch.arange(batch_size, device=device)}
    losses = {}
    for amp in ("none", "bf16"):
        m, b = copy.deepcopy(model), copy.deepcopy(bank)
        ctx = StepContext(m, b, torch.optim.SGD(m.parameters(), lr=0.0), device, "residual",
                          "repeat", amp)  # fmt: skip
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = amp != "none"
        try:
            torch.manual_seed(1)  # the same intra-negative frames and negatives
            losses[amp] = float(train_step(ctx, batch)[0])
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    diff = abs(losses["bf16"] - losses["none"])
    rel = diff / abs(losses["none"])
    return {
        "backbone": backbone, "batch_size": batch_size, "loss_fp32": losses["none"],
        "loss_bf16": losses["bf16"], "abs_diff": diff, "rel_diff": rel, "rtol": AMP_RTOL,
        "ok": rel <= AMP_RTOL,
    }  # fmt: skip


# ----------------------------------------------------------------------------------- retrieval
def bench_retrieval(backbone: str, data: BenchData, *, profile: Profile, workers: int, device):
    """Videos/s of retrieval features (spec 10): `eval_clips` centre-cropped clips per video,
    RGB, conv5 map max-pooled and flattened, averaged per video; fp32 as `iicrepro retrieve`."""
    import torch

    from iicrepro.data.clips import EvalClips
    from iicrepro.data.frames import FrameStore
    from iicrepro.method.views import to_unit
    from iicrepro.models import build_backbone

    t, _, crop = profile.clip
    manifest = data.manifest.iloc[: profile.eval_videos]
    clips = EvalClips(manifest, FrameStore(data.store), clip_len=t, crop=crop,
                      num_clips=profile.eval_clips)  # fmt: skip
    loader = torch.utils.data.DataLoader(
        clips, batch_size=profile.eval_batch, num_workers=workers, pin_memory=device.type == "cuda"
    )
    width = _width_for(backbone, profile.width)
    model = build_backbone(backbone, width=width).to(device).eval()
    skip = 1 if len(loader) > 1 else 0  # the first batch pays for start-up
    videos, start, dim = 0, time.perf_counter(), None
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == skip:
                _sync(device)
                start = time.perf_counter()
            b, n = batch["video"].shape[:2]
            x = to_unit(batch["video"].flatten(0, 1).to(device, non_blocking=True))
            feats = model.retrieval_features(x).reshape(b, n, -1).mean(dim=1)
            dim = feats.shape[1]
            videos += b if i >= skip else 0
    _sync(device)
    seconds = time.perf_counter() - start
    return {"videos_per_s": videos / seconds, "videos": videos, "clips_per_video":
            profile.eval_clips, "feature_dim": dim, "width": width}  # fmt: skip


# -------------------------------------------------------------------------------------- report
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


def table(result: dict) -> str:
    """The measurements as a plain-text table."""
    lines = [f"device: {result.get('device_name', '?')} ({result.get('device', '?')})"]
    loader = result.get("loader")
    if loader:
        w = loader["ours"]["workers"]
        lines += [
            f"input pipeline ({w} workers, batch {loader['ours']['batch_size']}, samples/s):",
            f"  ours, RGB + residual + intra-negative   {loader['ours']['samples_per_s']:9.1f}",
            f"  ours, RGB + u flow + intra-negative     {loader['ours_flow']['samples_per_s']:9.1f}",
            f"  upstream-style JPEG files (RGB+u+v)     {loader['baseline']['samples_per_s']:9.1f}",
            f"  speedup vs JPEG files                   {loader['speedup_vs_jpeg']:9.1f}x",
            f"  CPU ms per sample: ours {loader['ours']['cpu_ms_per_sample']:.1f}, flow "
            f"{loader['ours_flow']['cpu_ms_per_sample']:.1f}, JPEG files "
            f"{loader['baseline']['cpu_ms_per_sample']:.1f} "
            f"({loader['cpu_time_ratio_vs_jpeg']:.1f}x less)",
        ]
    train = result.get("train") or {}
    if train:
        lines.append("training step (samples/s, MFU vs bf16 peak, peak CUDA MiB):")
        for name, r in train.items():
            if "error" in r:
                lines.append(f"  {name:6s} error: {r['error']}")
                continue
            for tag, m in (("", r), ("max ", (r.get("max_batch") or {}).get("largest"))):
                if not m or "train_samples_per_s" not in m:
                    continue
                u = f"{m['mfu']:.1%}" if m.get("mfu") is not None else "n/a"
                mem = m.get("peak_cuda_mib", "n/a")
                lines.append(
                    f"  {name:6s} {tag}batch {m['batch_size']:4d}  {m['train_samples_per_s']:9.1f}"
                    f"  MFU {u:>6s}  mem {mem}"
                )
            if r.get("channels_last"):
                cl = r["channels_last"]
                lines.append(f"  {name:6s} channels-last 3D: {cl['train_samples_per_s']:9.1f} "
                             f"({cl['speedup']:.2f}x)")  # fmt: skip
    for name, a in (result.get("amp_agreement") or {}).items():
        if "loss_bf16" in a:
            lines.append(f"  bf16 vs fp32 loss ({name}): {a['loss_bf16']:.5f} vs "
                         f"{a['loss_fp32']:.5f}, rel {a['rel_diff']:.2e} "
                         f"({'ok' if a['ok'] else 'OUTSIDE'} rtol {a['rtol']})")  # fmt: skip
        else:
            lines.append(f"  bf16 vs fp32 loss ({name}): {a.get('skipped')}")
    retrieval = result.get("retrieval_videos_per_s") or {}
    if retrieval:
        lines.append("retrieval features (videos/s): " + ", ".join(
            f"{k} {v:.1f}" for k, v in retrieval.items()))  # fmt: skip
    rss = result["memory"]["cpu_max_rss_mib"]
    lines.append(f"CPU max RSS: {rss['self']} MiB (largest child {rss['children']} MiB)")
    for name, err in result.get("errors", {}).items():
        lines.append(f"FAILED {name}: {err}")
    return "\n".join(lines)


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
