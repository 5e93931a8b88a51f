"""The rehearsal: stand-ins of the official archives from the official lists, the mirror that serves
them with its own checksums, and a sub-grid of the paper's path through that mirror end to end."""

from __future__ import annotations

import csv
import json
import re
import urllib.request
from pathlib import Path

import pytest
from mlflow_server import free_port
from project import Project

from iicrepro import config, grid, io, layout, rehearsal, report
from iicrepro.data import archives, sources, splits
from iicrepro.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
LISTS = ROOT / "tests" / "data" / "splits"


def settings_for(tmp_path: Path, *overrides: str):
    return config.load(
        ROOT / "params.yaml",
        "rehearsal",
        [f"paths.data={tmp_path}/data", f"download.mirror_sums={tmp_path}/mirror/SHA256SUMS",
         *overrides],
    )  # fmt: skip


def test_ucf101_subset_covers_every_class_in_train_and_test_of_every_split():
    chosen = set(rehearsal.ucf101_subset(LISTS / "ucf101"))
    assert len(chosen) == 3 * 101
    parsed = splits.parse_ucf101(LISTS / "ucf101")
    for k in splits.SPLITS:
        for subset in ("train", "test"):
            have = {e.class_name for e in parsed.subset(k, subset) if e.video in chosen}
            assert have == set(parsed.classes), (k, subset)
    # the lists' own quirk is kept: folder HandstandPushups, files v_HandStandPushups_*
    assert "HandstandPushups/v_HandStandPushups_g01_c01.avi" in chosen


def test_hmdb51_split_files_are_the_official_format_of_the_official_lists(tmp_path):
    tags = rehearsal.hmdb51_tags(LISTS / "hmdb51-converted")
    for name, data in rehearsal.hmdb51_split_files(tags).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    folder = tmp_path / rehearsal.HMDB_LISTS
    assert len(list(folder.iterdir())) == 51 * 3
    first = (folder / "brush_hair_test_split1.txt").read_text().splitlines()[0]
    assert first.endswith((".avi 0 ", ".avi 1 ", ".avi 2 "))
    parsed = splits.parse_hmdb51(folder)
    for k in splits.SPLITS:
        for subset, name in (("train", "trainlist"), ("test", "testlist")):
            listed = set(rehearsal.read_list(LISTS / "hmdb51-converted" / f"{name}0{k}.txt"))
            assert {e.video for e in parsed.subset(k, subset)} == listed
    chosen = set(rehearsal.hmdb51_subset(tags))
    for k in splits.SPLITS:
        for subset in ("train", "test"):
            have = {e.class_name for e in parsed.subset(k, subset) if e.video in chosen}
            assert have == set(parsed.classes), (k, subset)


def test_mirror_sums_replace_the_registry_and_keep_the_official_servers_out(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "SHA256SUMS").write_text(f"{'ab' * 32}  UCF101.rar\n")
    videos, split_lists = sources.archives(settings_for(tmp_path), "ucf101")
    assert videos.sha256 == "ab" * 32 and videos.size is None and videos.approx_size is None
    assert videos.urls() == ["http://127.0.0.1:47801/ucf101/UCF101.rar"]  # no official URL
    # an archive the file does not list keeps the official expectations and servers
    assert split_lists.sha256 is None and split_lists.urls()[-1] == split_lists.url
    # the paper's settings (no mirror_sums) keep the official archives as they are
    paper = config.load(ROOT / "params.yaml", "paper")
    assert all(a.official and a.urls() == [a.url] for a in sources.archives(paper, "ucf101"))

    with pytest.raises(UserError, match="download.mirrors.ucf101 is empty"):
        sources.archives(settings_for(tmp_path, "download.mirrors.ucf101=[]"), "ucf101")
    (mirror / "SHA256SUMS").unlink()
    with pytest.raises(UserError, match="does not exist"):
        sources.archives(settings_for(tmp_path), "ucf101")


def test_report_counts_listed_videos_absent_from_the_archives(tmp_path):
    s = settings_for(tmp_path, f"paths.results={tmp_path}/results")
    lists = splits.Splits(["YoYo"], {k: [] for k in splits.SPLITS})
    splits.write_manifests(lists, layout.manifests(s, "ucf101"), ["YoYo/a.avi", "YoYo/b.avi"])
    splits.write_manifests(lists, layout.manifests(s, "hmdb51"), [])
    md = report.build(s, mlflow=False)["md"].read_text()
    absent = md[md.index("## Videos absent") : md.index("## Missing")]
    assert "* ucf101: 2 (" in absent and "* hmdb51: none" in absent


def test_report_over_the_complete_grid_fills_the_papers_rows(tmp_path):
    """Every result of the rehearsal grid present: nothing missing, and every paper row of a
    setting in the grid (IIC, CMC, random init of c3d / r3d / r21d) has our number beside it."""
    from test_report import write_finetune, write_retrieval

    s = settings_for(tmp_path, f"paths.results={tmp_path}/results")
    for r in grid.pretrained_runs(s):
        run_dir = layout.pretrain_dir(s, r.backbone, r.view, r.neg, r.seed)
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.csv").write_text("epoch,loss\n1,5.0\n")
        io.write_json(run_dir / "metrics.json", {"final_loss": 5.0, "epochs": 1})
    for r in grid.expected(s):
        if r.protocol == "retrieval":
            write_retrieval(s, r.dataset, r.run, 20.0)
        elif r.protocol == "finetune":
            write_finetune(s, r.dataset, r.split, r.run, 30.0)
    md = report.build(s, mlflow=False)["md"].read_text()
    assert md[md.index("## Missing") : md.index("## Sources")].count("\n* ") == 1
    assert "* nothing" in md
    ours = re.compile(r"IIC|\(ours|\(random\)|reimplemented by IIC")
    paper_only = [ln.split("|")[2] for ln in md.splitlines() if ln.startswith("| — |")]
    unfilled = [label for label in paper_only if ours.search(label) and "[r3d18]" not in label]
    assert paper_only and not unfilled, unfilled
    # and the rows of ours that have a paper number show it (a few settings, both protocols)
    assert "| r3d u · IIC repeat (joint) | IIC (repeat + u) [r3d] | 1 | 24.0 / 41.8" in md
    assert "| c3d residual · IIC repeat | C3D (ours, repeat) [c3d] | 30.0 | 30.0 | 70.0 |" in md


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """The four archives built once (small videos), with the settings that name them."""
    tmp = tmp_path_factory.mktemp("rehearsal")
    s = settings_for(tmp)
    options = {"width": 32, "height": 24, "frames": 10, "fps": 25, "seed": 0}
    counts = rehearsal.build(s, LISTS, options)
    return tmp, s, counts, options


def test_build_writes_the_official_archives_and_their_sums(stand_ins, tmp_path):
    tmp, s, counts, options = stand_ins
    mirror = tmp / "mirror"
    sums = sources.read_sha256sums(mirror / "SHA256SUMS")
    assert set(sums) == {
        name for d in ("ucf101", "hmdb51") for name in sources.archive_filenames(d).values()
    }
    assert counts["ucf101"] == {"videos": 303, "listed": 13320, "classes": 101}
    assert counts["hmdb51"]["classes"] == 51 and counts["hmdb51"]["videos"] >= 102
    assert archives.archive_format(mirror / "ucf101" / "UCF101.rar") == "rar4"
    assert archives.archive_format(mirror / "hmdb51" / "hmdb51_org.rar") == "rar4"
    assert rehearsal.build(s, LISTS, options) == counts  # up to date: not rebuilt

    # HMDB51's RAR of per-class RARs extracts (nested) into <class>/<video>.avi
    target = tmp_path / "hmdb"
    files = archives.extract(mirror / "hmdb51" / "hmdb51_org.rar", target, nested=True)
    assert len(files) == counts["hmdb51"]["videos"]
    assert {p.parent.name for p in files} == set(rehearsal.hmdb51_tags(LISTS / "hmdb51-converted"))
    # UCF101's split zip holds the official lists byte for byte (CRLF)
    out = tmp_path / "ucf"
    archives.extract(mirror / "ucf101" / "UCF101TrainTestSplits-RecognitionTask.zip", out)
    got = (out / "ucfTrainTestlist" / "classInd.txt").read_bytes()
    assert got == (LISTS / "ucf101" / "classInd.txt").read_bytes() and b"\r\n" in got


def test_mirror_serves_the_stand_ins(stand_ins):
    tmp, s, _, _ = stand_ins
    port = free_port()
    with rehearsal.Mirror(tmp / "mirror", "127.0.0.1", port):
        url = f"http://127.0.0.1:{port}/hmdb51/test_train_splits.rar"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = r.read()
    assert body == (tmp / "mirror" / "hmdb51" / "test_train_splits.rar").read_bytes()
    with pytest.raises(UserError, match="explicit port"):
        rehearsal.mirror_address(
            config.load(
                ROOT / "params.yaml",
                "rehearsal",
                ["download.mirrors.ucf101=['http://127.0.0.1/x']"],
            )  # fmt: skip
        )


# A sub-grid of the rehearsal through the same mirror: both datasets, one backbone, the u view
# (so TV-L1 flow runs), one intra-negative, split 1: 28 jobs, about 4-5 minutes on 2 idle cores.
# The time limit only guards against a hang: a machine shared with other work takes far longer.
SUB_GRID = {
    "tracking": {"enabled": False},
    "pretrain": {"backbones": ["r3d"], "views": ["u"], "intra_negatives": ["repeat"]},
    "finetune": {"splits": [1]},
}


@pytest.mark.slow
def test_rehearsal_sub_grid_through_the_mirror(tmp_path):
    port = free_port()
    mirrors = {d: [f"http://127.0.0.1:{port}/{d}"] for d in ("ucf101", "hmdb51")}
    grid = {**SUB_GRID, "download": {"mirrors": mirrors}}
    project = Project.create(tmp_path / "project", demo=grid, preset="rehearsal")
    proc = project.run(
        "iicrepro", "rehearsal", "run", "--preset", "rehearsal", "--cores", "2",
        "--width", "32", "--height", "24", "--frames", "10",
        "--snakemake", "--set-threads pretrain=1 retrieve=1 retrieve_bnrecal=1 finetune=1",
        timeout=1800, env=project.env(OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert "rehearsal: done" in proc.stdout

    # every archive came from the mirror, checked against the builder's sums
    for d, names in (("ucf101", ["UCF101.rar"]), ("hmdb51", ["hmdb51_org.rar"])):
        for name in names:
            log = project.path(f"logs/fetch/{d}/{name}.log").read_text()
            assert f"from http://127.0.0.1:{port}/{d}/{name}" in log
    # the listed videos the stand-ins lack are counted and left out, not a failure
    for d in ("ucf101", "hmdb51"):
        manifests = project.path(f"data/rehearsal/manifests/{d}")
        assert splits.missing_count(manifests) > 1000
        with open(manifests / "split1.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {r["subset"] for r in rows} == {"train", "test"}

    record = json.loads(project.path("results/rehearsal/rehearsal.json").read_text())
    assert record["returncode"] == 0
    assert record["jobs"]["pretrain"] == 1 and record["jobs"]["finetune"] == 4
    assert record["jobs"]["retrieve"] == 4 and record["jobs"]["retrieve_bnrecal"] == 2

    md = project.path("results/rehearsal/summary.md").read_text()
    assert "* ucf101: 13017 (" in md and "* hmdb51: 6222 (" in md  # listed but not stood in for
    missing = md[md.index("## Missing") : md.index("## Sources")]
    assert "* nothing" in missing, missing
    # the paper's R3D rows of this setting carry our number beside the paper's
    recognition = md[md.index("## UCF101 recognition") :].split("\n## ", 1)[0]
    row = next(ln for ln in recognition.splitlines() if ln.startswith("| r3d u · IIC repeat"))
    assert "IIC" in row.split("|")[2] and "—" not in row.split("|")[5]


def test_rehearsal_is_the_paper_grid_with_only_sizes_changed():
    paper = config.load(ROOT / "params.yaml", "paper")
    toy = config.load(ROOT / "params.yaml", "rehearsal")
    assert grid.expected(toy) == grid.expected(paper)  # same runs, datasets and splits

    def changed(a, b, prefix=""):
        if isinstance(a, dict) and isinstance(b, dict):
            return [k for key in a for k in changed(a[key], b.get(key), f"{prefix}{key}.")]
        return [] if a == b else [prefix.rstrip(".")]

    allowed = {
        # sizes
        "frames.size", "frames.codec", "frames.min_frames", "clips.length", "clips.crop",
        "clips.eval_clips", "model.width", "pretrain.epochs", "pretrain.checkpoint_every",
        "pretrain.workers", "pretrain.nce.k", "retrieval.batch_size", "retrieval.workers",
        "finetune.epochs",
        "finetune.val_size.ucf101", "finetune.val_size.hmdb51", "finetune.checkpoint_every",
        "finetune.workers", "flow.tvl1.nscales", "flow.tvl1.warps", "flow.tvl1.inner_iterations",
        "flow.tvl1.outer_iterations", "flow.tvl1.epsilon",
        # where things live, the stand-ins' mirror, and MLflow off
        "preset", "paths.data", "paths.results", "download.mirrors.ucf101",
        "download.mirrors.hmdb51", "download.mirror_sums", "splits.max_missing",
        "tracking.enabled",
    }  # fmt: skip
    diff = {k for k in changed(dict(toy), dict(paper)) if not k.startswith("presets.")}
    assert diff <= allowed, sorted(diff - allowed)


@pytest.mark.parametrize("child_got_it", [True, False])
def test_after_ctrl_c_snakemake_is_stopped_and_its_last_words_shown(child_got_it, capsys):
    """Ctrl-C in a terminal reaches Snakemake too; a signal sent to the rehearsal alone is
    forwarded, and the mirror is only stopped once Snakemake has exited."""
    import signal
    import subprocess
    import sys

    script = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        "    print('Terminating processes on user request'); sys.exit(130)\n"
        "signal.signal(signal.SIGINT, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    if child_got_it:
        proc.send_signal(signal.SIGINT)
    rehearsal._let_snakemake_stop(proc, grace=1.0)
    assert proc.returncode == 130
    assert "Terminating processes on user request" in capsys.readouterr().out
