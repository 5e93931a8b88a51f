"""A full disk stops every writing step with one clear error and leaves nothing that looks complete.

Each test mounts a real tmpfs of a few hundred KiB as the step's output folder (skipped where
mounting is refused), runs the step through the CLI, then grows the file system, as a user freeing
space would, and runs the step again to completion.
"""

from __future__ import annotations

from pathlib import Path

import evaluation_data as data
import numpy as np
import pandas as pd
import pytest
from small_fs import fill, resize, small_filesystem
from videos import moving_pattern, write_video

from iicrepro import cli, config, layout
from iicrepro.data.frames import FrameStore, save_frames, write_index

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
MiB = 1 << 20

pytestmark = pytest.mark.usefixtures("one_thread")
_observe: list = []  # record_property of the running test (the fault sweep shows what it saw)


@pytest.fixture(autouse=True)
def _observed(record_property):
    _observe[:] = [record_property]
    yield
    _observe.clear()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stderr, stdout) of `iicrepro ARGV` (an uncaught exception fails the test)."""
    capsys.readouterr()
    rc = cli.main([argv[0], "--params", str(PARAMS), "--preset", "demo", *argv[1:]])
    out, err = capsys.readouterr()
    return rc, err, out


def assert_one_clear_error(rc: int, err: str, where: Path) -> None:
    # one message (progress bars may share stderr), no traceback
    lines = [line for line in err.splitlines() if "iicrepro" in line or "Error" in line]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "no space left on device writing" in err and f"file system at {where}" in err, err
    assert "paths.data" in err and "paths.results" in err, err
    if _observe:
        _observe[0]("observed", lines[0])


def no_temporaries(root: Path) -> bool:
    return not [p for p in root.rglob(".*") if p.name.endswith(".tmp") or ".synthesize-" in p.name]


@pytest.mark.slow
def test_synthesize(tmp_path, capsys):
    mnt = tmp_path / "mnt"
    with small_filesystem(mnt, 256 << 10):
        argv = ["synthesize", "--set", f"paths.data={mnt}/data", "--workers", "2"]
        rc, err, _ = run(capsys, *argv)
        assert_one_clear_error(rc, err, mnt)
        demo = config.load(Path(__file__).parents[1] / "params.yaml", preset="demo").synthetic
        videos = len(demo.classes) * demo.groups * demo.videos_per_group
        assert f"needed for {videos} videos and their archive" in err
        source = mnt / "data" / "synthetic-source"
        assert not (source / "SHA256SUMS").exists() and no_temporaries(mnt)
        resize(mnt, 32 * MiB)
        assert run(capsys, *argv)[0] == 0 and (source / "SHA256SUMS").is_file()


@pytest.mark.slow
def test_fetch_and_extract(tmp_path, capsys):
    mnt = tmp_path / "mnt"
    with small_filesystem(mnt, 16 * MiB):
        data = ["--set", f"paths.data={mnt}/data"]
        assert run(capsys, "synthesize", *data)[0] == 0
        filler = fill(mnt, leave=64 << 10)
        rc, err, _ = run(capsys, "fetch", "synthetic", *data, "--no-progress")
        lines = [line for line in err.splitlines() if "iicrepro" in line or "Error" in line]
        assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
        assert "disk space" in err and "paths.data" in err, err
        assert "mirror" not in err and "Tried" not in err  # no other source helps a full disk
        if _observe:
            _observe[0]("observed", lines[0])
        downloads = mnt / "data" / "downloads" / "synthetic"
        assert not list(downloads.glob("*.zip")) and not list(downloads.glob("*.sha256"))
        filler.unlink()
        assert run(capsys, "fetch", "synthetic", *data, "--no-progress")[0] == 0
        filler = fill(mnt, leave=64 << 10)
        rc, err, _ = run(capsys, "extract", "synthetic", *data)
        lines = [line for line in err.splitlines() if "iicrepro" in line or "Error" in line]
        assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
        assert "space" in err and "paths.data" in err, err
        filler.unlink()
        assert run(capsys, "extract", "synthetic", *data)[0] == 0


def small_videos(root: Path, n: int) -> Path:
    """n tiny real videos and a one-split manifest folder naming them."""
    names = [f"C{i % 2}/v_{i:02d}.avi" for i in range(n)]
    for i, name in enumerate(names):
        write_video(root / "videos" / name, moving_pattern(20, 48, 64, seed=i))
    manifests = root / "manifests"
    manifests.mkdir()
    pd.DataFrame({"video": names, "label": [i % 2 for i in range(n)]}).to_csv(
        manifests / "split1.csv", index=False
    )
    return root


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_frames_stop_instead_of_counting_videos_as_failed(tmp_path, capsys, workers):
    src = small_videos(tmp_path / "src", 8)  # raw frames: 20 x 24 x 32 x 3 = 45 KiB per video
    mnt = tmp_path / "mnt"
    with small_filesystem(mnt, 160 << 10):
        store = mnt / "store"
        argv = ["frames", "synthetic", "--videos", str(src / "videos"), "--workers", str(workers)]
        argv += ["--manifests", str(src / "manifests"), "--out", str(store)]
        argv += ["--set", "frames.size=[24, 32]", "--set", "frames.codec=raw"]
        argv += ["--set", "frames.min_frames=17"]
        rc, err, _ = run(capsys, *argv)
        assert_one_clear_error(rc, err, mnt)
        stored = sorted(store.rglob("*.npy"))
        assert 0 < len(stored) < 8 and f"holds {len(stored)} of 8 videos" in err
        assert f"needed for the {8 - len(stored)} videos not stored" in err
        assert not (store / "index.csv").exists() and not (store / "failures.csv").exists()
        assert no_temporaries(mnt)
        for path in stored:  # what is there is complete
            assert np.load(path).shape == (20, 24, 32, 3)

        resize(mnt, 2 * MiB)
        rc, _, out = run(capsys, *argv)
        assert rc == 0 and f"already stored {len(stored)}" in out and "failed 0" in out
        assert len(FrameStore(store)) == 8
        assert pd.read_csv(store / "failures.csv").empty


@pytest.mark.slow
def test_flow_stops_instead_of_counting_videos_as_failed(tmp_path, capsys):
    frames = tmp_path / "frames"
    keys = [f"C{i % 2}/v_{i:02d}" for i in range(6)]
    for i, key in enumerate(keys):
        save_frames(frames, key, moving_pattern(12, 32, 32, seed=i), "raw")
    write_index(frames, keys, "raw")
    mnt = tmp_path / "mnt"
    with small_filesystem(mnt, 64 << 10):  # raw u and v: 2 x 11 x 32 x 32 = 22 KiB per video
        out = mnt / "flow"
        argv = ["flow", "synthetic", "--frames", str(frames), "--out", str(out)]
        argv += ["--set", "frames.codec=raw", "--set", "flow.workers=1"]
        rc, err, _ = run(capsys, *argv)
        assert_one_clear_error(rc, err, mnt)
        assert not (out / "index.csv").exists() and no_temporaries(mnt)
        resize(mnt, 2 * MiB)
        assert run(capsys, *argv)[0] == 0
        assert pd.read_csv(out / "index.csv").video.tolist() == sorted(keys)
        assert pd.read_csv(out / "failures.csv").empty


@pytest.fixture
def tiny(tmp_path):
    """The evaluation tests' tiny dataset and checkpoint, on the ordinary disk."""
    s = data.settings(tmp_path / "disk")
    data.build_dataset(s)
    return s, data.write_checkpoints(s) / "checkpoint.pt"


def sets(tmp_path: Path, results: Path, **extra) -> list[str]:
    argv = []
    for item in data.overrides(tmp_path / "disk", **extra):
        argv += ["--set", item]
    return [*argv, "--set", f"paths.results={results}"]


@pytest.mark.slow
def test_pretrain(tmp_path, capsys, tiny):
    mnt = tmp_path / "mnt"
    with small_filesystem(mnt, 1 * MiB):
        fill(mnt, leave=32 << 10)  # less than one checkpoint of the tiny r3d
        argv = ["pretrain", "--backbone", "r3d", "--device", "cpu"]
        argv += sets(tmp_path, mnt, **{"pretrain.epochs": 1})
        rc, err, _ = run(capsys, *argv)
        assert_one_clear_error(rc, err, mnt)
        run_dir = layout.pretrain_dir(tiny[0], "r3d", "residual", "repeat", 0)
        run_dir = mnt / run_dir.relative_to(tiny[0].paths.results)
        assert not (run_dir / "checkpoint.pt").exists() and no_temporaries(mnt)
        assert "B needed" in err  # the size of the checkpoint that did not fit
        resize(mnt, 32 * MiB)
        rc, err, _ = run(capsys, *argv)
        assert rc == 0 and (run_dir / "checkpoint.pt").is_file(), err

        # Room for the resume state but not for the final checkpoint beside it: the run's
        # metrics.json, written just before, must go too (no record of a run without its model).
        size = {n: (run_dir / n).stat().st_size for n in ("checkpoint.pt", "init.pt")}
        for name in ("checkpoint.pt", "metrics.json", "metrics.csv"):
            (run_dir / name).unlink()
        # last.pt = the checkpoint's model and banks + SGD momentum (at most one model) + RNG
        last = size["checkpoint.pt"] + size["init.pt"] + (64 << 10)
        filler = fill(mnt, leave=last + size["checkpoint.pt"] // 2)
        rc, err, _ = run(capsys, *argv)
        assert_one_clear_error(rc, err, mnt)
        assert f"writing {run_dir / 'checkpoint.pt'}" in err
        assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "metrics.json").exists()
        filler.unlink()
        assert run(capsys, *argv)[0] == 0 and (run_dir / "metrics.json").is_file()


@pytest.mark.slow
def test_retrieve(tmp_path, capsys, tiny):
    mnt = tmp_path / "mnt"
    with small_filesystem(mnt, 256 << 10):
        fill(mnt, leave=0)
        argv = ["retrieve", "--checkpoint", str(tiny[1]), "--dataset", data.DATASET]
        argv += ["--view", "residual", "--out", str(mnt / "ret"), "--device", "cpu"]
        rc, err, _ = run(capsys, *argv, *sets(tmp_path, mnt))
        assert_one_clear_error(rc, err, mnt)
        assert not (mnt / "ret" / "metrics.json").exists() and no_temporaries(mnt)


@pytest.mark.slow
def test_finetune(tmp_path, capsys, tiny):
    mnt = tmp_path / "mnt"
    with small_filesystem(mnt, 1 * MiB):
        fill(mnt, leave=16 << 10)
        argv = ["finetune", "--backbone", "r3d", "--view", "residual", "--checkpoint", str(tiny[1])]
        argv += ["--dataset", data.DATASET, "--split", "1", "--out", str(mnt / "ft")]
        argv += ["--init", "iic", "--seed", "0", "--device", "cpu"]
        rc, err, _ = run(capsys, *argv, *sets(tmp_path, mnt))
        assert_one_clear_error(rc, err, mnt)
        assert not (mnt / "ft" / "metrics.json").exists() and no_temporaries(mnt)


def test_report(tmp_path, capsys):
    mnt = tmp_path / "mnt"
    with small_filesystem(mnt, 64 << 10):
        fill(mnt, leave=0)
        rc, err, _ = run(capsys, "report", "--no-mlflow", "--set", f"paths.results={mnt}")
        assert_one_clear_error(rc, err, mnt)
        assert not list(mnt.rglob("summary.*")) and no_temporaries(mnt)
