"""Fine-tuning for action recognition, then the video-level test (spec 11): `iicrepro finetune`.

The backbone is built with a linear head and initialised from one of our checkpoints: the pretrained
``checkpoint.pt`` (init ``iic``/``cmc``) or the same seed's epoch-0 ``init.pt`` (init ``random``).
Every backbone entry must load (strictly); only the new head is random. Upstream loaded with
``strict=False`` and so silently trained from scratch on a key mismatch (spec 11, issues #10/#11).

Training follows upstream's ``ft_classify.py``: one random clip and crop per video per epoch; a
seeded held-out validation subset of the train list that uses the training transforms; SGD with
momentum and weight decay in two parameter groups (the last two stages and the head at ``ft_lr``,
the rest at ``lr``); ReduceLROnPlateau on the validation loss; the lowest-validation-loss model
(``best.pt``) is tested on every test video with ``clips.eval_clips`` centre-cropped clips whose
logits are averaged (spec 11). The residual input is unscaled, x_t - x_{t-1} (spec 3.3).

Resumable: ``ckpt/last.pt`` (model, optimizer, scheduler, RNG states, epoch, best model so far,
history) is written atomically every ``finetune.checkpoint_every`` epochs and at the end, and a
rerun continues from it. Each epoch's sampling is seeded from (seed, epoch), so a resumed run
repeats the uninterrupted one.

`finetune()` reads as its parts: `prepare` (checks, folder, usable videos), `build` (classifier,
optimizer, scheduler, resume), `start_tracking` (MLflow), `train_epochs` and `finish` (the test of
`evaluate.recognition`).

Outputs: ``metrics.csv`` (one row per epoch), ``best.pt``, ``test_predictions.csv`` and
``metrics.json`` ({"top1": video accuracy %, "clip_top1", "best_epoch", counts, provenance, ...}).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iicrepro import io, layout, steps, track
from iicrepro.checkpoint import FORMAT
from iicrepro.errors import UserError

VIEWS = ("rgb", "residual", "u", "v")
# Parameters trained at `ft_lr` (spec 11: conv4, conv5 and the head); the rest use `lr`. Matched on
# the top-level module name, as upstream matched parameter names.
FT_MODULES = {"r3d18": ("layer3", "layer4", "linear")}
FT_MODULES_DEFAULT = ("conv4", "conv5", "linear")
CSV_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "ft_lr")


# --------------------------------------------------------------------------- model


def model_from_checkpoint(checkpoint: str | Path, num_classes: int, backbone: str | None = None):
    """Classifier whose backbone is loaded strictly from one of our checkpoints; head random.

    Raises UserError naming every missing, unexpected or mis-shaped backbone entry.
    """
    from iicrepro.checkpoint import load_backbone, load_model_checkpoint
    from iicrepro.models import build_backbone

    ckpt = load_model_checkpoint(checkpoint)
    if backbone is not None and ckpt.get("backbone") != backbone:
        raise UserError(
            f"{checkpoint} holds a {ckpt.get('backbone')} backbone, not {backbone}: pass the "
            "matching --backbone or checkpoint"
        )
    kwargs = {k: v for k, v in (ckpt.get("model_kwargs") or {}).items() if k != "num_classes"}
    body = build_backbone(ckpt["backbone"], **kwargs)
    load_backbone(body, checkpoint)  # strict: every backbone entry, names and shapes
    model = build_backbone(ckpt["backbone"], **kwargs, num_classes=num_classes)
    result = model.load_state_dict(body.state_dict(), strict=False)
    expected_missing = set(model.state_dict()) - set(body.state_dict())  # the new head
    if result.unexpected_keys or set(result.missing_keys) != expected_missing:
        raise UserError(  # the classifier's backbone must be exactly the headless backbone
            f"backbone {ckpt['backbone']} with a head does not match its headless form: "
            f"missing {sorted(set(result.missing_keys) - expected_missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    return model, ckpt


def parameter_groups(model, backbone: str, lr: float, ft_lr: float) -> list[dict]:
    """Two SGD groups: the last two stages and the head at `ft_lr`, the rest at `lr` (spec 11)."""
    prefixes = FT_MODULES.get(backbone, FT_MODULES_DEFAULT)
    base, late = [], []
    for name, p in model.named_parameters():
        (late if name.split(".")[0].startswith(prefixes) else base).append(p)
    if not late:
        raise UserError(f"no {'/'.join(prefixes)} parameters found in backbone {backbone}")
    return [
        {"params": base, "lr": lr, "name": "lr"},
        {"params": late, "lr": ft_lr, "name": "ft_lr"},
    ]


# --------------------------------------------------------------------------- data


def epoch_seed(seed: int, epoch: int) -> int:
    """Sampling seed of one epoch: a resumed run draws the clips of the uninterrupted one."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


# --------------------------------------------------------------------------- loops


def run_epoch(model, loader, view, residual_scaled, device, optimizer=None) -> tuple[float, float]:
    """One pass; trains when `optimizer` is given. Returns (mean loss, accuracy %)."""
    import torch
    import torch.nn.functional as F

    from iicrepro.method.views import batch_input

    model.train(optimizer is not None)
    total, loss_sum, correct = 0, 0.0, 0
    with torch.set_grad_enabled(optimizer is not None):
        for batch in loader:
            labels = torch.as_tensor(batch["label"], device=device)
            logits = model(batch_input(batch, view, device, residual_scaled=residual_scaled))
            loss = F.cross_entropy(logits, labels)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total += len(labels)
            loss_sum += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
    return loss_sum / max(total, 1), 100.0 * correct / max(total, 1)


# --------------------------------------------------------------------------- the step


def _cpu_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _save(path: Path, state: dict) -> None:
    from iicrepro.checkpoint import plain, save_checkpoint

    save_checkpoint(
        path, {k: plain(v) if k in ("identity", "history") else v for k, v in state.items()}
    )


class Trainer:
    """Model, optimizer and scheduler of one fine-tuning run, with its resume file (spec 11)."""

    def __init__(self, settings, out: Path, model, ckpt: dict, backbone: str, identity: dict):
        import torch

        f = settings["finetune"]
        self.f, self.out, self.model, self.identity = f, out, model, identity
        self.optimizer = torch.optim.SGD(
            parameter_groups(model, backbone, f["lr"], f["ft_lr"]),
            lr=f["lr"], momentum=f["momentum"], weight_decay=f["weight_decay"],
        )  # fmt: skip
        p = f["plateau"]
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=p["factor"], patience=p["patience"],
            min_lr=p["min_lr"],
        )  # fmt: skip
        self.head = {"format": FORMAT, "backbone": backbone,
                     "model_kwargs": {**(ckpt.get("model_kwargs") or {}),
                                      "num_classes": model.num_classes}}  # fmt: skip
        self.epoch, self.history = 0, []
        self.best = {"epoch": 0, "loss": float("inf"), "model": _cpu_state(model)}
        self.last = out / "ckpt" / "last.pt"

    def resume(self) -> None:
        """Continue from ckpt/last.pt if it exists and belongs to this run."""
        from iicrepro.checkpoint import clean_run_folder, load_checkpoint
        from iicrepro.seeding import set_rng_state

        clean_run_folder(self.last.parent.parent, self.last.parent)  # a killed write's temp files
        if not self.last.is_file():
            return
        state = load_checkpoint(self.last)
        if state.get("identity") != self.identity:
            raise UserError(
                f"{self.last} belongs to a run with other settings or inputs: delete "
                f"{self.last.parent} to start this fine-tuning over"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.epoch, self.history, self.best = state["epoch"], state["history"], state["best"]
        self.save_best()  # this timeline's best, even if an interrupted run wrote a later one
        print(f"resuming {self.out} after epoch {self.epoch}")

    def save_best(self) -> None:
        best = {
            "model": self.best["model"],
            "epoch": self.best["epoch"],
            "val_loss": self.best["loss"],
        }
        _save(self.out / "best.pt", {**self.head, **best})

    def checkpoint(self) -> None:
        from iicrepro.seeding import rng_state

        _save(self.last, {
            **self.head, "identity": self.identity, "epoch": self.epoch,
            "model": _cpu_state(self.model), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
            "history": self.history, "best": self.best,
        })  # fmt: skip

    def end_epoch(self, row: dict) -> None:
        """Scheduler step on the validation loss, best model so far, metrics.csv."""
        self.scheduler.step(row["val_loss"])
        row |= {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.history.append(row)
        print(f"epoch {row['epoch']}/{self.f['epochs']} train {row['train_loss']:.4f} "
              f"({row['train_acc']:.1f}%) val {row['val_loss']:.4f} ({row['val_acc']:.1f}%) "
              f"lr {row['lr']:.2e}/{row['ft_lr']:.2e}")  # fmt: skip
        if row["val_loss"] < self.best["loss"]:
            self.best = {
                "epoch": self.epoch,
                "loss": row["val_loss"],
                "model": _cpu_state(self.model),
            }
            self.save_best()
        lines = [",".join(CSV_COLUMNS)]
        lines += [",".join(str(r[c]) for c in CSV_COLUMNS) for r in self.history]
        io.write_text(self.out / "metrics.csv", "\n".join(lines) + "\n")


@dataclass
class Job:
    """One fine-tuning run: its identity, folder and device, and its usable videos (`prepare`)."""

    settings: Any
    backbone: str
    view: str
    init: str
    checkpoint: Path
    dataset: str
    split: int
    seed: int
    out: Path
    device: Any
    sha: str  # the initialising checkpoint's sha256
    data: dict  # datasets.finetuning_data: train / val / test videos, stores, classes, counts
    train_clips: Any = None
    val_clips: Any = None  # None: no validation subset (the training loss stands in)

    @property
    def residual_scaled(self) -> bool:
        return (
            self.settings["finetune"]["residual"] == "rescaled"
        )  # spec 3.3: unscaled since 6632296

    def loader(self, clips, shuffle: bool, seed: int):
        import torch

        from iicrepro.devices import pin_memory

        f = self.settings["finetune"]
        return torch.utils.data.DataLoader(
            clips, batch_size=f["batch_size"], shuffle=shuffle, num_workers=f["workers"],
            generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory(self.device),
        )  # fmt: skip


def prepare(settings: Any, *, backbone, view, init, checkpoint, dataset, split, seed, out,
            device) -> Job:  # fmt: skip
    """Checked arguments, the run folder and device, the usable videos and their clip datasets."""
    from iicrepro.data.datasets import finetuning_data, training_clips
    from iicrepro.devices import pick_device

    if view not in VIEWS:
        raise UserError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
    if init not in layout.INITS:
        raise UserError(f"unknown init {init!r}; choose one of {', '.join(layout.INITS)}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        hint = "the seed's init.pt" if init == "random" else "checkpoint.pt"
        raise UserError(f"checkpoint {checkpoint} not found: pass {hint} of `iicrepro pretrain`")
    run = layout.finetune_run(checkpoint, view, seed)
    out = Path(out) if out else layout.finetune_dir(settings, dataset, split, run)
    device = pick_device(device)
    sha = io.sha256_file(checkpoint)
    data = finetuning_data(settings, dataset, split, view, seed)
    job = Job(settings, backbone, view, init, checkpoint, dataset, split, seed, out, device, sha,
              data)  # fmt: skip
    job.train_clips = training_clips(settings, data["train"], data["store"], data["flows"])
    if len(data["val"]):
        job.val_clips = training_clips(settings, data["val"], data["store"], data["flows"])
    return job


def build(job: Job) -> Trainer:
    """The classifier (backbone loaded strictly, head seeded by the run's seed), its optimizer and
    scheduler, continued from ckpt/last.pt when that holds this very run."""
    from iicrepro.checkpoint import plain
    from iicrepro.seeding import seed_everything

    seed_everything(job.seed)  # the head's initial weights
    model, ckpt = model_from_checkpoint(job.checkpoint, job.data["classes"], job.backbone)
    identity = {  # what a resume file must match: the run, its inputs and steps.Finetune
        "backbone": job.backbone, "view": job.view, "init": job.init,
        "checkpoint_sha256": job.sha, "dataset": job.dataset, "split": job.split,
        "seed": job.seed, "model_kwargs": ckpt.get("model_kwargs"),
        "train_videos": list(job.data["train"]["video"]),
        **steps.Finetune.from_settings(job.settings, dataset=job.dataset).as_dict(),
    }  # fmt: skip
    trainer = Trainer(
        job.settings, job.out, model.to(job.device), ckpt, job.backbone, plain(identity)
    )
    trainer.resume()
    return trainer


def start_tracking(job: Job):
    """The run's MLflow run (`track.start_run`): params = steps.Finetune, lineage = the
    initialising checkpoint; it logs each epoch while the run trains."""
    run = layout.finetune_run(job.checkpoint, job.view, job.seed)
    ident = {**(layout.parse_run_name(run) or {}), "dataset": job.dataset, "split": job.split,
             "view": job.view, "init": job.init, "seed": job.seed, "variant": None}  # fmt: skip
    return track.start_run(
        job.settings, "finetune", job.out, name=f"{run}/split{job.split}", identity=ident,
        params=steps.Finetune.from_settings(job.settings, dataset=job.dataset).as_dict(),
        lineage={"sha256": job.sha, "file": job.checkpoint.name},
    )  # fmt: skip


def train_epochs(job: Job, trainer: Trainer, tracked, stop_after: int | None) -> bool:
    """Epochs until `finetune.epochs` (or `stop_after` more), each seeded from (seed, epoch);
    resume state every `finetune.checkpoint_every` epochs and when stopping. True when done."""
    from iicrepro.seeding import seed_everything

    f, model, device = job.settings["finetune"], trainer.model, job.device
    ran = 0
    while trainer.epoch < f["epochs"] and (stop_after is None or ran < stop_after):
        trainer.epoch += 1
        ran += 1
        s = epoch_seed(job.seed, trainer.epoch)
        seed_everything(s)
        row = {"epoch": trainer.epoch}
        row["train_loss"], row["train_acc"] = run_epoch(
            model, job.loader(job.train_clips, True, s), job.view, job.residual_scaled, device,
            trainer.optimizer,
        )  # fmt: skip
        row["val_loss"], row["val_acc"] = (  # no validation subset: follow the training loss
            run_epoch(
                model,
                job.loader(job.val_clips, False, s + 1),
                job.view,
                job.residual_scaled,
                device,
            )  # fmt: skip
            if job.val_clips is not None
            else (row["train_loss"], row["train_acc"])
        )
        trainer.end_epoch(row)
        tracked.log_epoch(row)
        if (
            trainer.epoch % f["checkpoint_every"] == 0
            or trainer.epoch == f["epochs"]
            or ran == stop_after
        ):
            trainer.checkpoint()
    if trainer.epoch < f["epochs"]:
        print(f"stopped after epoch {trainer.epoch} of {f['epochs']}; rerun to continue")
        tracked.finish(complete=False)
        return False
    return True


def finish(job: Job, trainer: Trainer, tracked) -> Path:
    """Test the best-validation model (every test video, eval_clips centre crops, spec 11):
    test_predictions.csv and metrics.json; the spent resume state goes, the MLflow run ends."""
    from iicrepro.checkpoint import load_checkpoint
    from iicrepro.evaluate.recognition import test_videos, write_predictions

    f, out, model = job.settings["finetune"], job.out, trainer.model
    trainer.save_best()  # also when no epoch improved on the initial weights (non-finite losses)
    model.load_state_dict(load_checkpoint(out / "best.pt")["model"])
    result = test_videos(job.settings, model, job.data, job.view, job.device, seed=job.seed)
    write_predictions(out / "test_predictions.csv", job.data["test"]["video"], result)
    manifest = layout.manifest(job.settings, job.dataset, job.split)
    metrics = {
        "top1": result["top1"], "clip_top1": result["clip_top1"],
        "best_epoch": trainer.best["epoch"], "best_val_loss": trainer.best["loss"],
        "epochs": f["epochs"], "backbone": job.backbone, "view": job.view, "init": job.init,
        "dataset": job.dataset, "split": job.split, "seed": job.seed,
        "num_classes": job.data["classes"], "residual": f["residual"],
        "counts": {**job.data["counts"], "test_clips": result["clips"]},
        "checkpoint": {"path": str(job.checkpoint), "sha256": job.sha},
        "provenance": io.provenance(job.settings, [job.checkpoint, manifest], step="finetune"),
    }  # fmt: skip
    io.write_json(out / "metrics.json", metrics)
    trainer.last.unlink(missing_ok=True)  # spent: a rerun with new settings starts anew
    tracked.finish(files=("metrics.csv", "metrics.json", "test_predictions.csv"))
    return out


def finetune(
    settings: Any,
    *,
    backbone: str,
    view: str,
    init: str,
    checkpoint: str | Path,
    dataset: str,
    split: int,
    seed: int,
    out: str | Path | None = None,
    device: str | None = None,
    stop_after: int | None = None,
) -> Path:
    """Fine-tune and test one model; returns the run folder (metrics.json once finished).

    `stop_after` ends this call after that many epochs (checkpointed), for time-limited jobs.
    """
    job = prepare(
        settings, backbone=backbone, view=view, init=init, checkpoint=checkpoint,
        dataset=dataset, split=split, seed=seed, out=out, device=device,
    )  # fmt: skip
    trainer = build(job)
    tracked = start_tracking(job)
    if not train_epochs(job, trainer, tracked, stop_after):
        return job.out
    return finish(job, trainer, tracked)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, help="c3d, r3d, r21d or r3d18")
    parser.add_argument("--view", required=True, choices=VIEWS, help="input modality")
    parser.add_argument(
        "--init",
        required=True,
        choices=layout.INITS,
        help="iic/cmc: pretrained checkpoint.pt; random: the seed's init.pt",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint to initialise from")
    parser.add_argument("--dataset", required=True, help="ucf101, hmdb51 or synthetic")
    parser.add_argument("--split", type=int, required=True, choices=(1, 2, 3))
    parser.add_argument(
        "--seed", type=int, required=True, help="validation split and sampling seed"
    )
    parser.add_argument("--out", default=None, help="output folder (default: layout)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop after N epochs of this call (checkpointed; rerun to continue)",
    )


def main(args: argparse.Namespace) -> int:
    from iicrepro.cli import settings_from_args

    settings = settings_from_args(args)
    out = finetune(
        settings,
        backbone=args.backbone,
        view=args.view,
        init=args.init,
        checkpoint=args.checkpoint,
        dataset=args.dataset,
        split=args.split,
        seed=args.seed,
        out=args.out,
        device=args.device,
        stop_after=args.stop_after,
    )
    if (out / "metrics.json").is_file():
        m = io.read_json(out / "metrics.json")
        print(
            f"test top1 {m['top1']:.2f} (clip {m['clip_top1']:.2f}), best epoch {m['best_epoch']}"
        )
    return 0
