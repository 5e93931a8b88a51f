"""Checkpoints: atomic save, weights-only load, strict backbone loading, RNG state round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from iicrepro.checkpoint import (
    FORMAT,
    backbone_state,
    load_backbone,
    load_checkpoint,
    plain,
    save_checkpoint,
)
from iicrepro.errors import UserError
from iicrepro.models import build_backbone
from iicrepro.seeding import rng_state, seed_everything, set_rng_state

KWARGS = {"width": 0.125, "small_input": True}


def test_save_load_round_trip(tmp_path):
    state = {
        "format": FORMAT,
        "w": torch.arange(6.0).view(2, 3),
        "nested": {"epoch": 3, "rows": [{"loss": 1.5}]},
        "settings": plain({"a": (1, 2)}),
    }
    path = save_checkpoint(tmp_path / "sub" / "x.pt", state)
    back = load_checkpoint(path)
    assert torch.equal(back["w"], state["w"])
    assert back["nested"] == state["nested"] and back["settings"] == {"a": [1, 2]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.pt"]  # no temporary left


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "last.pt"
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        save_checkpoint(path, {"w": torch.ones(3), "bad": lambda: None})
    assert list(tmp_path.iterdir()) == []
    save_checkpoint(path, {"epoch": 1})
    with pytest.raises(Exception):  # noqa: B017
        save_checkpoint(path, {"epoch": 2, "bad": lambda: None})
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_unreadable_or_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    bad = tmp_path / "torn.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(bad)


def test_load_backbone_is_strict(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("r3d", **KWARGS)
    path = save_checkpoint(tmp_path / "c.pt", backbone_state(model, "r3d", KWARGS, epoch=7))
    fresh = build_backbone("r3d", **KWARGS)
    ckpt = load_backbone(fresh, path)
    assert ckpt["epoch"] == 7 and ckpt["backbone"] == "r3d" and ckpt["model_kwargs"] == KWARGS
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    wider = build_backbone("r3d", width=0.25, small_input=True)
    with pytest.raises(UserError, match="wrong shape"):
        load_backbone(wider, path)
    other = build_backbone("c3d", **KWARGS)
    with pytest.raises(UserError, match="missing"):
        load_backbone(other, path)
    save_checkpoint(tmp_path / "raw.pt", model.state_dict())
    with pytest.raises(UserError, match="not an iicrepro checkpoint"):
        load_backbone(fresh, tmp_path / "raw.pt")


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), np.random.randn()


def test_rng_state_survives_a_checkpoint(tmp_path):
    seed_everything(11)
    draws()
    np.random.randn()  # leave a cached Gaussian in NumPy's state
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = draws()
    seed_everything(99)
    draws()
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draws() == expected


def test_seed_everything_repeats_the_streams():
    seed_everything(5)
    a = draws()
    seed_everything(5)
    assert draws() == a


def test_unloadable_files_get_our_message_never_the_unsafe_advice(tmp_path):
    rand = tmp_path / "random.pt"
    rand.write_bytes(np.random.default_rng(0).bytes(4096))
    whole = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), whole)  # a whole pickled model, not a state dict
    good = save_checkpoint(tmp_path / "good.pt", {"w": torch.ones(1000)})
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    expected = {
        rand: "is not a PyTorch checkpoint",
        whole: r"holds Python objects \(such as torch\.nn\.modules\.linear\.Linear\)",
        cut: "damaged or incomplete",
        empty: "damaged or incomplete",
    }
    for path, message in expected.items():
        with pytest.raises(UserError, match=message) as info:
            load_checkpoint(path)
        text = str(info.value)
        assert "weights_only" not in text and "trust" not in text, text
        assert info.value.__cause__ is None and info.value.__suppress_context__  # nor its text


def test_a_bare_state_dict_is_named_with_what_is_expected(tmp_path):
    from iicrepro.evaluate.retrieval import load_backbone as retrieval_backbone
    from iicrepro.train.finetune import model_from_checkpoint

    model = build_backbone("r3d", **KWARGS)
    bare = save_checkpoint(tmp_path / "bare.pt", model.state_dict())
    first = next(iter(model.state_dict()))
    for load in (
        lambda: model_from_checkpoint(bare, 3, "r3d"),
        lambda: retrieval_backbone(bare, "cpu"),
        lambda: load_backbone(build_backbone("r3d", **KWARGS), bare),
    ):
        with pytest.raises(UserError) as info:
            load()
        text = str(info.value)
        assert f"is a bare state dict ({len(model.state_dict())} tensors, the first {first!r})" in (
            text
        )
        assert f"expected a dict with format {FORMAT!r}, 'backbone'" in text
        assert "import-upstream" in text and "None" not in text


def test_a_run_start_removes_the_temporary_files_of_a_killed_write(tmp_path):
    from iicrepro.checkpoint import clean_run_folder

    ckpt = tmp_path / "run" / "ckpt"
    save_checkpoint(ckpt / "last.pt", {"epoch": 1})
    stale = ckpt / ".last.pt.k3jd9x.pt.tmp"  # what a write killed with SIGKILL leaves
    stale.write_bytes(b"PK\x03\x04 half a checkpoint")
    other = tmp_path / "run" / ".metrics.csv.q1w2e3.tmp"
    other.write_text("epoch\n")
    clean_run_folder(tmp_path / "run", ckpt)
    assert sorted(p.name for p in ckpt.parent.rglob("*")) == ["ckpt", "last.pt"]
    assert load_checkpoint(ckpt / "last.pt") == {"epoch": 1}
