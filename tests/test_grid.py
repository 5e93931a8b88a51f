"""iicrepro.grid: the one definition of a preset's runs, shared by the workflow, report and MLflow."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from iicrepro import config, grid, report

ROOT = Path(__file__).resolve().parents[1]


def test_paper_grid_counts():
    settings = config.load(ROOT / "params.yaml", "paper")
    assert len(grid.pretrained_runs(settings)) == 27
    assert len(grid.random_runs(settings)) == 9
    # fine-tuning: IIC (repeat, shuffle) and random init; CMC (`none`) is left out by finetune.inits
    assert {r.init for r in grid.finetune_runs(settings)} == {"iic", "random"}
    assert grid.counts(settings) == {
        "pretrain": 27, "retrieval": 72, "retrieval_bnrecal": 18, "finetune": 162,
    }  # fmt: skip


def test_report_missing_is_the_grid(tmp_path):
    """An empty results folder: the report misses exactly the grid's results, nothing more."""
    settings = config.load(ROOT / "params.yaml", "paper", [f"paths.results={tmp_path}"])
    empty = pd.DataFrame(columns=report.COLUMNS)
    missing = report._missing(settings, empty, {})
    assert len(missing) == 27 + 72 + 18 + 162
    assert "finetune hmdb51/split3/c3d-u-random-s632" in missing
    assert "retrieval ucf101/r21d-v-random-s632-bnrecal" in missing
    assert not [m for m in missing if m.startswith("finetune") and "-none-" in m]


def test_finetune_inits_select_runs():
    settings = config.load(ROOT / "params.yaml", "paper", ["finetune.inits=[random]"])
    runs = grid.finetune_runs(settings)
    assert len(runs) == 9 and {r.neg for r in runs} == {"random"}
    assert grid.random_source(settings) == "repeat"
