"""What decides each step's result (iicrepro.steps): every knob is classified, resource knobs decide
nothing, result knobs decide exactly the steps that read them, and the resume checks, the
retrieval cache key and the flow fingerprint use the same definitions."""

from __future__ import annotations

import copy

import pytest
import yaml

from iicrepro import config, steps
from iicrepro.data.flow import FlowConfig
from iicrepro.train.pretrain import _plan

PARAMS = config.DEFAULT_PARAMS
PRESETS = sorted((yaml.safe_load(PARAMS.read_text()).get("presets") or {}).keys())


def leaves(tree, prefix=""):
    """Dotted keys of every leaf setting."""
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip(".")


def covers(key: str, known: str) -> bool:
    return key == known or key.startswith(f"{known}.")


def decided(settings) -> dict:
    """Every step's settings read from `settings` (for each dataset)."""
    return {
        (rule, d): cls.from_settings(settings, dataset=d).as_dict()
        for rule, cls in steps.STEPS.items()
        for d in ("ucf101", "hmdb51", "synthetic")
    }


def with_value(settings, dotted: str, value):
    changed = copy.deepcopy(settings)
    node = changed
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return changed


@pytest.mark.parametrize("preset", PRESETS)
def test_every_knob_decides_a_step_or_is_listed_as_deciding_none(preset):
    settings = config.load(PARAMS, preset)
    read = [
        k.replace(".{dataset}", "") for cls in steps.STEPS.values() for k in cls.keys().values()
    ]
    unclassified = [
        key
        for key in leaves(settings)
        if not any(covers(key, k) for k in read)
        and not any(covers(key, k) for k in steps.NEVER_DECIDE)
    ]
    assert unclassified == [], (
        "add these params.yaml keys to the steps whose result they decide (iicrepro.steps), "
        "or to steps.NEVER_DECIDE"
    )
    both = [k for k in read if any(covers(k, n) for n in steps.NEVER_DECIDE)]
    assert both == []


RESOURCE_KNOBS = [
    ("frames.workers", 7),
    ("flow.workers", 7),
    ("flow.threads", 3),
    ("pretrain.workers", 5),
    ("pretrain.checkpoint_every", 3),
    ("pretrain.compile", True),
    ("pretrain.channels_last", True),
    ("retrieval.workers", 5),
    ("finetune.workers", 5),
    ("finetune.checkpoint_every", 3),
    ("tracking.enabled", False),
    ("tracking.mlflow_uri", "http://127.0.0.1:5999"),
    ("download.retries", 9),
]


@pytest.mark.parametrize(("dotted", "value"), RESOURCE_KNOBS)
def test_resource_knobs_decide_no_result(dotted, value):
    settings = config.load(PARAMS, "demo")
    assert decided(with_value(settings, dotted, value)) == decided(settings)


def test_a_result_knob_decides_exactly_the_steps_that_read_it():
    settings = config.load(PARAMS, "demo")
    before = decided(settings)
    after = decided(with_value(settings, "pretrain.nce.k", 32))
    assert {rule for (rule, _), v in after.items() if v != before[(rule, _)]} == {"pretrain"}
    after = decided(with_value(settings, "clips.length", 6))
    changed = {rule for (rule, _), v in after.items() if v != before[(rule, _)]}
    assert changed == {"pretrain", "retrieve", "retrieve_bnrecal", "finetune"}
    after = decided(with_value(settings, "pretrain.batch_size", 6))  # also the BN recalibration's
    assert {rule for (rule, _), v in after.items() if v != before[(rule, _)]} == {
        "pretrain",
        "retrieve_bnrecal",
    }


def test_per_dataset_and_conditional_settings():
    settings = config.load(PARAMS, "paper")
    ucf = steps.Finetune.from_settings(settings, dataset="ucf101")
    hmdb = steps.Finetune.from_settings(settings, dataset="hmdb51")
    assert (ucf.val_size, hmdb.val_size) == (800, 400)
    changed = with_value(settings, "finetune.val_size.hmdb51", 300)
    assert steps.Finetune.from_settings(changed, dataset="ucf101") == ucf  # only HMDB51's jobs
    # the retrieval batch decides the result only when drop_last drops a partial batch
    assert steps.Retrieve.from_settings(settings).batch_size is None
    dropping = with_value(settings, "retrieval.drop_last", True)
    assert steps.Retrieve.from_settings(dropping).batch_size == settings.retrieval.batch_size
    assert isinstance(steps.Pretrain.from_settings(settings).milestones, tuple)  # frozen
    with pytest.raises(AttributeError):
        ucf.epochs = 3


def test_pretraining_resume_plan_uses_the_step_settings():
    settings = config.load(PARAMS, "demo")
    args = ("r3d", "residual", "repeat", 0, 30, None, 96)
    plan = _plan(settings, *args)
    assert _plan(with_value(settings, "pretrain.workers", 4), *args) == plan
    assert _plan(with_value(settings, "pretrain.checkpoint_every", 7), *args) == plan
    other = _plan(with_value(settings, "pretrain.nce.k", 32), *args)
    assert steps.differences(plan, other) == "nce: {'k': 128, 'momentum': 0.5, " + (
        "'normalize_features': True, 't': 0.1} -> {'k': 32, 'momentum': 0.5, "
        "'normalize_features': True, 't': 0.1}"
    )


def test_flow_fingerprint_is_the_flow_step_settings():
    settings = config.load(PARAMS, "demo-flow")
    cfg = FlowConfig.from_settings(settings)
    assert cfg.fingerprint() == steps.Flow.from_settings(settings).fingerprint()
    threads = FlowConfig.from_settings(with_value(settings, "flow.threads", 4))
    assert threads.fingerprint() == cfg.fingerprint()
    eps = FlowConfig.from_settings(with_value(settings, "flow.tvl1.epsilon", 0.02))
    assert eps.fingerprint() != cfg.fingerprint()
