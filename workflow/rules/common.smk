"""Wiring shared by the workflow phases: the resolved settings, the preset grid and every path.

Paths come only from `iicrepro.layout` (and the archive names from `iicrepro.data.sources`), so the
rules, the DVC stages and the Python steps spell each path once. The steps read params.yaml
themselves; the workflow resolves the same file with the same preset to build the DAG.

Rerunning: a job reruns when the settings or the code that decide its result change (each rule's
`params`, see "rerun params" below), its shell command or set of inputs changes, or a job it
depends on reruns. It must not rerun because DVC restored its files with new modification times
(`dvc checkout`, `dvc pull`), and Snakemake 9 compares modification times whatever
`--rerun-triggers` says. So large inputs (archives, extracted videos, model weights) are
`ancient()`, and each edge between steps also carries a small file that Snakemake checksums
(manifests, index.csv, metrics.json): with the `.snakemake/metadata` records that DVC versions, an
identical checksum makes a newer mtime harmless.
"""

import re
import sys
from pathlib import Path

import yaml

from iicrepro import config as iic_config
from iicrepro import grid, layout, steps, track
from iicrepro.data import sources

PARAMS = "params.yaml"


def _changed_keys(given, written, prefix=""):
    """Dotted keys whose value in the Snakemake config differs from the one in params.yaml."""
    if isinstance(given, dict) and isinstance(written, dict):
        keys = sorted(set(given) | set(written))
        return [
            k
            for key in keys
            for k in _changed_keys(given.get(key), written.get(key), f"{prefix}{key}.")
        ]
    return [] if given == written else [prefix.rstrip(".")]


def _resolve_settings():
    """Validate the settings and stop, naming the bad key, before any job starts."""
    settings = iic_config.resolve(config, config.get("preset"))
    written = yaml.safe_load(Path(PARAMS).read_text()) or {}
    stray = [k for k in _changed_keys(config, written) if k != "preset"]
    if stray:
        raise iic_config.ConfigError(
            f"--config sets {', '.join(stray)}: only `preset` may be chosen on the command line, "
            f"because every step reads {PARAMS}; edit {PARAMS} (or `dvc exp run -S KEY=VALUE`)."
        )
    return settings


SETTINGS = _resolve_settings()
PRESET = SETTINGS.preset


# ------------------------------------------------------------------------------ vocabulary
def _enum(name):
    """Alternatives of a schema enum as a wildcard regex: the vocabulary is defined once."""
    schema = yaml.safe_load(Path(iic_config.SCHEMA_PATH).read_text())
    return "|".join(schema["$defs"][name]["enum"])


DATASETS = _enum("dataset")
BACKBONES = _enum("backbone")
VIEWS = _enum("view")
INTRA_NEGATIVES = _enum("intra_negative")
ARCHIVE_NAMES = "|".join(
    re.escape(name)
    for d in sources.DATASETS
    for name in sources.archive_filenames(d).values()
)
FLOW_VIEWS = ("u", "v")
# layout.run_name as a wildcard pattern
RUN = layout.run_name("{backbone}", "{view}", "{neg}", "{seed}")
BNRECAL_RUN = f"{RUN}-bnrecal"  # random init, BatchNorm statistics recalibrated


def job(rule_name):
    """Prefix of a rule's shell command: the step's MLflow run records its rule and log file.
    The rule is named here rather than through `{rule}`, which `snakemake --lint` flags.
    """
    return f"{track.RULE_ENV}={rule_name} {track.LOG_ENV}={{log}} "


def log_file(step, *parts):
    """logs/<step>/<wildcards>.log: one log per job, named like its outputs."""
    return str(Path("logs", step, *parts[:-1], f"{parts[-1]}.log"))


# ------------------------------------------------------------------------------ the grid
# Defined once in iicrepro.grid, which `report` (its "Missing" list) and the MLflow summary share.
def pretrained_runs():
    """Every model the preset pretrains (grid.Run: backbone, view, neg, seed)."""
    return grid.pretrained_runs(SETTINGS)


def random_source():
    """The pretraining run whose init.pt (epoch-0 weights) is the random-init baseline."""
    return grid.random_source(SETTINGS)


def needed_datasets():
    return grid.needed_datasets(SETTINGS)


def expected(protocol):
    """The grid's results of one protocol (grid.Result: dataset, run, split)."""
    return [r for r in grid.expected(SETTINGS) if r.protocol == protocol]


# ------------------------------------------------------------------------------ paths
def download(dataset, archive):
    return str(layout.downloads(SETTINGS, dataset) / archive)


def archives(wildcards):
    """The downloaded archives of a dataset, one fetch job each (large: ancient)."""
    names = sources.archive_filenames(wildcards.dataset).values()
    return [ancient(download(wildcards.dataset, name)) for name in names]


def archive_role(wildcards):
    """The role (videos, splits) of an archive file name, for `fetch --only`."""
    roles = sources.archive_filenames(wildcards.dataset)
    return next(role for role, name in roles.items() if name == wildcards.archive)


def raw(dataset):
    """Extracted archives (videos and split files): temporary, removed once split and decoded."""
    return str(layout.raw(SETTINGS, dataset))


def manifest(dataset, split):
    return str(layout.manifest(SETTINGS, dataset, split))


def manifests(dataset):
    """split1.csv .. split3.csv: the splits step writes all three official splits."""
    return [manifest(dataset, k) for k in (1, 2, 3)]


def frame_index(dataset):
    return str(layout.frame_store(SETTINGS, dataset) / "index.csv")


def flow_index(dataset):
    return str(layout.flow_store(SETTINGS, dataset) / "index.csv")


def flow_chunk_done(dataset):
    """Marker of a finished flow chunk ({scatteritem} = '<i>-of-<n>', 1-based)."""
    return str(layout.flow_store(SETTINGS, dataset) / "chunks" / "{scatteritem}.done")


def flow_chunk(wildcards):
    """`iicrepro flow --chunk I/N` (0-based) of a scatter item '<i>-of-<n>'."""
    i, n = wildcards.scatteritem.split("-of-")
    return f"{int(i) - 1}/{n}"


def pretrain_dir(backbone, view, neg, seed):
    return layout.pretrain_dir(SETTINGS, backbone, view, neg, seed)


def pretrain_file(name):
    """Output pattern of a pretraining file: checkpoint.pt (final) or init.pt (epoch 0)."""
    return str(pretrain_dir("{backbone}", "{view}", "{neg}", "{seed}") / name)


def retrieval_dir(dataset, run):
    return str(layout.retrieval_dir(SETTINGS, dataset, run))


def retrieval_metrics(dataset, run):
    return str(Path(retrieval_dir(dataset, run)) / "metrics.json")


def finetune_dir(dataset, split, run):
    return str(layout.finetune_dir(SETTINGS, dataset, split, run))


def finetune_metrics(dataset, split, run):
    return str(Path(finetune_dir(dataset, split, run)) / "metrics.json")


# ------------------------------------------------------------------------------ rule inputs
def view_inputs(dataset, view):
    """Decoded data a model reads for `view`: frames, plus the flow store for u and v."""
    files = [frame_index(dataset)]
    if view in FLOW_VIEWS:
        files.append(flow_index(dataset))
    return files


def fetch_inputs(wildcards):
    """The synthetic dataset is fetched (file://) from the archives `synthesize` wrote."""
    if wildcards.dataset == "synthetic":
        return str(layout.synthetic_source(SETTINGS) / sources.SYNTHETIC_SUMS)
    return []


def pretrain_inputs(wildcards):
    d = SETTINGS.pretrain.dataset
    return [manifest(d, SETTINGS.pretrain.split), *view_inputs(d, wildcards.view)]


def _source_run(wildcards):
    """The pretraining run a model comes from; `random` uses the init.pt of the same seed."""
    w = wildcards
    neg = random_source() if w.neg == "random" else w.neg
    return pretrain_dir(w.backbone, w.view, neg, w.seed)


def model_checkpoint(wildcards):
    """checkpoint.pt of a pretrained model; for `random`, the epoch-0 init.pt (large: ancient)."""
    name = "init.pt" if wildcards.neg == "random" else "checkpoint.pt"
    return ancient(str(_source_run(wildcards) / name))


def model_record(wildcards):
    """metrics.json of the pretraining run: the checksummed edge to the model's weights."""
    return str(_source_run(wildcards) / "metrics.json")


def retrieval_inputs(wildcards):
    return [
        manifest(wildcards.dataset, SETTINGS.retrieval.split),
        *view_inputs(wildcards.dataset, wildcards.view),
    ]


def recalibration_inputs(wildcards):
    """BN recalibration also reads the pretraining dataset's training clips."""
    return retrieval_inputs(wildcards) + pretrain_inputs(wildcards)


def finetune_inputs(wildcards):
    return [
        manifest(wildcards.dataset, wildcards.split),
        *view_inputs(wildcards.dataset, wildcards.view),
    ]


def init_name(wildcards):
    """The finetune step's --init for a run-name slot: iic, cmc or random."""
    return layout.init_of(wildcards.neg)


# ------------------------------------------------------------------------------ rerun params
# A job reruns when what decides its result changes (rerun trigger `params`): its step's settings
# (iicrepro.steps) and the fingerprint of the code its step runs (iicrepro.fingerprint, computed
# once here). Worker, thread, tracking and checkpoint-frequency knobs are in neither.
CODE = {rule: steps.code_fingerprint(rule) for rule in steps.STEPS}


def result_settings(rule):
    """A params function: the settings that decide a job's result (its dataset filled in)."""

    def of(wildcards):
        return steps.STEPS[rule].from_settings(SETTINGS, **wildcards).as_dict()

    return of


def preset_option(wildcards, output):
    """The --preset a step reads params.yaml with. It names the settings, which `settings`
    compares; a function of the output is a derived param, which Snakemake does not compare, so
    switching between presets that share a job's settings reruns nothing."""
    return PRESET


# ------------------------------------------------------------------------------ targets
def data_targets():
    """Manifests, frame stores and (for u/v) flow stores of every dataset the preset uses."""
    views = {*SETTINGS.pretrain.views}
    files = []
    for d in needed_datasets():
        files += manifests(d)
        files += [frame_index(d)] + ([flow_index(d)] if views & set(FLOW_VIEWS) else [])
    return files


def model_targets():
    names = ("checkpoint.pt", "init.pt", "metrics.json")
    return [
        str(pretrain_dir(r.backbone, r.view, r.neg, r.seed) / name)
        for r in pretrained_runs()
        for name in names
    ]


def retrieval_targets():
    """Every model and random init, plus each random init with BN recalibrated."""
    return [retrieval_metrics(r.dataset, r.run) for r in expected("retrieval")]


def finetune_targets():
    return [finetune_metrics(r.dataset, r.split, r.run) for r in expected("finetune")]


def evaluation_targets():
    return retrieval_targets() + finetune_targets()
