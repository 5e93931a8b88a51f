"""What decides each step's result: one frozen dataclass of settings per step, and its code.

A step's result depends on its input files, its code (`iicrepro.fingerprint`) and the settings its
class below lists; nothing else in params.yaml changes it. The knobs in `NEVER_DECIDE` (workers,
threads, tracking, downloading, checkpoint frequency, speed-ups) and the grid's lists (which jobs
exist, not what one job computes) never rerun a job. Everything that compares settings takes them
from here:

* the workflow's rerun params (`workflow/rules/common.smk`): a job reruns when its step's settings
  or code fingerprint change;
* the resume checks: a pretraining or fine-tuning run continues only from a state made with the
  same settings (`train.pretrain`, `train.finetune`);
* the retrieval feature cache key (`evaluate.retrieval`) and the flow store's fingerprint
  (`data.flow.FlowConfig`).

Each field reads one dotted params.yaml key (its `setting(...)`); `{dataset}` in a key is the job's
dataset, e.g. `finetune.val_size.{dataset}`. A new knob goes into the class of every step whose
result it decides, or into `NEVER_DECIDE` (tests/test_steps.py checks that every knob is in one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

# Knobs that never decide a result, with the reason (dotted keys; a section name covers its keys).
NEVER_DECIDE: dict[str, str] = {
    "presets": "the selected preset is merged into the settings the steps compare",
    "paths": "where results live: a job's outputs are at its paths",
    "tracking": "MLflow mirrors the results the steps write to files first",
    "download": "retries, timeouts and mirrors: each archive is verified against its sha256",
    "frames.workers": "processes",
    "flow.workers": "processes",
    "flow.threads": "OpenCV (torch: intra-op) threads per process",
    "flow.device": "where the torch engine computes",
    "flow.batch": "frame pairs per batch of the torch engine",
    "pretrain.workers": "DataLoader processes",
    "pretrain.checkpoint_every": "how often resume state is saved",
    "pretrain.compile": "speed: torch.compile",
    "pretrain.channels_last": "speed: NDHWC convolutions",
    "retrieval.workers": "DataLoader processes",
    "finetune.workers": "DataLoader processes",
    "finetune.checkpoint_every": "how often resume state is saved",
    # limits that stop a step: a step that succeeds has the same result under any of them
    "splits.max_missing": "the most listed videos the extracted archive may lack",
    "data.max_excluded_fraction": "the most listed videos a step may leave out",
}


def setting(key: str) -> Any:
    """A field read from the dotted params.yaml `key`."""
    return field(metadata={"key": key})


def lookup(settings: Mapping, key: str) -> Any:
    """The value at a dotted key; None where a part is missing."""
    node: Any = settings
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _frozen(value: Any) -> Any:
    """Immutable and canonical: lists as tuples, mappings sorted, 20.0 as 20 (the same setting)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _frozen(value[k]) for k in sorted(value)}
    return value


def _plain(value: Any) -> Any:
    """JSON-able plain values (tuples as lists, keys sorted), as stored in checkpoints."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@dataclass(frozen=True)
class StepSettings:
    """Base of the per-step settings. `command`: the `iicrepro <command>` that computes the
    result; `code`: whether a change of that command's code reruns it."""

    command: ClassVar[str]
    code: ClassVar[bool] = True

    @classmethod
    def keys(cls) -> dict[str, str]:
        """Field name -> dotted params.yaml key."""
        return {f.name: f.metadata["key"] for f in dataclasses.fields(cls)}

    @classmethod
    def from_settings(cls, settings: Mapping, **job: Any) -> StepSettings:
        """Read the fields from resolved settings; `job` fills `{dataset}` in keys."""
        return cls(**{
            name: _frozen(lookup(settings, key.format(**job)))
            for name, key in cls.keys().items()
        })  # fmt: skip

    @classmethod
    def of(cls, obj: Any) -> StepSettings:
        """The fields of this class taken by name from another object (e.g. a step's config)."""
        return cls(**{f.name: _frozen(getattr(obj, f.name)) for f in dataclasses.fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        return _plain({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def fingerprint(self) -> str:
        """Hash of the settings (16 hex digits)."""
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(old: Mapping, new: Mapping) -> str:
    """'key: old -> new' for every key whose value differs (for resume errors)."""
    keys = sorted(set(old) | set(new))
    return ", ".join(
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)
    )


# ------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Synthesize(StepSettings):
    """The synthetic dataset: every `synthetic` setting shapes its videos."""

    command = "synthesize"
    synthetic: Mapping = setting("synthetic")


@dataclass(frozen=True)
class Fetch(StepSettings):
    """A downloaded archive: the bytes its sha256 names, whatever the code or the mirror."""

    command = "fetch"
    code = False


@dataclass(frozen=True)
class Extract(StepSettings):
    """Extracted archives: the archive's members, copied as they are. Temporary, and read through
    ancient() edges (workflow/rules/common.smk), so rerunning it for a code change would only
    re-extract files nothing reads."""

    command = "extract"
    code = False


@dataclass(frozen=True)
class Splits(StepSettings):
    """Manifests: the official split files, less the listed videos absent from the extracted
    archive."""

    command = "splits"


@dataclass(frozen=True)
class Frames(StepSettings):
    """The frame store (spec 3.4)."""

    command = "frames"
    size: tuple[int, int] = setting("frames.size")
    codec: str = setting("frames.codec")
    jpeg_quality: int = setting("frames.jpeg_quality")
    min_frames: int = setting("frames.min_frames")


@dataclass(frozen=True)
class Flow(StepSettings):
    """The TV-L1 flow store (spec 3.2). Defaults are OpenCV's (`data.flow.FlowConfig`)."""

    command = "flow"
    tvl1: Mapping = field(default_factory=dict, metadata={"key": "flow.tvl1"})
    bound: float = field(default=20.0, metadata={"key": "flow.bound"})
    reference_short_side: int | None = field(
        default=256, metadata={"key": "flow.reference_short_side"}
    )
    codec: str = field(default="raw", metadata={"key": "frames.codec"})
    jpeg_quality: int = field(default=90, metadata={"key": "frames.jpeg_quality"})
    # OpenCV's TV-L1 or the PyTorch one: the same algorithm, flows within 0.002 px
    engine: str = field(default="opencv", metadata={"key": "flow.engine"})


# ------------------------------------------------------------------------------ the method
@dataclass(frozen=True)
class Pretrain(StepSettings):
    """One pretrained model (spec 4, 7, 9), besides its backbone, view, intra-negative and seed."""

    command = "pretrain"
    dataset: str = setting("pretrain.dataset")
    split: int = setting("pretrain.split")
    epochs: int = setting("pretrain.epochs")
    batch_size: int = setting("pretrain.batch_size")
    lr: float = setting("pretrain.lr")
    momentum: float = setting("pretrain.momentum")
    weight_decay: float = setting("pretrain.weight_decay")
    schedule: str = setting("pretrain.schedule")
    milestones: tuple[int, ...] = setting("pretrain.milestones")
    gamma: float = setting("pretrain.gamma")
    amp: str = setting("pretrain.amp")
    nce: Mapping = setting("pretrain.nce")
    clip_length: int = setting("clips.length")
    crop: int = setting("clips.crop")
    width: float = setting("model.width")
    small_input: bool = setting("model.small_input")
    min_frames: int = setting("frames.min_frames")


@dataclass(frozen=True)
class Retrieve(StepSettings):
    """Retrieval top-k of one model on one dataset (spec 10)."""

    command = "retrieve"
    split: int = setting("retrieval.split")
    topk: tuple[int, ...] = setting("retrieval.topk")
    features: str = setting("retrieval.features")
    conv_pool: bool = setting("retrieval.conv_pool")
    drop_last: bool = setting("retrieval.drop_last")
    # decides which videos drop_last drops; None when every video counts
    batch_size: int | None = setting("retrieval.batch_size")
    clip_length: int = setting("clips.length")
    crop: int = setting("clips.crop")
    eval_clips: int = setting("clips.eval_clips")
    min_frames: int = setting("frames.min_frames")

    @classmethod
    def from_settings(cls, settings: Mapping, **job: Any) -> Retrieve:
        read = super().from_settings(settings, **job)
        return read if read.drop_last else dataclasses.replace(read, batch_size=None)


@dataclass(frozen=True)
class Bnrecal(Retrieve):
    """Retrieval of a random init whose BatchNorm statistics are recalibrated first, on the
    pretraining dataset's training clips in pretraining batches."""

    recalibration_dataset: str = setting("pretrain.dataset")
    recalibration_split: int = setting("pretrain.split")
    recalibration_batch_size: int = setting("pretrain.batch_size")


@dataclass(frozen=True)
class Finetune(StepSettings):
    """One fine-tuned model and its test (spec 11), besides its checkpoint, split and seed."""

    command = "finetune"
    epochs: int = setting("finetune.epochs")
    batch_size: int = setting("finetune.batch_size")
    lr: float = setting("finetune.lr")
    ft_lr: float = setting("finetune.ft_lr")
    momentum: float = setting("finetune.momentum")
    weight_decay: float = setting("finetune.weight_decay")
    val_size: int | None = setting("finetune.val_size.{dataset}")
    plateau: Mapping = setting("finetune.plateau")
    residual: str = setting("finetune.residual")
    clip_length: int = setting("clips.length")
    crop: int = setting("clips.crop")
    eval_clips: int = setting("clips.eval_clips")
    min_frames: int = setting("frames.min_frames")


@dataclass(frozen=True)
class Report(StepSettings):
    """The results table: its inputs are every result; the settings name the preset and the grid
    whose missing results it lists."""

    command = "report"
    preset: str = setting("preset")
    pretrain_dataset: str = setting("pretrain.dataset")
    pretrain_split: int = setting("pretrain.split")
    backbones: tuple[str, ...] = setting("pretrain.backbones")
    views: tuple[str, ...] = setting("pretrain.views")
    intra_negatives: tuple[str, ...] = setting("pretrain.intra_negatives")
    seeds: tuple[int, ...] = setting("pretrain.seeds")
    retrieval_datasets: tuple[str, ...] = setting("retrieval.datasets")
    retrieval_split: int = setting("retrieval.split")
    finetune_datasets: tuple[str, ...] = setting("finetune.datasets")
    finetune_splits: tuple[int, ...] = setting("finetune.splits")
    finetune_inits: tuple[str, ...] = setting("finetune.inits")


# Workflow rule -> its step's settings.
STEPS: dict[str, type[StepSettings]] = {
    "synthesize": Synthesize,
    "fetch": Fetch,
    "extract": Extract,
    "splits": Splits,
    "frames": Frames,
    "flow": Flow,
    "pretrain": Pretrain,
    "retrieve": Retrieve,
    "retrieve_bnrecal": Bnrecal,
    "finetune": Finetune,
    "report": Report,
}


def code_fingerprint(rule: str) -> str | None:
    """Fingerprint of the code a rule's step runs (None where code does not decide the result)."""
    from iicrepro import fingerprint

    cls = STEPS[rule]
    return fingerprint.of_step(cls.command) if cls.code else None
