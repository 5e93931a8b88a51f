# IIC reproduction: download -> extract -> splits -> frames -> pretrain -> retrieval + fine-tuning
# -> results table beside the paper. This file only wires; each rule calls one `iicrepro <step>`.
#
#   snakemake --cores 2                          the preset named in params.yaml (demo)
#   snakemake --cores 2 --config preset=paper    another preset
#   snakemake --profile slurm                    on a Slurm cluster (profile: ./slurm)


from snakemake.utils import min_version

min_version("9.0")


# The one source of every knob; common.smk resolves the preset and validates the result.
configfile: "params.yaml"


# Jobs per dataset for TV-L1 flow, the slowest data step (about 260 CPU-hours for UCF101); a
# cluster profile raises it with `set-scatter: {flow: N}`. The result does not depend on it.
scattergather:
    flow=1,


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


# Jobs find `iicrepro` without an activated virtual environment: the bin folder of the Python that
# runs Snakemake goes last on PATH (an activated or conda environment still comes first).
shell.prefix(f'export PATH="$PATH:{Path(sys.executable).parent}"; ')


wildcard_constraints:
    dataset=DATASETS,
    backbone=BACKBONES,
    view=VIEWS,
    # an intra-negative for pretrained models, or `random` for the untrained baseline
    neg=f"{INTRA_NEGATIVES}|random",
    seed=r"\d+",
    split=r"\d+",
    archive=ARCHIVE_NAMES,


onstart:
    print(f"iicrepro: preset {PRESET}, {len(pretrained_runs())} pretrained models")
    # One MLflow parent run per workflow execution; the jobs' runs are its children.
    track.workflow_start(SETTINGS)


onsuccess:
    track.workflow_end(SETTINGS, ok=True)
    print(f"iicrepro: done; results table in {layout.summary_md(SETTINGS)}")


onerror:
    track.workflow_end(SETTINGS, ok=False)
    print(
        "iicrepro: a step failed; its log under logs/<rule>/ says why (see the error above)"
    )


rule all:
    """The preset's whole grid: the results table and everything it depends on."""
    default_target: True
    input:
        layout.summary_md(SETTINGS),


rule data:
    """Manifests and decoded frames (and flow) of every dataset the preset uses."""
    input:
        data_targets(),


rule models:
    """Every pretrained model of the preset's grid."""
    input:
        model_targets(),


rule evaluation:
    """Retrieval and fine-tuning metrics of every model, random init included."""
    input:
        evaluation_targets(),
