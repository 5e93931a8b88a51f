"""`iicrepro <step>`: one entry point, one subcommand per pipeline step.

Snakemake rules, DVC stages, tests and users all call the steps the same way. Each step lives in the
module that implements it, which provides ``add_arguments(parser)`` and ``main(args)``; a module is
imported only when its step runs, so ``--help`` and light steps stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# step name -> (module, one-line help). Order = pipeline order.
STEPS: dict[str, tuple[str, str]] = {
    "synthesize": ("iicrepro.data.synthetic", "write the synthetic motion dataset as archives"),
    "fetch": ("iicrepro.data.fetch", "download a dataset's archives (resumable, verified)"),
    "extract": ("iicrepro.data.archives", "safely extract downloaded archives (zip, tar, rar)"),
    "splits": ("iicrepro.data.splits", "official split files -> one manifest CSV per split"),
    "frames": ("iicrepro.data.frames", "decode every video once into a per-video frame store"),
    "flow": ("iicrepro.data.flow", "TV-L1 optical flow (u, v) into a per-video store"),
    "pretrain": ("iicrepro.train.pretrain", "self-supervised IIC pretraining (resumable)"),
    "retrieve": ("iicrepro.evaluate.retrieval", "nearest-neighbour video retrieval top-k"),
    "finetune": ("iicrepro.train.finetune", "fine-tune for action recognition and test"),
    "evaluate": ("iicrepro.evaluate.recognition", "test a classifier checkpoint as it is"),
    "report": ("iicrepro.report", "results table beside the paper, plots, MLflow summary"),
    "models": ("iicrepro.models", "list backbones with parameter counts"),
    "import-upstream": ("iicrepro.models.upstream", "convert an upstream IIC/VCOP checkpoint"),
    "bench": ("iicrepro.bench", "throughput and memory benchmarks"),
    "rehearsal": (
        "iicrepro.rehearsal",
        "stand-in UCF101/HMDB51 archives, their mirror, a full run",
    ),
}


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every step shares for reading params.yaml."""
    g = parser.add_argument_group("settings")
    g.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    g.add_argument("--preset", default=None, help="preset to apply (default: params.yaml 'preset')")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one base setting, e.g. --set pretrain.epochs=2 (repeatable)",
    )


def settings_from_args(args: argparse.Namespace):
    from iicrepro import config

    return config.load(args.params, args.preset, args.set)


def build_parser(step: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iicrepro",
        description="IIC reproduction pipeline. Each step is one subcommand; "
        "`iicrepro STEP --help` shows its options.",
    )
    sub = parser.add_subparsers(dest="step", metavar="STEP", required=True)
    for name, (module, help_text) in STEPS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == step:
            mod = importlib.import_module(module)
            add_settings_arguments(p)
            mod.add_arguments(p)
            p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    step = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(step if step in STEPS else None)
    args = parser.parse_args(argv)
    from iicrepro.errors import UserError

    try:
        rc = args._main(args)
    except UserError as exc:
        print(f"iicrepro {args.step}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from iicrepro.io import is_out_of_space

        if not is_out_of_space(exc):
            raise
        # A full disk is one error for the whole step, wherever the write happened.
        print(f"iicrepro {args.step}: error: {no_space_message(args, exc)}", file=sys.stderr)
        return 1
    return int(rc or 0)


def no_space_message(args: argparse.Namespace, exc: BaseException) -> str:
    """The out-of-space message for a write that did not go through `iicrepro.io.atomic_path`:
    the file when the error names it, else the free space where the step writes."""
    import shutil

    from iicrepro.io import human_bytes, mount_point, no_space_filename, out_of_space

    filename = no_space_filename(exc)
    if filename:
        return str(out_of_space(filename, exc=exc))

    try:
        settings = settings_from_args(args)
        folders = {str(settings.paths[k]) for k in ("data", "results")}
    except Exception:  # noqa: BLE001 - the message must not fail in turn
        folders = {"."}
    room = []
    for folder in sorted(folders):
        mount = mount_point(folder)
        try:
            room.append(f"{folder} (on {mount}): {human_bytes(shutil.disk_usage(mount).free)} free")
        except OSError:
            room.append(f"{folder} (on {mount})")
    return (
        f"no space left on device ({exc}); {'; '.join(room)}. Free space there, or point "
        "paths.data or paths.results in params.yaml (or --set paths.data=...) at a file system "
        "with room, then run the step again: what it finished before is kept."
    )


if __name__ == "__main__":
    raise SystemExit(main())
