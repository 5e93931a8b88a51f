"""`iicrepro pretrain` end to end on a tiny real frame store: outputs, resume equivalence,
the intra-negative forward (no gradient, train-mode BN), schedules and the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from iicrepro import config, io, layout
from iicrepro.checkpoint import load_backbone, load_checkpoint
from iicrepro.cli import main as cli_main
from iicrepro.data.frames import save_frames, write_index
from iicrepro.errors import UserError
from iicrepro.method.memory_bank import MemoryBank
from iicrepro.models import build_backbone
from iicrepro.train import pretrain as pt

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
VIDEOS, FRAMES, SIZE = 12, 10, 28


pytestmark = pytest.mark.usefixtures("one_thread")


def overrides(root: Path, **extra) -> list[str]:
    values = {
        "paths.data": root / "data", "paths.results": root / "results",
        "frames.size": f"[{SIZE}, {SIZE}]", "frames.min_frames": FRAMES,
        "clips.length": 8, "clips.crop": 24, "pretrain.epochs": 2, "pretrain.batch_size": 4,
        "pretrain.checkpoint_every": 1, "pretrain.nce.k": 16, "pretrain.workers": 0,
        "tracking.enabled": "false",
    }  # fmt: skip
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def moving_bar(direction: int, phase: int) -> np.ndarray:
    """(T, H, W, 3) uint8: a bright vertical bar moving right (+1) or left (-1)."""
    video = np.full((FRAMES, SIZE, SIZE, 3), 40, np.uint8)
    for t in range(FRAMES):
        x = (phase + direction * 2 * t) % (SIZE - 4)
        video[t, :, x : x + 4] = (230, 200, 60)
    return video


def build_dataset(settings) -> None:
    """The synthetic dataset's manifest and raw frame store, written in their real formats."""
    rows, keys = [], []
    store = layout.frame_store(settings, "synthetic")
    for i in range(VIDEOS + 2):
        cls = ["Right", "Left"][i % 2]
        key = f"{cls}/v_{cls}_g01_c{i:02d}"
        subset = "train" if i < VIDEOS else "test"
        rows.append({"video": key + ".avi", "class": cls, "label": i % 2, "subset": subset})
        save_frames(store, key, moving_bar(1 if i % 2 == 0 else -1, 3 * i), "raw")
        keys.append(key)
    write_index(store, keys, "raw")
    manifest = layout.manifest(settings, "synthetic", 1)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(manifest, index=False)


@pytest.fixture
def settings(tmp_path):
    s = config.load(PARAMS, "demo", overrides(tmp_path))
    build_dataset(s)
    return s


def run(settings, out, **kw):
    args = dict(
        backbone="r3d", view="residual", intra_negative="repeat", seed=0, out_dir=out, device="cpu"
    )  # bit-identical resume is a CPU property (cuDNN autotuning is not deterministic)
    return pt.pretrain(settings, **(args | kw))


def test_pretrain_end_to_end(settings, tmp_path):
    out = run(settings, None)
    assert out == layout.pretrain_dir(settings, "r3d", "residual", "repeat", 0)
    for name in ("init.pt", "metrics.csv", "metrics.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert not (out / "ckpt" / "last.pt").exists()  # spent once the run has finished
    rows = pd.read_csv(out / "metrics.csv")
    assert list(rows.columns) == pt.METRIC_COLUMNS
    assert rows["epoch"].tolist() == [1, 2] and np.isfinite(rows["loss"]).all()
    assert rows["lr"].iloc[0] == pytest.approx(0.03)  # demo: cosine from 0.03
    assert rows["lr"].iloc[1] == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    summary = io.read_json(out / "metrics.json")
    assert summary["chance_loss"] == pytest.approx(2 * math.log(2 * 16 + 2))
    assert summary["epochs"] == 2 and summary["steps"] == 2 * (VIDEOS // 4)
    videos = summary["videos"]
    assert (videos["listed"], videos["used"], videos["excluded"]) == (VIDEOS, VIDEOS, 0)
    assert videos["excluded_by_reason"] == {} and videos["excluded_videos"] == []
    assert "code_version" in summary["provenance"]

    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["bank_config"]["n"] == VIDEOS and ckpt["bank_config"]["intra"] is True
    assert ckpt["settings"]["pretrain"]["nce"]["k"] == 16
    model = build_backbone("r3d", **ckpt["model_kwargs"])
    load_backbone(model, out / "checkpoint.pt")
    init = load_checkpoint(out / "init.pt")
    assert init["epoch"] == 0
    assert not torch.equal(init["model"]["conv1.temporal_spatial_conv.weight"],
                           ckpt["model"]["conv1.temporal_spatial_conv.weight"])  # fmt: skip
    # every video was seen each epoch: all bank rows were updated and are unit vectors
    for name in ("memory_v1", "memory_v2", "memory_neg"):
        norms = ckpt["bank"][name].norm(dim=1)
        assert torch.allclose(norms, torch.ones(VIDEOS), atol=1e-5), name

    # init.pt is the same initial network as a fresh seed-0 build (random-init baseline)
    torch.manual_seed(0)
    same = build_backbone("r3d", **ckpt["model_kwargs"])
    assert all(torch.equal(v, init["model"][k]) for k, v in same.state_dict().items())

    # done: a rerun returns at once; other settings are refused instead of mixed
    stamp = (out / "checkpoint.pt").stat().st_mtime_ns
    assert run(settings, None) == out and (out / "checkpoint.pt").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="other settings"):
        run(settings, None, epochs=3)


def test_resume_is_bit_identical(settings, tmp_path, monkeypatch):
    whole = run(settings, tmp_path / "whole")

    real_step, calls = pt.train_step, []

    def interrupted(ctx, batch):
        calls.append(1)
        if len(calls) == VIDEOS // 4 + 2:  # in the middle of epoch 2
            raise KeyboardInterrupt
        return real_step(ctx, batch)

    monkeypatch.setattr(pt, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(settings, tmp_path / "resumed")
    monkeypatch.setattr(pt, "train_step", real_step)
    part = tmp_path / "resumed"
    assert not (part / "checkpoint.pt").exists()
    assert load_checkpoint(part / "ckpt" / "last.pt")["epoch"] == 1
    stale = part / "ckpt" / ".last.pt.x1y2z3.pt.tmp"  # as a write killed with SIGKILL leaves it
    stale.write_bytes(b"PK\x03\x04 half a checkpoint")
    run(settings, part)
    assert not stale.exists()  # removed when the run resumed

    a, b = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    for group in ("model", "bank"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (group, k)
    ra, rb = pd.read_csv(whole / "metrics.csv"), pd.read_csv(part / "metrics.csv")
    assert ra[["epoch", "loss", "lr", "positive_rank1"]].equals(
        rb[["epoch", "loss", "lr", "positive_rank1"]]
    )


def test_intra_negative_forward_has_no_gradient_but_updates_bn():
    from iicrepro.method.intra_negative import intra_negative
    from iicrepro.method.memory_bank import nce_loss
    from iicrepro.method.views import residual, to_unit

    torch.manual_seed(1)
    model = build_backbone("r3d", width=0.125, small_input=True).train()
    bank = MemoryBank(8, model.out_dim, k=4, t=0.1, momentum=0.5, normalize_features=True)
    start_model = {k: v.clone() for k, v in model.state_dict().items()}
    start_bank = {k: v.clone() for k, v in bank.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    outputs = []
    model.register_forward_hook(lambda m, i, o: outputs.append(o))
    ctx = pt.StepContext(model, bank, opt, torch.device("cpu"), "residual", "shuffle")
    video = torch.randint(0, 256, (4, 3, 8, 24, 24), dtype=torch.uint8)
    batch = {"video": video, "index": torch.arange(4), "label": torch.zeros(4)}
    torch.manual_seed(2)
    loss, rank1 = pt.train_step(ctx, batch)
    assert [o.requires_grad for o in outputs] == [True, True, False]  # f1, f2, then fn
    assert outputs[2].grad_fn is None
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert all(int(bn.num_batches_tracked) == 3 for bn in bns)  # three train-mode forwards
    assert math.isfinite(loss.item()) and 0 <= rank1.item() <= 1
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert any(g.abs().sum() > 0 for g in grads.values())

    # The same step with the intra-negative forward left out (same random draws, same banks)
    # gives the same gradients: nothing flows back through the intra-negative.
    model.load_state_dict(start_model)
    bank.load_state_dict(start_bank)
    model.zero_grad()
    torch.manual_seed(2)
    x = to_unit(video)
    intra_negative(x, "shuffle")  # consume the same draws
    f1, f2 = model(x), model(residual(x, scaled=True))
    loss2 = nce_loss(*bank(f1, f2, torch.arange(4), torch.zeros_like(f1)))
    loss2.backward()
    assert torch.equal(loss2.detach(), loss)
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, grads[k]), k


def test_learning_rate_schedules():
    paper = {"schedule": "multistep", "lr": 0.01, "gamma": 0.2, "milestones": [45, 90, 125, 160]}
    lr = [pt.learning_rate(paper, e, 0, 10, 240) for e in range(240)]  # 0-based epochs
    assert lr[0] == lr[44] == 0.01  # spec 9: epochs 1-45 at 1e-2
    assert lr[45] == pytest.approx(2e-3) and lr[89] == pytest.approx(2e-3)
    assert lr[90] == pytest.approx(4e-4) and lr[125] == pytest.approx(8e-5)
    assert lr[160] == pytest.approx(1.6e-5) and lr[239] == pytest.approx(1.6e-5)
    cos = {"schedule": "cosine", "lr": 0.03}
    assert pt.learning_rate(cos, 0, 0, 12, 10) == 0.03
    assert pt.learning_rate(cos, 5, 0, 12, 10) == pytest.approx(0.015)
    assert pt.learning_rate(cos, 9, 11, 12, 10) < 0.03 * 1e-3
    assert pt.learning_rate({"schedule": "constant", "lr": 0.1}, 7, 3, 12, 10) == 0.1


def test_cli_cmc_debug_run(settings, tmp_path, capsys):
    out = tmp_path / "cmc"
    argv = ["pretrain", "--params", str(PARAMS), "--preset", "demo",
            *[a for o in overrides(tmp_path) for a in ("--set", o)],
            "--backbone", "r3d", "--view", "residual", "--intra-negative", "none", "--seed", "3",
            "--out", str(out), "--device", "cpu", "--max-steps", "2"]  # fmt: skip
    assert cli_main(argv) == 0
    assert "chance 5.67" in capsys.readouterr().out  # 2 ln(K + 1), K = 16, two banks
    summary = io.read_json(out / "metrics.json")
    assert summary["steps"] == 2 and summary["max_steps"] == 2 and summary["epochs"] == 1
    assert not (out / "ckpt" / "last.pt").exists()  # a truncated debug run keeps no resume state
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert set(ckpt["bank"]) == {"memory_v1", "memory_v2"}
    assert cli_main([*argv[:-2], "--view", "depth"]) == 1
