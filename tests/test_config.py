"""Preset resolution: `extends` chains, loops and unknown names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from iicrepro import config

ROOT = Path(__file__).resolve().parents[1]


def raw_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_params_yaml_has_no_anchors():
    # `dvc exp run -S` rewrites params.yaml and expands anchors, cutting a preset off its base
    text = (ROOT / "params.yaml").read_text()
    code = [line.split("#", 1)[0] for line in text.splitlines()]
    assert not any("&" in line or "*" in line or "<<:" in line for line in code)


def test_extends_merges_the_base_preset_first():
    raw = raw_params()
    flow = config.resolve(raw, "demo-flow")
    demo = config.resolve(raw, "demo")
    assert flow.pretrain.views == ["u", "v"]
    # everything else in pretrain comes from demo, not from the paper's base settings
    for key in ("dataset", "epochs", "batch_size", "lr", "nce"):
        assert flow.pretrain[key] == demo.pretrain[key]
    assert flow.pretrain.epochs != raw["pretrain"]["epochs"]
    assert flow.paths.results == "results/demo-flow"


def test_extends_follows_an_edited_base_as_dvc_exp_run_would_write_it():
    raw = raw_params()
    raw["presets"]["demo"]["pretrain"]["epochs"] = (
        7  # what `-S presets.demo.pretrain.epochs=7` writes
    )
    assert config.resolve(raw, "demo-flow").pretrain.epochs == 7


def test_extends_loop_and_unknown_base_are_named():
    raw = raw_params()
    raw["presets"]["a"] = {"extends": "b"}
    raw["presets"]["b"] = {"extends": "a"}
    with pytest.raises(config.ConfigError, match="loop: a -> b -> a"):
        config.resolve(raw, "a")
    raw["presets"]["c"] = {"extends": "nonesuch"}
    with pytest.raises(
        config.ConfigError, match="unknown preset 'nonesuch' \\(extended by preset 'c'\\)"
    ):
        config.resolve(raw, "c")
