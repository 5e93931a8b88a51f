"""The bounded calibration search behind the `proof-shortcut` preset (docs/synthetic.md).

Each named setting below is the `proof-shortcut` preset with a few knobs changed (colour spread,
epochs, seeds, intra-negatives). A setting runs as its own small project: a folder holding
params.yaml (this repository's, plus a preset `search` = proof-shortcut + the setting) and links
to the workflow, run by the real Snakemake workflow with one thread per job, then `iicrepro
report`. Its retrieval top-1 rows are appended to OUT/search.csv with the setting's knobs, so every
row says how it was made; `--table` prints them as docs/synthetic.md's table.

    PYTHONPATH=$PWD/src PATH=$PWD/.venv/bin:$PATH \\
        python scripts/shortcut_search.py OUT screen-s1.0 screen-s0.5 --cores 2
    PYTHONPATH=$PWD/src .venv/bin/python scripts/shortcut_search.py OUT --table
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


SCREEN = {"seeds": [0], "intra_negatives": ["repeat", "none"]}
SPREADS = ("1.0", "0.5", "0.3", "0.75")  # 0.75: added after the first three screens (below)
# name -> (folder, overrides of the proof-shortcut preset). A setting's `seeds-` sibling shares
# its folder: the screen's seed-0 runs are reused (grid lists do not decide a job's result).
SETTINGS: dict[str, tuple[str, dict]] = {}


for _s in SPREADS:
    # screening, seed 0: how strong a colour shortcut still leaves motion to learn
    _knobs = {"synthetic": {"shortcut": float(_s)}, "pretrain": {"epochs": 120}}
    SETTINGS[f"screen-s{_s}"] = (f"s{_s}", _merge(_knobs, {"pretrain": SCREEN}))
    # the preset's seeds 0, 1, 2 and intra-negatives repeat / shuffle / none at that spread
    SETTINGS[f"seeds-s{_s}"] = (f"s{_s}", _knobs)
# IIC's pretext was still improving at epoch 120 with s = 1.0: the declared 240-epoch step,
# which became the preset
_LONG = {"synthetic": {"shortcut": 1.0}, "pretrain": {"epochs": 240}}
SETTINGS["screen-s1.0-e240"] = ("s1.0-e240", _merge(_LONG, {"pretrain": SCREEN}))
SETTINGS["seeds-s1.0-e240"] = ("s1.0-e240", _LONG)


def prepare(out: Path, name: str) -> tuple[Path, dict]:
    """OUT/<name>/ with params.yaml selecting preset `search`; returns it and the resolved settings."""
    from iicrepro import config

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    preset = config.preset_overrides(raw["presets"], "proof-shortcut")
    folder_name, overrides = SETTINGS[name]
    preset = _merge(preset, overrides)
    merged = config.resolve({**raw, "presets": {**raw["presets"], "search": preset}}, "search")
    # Settings that share synthetic data share its folder.
    data_key = json.dumps(merged["synthetic"], sort_keys=True)
    data = out / "data" / hashlib.sha256(data_key.encode()).hexdigest()[:10]
    preset["paths"] = {"data": str(data), "results": "results"}
    raw["presets"]["search"] = preset
    raw["preset"] = "search"
    folder = out / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for link in ("Snakefile", "workflow", "profiles"):
        if not (folder / link).exists():
            (folder / link).symlink_to(ROOT / link)
    return folder, config.load(folder / "params.yaml")


def run(folder: Path, cores: int) -> float:
    start = time.perf_counter()
    one = ["pretrain=1", "retrieve=1", "retrieve_bnrecal=1", "frames=1", "synthesize=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["snakemake", "--cores", str(cores), "--set-threads", *one]
    with open(folder / "snakemake.log", "w") as log:
        subprocess.run(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        subprocess.run(["iicrepro", "report", "--no-mlflow"], cwd=folder, env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=True)  # fmt: skip
    return time.perf_counter() - start


def collect(out: Path, name: str, folder: Path, settings, wall: float) -> None:
    knobs = {
        "shortcut": settings["synthetic"]["shortcut"],
        "train_videos": settings["synthetic"]["videos_per_group"]
        * (settings["synthetic"]["groups"] - settings["synthetic"]["test_groups"])
        * len(settings["synthetic"]["classes"]),
        "epochs": settings["pretrain"]["epochs"],
        "k": settings["pretrain"]["nce"]["k"],
        "t": settings["pretrain"]["nce"]["t"],
        "width": settings["model"]["width"],
    }
    path = out / "search.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["setting", *knobs, "model", "seed", "modality", "top1", "wall_s"])
        with open(folder / "results" / "summary.csv") as s:
            for row in csv.DictReader(s):
                if row["protocol"] != "retrieval" or row["metric"] != "top1":
                    continue
                model = row["intra_negative"] + (f"-{row['variant']}" if row["variant"] else "")
                w.writerow([name, *knobs.values(), model, row["seed"], row["modality"],
                            f"{float(row['value']):.1f}", f"{wall:.0f}"])  # fmt: skip


def table(out: Path) -> str:
    """OUT/search.csv as a markdown table: per setting and model, retrieval top-1 (mean +- std over
    the seeds run, their count) and the pretext's end (loss / its chance, positive ranked first)."""
    import statistics

    with open(out / "search.csv") as f:
        rows = list(csv.DictReader(f))
    cells: dict = {}
    labels: dict = {}
    for r in rows:  # a `seeds-` setting repeats its screen's rows: keep one per folder and run
        folder = SETTINGS[r["setting"]][0]
        labels[folder] = f"{r['shortcut']} · {r['epochs']}"
        cells.setdefault((folder, r["model"]), {}).setdefault(r["modality"], {})[r["seed"]] = float(
            r["top1"]
        )
    lines = ["| colour spread · epochs | model | seeds | joint | residual | rgb | pretext loss (chance) | "
             "positive 1st |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def cell(by_mod: dict, mod: str) -> str:
        v = list(by_mod.get(mod, {}).values())
        return f"{statistics.mean(v):.1f}" + (f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else "")

    for (folder, model), by_mod in sorted(cells.items()):
        seeds = sorted(by_mod["joint"])
        loss = rank = "–"
        if not model.startswith("random"):
            finals = [json.loads((out / folder / "results" / "pretrain" / "synthetic" /
                                  f"r3d-residual-{model}-s{s}" / "metrics.json").read_text())
                      for s in seeds]  # fmt: skip
            loss = f"{statistics.mean(f['final_loss'] for f in finals):.2f} ({finals[0]['chance_loss']:.2f})"
            rank = f"{100 * statistics.mean(f['final_positive_rank1'] for f in finals):.0f} %"
        lines.append(f"| {labels[folder]} | {model} | {','.join(seeds)} | {cell(by_mod, 'joint')} | "
                     f"{cell(by_mod, 'residual')} | {cell(by_mod, 'rgb')} | {loss} | {rank} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("settings", nargs="*", help=f"of: {', '.join(sorted(SETTINGS))}")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="print OUT/search.csv as markdown")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.table:
        print(table(out))
        return 0
    unknown = set(args.settings) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; known: {sorted(SETTINGS)}")
    for name in args.settings:
        folder, settings = prepare(out, name)
        wall = run(folder, args.cores)
        collect(out, name, folder, settings, wall)
        print(f"{name}: done in {wall:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
