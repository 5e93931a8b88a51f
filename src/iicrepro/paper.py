"""The paper's numbers (``paper_results.csv``) in this project's vocabulary.

The CSV is a copy of ``spec/paper-results.csv``: every number the IIC paper and its upstream README
report, one row each, in the paper's words (``UCF101``, ``R(2+1)D``, ``RGB+Res``, ``top1_acc``).
`load` maps each row onto the keys of ``results/summary.csv`` (``ucf101``, ``r21d``, ``residual``,
``top1``) so `lookup` can set a paper number beside ours.

Mapping rules (spec sections in brackets):
* IIC rows (intra-negative ``repeat``/``shuffle``) are joint retrieval: RGB feature concatenated with the
  second view's feature [10.7, 12], so they attach to our ``joint`` rows. The released R3D weights also
  give ``rgb``-only and ``res``-only numbers [10.7]; those attach to our ``rgb``/``residual`` rows.
* The CMC baseline (intra-negative ``none``) does not say which second view it used, so it attaches to
  every view's ``joint`` row; the random-init baseline is RGB (``rgb`` rows, any view slot).
* Recognition: the paper's comparison table and the post-paper architecture tables are 3-split means
  [17] (split ``mean``); the released fine-tuned R3D checkpoint is split 1 [11].
* Retrieval uses split 1 only [10]; the post-paper architecture tables say "averaged over 3 splits", so
  their retrieval numbers attach to our (single-split) retrieval rows, labelled by their table.
* Rows for other methods (VCOP, PRP, ...) keep ``init`` None: shown beside ours, never joined to ours.
* Rows whose setting is not stated (a benchmark index entry) or that are not accuracies (the abstract's
  gains) are left out.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PAPER_CSV = Path(__file__).with_name("paper_results.csv")

DATASETS = {"UCF101": "ucf101", "HMDB51": "hmdb51"}
PROTOCOLS = {"retrieval": "retrieval", "recognition": "finetune"}
METRICS = {"top1": "top1", "top5": "top5", "top10": "top10", "top20": "top20", "top50": "top50"}
METRICS_FINETUNE = {"top1_acc": "top1"}
VIEWS = {"res": "residual", "u": "u", "v": "v"}

# Tables in order of preference when two rows give the same setting (they agree where they overlap).
PAPER_TABLE = "README-retrieval-UCF101-split1"
RECOGNITION_TABLE = "README-recognition"
ARCHITECTURE_TABLE = "README-other-architectures"
RELEASED_TABLE = "README-released-R3D-weights"
_PRIORITY = (PAPER_TABLE, RECOGNITION_TABLE, ARCHITECTURE_TABLE, RELEASED_TABLE)


@dataclass(frozen=True)
class PaperNumber:
    dataset: str  # ucf101 | hmdb51
    protocol: str  # retrieval | finetune
    method: str  # the paper's label, e.g. "IIC (repeat + res)", "VCOP"
    backbone: str | None  # c3d | r3d | r21d | r3d18; None for backbones this project lacks
    view: str | None  # residual | u | v; None = any (not stated, or a baseline)
    init: str | None  # iic | cmc | random; None = another method (shown, never joined)
    intra_negative: str | None  # run-name slot: repeat | shuffle | none | random
    modality: str | None  # retrieval feature: rgb | residual | u | v | joint; None for finetune
    split: str  # "1" or "mean" (3-split mean)
    metric: str  # top1 ... top50
    value: float
    table: str  # the CSV's table label

    @property
    def priority(self) -> int:
        return next(
            (i for i, t in enumerate(_PRIORITY) if self.table.startswith(t)), len(_PRIORITY)
        )


def _backbone(text: str) -> str | None:
    if text.startswith("R3D-18"):
        return "r3d18"
    return {"R3D": "r3d", "C3D": "c3d", "R(2+1)D": "r21d"}.get(text)


def _method(setting: str) -> str:
    m = re.search(r"method: ([^;]+)", setting)
    return (m.group(1) if m else setting).strip()


def _parse(row: dict) -> PaperNumber | None:
    """One CSV row -> PaperNumber in our vocabulary, or None if it cannot be compared."""
    dataset = DATASETS.get(row["dataset"])
    protocol = PROTOCOLS.get(row["task"])
    metric = (METRICS if protocol == "retrieval" else METRICS_FINETUNE).get(row["metric"])
    neg = (row["intra_negative"] or "").strip()
    if not (dataset and protocol and metric) or neg in ("not stated", "best setting"):
        return None
    table, setting, modality_text = row["table"], row["pretrain_setting"], row["modality"]
    backbone = _backbone(row["backbone"])
    released = table.startswith(RELEASED_TABLE)
    view = init = modality = None
    if "random init" in setting:
        init, neg, modality = "random", "random", "rgb"
    elif neg == "none":
        init, modality = "cmc", "joint"
    elif neg in ("repeat", "shuffle"):
        init, modality = "iic", "joint"
        m = re.search(r"\((?:repeat|shuffle) \+ (res|u|v)\b", setting)
        if m:
            view = VIEWS[m.group(1)]
        elif released or "RGB+Res" in modality_text:
            view = "residual"  # released weights: repeat + res (spec 10.7); README: "RGB+Res"
        if released and "merge=False" in modality_text:
            modality = "rgb" if "modality=rgb" in modality_text else "residual"
    else:
        neg = None
    if protocol == "finetune":
        modality = None
        split = "1" if released else "mean"  # spec 17: the recognition tables are 3-split means
    else:
        split = "mean" if table.startswith(ARCHITECTURE_TABLE) else "1"
    method = "IIC (repeat + res), released R3D weights" if released else _method(setting)
    return PaperNumber(
        dataset=dataset, protocol=protocol, method=method,
        backbone=backbone, view=view, init=init, intra_negative=neg if init else None,
        modality=modality, split=split, metric=metric, value=float(row["value"]), table=table,
    )  # fmt: skip


@cache
def load(path: str | Path = PAPER_CSV) -> tuple[PaperNumber, ...]:
    """Every comparable number of the paper, in our vocabulary."""
    with open(path, newline="") as f:
        parsed = (_parse(row) for row in csv.DictReader(f))
        return tuple(p for p in parsed if p is not None)


def lookup(
    dataset: str,
    protocol: str,
    backbone: str,
    view: str,
    intra_negative: str,
    metric: str,
    modality: str | None = None,
    split: str | int = "1",
) -> PaperNumber | None:
    """The paper's number for one of our result rows, or None where the paper has none.

    `intra_negative` is the run-name slot (repeat, shuffle, none = CMC, random = random init);
    `modality` is the retrieval feature (rgb, residual, u, v, joint); `split` matters for
    fine-tuning only ("1" or "mean" for the 3-split mean).
    """
    hits = [
        p
        for p in load()
        if p.init is not None
        and (p.dataset, p.protocol, p.backbone, p.intra_negative, p.metric)
        == (dataset, protocol, backbone, intra_negative, metric)
        and p.view in (None, view)
        and (protocol != "retrieval" or p.modality == modality)
        and (protocol != "finetune" or p.split == str(split))
    ]
    return min(hits, key=lambda p: p.priority) if hits else None


def numbers(dataset: str, protocol: str) -> list[PaperNumber]:
    """All numbers of one dataset and protocol (ours and other methods), CSV order."""
    return [p for p in load() if (p.dataset, p.protocol) == (dataset, protocol)]
