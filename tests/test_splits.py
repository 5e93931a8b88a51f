"""Split parsing on the real official UCF101 lists and on HMDB51 per-class files rebuilt from the
real converted HMDB51 lists."""

from __future__ import annotations

import csv
import re
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from iicrepro import cli
from iicrepro.data import splits
from iicrepro.errors import UserError

DATA = Path(__file__).parent / "data" / "splits"
UCF = DATA / "ucf101"
HMDB_CONVERTED = DATA / "hmdb51-converted"
UCF_COUNTS = {1: (9537, 3783), 2: (9586, 3734), 3: (9624, 3696)}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def counts(entries) -> tuple[int, int]:
    c = Counter(e.subset for e in entries)
    return c["train"], c["test"]


@pytest.fixture(scope="module")
def ucf() -> splits.Splits:
    return splits.parse_ucf101(UCF)


def test_ucf101_counts_and_classes(ucf):
    assert len(ucf.classes) == 101
    assert ucf.classes[0] == "ApplyEyeMakeup" and ucf.classes[-1] == "YoYo"
    assert {s: counts(e) for s, e in ucf.splits.items()} == UCF_COUNTS
    for entries in ucf.splits.values():
        assert {e.label for e in entries} == set(range(101))


def test_ucf101_class_folder_is_the_class_and_handstand_quirk(ucf):
    for entries in ucf.splits.values():
        for e in entries:
            assert e.video.split("/")[0] == e.class_name == ucf.classes[e.label]
    hand = [e for e in ucf.splits[1] if e.class_name == "HandstandPushups"]
    assert hand and all(e.video.startswith("HandstandPushups/v_HandStandPushups_g") for e in hand)


def test_ucf101_test_groups_rotate(ucf):
    # spec 2.1: test groups 1-7 / 8-14 / 15-21 for splits 1 / 2 / 3
    for s, groups in {1: range(1, 8), 2: range(8, 15), 3: range(15, 22)}.items():
        tested = {int(e.video.rsplit("_g", 1)[1][:2]) for e in ucf.subset(s, "test")}
        assert tested == set(groups)


def hmdb_converted() -> tuple[list[str], dict[int, dict[str, list[str]]]]:
    classes = [
        line.split()[1] for line in (HMDB_CONVERTED / "classInd.txt").read_text().split("\n")
    ]
    lists = {
        s: {
            subset: (HMDB_CONVERTED / f"{subset}list0{s}.txt").read_text().split("\n")
            for subset in ("train", "test")
        }
        for s in splits.SPLITS
    }
    return classes, lists


def write_official_hmdb51(folder: Path) -> Path:
    """The 153 official per-class files (tag 1 train, 2 test, 0 unused), as HMDB51 ships them."""
    classes, lists = hmdb_converted()
    folder.mkdir(parents=True, exist_ok=True)
    for s in splits.SPLITS:
        lines: dict[str, list[str]] = {c: [] for c in classes}
        for subset, tag in (("train", 1), ("test", 2)):
            for video in lists[s][subset]:
                cls, name = video.split("/")
                lines[cls].append(f"{name} {tag} ")  # official lines end with a space
        for i, cls in enumerate(classes[:3]):  # a few unused videos, excluded from the split
            lines[cls].insert(i, f"unused_{cls}_{i}.avi 0 ")
        for cls in classes:
            (folder / f"{cls}_test_split{s}.txt").write_text("\n".join(sorted(lines[cls])) + "\n")
    return folder


def test_hmdb51_official_files_give_the_converted_lists(tmp_path):
    folder = write_official_hmdb51(tmp_path / "testTrainMulti_7030_splits")
    assert len(list(folder.iterdir())) == 153
    parsed = splits.parse_hmdb51(folder)
    classes, lists = hmdb_converted()
    assert parsed.classes == classes == sorted(classes)
    for s in splits.SPLITS:
        assert counts(parsed.splits[s]) == (3570, 1530)
        for subset in ("train", "test"):
            got = parsed.subset(s, subset)
            assert sorted(e.video for e in got) == sorted(lists[s][subset])
            assert all(classes[e.label] == e.class_name == e.video.split("/")[0] for e in got)
        assert not any("unused_" in e.video for e in parsed.splits[s])


def test_cli_from_zip_writes_manifests(tmp_path):
    archive = tmp_path / "UCF101TrainTestSplits-RecognitionTask.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(UCF.iterdir()):
            zf.write(f, f"ucfTrainTestlist/{f.name}")
    out = tmp_path / "manifests"
    assert cli.main(["splits", "ucf101", "--from", str(archive), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.csv",
        "missing.csv",
        "split1.csv",
        "split2.csv",
        "split3.csv",
    ]
    for s, (n_train, n_test) in UCF_COUNTS.items():
        rows = read_csv(out / f"split{s}.csv")
        assert list(rows[0]) == ["video", "class", "label", "subset"]
        assert Counter(r["subset"] for r in rows) == {"train": n_train, "test": n_test}
    first = read_csv(out / "split1.csv")[0]
    assert first == {
        "video": "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
        "class": "ApplyEyeMakeup",
        "label": "0",
        "subset": "train",
    }
    classes = read_csv(out / "classes.csv")
    assert len(classes) == 101 and classes[36] == {"label": "36", "class": "HandstandPushups"}


def test_hmdb51_from_zip_archive(tmp_path):
    folder = write_official_hmdb51(tmp_path / "src" / "testTrainMulti_7030_splits")
    archive = tmp_path / "test_train_splits.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"testTrainMulti_7030_splits/{f.name}")
    out = tmp_path / "out"
    parsed = splits.build("hmdb51", archive, out)
    assert len(parsed.classes) == 51
    rows = read_csv(out / "split2.csv")
    assert Counter(r["subset"] for r in rows) == {"train": 3570, "test": 1530}


def copy_ucf(tmp_path: Path) -> Path:
    folder = tmp_path / "lists"
    folder.mkdir()
    for f in UCF.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_bytes().split(b"\r\n")
    lines[number - 1] = text.encode()
    path.write_bytes(b"\r\n".join(lines))


@pytest.mark.parametrize(
    ("file", "line", "text", "message"),
    [
        ("trainlist01.txt", 5, "Nope/v_Nope_g01_c01.avi 1", "unknown class 'Nope'"),
        ("trainlist01.txt", 7, "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c07.avi 2", "disagrees"),
        ("testlist02.txt", 3, "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c03.avi 1", "expected"),
        ("classInd.txt", 4, "5 BabyCrawling", "expected index 4"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, file, line, text, message):
    folder = copy_ucf(tmp_path)
    replace_line(folder / file, line, text)
    with pytest.raises(UserError, match=message) as err:
        splits.parse_ucf101(folder)
    assert f"{folder / file}:{line}:" in str(err.value)


def test_hmdb51_bad_tag_and_missing_split(tmp_path):
    folder = write_official_hmdb51(tmp_path / "h")
    bad = folder / "catch_test_split2.txt"
    lines = bad.read_text().splitlines()
    lines[1] = lines[1].replace(" 1 ", " 3 ").replace(" 2 ", " 3 ")
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=re.escape(f"{bad}:2: expected")):
        splits.parse_hmdb51(folder)
    bad.unlink()
    with pytest.raises(UserError, match="'catch' has no catch_test_split2.txt"):
        splits.parse_hmdb51(folder)


def test_verify_videos_resolves_case_and_reports_missing(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "classInd.txt").write_bytes(b"1 HandstandPushups\r\n2 YoYo\r\n")
    for s in splits.SPLITS:
        (lists / f"trainlist0{s}.txt").write_bytes(
            b"HandstandPushups/v_HandStandPushups_g01_c01.avi 1\r\nYoYo/v_YoYo_g01_c01.avi 2\r\n"
        )
        (lists / f"testlist0{s}.txt").write_bytes(b"YoYo/v_YoYo_g02_c01.avi\r\n")
    videos = tmp_path / "UCF-101"
    for rel in ("HandstandPushups/v_HandstandPushups_g01_c01.avi", "YoYo/v_YoYo_g01_c01.avi"):
        (videos / rel).parent.mkdir(parents=True, exist_ok=True)
        (videos / rel).write_bytes(b"avi")
    with pytest.raises(UserError, match=r"1 of 3 listed videos are missing") as err:
        splits.build("ucf101", lists, tmp_path / "out", videos)
    assert "YoYo/v_YoYo_g02_c01.avi" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written on failure

    (videos / "YoYo/v_YoYo_g02_c01.avi").write_bytes(b"avi")
    splits.build("ucf101", lists, tmp_path / "out", videos)
    rows = read_csv(tmp_path / "out" / "split1.csv")
    assert (
        rows[0]["video"] == "HandstandPushups/v_HandstandPushups_g01_c01.avi"
    )  # real on-disk path
    assert rows[0]["class"] == "HandstandPushups"


def test_missing_source_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        splits.parse("ucf101", tmp_path / "nope.zip")
    with pytest.raises(UserError, match="no split files"):
        splits.parse("hmdb51", tmp_path)


def test_absent_videos_are_left_out_and_counted_up_to_max_missing(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "classInd.txt").write_bytes(b"1 YoYo\r\n")
    for s in splits.SPLITS:
        (lists / f"trainlist0{s}.txt").write_bytes(
            b"YoYo/v_YoYo_g01_c01.avi 1\r\nYoYo/v_YoYo_g02_c01.avi 1\r\n"
        )
        (lists / f"testlist0{s}.txt").write_bytes(b"YoYo/v_YoYo_g03_c01.avi\r\n")
    videos = tmp_path / "UCF-101"
    for rel in ("YoYo/v_YoYo_g01_c01.avi", "YoYo/v_YoYo_g03_c01.avi"):
        (videos / rel).parent.mkdir(parents=True, exist_ok=True)
        (videos / rel).write_bytes(b"avi")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"(?s)1 of 3 listed videos are missing.*max_missing"):
        splits.build("ucf101", lists, out, videos, max_missing=0.3)
    splits.build("ucf101", lists, out, videos, max_missing=0.5)
    assert [r["video"] for r in read_csv(out / "split2.csv")] == [
        "YoYo/v_YoYo_g01_c01.avi",
        "YoYo/v_YoYo_g03_c01.avi",
    ]
    assert [r["video"] for r in read_csv(out / "missing.csv")] == ["YoYo/v_YoYo_g02_c01.avi"]
    assert splits.missing_count(out) == 1
