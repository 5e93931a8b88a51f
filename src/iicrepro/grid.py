"""The preset's grid: every run and every result it implies, defined once.

The Snakefile builds its targets from here, `report` lists what is missing against it and the MLflow
summary counts it, so a complete run is reported complete. A run is (backbone, view, intra-negative
or 'random', seed); its name is `layout.run_name`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from iicrepro import layout

BNRECAL = "bnrecal"  # variant suffix of the random init with recalibrated BatchNorm statistics


@dataclass(frozen=True)
class Run:
    backbone: str
    view: str
    neg: str  # an intra-negative (repeat, shuffle: IIC; none: CMC) or 'random'
    seed: int

    @property
    def name(self) -> str:
        return layout.run_name(self.backbone, self.view, self.neg, self.seed)

    @property
    def init(self) -> str:
        return layout.init_of(self.neg)


@dataclass(frozen=True)
class Result:
    """One result file the grid implies."""

    protocol: str  # pretrain | retrieval | finetune
    dataset: str
    run: str  # run-folder name, variant suffix included ('...-s0-bnrecal')
    split: int

    def __str__(self) -> str:
        split = f"/split{self.split}" if self.protocol == "finetune" else ""
        return f"{self.protocol} {self.dataset}{split}/{self.run}"


def pretrained_runs(settings: Any) -> list[Run]:
    """Every model the preset pretrains: backbones x views x intra-negatives x seeds."""
    p = settings["pretrain"]
    return [
        Run(b, v, n, int(s))
        for b in p["backbones"]
        for v in p["views"]
        for n in p["intra_negatives"]
        for s in p["seeds"]
    ]


def random_runs(settings: Any) -> list[Run]:
    """One random init per backbone x view x seed (the epoch-0 weights of a pretraining run)."""
    p = settings["pretrain"]
    return [
        Run(b, v, "random", int(s)) for b in p["backbones"] for v in p["views"] for s in p["seeds"]
    ]


def random_source(settings: Any) -> str:
    """The intra-negative of the pretraining run whose init.pt is the random-init baseline."""
    negs = settings["pretrain"]["intra_negatives"]
    return "repeat" if "repeat" in negs else negs[0]


def all_runs(settings: Any) -> list[Run]:
    """Every evaluated model: the pretrained ones plus the random inits."""
    return pretrained_runs(settings) + random_runs(settings)


def finetune_runs(settings: Any) -> list[Run]:
    """Models fine-tuned: those whose init (iic, cmc, random) `finetune.inits` lists."""
    inits = settings["finetune"]["inits"]
    return [r for r in all_runs(settings) if r.init in inits]


def needed_datasets(settings: Any) -> list[str]:
    """Datasets whose data the preset uses: pretraining, retrieval and fine-tuning."""
    names = [
        settings["pretrain"]["dataset"],
        *settings["retrieval"]["datasets"],
        *settings["finetune"]["datasets"],
    ]
    return list(dict.fromkeys(names))


def retrieval_runs(settings: Any) -> list[str]:
    """Run-folder names retrieved on each dataset: every model, and each random init also with
    BatchNorm recalibrated."""
    names = []
    for r in all_runs(settings):
        names.append(r.name)
        if r.neg == "random":
            names.append(f"{r.name}-{BNRECAL}")
    return names


def expected(settings: Any) -> list[Result]:
    """Every result of the grid, in workflow order: pretraining, retrieval, fine-tuning."""
    pt_split = int(settings["pretrain"]["split"])
    ret_split = int(settings["retrieval"]["split"])
    out = [Result("pretrain", settings["pretrain"]["dataset"], r.name, pt_split)
           for r in pretrained_runs(settings)]  # fmt: skip
    out += [
        Result("retrieval", d, name, ret_split)
        for d in settings["retrieval"]["datasets"]
        for name in retrieval_runs(settings)
    ]
    out += [
        Result("finetune", d, r.name, int(k))
        for d in settings["finetune"]["datasets"]
        for k in settings["finetune"]["splits"]
        for r in finetune_runs(settings)
    ]
    return out


def counts(settings: Any) -> dict[str, int]:
    """Results per protocol, with BN-recalibrated retrievals counted apart."""
    out = {"pretrain": 0, "retrieval": 0, "retrieval_bnrecal": 0, "finetune": 0}
    for r in expected(settings):
        key = r.protocol
        if r.protocol == "retrieval" and r.run.endswith(f"-{BNRECAL}"):
            key = "retrieval_bnrecal"
        out[key] += 1
    return out
