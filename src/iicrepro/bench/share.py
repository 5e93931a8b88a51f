"""Several training runs sharing one device: aggregate pretraining samples/s of N processes.

The paper's grid is many small-batch runs (batch 16); one such run leaves a large GPU mostly
idle, so N runs on one GPU may give more samples per GPU-hour than one. This measures it: for
each N in `--processes`, N spawned processes each build a backbone, memory bank and SGD and run
the real `train_step` on one batch kept on the device (as `iicrepro bench --parts train`); after
their warm-up they start together (a barrier) and step for `--seconds`. The figure is the sum of
their samples/s, beside N = 1. Usage:

    python -m iicrepro.bench.share --device cuda --backbone r3d --batch-size 16 --amp bf16 \\
        --processes 1 2 4 --seconds 20 --out results/share.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path


def _worker(cfg: dict, barrier, queue) -> None:
    """One run: warm up, wait for the others, step for cfg['seconds']; report its samples/s."""
    import torch

    from iicrepro.method.memory_bank import MemoryBank
    from iicrepro.models import build_backbone
    from iicrepro.train.pretrain import StepContext, train_step

    try:
        torch.set_num_threads(cfg["threads"])
        device = torch.device(cfg["device"])
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(cfg["rank"])
        model = build_backbone(cfg["backbone"], width=cfg["width"]).to(device).train()
        if cfg["channels_last"]:
            model.to(memory_format=torch.channels_last_3d)
        bank = MemoryBank(cfg["bank"], model.out_dim, k=cfg["k"], t=0.07, momentum=0.5)
        bank = bank.to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        step_model = torch.compile(model) if cfg["compile"] else model
        ctx = StepContext(step_model, bank, opt, device, "residual", "repeat", cfg["amp"])
        b = cfg["batch_size"]
        video = torch.randint(0, 256, (b, 3, *cfg["clip"]), dtype=torch.uint8, device=device)

        def step(i: int) -> None:
            index = (torch.arange(b, device=device) + i * b) % cfg["bank"]
            train_step(ctx, {"video": video, "index": index})

        for i in range(cfg["warmup"]):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except BaseException as exc:
        barrier.abort()
        queue.put({"rank": cfg["rank"], "error": f"{type(exc).__name__}: {exc}"})
        raise
    barrier.wait()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < cfg["seconds"]:
        step(cfg["warmup"] + steps)
        steps += 1
        if device.type == "cuda" and steps % 4 == 0:
            torch.cuda.synchronize(device)  # keep the host at most a few steps ahead
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    queue.put({"rank": cfg["rank"], "steps": steps, "seconds": seconds,
               "samples_per_s": steps * b / seconds})  # fmt: skip


def measure(processes: int, cfg: dict, timeout: float) -> dict:
    """Aggregate samples/s of `processes` concurrent runs with settings `cfg`."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(cfg | {"rank": r}, barrier, queue))
        for r in range(processes)
    ]
    for p in procs:
        p.start()
    runs = []
    deadline = time.monotonic() + timeout
    try:
        while len(runs) < processes:
            runs.append(queue.get(timeout=max(deadline - time.monotonic(), 1)))
            if "error" in runs[-1]:
                break
    except Exception:  # queue.Empty: a process died or hung
        runs.append({"error": f"timed out after {timeout:.0f} s"})
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return {"processes": processes, "error": errors[0]}
    runs.sort(key=lambda r: r["rank"])
    total = sum(r["samples_per_s"] for r in runs)
    return {"processes": processes, "aggregate_samples_per_s": total,
            "per_process_samples_per_s": [r["samples_per_s"] for r in runs],
            "steps": [r["steps"] for r in runs]}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    cfg = {
        "device": args.device, "backbone": args.backbone, "batch_size": args.batch_size,
        "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
        "width": args.width, "clip": tuple(args.clip), "bank": max(args.bank, args.batch_size),
        "k": args.k, "warmup": args.warmup, "seconds": args.seconds, "threads": args.threads,
    }  # fmt: skip
    result = {"settings": cfg, "runs": []}
    for n in args.processes:
        r = measure(n, cfg, timeout=args.timeout)
        result["runs"].append(r)
        print(json.dumps(r), flush=True)
    base = next((r for r in result["runs"] if r.get("processes") == 1), None)
    if base and "aggregate_samples_per_s" in base:
        for r in result["runs"]:
            if "aggregate_samples_per_s" in r:
                r["gain_vs_1"] = r["aggregate_samples_per_s"] / base["aggregate_samples_per_s"]
    ok = [r for r in result["runs"] if "aggregate_samples_per_s" in r]
    if ok:
        best = max(ok, key=lambda r: r["aggregate_samples_per_s"])
        result["best"] = {k: best.get(k) for k in ("processes", "aggregate_samples_per_s")}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbone", default="r3d", choices=("c3d", "r3d", "r21d", "r3d18"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--amp", choices=("none", "bf16"), default="bf16")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--clip", type=int, nargs=3, default=[16, 112, 112], metavar=("T", "H", "W"))
    ap.add_argument("--bank", type=int, default=9537, help="memory-bank rows (UCF101 split 1)")
    ap.add_argument("--k", type=int, default=1024, help="negatives")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0, help="timed window per measurement")
    ap.add_argument("--threads", type=int, default=2, help="intra-op CPU threads per process")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--timeout", type=float, default=180.0, help="per measurement, seconds")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if "best" in result:
        b = result["best"]
        print(f"best: {b['processes']} process(es), {b['aggregate_samples_per_s']:.1f} samples/s")
    return 0 if all("error" not in r for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
