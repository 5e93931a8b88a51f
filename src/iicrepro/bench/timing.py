"""The timed parts of `iicrepro bench`: input pipeline, training step (with MFU), bf16 agreement,
largest batch, retrieval feature extraction, memory."""

from __future__ import annotations

import gc
import os
import platform
import resource
import time
from pathlib import Path

from iicrepro.bench.data import BenchData, Profile
from iicrepro.devices import forward_flops, mfu

AMP_RTOL = 0.02  # bf16 vs fp32 loss, relative


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

    from iicrepro.bench.upstream import UpstreamStyleClips
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
