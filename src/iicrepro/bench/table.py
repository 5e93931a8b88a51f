"""The plain-text table `iicrepro bench` prints from its result."""

from __future__ import annotations


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
