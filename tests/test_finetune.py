"""Fine-tuning (spec 11): strict backbone loading, parameter groups, the step end to end, resume."""

from pathlib import Path

import evaluation_data as data
import numpy as np
import pandas as pd
import pytest
import torch

from iicrepro import cli, io, layout
from iicrepro.checkpoint import load_checkpoint, save_checkpoint
from iicrepro.errors import UserError
from iicrepro.evaluate.recognition import evaluate
from iicrepro.train.finetune import finetune, model_from_checkpoint, parameter_groups


def init_pt(tiny):
    return tiny["run_dir"] / "init.pt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    s = data.settings(tmp)
    data.build_dataset(s)
    return {"tmp": tmp, "settings": s, "run_dir": data.write_checkpoints(s)}


def test_backbone_loads_strictly_and_only_the_head_is_new(tiny):
    ckpt = load_checkpoint(tiny["run_dir"] / "checkpoint.pt")
    model, _ = model_from_checkpoint(tiny["run_dir"] / "checkpoint.pt", 3, "r3d")
    state = model.state_dict()
    assert set(state) - set(ckpt["model"]) == {"linear.weight", "linear.bias"}
    for k, v in ckpt["model"].items():
        torch.testing.assert_close(state[k], v)
    assert model(torch.rand(2, 3, 8, 40, 40)).shape == (2, 3)


def test_missing_backbone_entry_fails_with_its_name(tiny, tmp_path):
    state = load_checkpoint(tiny["run_dir"] / "checkpoint.pt")
    del state["model"]["conv4.block1.conv2.temporal_spatial_conv.weight"]
    save_checkpoint(tmp_path / "bad.pt", state)
    with pytest.raises(UserError, match=r"conv4\.block1\.conv2\.temporal_spatial_conv\.weight"):
        model_from_checkpoint(tmp_path / "bad.pt", 3, "r3d")
    with pytest.raises(UserError, match="holds a r3d backbone, not c3d"):
        model_from_checkpoint(tiny["run_dir"] / "checkpoint.pt", 3, "c3d")


def test_two_parameter_groups_split_at_conv4(tiny):
    model, _ = model_from_checkpoint(tiny["run_dir"] / "checkpoint.pt", 3, "r3d")
    base, late = parameter_groups(model, "r3d", 0.1, 0.2)
    assert (base["lr"], late["lr"]) == (0.1, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    late_names = {names[id(p)].split(".")[0] for p in late["params"]}
    base_names = {names[id(p)].split(".")[0] for p in base["params"]}
    assert late_names == {"conv4", "conv5", "linear"}
    assert base_names == {"conv1", "bn1", "conv2", "conv3"}
    assert len(base["params"]) + len(late["params"]) == len(list(model.parameters()))


def test_default_run_names(tiny):
    run_dir = Path("results/pretrain/synthetic/r3d-residual-repeat-s0")
    assert layout.finetune_run(run_dir / "checkpoint.pt", "residual", 0) == "r3d-residual-repeat-s0"
    assert layout.finetune_run(run_dir / "init.pt", "residual", 0) == "r3d-residual-random-s0"
    assert (
        layout.finetune_run(run_dir / "checkpoint.pt", "rgb", 5)
        == "r3d-residual-repeat-s0-ftrgb-fs5"
    )


def run(tiny, out, **kw):
    return finetune(
        tiny["settings"], backbone="r3d", view="residual", init="iic",
        checkpoint=tiny["run_dir"] / "checkpoint.pt", dataset=data.DATASET, split=1, seed=0,
        out=out, device="cpu", **kw,
    )  # fmt: skip


@pytest.mark.slow
def test_finetune_end_to_end_and_resume_equals_uninterrupted(tiny):
    whole = tiny["tmp"] / "whole"
    argv = ["finetune", "--params", str(data.PARAMS), "--preset", "demo"]
    for item in data.overrides(tiny["tmp"]):
        argv += ["--set", item]
    argv += ["--backbone", "r3d", "--view", "residual", "--init", "iic", "--checkpoint",
             str(tiny["run_dir"] / "checkpoint.pt"), "--dataset", data.DATASET, "--split", "1",
             "--seed", "0", "--out", str(whole), "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0

    m = io.read_json(whole / "metrics.json")
    # 13 listed, 1 never decoded, 3 held out for validation; every test video with 2 clips.
    assert (m["counts"]["train"], m["counts"]["val"], m["counts"]["test"]) == (9, 3, 6)
    assert m["counts"]["train_list"]["excluded_decode"] == 1 and m["counts"]["test_clips"] == 12
    assert m["num_classes"] == 3 and m["residual"] == "unscaled"
    assert 1 <= m["best_epoch"] <= 2
    history = pd.read_csv(whole / "metrics.csv")
    assert list(history.columns) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc",
                                     "lr", "ft_lr"]  # fmt: skip
    assert history["epoch"].tolist() == [1, 2]
    assert m["best_val_loss"] == history["val_loss"].min()
    assert m["best_epoch"] == int(history.loc[history["val_loss"].idxmin(), "epoch"])
    preds = pd.read_csv(whole / "test_predictions.csv")
    assert len(preds) == 6 and m["top1"] == pytest.approx(
        100 * (preds["label"] == preds["prediction"]).mean()
    )
    best = load_checkpoint(whole / "best.pt")
    assert best["epoch"] == m["best_epoch"] and best["model_kwargs"]["num_classes"] == 3
    # `iicrepro evaluate` on best.pt is the very test fine-tuning ran.
    evaluated = evaluate(tiny["settings"], whole / "best.pt", data.DATASET, 1, "residual",
                         out=tiny["tmp"] / "evaluated", device="cpu")  # fmt: skip
    assert (evaluated / "test_predictions.csv").read_text() == (
        whole / "test_predictions.csv"
    ).read_text()
    assert io.read_json(evaluated / "metrics.json")["top1"] == m["top1"]

    # Interrupted after epoch 1, then resumed: the same run.
    split = tiny["tmp"] / "split"
    run(tiny, split, stop_after=1)
    assert not (split / "metrics.json").exists()
    assert load_checkpoint(split / "ckpt" / "last.pt")["epoch"] == 1
    assert len(pd.read_csv(split / "metrics.csv")) == 1
    run(tiny, split)
    assert (split / "metrics.csv").read_text() == (whole / "metrics.csv").read_text()
    resumed = io.read_json(split / "metrics.json")
    for key in ("top1", "clip_top1", "best_epoch", "best_val_loss", "counts"):
        assert resumed[key] == m[key], key
    for k, v in load_checkpoint(split / "best.pt")["model"].items():
        torch.testing.assert_close(v, best["model"][k], rtol=0, atol=0)
    # A finished run's resume state is spent: a rerun with new settings starts anew.
    assert not (split / "ckpt" / "last.pt").exists()

    # A resume file of another run is refused, not silently continued.
    run(tiny, split, stop_after=1)
    with pytest.raises(UserError, match="other settings"):
        finetune(tiny["settings"], backbone="r3d", view="residual", init="iic",
                 checkpoint=tiny["run_dir"] / "checkpoint.pt", dataset=data.DATASET, split=1,
                 seed=1, out=split, device="cpu")  # fmt: skip


def test_validation_subset_must_leave_training_videos(tiny):
    s = data.settings(tiny["tmp"], **{"finetune.val_size.synthetic": 12})
    with pytest.raises(UserError, match="val_size"):
        finetune(s, backbone="r3d", view="rgb", init="random", checkpoint=init_pt(tiny),
                 dataset=data.DATASET, split=1, seed=0, device="cpu")  # fmt: skip


def test_random_init_trains_from_the_seed_init_weights(tiny):
    s = data.settings(tiny["tmp"], **{"finetune.epochs": 1})
    out = finetune(s, backbone="r3d", view="rgb", init="random", checkpoint=init_pt(tiny),
                   dataset=data.DATASET, split=1, seed=0, device="cpu")  # fmt: skip
    assert out.name == "r3d-residual-random-s0-ftrgb" and out.parent.name == "split1"
    m = io.read_json(out / "metrics.json")
    assert m["init"] == "random" and m["view"] == "rgb"
    assert m["checkpoint"]["sha256"] == io.sha256_file(tiny["run_dir"] / "init.pt")
    assert np.isfinite(m["best_val_loss"])
