"""`iicrepro pretrain`: self-supervised IIC pretraining of one backbone x view x intra-negative x
seed (spec 4, 7, 9), resumable.

Outputs in the run folder (`layout.pretrain_dir`):
    init.pt        epoch-0 weights (the seed's random-init baseline starts from the same weights)
    ckpt/last.pt   resume state: model, optimizer, schedule position, banks, RNG states, metrics
    metrics.csv    one row per epoch: epoch, loss, lr, positive_rank1, samples_per_s, seconds
    metrics.json   final loss beside its chance level, epochs, seconds per epoch, provenance
    checkpoint.pt  final backbone + banks + settings; written last, so its presence means "done"

`pretrain()` reads as its parts: `prepare` (folder, process group, usable videos, plan), `finished`,
`build` (backbone, banks, init.pt, optimizer), `resume`, `train_epochs` (`run_epoch` -> `train_step`)
and `finish` (metrics.json, checkpoint.pt).

A run that finds ckpt/last.pt continues from it; on the CPU the result is bit-identical to an
uninterrupted run (every random stream is restored, and the learning rate is a pure function of
the position in the schedule).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io as _io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iicrepro import io, layout, steps, track
from iicrepro.errors import UserError

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["epoch", "loss", "lr", "positive_rank1", "samples_per_s", "seconds"]


# ------------------------------------------------------------------------------------- schedule
def learning_rate(p: Any, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Learning rate at step `step` of 0-based `epoch`.

    multistep: what upstream ran (spec 9): MultiStepLR stepped after each epoch, so 1-based epoch
    e trains at lr * gamma^(number of milestones <= e - 1). cosine: per step from lr to 0 over the
    whole run. constant: lr.
    """
    if p["schedule"] == "multistep":
        return p["lr"] * p["gamma"] ** sum(m <= epoch for m in p["milestones"])
    if p["schedule"] == "cosine":
        progress = (epoch * steps_per_epoch + step) / (epochs * steps_per_epoch)
        return p["lr"] * 0.5 * (1 + math.cos(math.pi * progress))
    if p["schedule"] == "constant":
        return p["lr"]
    raise UserError(f"pretrain.schedule {p['schedule']!r} is unknown (multistep|cosine|constant)")


# ----------------------------------------------------------------------------------------- step
@dataclass
class StepContext:
    """What one optimisation step needs. `model` is the module called for the forwards (it may
    be compiled or wrapped, e.g. for DDP); `bank` the memory banks."""

    model: Any
    bank: Any
    optimizer: Any
    device: Any
    view: str
    intra_negative: str
    amp: str = "none"
    world: Any = None  # train.distributed.World of a DDP job; None: one process


def train_step(ctx: StepContext, batch: dict):
    """One IIC step on a batch from PretrainClips; returns (loss, positive_rank1), detached.

    Three separate forwards in train mode (spec 15: BN statistics per stream, not one
    concatenated batch). The intra-negative forward runs without gradient but still updates BN
    running statistics (spec 7.7); only f1 and f2 receive gradient.
    """
    import torch

    from iicrepro.devices import autocast
    from iicrepro.method.intra_negative import intra_negative_of_rank
    from iicrepro.method.memory_bank import nce_loss, positive_rank1
    from iicrepro.method.views import make_view, to_unit
    from iicrepro.train import distributed as ddp

    x = to_unit(batch["video"].to(ctx.device, non_blocking=True))
    flow = batch.get("flow")
    if flow is not None:
        flow = to_unit(flow.to(ctx.device, non_blocking=True))
    index = batch["index"].to(ctx.device, non_blocking=True)
    world = ctx.world or ddp.SINGLE
    neg = intra_negative_of_rank(x, ctx.intra_negative, world.rank, world.size)
    with autocast(ctx.device, ctx.amp):
        f1 = ctx.model(x)
        # view rgb: view 2 is the very same feature (spec 5, degenerate upstream option).
        f2 = f1 if ctx.view == "rgb" else ctx.model(make_view(x, ctx.view, flow=flow))
        fn = None
        if neg is not None:
            with torch.no_grad():
                fn = ctx.model(neg)
    logits1, logits2 = ctx.bank(f1, f2, index, fn)
    loss = nce_loss(logits1, logits2)
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ctx.optimizer.step()
    return loss.detach(), positive_rank1(logits1, logits2)


def run_epoch(
    ctx: StepContext,
    loader,
    *,
    epoch: int,
    epochs: int,
    schedule: Any,
    steps_per_epoch: int,
    max_steps: int | None = None,
) -> dict:
    """Train one epoch (0-based `epoch`); returns its metrics row."""
    import torch
    from tqdm import tqdm

    from iicrepro.train.distributed import SINGLE

    world = ctx.world or SINGLE
    sums = torch.zeros(2, device=ctx.device)
    steps, first_lr = 0, None
    batch_size = loader.batch_size * world.size  # the global batch
    start = time.perf_counter()
    bar = tqdm(
        total=steps_per_epoch * batch_size, unit="clip", unit_scale=True, leave=False,
        desc=f"pretrain epoch {epoch + 1}/{epochs}", dynamic_ncols=True,
        disable=None if world.main else True,  # rank 0's bar, on terminals only
    )  # fmt: skip
    with bar:
        for i, batch in enumerate(loader):
            if max_steps is not None and i >= max_steps:
                break
            lr = learning_rate(schedule, epoch, i, steps_per_epoch, epochs)
            first_lr = lr if first_lr is None else first_lr
            for group in ctx.optimizer.param_groups:
                group["lr"] = lr
            loss, rank1 = train_step(ctx, batch)
            sums += torch.stack([loss, rank1])
            steps += 1
            bar.update(batch_size)
            if i % 10 == 0:  # .item() waits for the device: not on every step
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - start
    loss_mean, rank1_mean = (world.mean(sums) / max(steps, 1)).tolist()
    return {
        "epoch": epoch + 1,
        "loss": loss_mean,
        "lr": first_lr,
        "positive_rank1": rank1_mean,
        "samples_per_s": steps * batch_size / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
        "steps": steps,
    }


def mfu_estimate(settings: Any, backbone: str, view: str, intra_negative: str, device, world):
    """samples/s -> MFU on a CUDA device with a known bf16 peak (the epoch line shows it), from
    the backbone's counted FLOPs (`devices.forward_flops`); None elsewhere."""
    import torch

    from iicrepro.devices import forward_flops, forwards_per_sample, mfu, peak_bf16_tflops

    if device.type != "cuda":
        return lambda samples_per_s: None
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device))
    c, m = settings["clips"], settings["model"]
    clip = (c["length"], c["crop"], c["crop"])
    flops = forward_flops(backbone, clip, m["width"], m["small_input"])
    forwards = forwards_per_sample(view, intra_negative)
    return lambda samples_per_s: mfu(samples_per_s / world.size, flops, peak, forwards)


def epoch_line(run: str, row: dict, epochs: int, chance: float, utilisation) -> str:
    """The line printed after each epoch; MFU where `utilisation` (`mfu_estimate`) knows it."""
    line = (
        f"pretrain {run} epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f} "
        f"(chance {chance:.2f}), positive first {row['positive_rank1']:.1%}, "
        f"lr {row['lr']:.3g}, {row['samples_per_s']:.0f} clips/s, {row['seconds']:.1f} s"
    )
    u = utilisation(row["samples_per_s"])
    return line if u is None else f"{line}, MFU {u:.1%}"


# ------------------------------------------------------------------------------------ outputs
def _write_metrics_csv(path: Path, rows: list[dict]) -> None:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    io.write_text(path, buf.getvalue())


def _plan(settings, backbone, view, intra_negative, seed, epochs, max_steps, n) -> dict:
    """Everything that determines the result (`steps.Pretrain` and the run's identity): a resume
    or a finished run must match it."""
    decided = dataclasses.replace(steps.Pretrain.from_settings(settings), epochs=epochs)
    return {
        "backbone": backbone, "view": view, "intra_negative": intra_negative, "seed": seed,
        "max_steps": max_steps, "videos": n, **decided.as_dict(),
    }  # fmt: skip


# ------------------------------------------------------------------------------------- the run
@dataclass
class Run:
    """One pretraining run: its identity, where it writes, what it trains on (`prepare`), and
    the parts `build` makes (backbone, banks, optimizer, the loader's random stream)."""

    settings: Any
    backbone: str
    view: str
    intra_negative: str
    seed: int
    epochs: int
    max_steps: int | None
    out: Path
    world: Any  # train.distributed.World
    device: Any
    clips: Any = None  # PretrainClips of the usable training videos
    inputs: list = field(default_factory=list)  # files the result depends on (provenance)
    counts: dict = field(default_factory=dict)  # usable-video counts (metrics.json "videos")
    plan: dict = field(default_factory=dict)  # what decides the result (`_plan`)
    model_kwargs: dict = field(default_factory=dict)
    model: Any = None
    bank: Any = None
    optimizer: Any = None
    loader_rng: Any = None
    tracked: Any = None  # the MLflow run (track.start_run), logging while it trains

    @property
    def final(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def last(self) -> Path:
        return self.out / "ckpt" / "last.pt"

    @property
    def steps_per_epoch(self) -> int:
        return len(self.clips) // self.settings["pretrain"]["batch_size"]  # drop_last (spec 4)


def prepare(settings: Any, *, backbone, view, intra_negative, seed, out_dir, max_steps, epochs,
            device) -> Run:  # fmt: skip
    """The run's folder, process group and device, its usable training videos and its plan."""
    from iicrepro import checkpoint as ck
    from iicrepro.data.datasets import pretraining_set
    from iicrepro.devices import configure
    from iicrepro.seeding import seed_everything
    from iicrepro.train import distributed as ddp

    p = settings["pretrain"]
    epochs = int(epochs or p["epochs"])
    out = Path(out_dir) if out_dir else layout.pretrain_dir(
        settings, backbone, view, intra_negative, seed
    )  # fmt: skip
    world, device = ddp.init(device)  # one process, or one rank of a torchrun job
    run = Run(settings, backbone, view, intra_negative, seed, epochs, max_steps, out, world, device)
    if world.main:
        ck.clean_run_folder(out, run.last.parent)  # temporary files of a killed write
    configure(device)
    seed_everything(seed)
    run.clips, run.inputs, run.counts = pretraining_set(settings, view)
    n, batch_size = len(run.clips), p["batch_size"]
    if n < batch_size:
        raise UserError(
            f"{n} usable training videos < pretrain.batch_size={batch_size} (drop_last leaves "
            "no batch): lower the batch size or fix the frame store"
        )
    ddp.rank_batch_size(batch_size, world)  # under DDP the global batch must split evenly
    run.plan = _plan(settings, backbone, view, intra_negative, seed, epochs, max_steps, n)
    return run


def finished(run: Run) -> bool:
    """True when checkpoint.pt holds this very run; another run's checkpoint.pt is an error."""
    from iicrepro import checkpoint as ck

    if not run.final.is_file():
        return False
    done = ck.load_checkpoint(run.final)
    if done.get("plan") == run.plan:
        log.info("%s exists: nothing to do", run.final)
        return True
    raise UserError(
        f"{run.final} was made with other settings "
        f"({steps.differences(done.get('plan', {}), run.plan)}); "
        f"delete {run.out} or pass another --out"
    )


def build(run: Run) -> None:
    """Backbone, memory banks, the loader's random stream, init.pt and the optimizer. The
    construction order fixes the random init: backbone, then banks, then the loader's stream."""
    import torch

    from iicrepro import checkpoint as ck
    from iicrepro.method.memory_bank import memory_bank
    from iicrepro.models import build_backbone

    s, p, device = run.settings, run.settings["pretrain"], run.device
    run.model_kwargs = {"width": s["model"]["width"], "small_input": s["model"]["small_input"]}
    run.model = build_backbone(run.backbone, **run.model_kwargs)
    run.bank = memory_bank(
        run.world, len(run.clips), run.model.out_dim, k=p["nce"]["k"], t=p["nce"]["t"],
        momentum=p["nce"]["momentum"], intra=run.intra_negative != "none",
        normalize_features=p["nce"]["normalize_features"],
    )  # fmt: skip
    run.loader_rng = torch.Generator().manual_seed(run.seed)
    init = run.out / "init.pt"
    if run.world.main and not init.is_file():
        prov = ck.plain(io.provenance(s, run.inputs, step="pretrain"))
        ck.save_checkpoint(init, ck.backbone_state(run.model, run.backbone, run.model_kwargs,
                                                   seed=run.seed, epoch=0, provenance=prov))  # fmt: skip
    run.model.to(device)
    if p["channels_last"] and device.type == "cuda":  # NDHWC convolutions (BENCHMARKS.md "GPU")
        run.model.to(memory_format=torch.channels_last_3d)
    run.bank.to(device)
    run.optimizer = torch.optim.SGD(
        run.model.parameters(), lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"]
    )


def resume(run: Run) -> tuple[int, list[dict]]:
    """Continue from ckpt/last.pt when it holds this run: (epochs done, their metric rows)."""
    from tqdm import tqdm

    from iicrepro import checkpoint as ck
    from iicrepro.seeding import set_rng_state

    if not run.last.is_file():
        return 0, []
    state = ck.load_checkpoint(run.last)
    if state.get("plan") != run.plan:
        raise UserError(
            f"{run.last} was made with other settings "
            f"({steps.differences(state.get('plan', {}), run.plan)}); "
            f"delete it to start over, or restore the settings to resume"
        )
    run.model.load_state_dict(state["model"])
    run.bank.load_state_dict(state["bank"])
    run.optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    run.loader_rng.set_state(state["loader_rng"])
    if run.world.main:
        tqdm.write(f"pretrain: resuming {run.out.name} after epoch {state['epoch']}/{run.epochs}")
    return state["epoch"], list(state["metrics"])


def data_loader(run: Run):
    """Shuffled batches of the global batch size, last partial batch dropped (spec 4); under
    DDP, this rank's rows of every global batch."""
    import torch

    from iicrepro.devices import pin_memory
    from iicrepro.train import distributed as ddp

    p = run.settings["pretrain"]
    if run.world.distributed:
        return ddp.data_loader(
            run.clips, run.world, batch_size=p["batch_size"], workers=p["workers"],
            generator=run.loader_rng, pin_memory=pin_memory(run.device),
        )  # fmt: skip
    return torch.utils.data.DataLoader(
        run.clips, batch_size=p["batch_size"], shuffle=True, drop_last=True,
        num_workers=p["workers"], generator=run.loader_rng, pin_memory=pin_memory(run.device),
    )  # fmt: skip


def _save_resume_state(run: Run, epoch: int, rows: list[dict]) -> None:
    from iicrepro import checkpoint as ck
    from iicrepro.seeding import rng_state

    p = run.settings["pretrain"]
    ck.save_checkpoint(run.last, {
        "format": ck.FORMAT, "plan": run.plan, "epoch": epoch, "metrics": rows,
        "model": run.model.state_dict(), "bank": run.bank.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": {"name": p["schedule"], "epoch": epoch, "steps_per_epoch": run.steps_per_epoch},
        "rng": rng_state(), "loader_rng": run.loader_rng.get_state(),
    })  # fmt: skip


def train_epochs(run: Run, start: int, rows: list[dict]) -> list[dict]:
    """Epochs `start`.. of the run: metrics.csv and the epoch line after each, resume state every
    `pretrain.checkpoint_every` epochs and at the end (not in a `max_steps` debug run)."""
    import torch
    from tqdm import tqdm

    from iicrepro.train import distributed as ddp

    p, world, device = run.settings["pretrain"], run.world, run.device
    loader = data_loader(run)
    step_model = ddp.wrap(run.model, world, device)  # DDP + synchronised BN in a process group
    step_model = torch.compile(step_model) if p["compile"] else step_model
    ctx = StepContext(step_model, run.bank, run.optimizer, device, run.view, run.intra_negative,
                      p["amp"], world)  # fmt: skip
    run.model.train()
    utilisation = mfu_estimate(
        run.settings, run.backbone, run.view, run.intra_negative, device, world
    )
    ident = {"dataset": p["dataset"], "split": p["split"], "backbone": run.backbone,
             "view": run.view, "intra_negative": run.intra_negative, "seed": run.seed}  # fmt: skip
    run.tracked = track.start_run(
        run.settings, "pretrain", run.out, identity=ident, params=run.plan, enabled=world.main,
        name=layout.run_name(run.backbone, run.view, run.intra_negative, run.seed),
    )  # fmt: skip
    steps_left = run.max_steps
    for epoch in range(start, run.epochs):
        row = run_epoch(
            ctx, loader, epoch=epoch, epochs=run.epochs, schedule=p,
            steps_per_epoch=run.steps_per_epoch, max_steps=steps_left,
        )  # fmt: skip
        rows.append(row)
        if world.main:  # only rank 0 writes and logs
            _write_metrics_csv(run.out / "metrics.csv", rows)
            run.tracked.log_epoch(row)
            tqdm.write(epoch_line(run.out.name, row, run.epochs, run.bank.chance_loss(),
                                  utilisation))  # fmt: skip
        if steps_left is not None:
            steps_left -= row["steps"]
            if steps_left <= 0:
                break
            continue  # a truncated debug run keeps no resume state
        if world.main and ((epoch + 1) % p["checkpoint_every"] == 0 or epoch + 1 == run.epochs):
            _save_resume_state(run, epoch + 1, rows)
    return rows


def finish(run: Run, rows: list[dict]) -> Path:
    """metrics.json, then checkpoint.pt (written last: its presence means "done"); the spent
    resume state goes, the MLflow run ends. Other ranks wait for rank 0."""
    from iicrepro import checkpoint as ck

    world, bank, out = run.world, run.bank, run.out
    if not world.main:
        world.barrier()  # returns once rank 0 has written the run's files
        return out
    prov = ck.plain(io.provenance(run.settings, run.inputs, step="pretrain"))
    seconds = [r["seconds"] for r in rows]
    summary = {
        "final_loss": rows[-1]["loss"],
        "chance_loss": bank.chance_loss(),
        "final_positive_rank1": rows[-1]["positive_rank1"],
        "epochs": len(rows),
        "planned_epochs": run.epochs,
        "steps": sum(r["steps"] for r in rows),
        "max_steps": run.max_steps,
        "seconds_per_epoch": sum(seconds) / len(seconds),
        "samples_per_s": sum(r["samples_per_s"] for r in rows) / len(rows),
        "videos": run.counts,
        "backbone": run.backbone, "view": run.view, "intra_negative": run.intra_negative,
        "seed": run.seed,
        "device": str(run.device),
        "processes": world.size,
        "provenance": prov,
    }  # fmt: skip
    io.write_json(out / "metrics.json", summary)
    bank_config = {k: getattr(bank, k) for k in ("n", "dim", "k", "t", "momentum", "intra",
                                                  "normalize_features")}  # fmt: skip
    try:
        ck.save_checkpoint(run.final, ck.backbone_state(
            run.model, run.backbone, run.model_kwargs,
            bank={k: v.cpu() for k, v in bank.state_dict().items()}, bank_config=bank_config,
            view=run.view, intra_negative=run.intra_negative, seed=run.seed, epoch=len(rows),
            plan=run.plan, settings=ck.plain(run.settings), provenance=prov,
        ))  # fmt: skip
    except BaseException:  # e.g. a full disk: no record of a run whose model was not written
        (out / "metrics.json").unlink(missing_ok=True)
        raise
    run.last.unlink(missing_ok=True)  # spent: a rerun with new settings starts anew
    run.tracked.finish(checkpoint=run.final, init=out / "init.pt")
    world.barrier()
    return out


def pretrain(
    settings: Any,
    *,
    backbone: str,
    view: str,
    intra_negative: str,
    seed: int,
    out_dir: str | Path | None = None,
    max_steps: int | None = None,
    epochs: int | None = None,
    device: str | None = None,
) -> Path:
    """Pretrain one model; returns its run folder. `max_steps` (debug, benchmarks) stops after
    that many optimisation steps; such a run records it and writes no resume state."""
    run = prepare(
        settings, backbone=backbone, view=view, intra_negative=intra_negative, seed=seed,
        out_dir=out_dir, max_steps=max_steps, epochs=epochs, device=device,
    )  # fmt: skip
    if finished(run):
        return run.out
    build(run)
    start, rows = resume(run)
    rows = train_epochs(run, start, rows)
    return finish(run, rows)


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backbone", help="c3d | r3d | r21d | r3d18 (default: first of pretrain.backbones)"
    )
    parser.add_argument(
        "--view", help="view 2: residual | u | v | rgb (default: first of pretrain.views)"
    )
    parser.add_argument(
        "--intra-negative",
        help="repeat | shuffle | none (CMC) (default: first of pretrain.intra_negatives)",
    )
    parser.add_argument("--seed", type=int, help="default: first of pretrain.seeds")
    parser.add_argument("--out", type=Path, help="run folder (default: layout.pretrain_dir)")
    parser.add_argument("--epochs", type=int, help="override pretrain.epochs")
    parser.add_argument("--max-steps", type=int, help="debug: stop after this many steps")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")


def main(args: argparse.Namespace) -> int:
    from iicrepro.cli import settings_from_args
    from iicrepro.method.intra_negative import KINDS
    from iicrepro.method.views import VIEWS
    from iicrepro.models import BACKBONES

    settings = settings_from_args(args)
    p = settings.pretrain
    backbone = args.backbone or p.backbones[0]
    view = args.view or p.views[0]
    neg = args.intra_negative or p.intra_negatives[0]
    seed = p.seeds[0] if args.seed is None else args.seed
    for value, allowed, what in ((backbone, BACKBONES, "--backbone"), (view, VIEWS, "--view"),
                                 (neg, KINDS, "--intra-negative")):  # fmt: skip
        if value not in allowed:
            raise UserError(f"{what} {value!r} is unknown; choose one of {', '.join(allowed)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError("--max-steps must be at least 1")
    from iicrepro.train import distributed as ddp

    try:
        out = pretrain(
            settings, backbone=backbone, view=view, intra_negative=neg, seed=seed,
            out_dir=args.out, max_steps=args.max_steps, epochs=args.epochs, device=args.device,
        )  # fmt: skip
    finally:
        ddp.shutdown()
    if not ddp.is_main_process():
        return 0
    summary = io.read_json(out / "metrics.json")
    print(
        f"pretrain {out}: {summary['epochs']} epochs, final loss {summary['final_loss']:.4f} "
        f"(chance {summary['chance_loss']:.2f}), positive ranked first "
        f"{summary['final_positive_rank1']:.1%}, {summary['seconds_per_epoch']:.2f} s/epoch"
    )
    return 0
