"""DDP pretraining (`train.distributed`): two gloo processes under torchrun compute what one
process with the same global batch computes, and resume a single-process run."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from iicrepro import config, io, layout
from iicrepro.checkpoint import load_checkpoint
from iicrepro.data.frames import save_frames, write_index
from iicrepro.method.intra_negative import intra_negative, intra_negative_of_rank
from iicrepro.method.memory_bank import DistributedMemoryBank, MemoryBank
from iicrepro.train import distributed as ddp
from iicrepro.train import pretrain as pt

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
# Clips of CLIP + 1 frames cropped to their full size: the clip start and the crop are fixed, so
# the runs can differ only in the training computation. Noisy frames and a small learning rate
# keep the first BN layers well conditioned: float32 rounding differences (summation order) then
# stay at rounding level instead of growing from step to step.
VIDEOS, CLIP, SIZE, BATCH = 8, 8, 24, 4
RUN = dict(backbone="r3d", view="residual", intra_negative="repeat", seed=0)


def overrides(root: Path) -> list[str]:
    values = {
        "paths.data": root / "data", "paths.results": root / "results",
        "frames.size": f"[{SIZE}, {SIZE}]", "frames.min_frames": CLIP + 1,
        "clips.length": CLIP, "clips.crop": SIZE, "pretrain.epochs": 2, "pretrain.lr": 0.001,
        "pretrain.batch_size": BATCH, "pretrain.checkpoint_every": 1, "pretrain.nce.k": 16,
        # clip sampling in a worker in both runs: the main process's RNG feeds only the step
        "pretrain.workers": 1, "tracking.enabled": "false",
        # the smallest demo width: wider models let rounding differences grow past the tolerance
        "model.width": 0.125,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in values.items()]


def build_dataset(settings) -> None:
    """Manifest and raw frame store: bars moving right or left over noise."""
    rows, keys = [], []
    store = layout.frame_store(settings, "synthetic")
    rng = np.random.default_rng(0)
    for i in range(VIDEOS):
        cls, direction = [("Right", 1), ("Left", -1)][i % 2]
        key = f"{cls}/v_{cls}_g01_c{i:02d}"
        video = rng.integers(0, 120, (CLIP + 1, SIZE, SIZE, 3), dtype=np.uint8)
        for t in range(CLIP + 1):
            x = (3 * i + direction * 2 * t) % (SIZE - 4)
            video[t, :, x : x + 4] = (230, 200, 60)
        save_frames(store, key, video, "raw")
        rows.append({"video": key + ".avi", "class": cls, "label": i % 2, "subset": "train"})
        keys.append(key)
    write_index(store, keys, "raw")
    manifest = layout.manifest(settings, "synthetic", 1)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(manifest, index=False)


def torchrun(root: Path, out: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """`iicrepro pretrain` as a torchrun job of `nproc` CPU processes (gloo)."""
    sets = [a for o in overrides(root) for a in ("--set", o)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "iicrepro.cli", "pretrain",
        "--params", str(PARAMS), "--preset", "demo", *sets, "--backbone", RUN["backbone"],
        "--view", RUN["view"], "--intra-negative", RUN["intra_negative"],
        "--seed", str(RUN["seed"]), "--out", str(out), "--device", "cpu",
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (whole, and stopped after epoch 1) and two torchrun jobs of two processes:
    one from scratch and one resuming the stopped run."""
    root = tmp_path_factory.mktemp("ddp")
    settings = config.load(PARAMS, "demo", overrides(root))
    build_dataset(settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = pt.pretrain(settings, **RUN, out_dir=root / "one", device="cpu")
        real_step, calls = pt.train_step, []

        def stop_in_epoch_two(ctx, batch):
            calls.append(1)
            if len(calls) == VIDEOS // BATCH + 1:
                raise KeyboardInterrupt
            return real_step(ctx, batch)

        pt.train_step = stop_in_epoch_two
        try:
            with pytest.raises(KeyboardInterrupt):
                pt.pretrain(settings, **RUN, out_dir=root / "resumed", device="cpu")
        finally:
            pt.train_step = real_step
    finally:
        torch.set_num_threads(threads)
    assert load_checkpoint(root / "resumed" / "ckpt" / "last.pt")["epoch"] == 1
    logs = {"two": torchrun(root, root / "two").stdout}
    logs["resumed"] = torchrun(root, root / "resumed").stdout
    return {"one": one, "two": root / "two", "resumed": root / "resumed", "logs": logs}


def compare(a: Path, b: Path) -> None:
    """Loss trajectories, final weights, BN statistics and memory banks of two runs."""
    ra, rb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    assert ra["epoch"].tolist() == rb["epoch"].tolist() == [1, 2]
    assert ra["lr"].tolist() == rb["lr"].tolist()
    for col in ("loss", "positive_rank1"):
        np.testing.assert_allclose(rb[col], ra[col], rtol=1e-5, err_msg=col)
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    for group in ("model", "bank"):
        assert ca[group].keys() == cb[group].keys()
        for k, v in ca[group].items():
            if v.is_floating_point():
                torch.testing.assert_close(cb[group][k], v, rtol=1e-4, atol=1e-4, msg=k)
            else:
                assert torch.equal(cb[group][k], v), k


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    """BN statistics over the global batch, gathered bank updates, global random draws,
    averaged gradients: the job reproduces the single process up to float32 summation order."""
    compare(runs["one"], runs["two"])
    summary = io.read_json(runs["two"] / "metrics.json")
    assert summary["processes"] == 2 and summary["steps"] == 2 * VIDEOS // BATCH
    assert io.read_json(runs["one"] / "metrics.json")["processes"] == 1
    # training moved the weights far beyond the tolerance, so trained models are compared
    init, final = (load_checkpoint(runs["two"] / f)["model"] for f in ("init.pt", "checkpoint.pt"))
    moved = max((final[k] - v).abs().max().item() for k, v in init.items() if v.is_floating_point())
    assert moved > 0.1
    assert runs["logs"]["two"].count("pretrain two epoch") == 2  # only rank 0 logs


@pytest.mark.slow
def test_ddp_resumes_a_single_process_run(runs):
    """The job picks up ckpt/last.pt written after epoch 1 and ends where one process ends."""
    log = runs["logs"]["resumed"]
    assert log.count("resuming resumed after epoch 1/2") == 1
    assert log.count("pretrain resumed epoch") == 1  # epoch 2 only
    compare(runs["one"], runs["resumed"])


def test_rank_batch_sampler_deals_out_the_single_process_batches():
    n, batch, epochs = 22, 6, 3
    data = torch.arange(n)
    single = torch.utils.data.DataLoader(
        data,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(7),
    )
    expected = [b.tolist() for _ in range(epochs) for b in single]
    for size in (2, 3):
        parts = []
        for rank in range(size):
            world = ddp.World(rank, size, rank, "gloo")
            gen = torch.Generator().manual_seed(7)
            loader = torch.utils.data.DataLoader(
                data, batch_size=batch // size, drop_last=True, generator=gen,
                sampler=ddp.RankBatchSampler(n, batch, world, gen),
            )  # fmt: skip
            assert len(loader) == n // batch
            parts.append([b.tolist() for _ in range(epochs) for b in loader])
        assert [sum(p, []) for p in zip(*parts, strict=True)] == expected, size
    with pytest.raises(Exception, match="not divisible"):
        ddp.RankBatchSampler(n, 7, ddp.World(0, 2, 0, "gloo"), torch.Generator())


@pytest.mark.parametrize("kind", ["repeat", "shuffle", "none"])
def test_rank_draws_are_rows_of_the_global_draw(kind):
    """Intra-negatives and negative indices: rank r gets rows r*b..(r+1)*b of what one process
    draws for the global batch from the same RNG state."""
    x = torch.rand(6, 3, 8, 5, 5)
    torch.manual_seed(11)
    whole = intra_negative(x, kind)
    bank = MemoryBank(40, 4, k=7, t=0.1, momentum=0.5)
    index = torch.arange(6) * 3
    idx = bank.sample_indices(index)
    for rank in range(2):
        world = ddp.World(rank, 2, rank, "gloo")
        rows = slice(3 * rank, 3 * rank + 3)
        torch.manual_seed(11)
        part = intra_negative_of_rank(x[rows], kind, world.rank, world.size)
        assert (part is None) if whole is None else torch.equal(part, whole[rows])
        dbank = DistributedMemoryBank(40, 4, k=7, t=0.1, momentum=0.5, world=world)
        assert torch.equal(dbank.sample_indices(index[rows]), idx[rows])
    assert whole is None or not torch.equal(whole, x)


def test_global_batchnorm_in_a_one_process_group_is_batchnorm(tmp_path):
    """Forward, parameter gradients, running statistics: torch's BatchNorm3d, in float64 (in
    float32 the two orders of summation differ in the last bits)."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        ref = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3), torch.nn.BatchNorm3d(4)).double()
        ours = ddp.global_batchnorm(copy.deepcopy(ref))
        assert isinstance(ours[1], ddp.GlobalBatchNorm) and ours[1].weight is not ref[1].weight
        x = torch.randn(3, 3, 6, 7, 7, dtype=torch.float64)
        outputs = []
        for model in (ref, ours):
            for _ in range(2):  # running statistics updated twice
                y = model(x)
            (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
            outputs.append(y.detach())
        torch.testing.assert_close(outputs[1], outputs[0])
        for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values(), strict=True):
            torch.testing.assert_close(b, a, msg=k)
        for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad)
        ours.eval(), ref.eval()
        torch.testing.assert_close(ours(x), ref(x))
    finally:
        dist.destroy_process_group()
