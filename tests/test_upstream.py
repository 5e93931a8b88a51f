"""Strict loading and `iicrepro import-upstream` on files laid out like upstream's."""

from __future__ import annotations

import argparse
import fractions
import hashlib

import pytest
import torch

from iicrepro import cli
from iicrepro.errors import UserError
from iicrepro.models import build_backbone
from iicrepro.models.upstream import FORMAT, import_upstream, load_state_strict


def randomised_state(name: str, num_classes: int | None = None, seed: int = 0) -> dict:
    """A state dict with upstream's names whose every entry (BN statistics too) is random, so an
    import that drops or reinitialises anything is caught."""
    torch.manual_seed(seed)
    model = build_backbone(name, num_classes=num_classes)
    state = {}
    for k, v in model.state_dict().items():
        if v.dtype == torch.long:  # num_batches_tracked
            state[k] = torch.randint(1, 10_000, v.shape)
        else:
            state[k] = torch.randn(v.shape).abs() if "running_var" in k else torch.randn(v.shape)
    return state


def save_legacy(obj, path):
    """PyTorch 1.3 (upstream's version) wrote the pre-zip serialisation format."""
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def ssl_checkpoint(model_state: dict) -> dict:
    """What upstream `train_ssl.py` saves every 40 epochs."""
    return {
        "opt": argparse.Namespace(model="r3d", lr=0.01, nce_k=1024, nce_t=0.07, neg="repeat"),
        "model": model_state,
        "contrast": {
            "params": torch.tensor([1024.0, 0.07, -1.0, -1.0, 0.5]),
            "memory_l": torch.rand(8, 512),
            "memory_ab": torch.rand(8, 512),
        },
        "optimizer": {"state": {}, "param_groups": [{"lr": 1.6e-5, "momentum": 0.9}]},
        "epoch": 240,
    }


@pytest.fixture(scope="module")
def r3d_state():
    return randomised_state("r3d")


def assert_same_tensors(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_import_ssl_checkpoint_round_trips(tmp_path, r3d_state):
    src = tmp_path / "ckpt_epoch_240.pth"
    save_legacy(ssl_checkpoint(r3d_state), src)
    out = tmp_path / "out" / "r3d.pt"
    import_upstream(src, "r3d", out)

    ckpt = torch.load(out, weights_only=True)
    assert ckpt["format"] == FORMAT and ckpt["backbone"] == "r3d"
    assert ckpt["model_kwargs"] == {"width": 1.0, "small_input": False, "num_classes": None}
    assert ckpt["head"] is None
    assert ckpt["source"] == {
        "path": str(src),
        "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        "kind": "upstream-ssl",
    }
    assert_same_tensors(ckpt["model"], r3d_state)
    assert [p.name for p in out.parent.iterdir()] == ["r3d.pt"]  # no temporary left behind

    model = build_backbone("r3d")
    load_state_strict(model, ckpt["model"], source=str(out))
    assert_same_tensors(model.state_dict(), r3d_state)


def test_import_finetuned_dataparallel_state_dict(tmp_path):
    state = randomised_state("r21d", num_classes=101, seed=1)
    src = tmp_path / "r21d_ft.pt"
    save_legacy({f"module.{k}": v for k, v in state.items()}, src)  # saved from nn.DataParallel
    out = tmp_path / "r21d.pt"
    assert cli.main(["import-upstream", str(src), "--backbone", "r21d", "--out", str(out)]) == 0

    ckpt = torch.load(out, weights_only=True)
    assert ckpt["source"]["kind"] == "upstream-finetuned"
    assert ckpt["model_kwargs"]["num_classes"] == 101
    assert_same_tensors(ckpt["head"], {k: state[k] for k in ("linear.weight", "linear.bias")})
    assert_same_tensors(ckpt["model"], {k: v for k, v in state.items() if "linear" not in k})
    model = build_backbone("r21d", num_classes=101)
    load_state_strict(model, {**ckpt["model"], **ckpt["head"]}, source="converted")
    assert_same_tensors(model.state_dict(), state)


def test_mismatch_names_every_bad_entry_and_loads_nothing(r3d_state):
    bad = dict(r3d_state)
    del bad["conv3.block1.bn2.running_var"]
    bad["conv6.block1.conv1.temporal_spatial_conv.weight"] = torch.zeros(4, 4, 1, 1, 1)
    bad["conv2.block1.conv1.temporal_spatial_conv.weight"] = torch.zeros(64, 64, 1, 3, 3)
    model = build_backbone("r3d")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as info:
        load_state_strict(model, bad, source="bad.pth")
    msg = str(info.value)
    assert "missing from the file (1)" in msg and "conv3.block1.bn2.running_var (128,)" in msg
    assert "unexpected in the file (1)" in msg
    assert "conv6.block1.conv1.temporal_spatial_conv.weight (4, 4, 1, 1, 1)" in msg
    assert "wrong shape (1)" in msg
    assert (
        "conv2.block1.conv1.temporal_spatial_conv.weight: file (64, 64, 1, 3, 3), "
        "model (64, 64, 3, 3, 3)" in msg
    )
    assert_same_tensors(model.state_dict(), before)


def test_import_rejects_mismatch_without_writing(tmp_path, r3d_state, capsys):
    bad = dict(r3d_state)
    bad["conv5.block1.bn1.weight"] = torch.ones(256)
    src = tmp_path / "bad.pth"
    save_legacy(ssl_checkpoint(bad), src)
    out = tmp_path / "never.pt"
    assert cli.main(["import-upstream", str(src), "--backbone", "r3d", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "conv5.block1.bn1.weight: file (256,), model (512,)" in err
    assert "width" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_wrong_backbone_is_named(tmp_path, r3d_state):
    src = tmp_path / "r3d.pth"
    save_legacy(ssl_checkpoint(r3d_state), src)
    with pytest.raises(UserError) as info:
        import_upstream(src, "r21d", tmp_path / "x.pt")
    msg = str(info.value)
    assert "wrong --backbone" in msg and "match backbone r3d" in msg
    assert "conv1.spatial_conv.weight (83, 3, 1, 7, 7)" in msg  # missing entries listed in full
    assert "conv1.temporal_spatial_conv.weight (64, 3, 3, 7, 7)" in msg


def test_head_mismatch_is_explained(r3d_state):
    with pytest.raises(UserError, match=r"model has a classification head \(linear\.\*\)"):
        load_state_strict(build_backbone("r3d", num_classes=101), r3d_state, source="ssl")
    with_head = {**r3d_state, "linear.weight": torch.zeros(51, 512), "linear.bias": torch.zeros(51)}
    with pytest.raises(UserError, match="file has a classification head"):
        load_state_strict(build_backbone("r3d"), with_head, source="ft")
    with pytest.raises(UserError, match="number of classes"):
        load_state_strict(build_backbone("r3d", num_classes=101), with_head, source="ft")


def test_dataparallel_prefix_is_explained(r3d_state):
    prefixed = {f"module.{k}": v for k, v in r3d_state.items()}
    with pytest.raises(UserError, match="DataParallel"):
        load_state_strict(build_backbone("r3d"), prefixed, source="dp")


def test_untrusted_pickle_needs_consent(tmp_path, r3d_state):
    ckpt = ssl_checkpoint(r3d_state)
    ckpt["opt"].ratio = fractions.Fraction(1, 3)  # an object weights-only loading refuses
    src = tmp_path / "odd.pth"
    torch.save(ckpt, src)
    with pytest.raises(UserError, match="--trust-pickle"):
        import_upstream(src, "r3d", tmp_path / "a.pt")
    assert not (tmp_path / "a.pt").exists()
    import_upstream(src, "r3d", tmp_path / "b.pt", trust_pickle=True)
    assert_same_tensors(torch.load(tmp_path / "b.pt", weights_only=True)["model"], r3d_state)


def test_not_a_checkpoint(tmp_path):
    src = tmp_path / "list.pth"
    torch.save([1, 2, 3], src)
    with pytest.raises(UserError, match="not an upstream IIC checkpoint"):
        import_upstream(src, "r3d", tmp_path / "x.pt")
    with pytest.raises(UserError, match="does not exist"):
        import_upstream(tmp_path / "missing.pth", "r3d", tmp_path / "x.pt")
