"""Safe extraction of real zip, tar and RAR archives (RAR extracted by the real unar / bsdtar)."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from archive_fixtures import Entry, write_rar4, write_rar5, write_tar, write_zip

from iicrepro.data.archives import (
    archive_format,
    extract,
    list_members,
    marker_path,
    unsafe_members,
)
from iicrepro.errors import UserError

FILES = {
    "UCF-101/YoYo/v_YoYo_g01_c01.avi": os.urandom(3000),
    "UCF-101/YoYo/v_YoYo_g01_c02.avi": b"second",
    "UCF-101/Punch/v_Punch_g25_c07 (1).avi": b"name with a space",
}


def tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".extracted-")
    }


def everything_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize(
    ("writer", "suffix", "fmt"),
    [
        (write_zip, ".zip", "zip"),
        (write_tar, ".tar", "tar"),
        (lambda p, items: write_tar(p, items, "w:gz"), ".tar.gz", "tar"),
        (write_rar4, ".rar", "rar4"),
        (write_rar5, ".rar", "rar5"),
    ],
)
def test_extracts_every_format(tmp_path, writer, suffix, fmt):
    archive = writer(tmp_path / f"a{suffix}", FILES)
    assert archive_format(archive) == fmt
    target = tmp_path / "raw" / "ucf101"
    files = extract(archive, target)
    assert tree(target) == FILES
    assert sorted(files) == sorted(target / name for name in FILES)
    marker = json.loads(marker_path(archive, target).read_text())
    assert marker["archive"] == archive.name and len(marker["sha256"]) == 64
    # Nothing is left beside the target (the temporary folder is gone).
    assert sorted(os.listdir(tmp_path / "raw")) == ["ucf101"]


def test_rar4_with_directories_and_inner_symlink(tmp_path):
    archive = write_rar4(
        tmp_path / "d.rar",
        [
            Entry("top", kind="dir"),
            Entry("top/sub", kind="dir"),
            Entry("top/sub/x.txt", b"hello"),
            Entry("top/alias", kind="symlink", link="sub/x.txt"),
        ],
    )
    kinds = {m.name: m.kind for m in list_members(archive)}
    assert kinds == {
        "top": "dir",
        "top/sub": "dir",
        "top/sub/x.txt": "file",
        "top/alias": "symlink",
    }
    extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "top" / "alias").is_symlink()
    assert (tmp_path / "out" / "top" / "alias").read_bytes() == b"hello"


def test_second_run_is_skipped_and_a_changed_archive_is_redone(tmp_path):
    archive = write_zip(tmp_path / "s.zip", {"splits/a.txt": b"1"})
    target = tmp_path / "raw"
    extract(archive, target)
    marker = marker_path(archive, target)
    stamp = marker.stat().st_mtime_ns
    (target / "splits" / "a.txt").write_bytes(b"edited")
    assert extract(archive, target) == [target / "splits" / "a.txt"]
    assert marker.stat().st_mtime_ns == stamp  # skipped: marker untouched
    assert (target / "splits" / "a.txt").read_bytes() == b"edited"
    # A deleted file or a different archive makes it extract again.
    (target / "splits" / "a.txt").unlink()
    extract(archive, target)
    assert (target / "splits" / "a.txt").read_bytes() == b"1"
    write_zip(archive, {"splits/a.txt": b"2"})
    extract(archive, target)
    assert (target / "splits" / "a.txt").read_bytes() == b"2"


def test_two_archives_share_a_target(tmp_path):
    target = tmp_path / "raw" / "ucf101"
    extract(write_rar4(tmp_path / "v.rar", {"UCF-101/A/v.avi": b"v"}), target)
    extract(write_zip(tmp_path / "s.zip", {"ucfTrainTestlist/classInd.txt": b"1 A"}), target)
    assert tree(target) == {"UCF-101/A/v.avi": b"v", "ucfTrainTestlist/classInd.txt": b"1 A"}


def test_nested_rar_of_rars(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    classes = {
        "brush_hair": {"brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi": b"b0"},
        "cartwheel": {
            "cartwheel/(Rad)Schlag_die_Bank!_cartwheel_f_cm_np1_le_med_0.avi": b"c0",
            "cartwheel/Bodenturnen_cartwheel_f_cm_np1_ri_med_1.avi": b"c1",
        },
    }
    outer = {
        f"{name}.rar": write_rar4(inner / f"{name}.rar", files).read_bytes()
        for name, files in classes.items()
    }
    archive = write_rar4(tmp_path / "hmdb51_org.rar", outer)
    target = tmp_path / "raw" / "hmdb51" / "videos"
    files = extract(archive, target, nested=True)
    expected = {k: v for files in classes.values() for k, v in files.items()}
    assert tree(target) == expected
    assert not list(target.glob("*.rar"))
    assert sorted(files) == sorted(target / k for k in expected)


def test_nested_inner_archive_is_checked_too(tmp_path):
    bad_inner = write_rar4(tmp_path / "x.rar", {"../../escape.avi": b"x"})
    archive = write_rar4(tmp_path / "outer.rar", {"x.rar": bad_inner.read_bytes()})
    target = tmp_path / "out" / "videos"
    with pytest.raises(UserError, match=r"\.\./\.\./escape\.avi"):
        extract(archive, target, nested=True)
    assert everything_under(tmp_path / "out") == set()
    assert not (tmp_path / "escape.avi").exists()


EVIL = [
    ("zip-dotdot", write_zip, ".zip", [Entry("ok.txt", b"ok"), Entry("../evil", b"x")], "../evil"),
    (
        "tar-absolute",
        write_tar,
        ".tar",
        [Entry("ok.txt", b"ok"), Entry("/tmp/evil", b"x")],
        "/tmp/evil",
    ),
    (
        "tar-symlink-out",
        write_tar,
        ".tar",
        [Entry("ok.txt", b"ok"), Entry("link", kind="symlink", link="../../etc")],
        "link",
    ),
    (
        "tar-hardlink-out",
        write_tar,
        ".tar",
        [Entry("ok.txt", b"ok"), Entry("hard", kind="hardlink", link="../outside")],
        "hard",
    ),
    (
        # Lexically inside (b/../x), but b is itself a link to '.', so the real path leaves.
        "tar-symlink-chain",
        write_tar,
        ".tar",
        [Entry("b", kind="symlink", link="."), Entry("a", kind="symlink", link="b/../x")],
        "'a'",
    ),
    (
        "zip-symlink-abs",
        write_zip,
        ".zip",
        [Entry("ok.txt", b"ok"), Entry("etc", kind="symlink", link="/etc")],
        "etc",
    ),
    (
        "rar4-dotdot",
        write_rar4,
        ".rar",
        [Entry("ok.txt", b"ok"), Entry("a/../../evil", b"x")],
        "a/../../evil",
    ),
    ("rar4-absolute", write_rar4, ".rar", [Entry("/evil", b"x")], "/evil"),
    (
        "rar4-symlink-out",
        write_rar4,
        ".rar",
        [Entry("d/link", kind="symlink", link="../../outside"), Entry("d/link/x", b"x")],
        "d/link",
    ),
    (
        "rar5-dotdot",
        write_rar5,
        ".rar",
        [Entry("ok.txt", b"ok"), Entry("../evil", b"x")],
        "../evil",
    ),
]


@pytest.mark.parametrize(
    ("writer", "suffix", "entries", "named"),
    [e[1:] for e in EVIL],
    ids=[e[0] for e in EVIL],
)
def test_malicious_members_are_refused_before_writing(tmp_path, writer, suffix, entries, named):
    archive = writer(tmp_path / f"evil{suffix}", entries)
    parent = tmp_path / "work"
    parent.mkdir()
    before = everything_under(tmp_path)
    with pytest.raises(UserError) as err:
        extract(archive, parent / "target")
    assert named in str(err.value) and "Nothing was extracted" in str(err.value)
    assert everything_under(tmp_path) == before  # no target, no temp folder, no escapee
    assert not Path("/tmp/evil").exists()


def test_safe_links_inside_the_target_are_allowed():
    from iicrepro.data.archives import Member

    members = [
        Member("data/real.avi", "file"),
        Member("data/alias.avi", "symlink", "real.avi"),
        Member("short", "symlink", "data"),
        Member("via.avi", "symlink", "short/real.avi"),
        Member("copy.avi", "hardlink", "data/real.avi"),
    ]
    assert unsafe_members(members) == []
    assert unsafe_members([*members, Member("short/../../x", "file")]) != []
    assert unsafe_members([Member("loop", "symlink", "loop/x")]) != []
    # Nothing is written through a symlink, even one that stays inside.
    assert unsafe_members([*members, Member("short/through.avi", "file")]) == [
        "'short/through.avi' (written through the symlink 'short', in the archive)"
    ]
    assert (
        "already in the target"
        in unsafe_members([Member("short/x.avi", "file")], present={"short": "data"})[0]
    )


def test_bsdtar_listing_parses_links(tmp_path):
    """The RAR 5 lister (bsdtar -tv) is checked on a RAR 4 archive, which bsdtar also reads."""
    from iicrepro.data.archives import _bsdtar_members

    archive = write_rar4(
        tmp_path / "l.rar",
        [
            Entry("d", kind="dir"),
            Entry("d/a b.txt", b"x"),
            Entry("d/l", kind="symlink", link="../../up"),
        ],
    )
    members = {m.name: (m.kind, m.link) for m in _bsdtar_members(archive)}
    assert members == {"d": ("dir", ""), "d/a b.txt": ("file", ""), "d/l": ("symlink", "../../up")}


def test_contents_larger_than_the_free_space_are_refused(tmp_path, monkeypatch):
    from iicrepro.data import archives

    # A 78-byte archive declaring more than the free space is a bomb first; lift that limit to
    # reach the free-space check.
    monkeypatch.setattr(archives, "MAX_EXPANSION", 1 << 62)
    huge = shutil.disk_usage(tmp_path).free + (8 << 30)  # > 4 GiB: the 64-bit size fields
    archive = write_rar4(tmp_path / "big.rar", [Entry("v/huge.avi", b"x", claimed_size=huge)])
    assert [m.size for m in list_members(archive)] == [huge]
    with pytest.raises(UserError, match="not enough disk space for the contents of big.rar"):
        extract(archive, tmp_path / "out" / "t")
    assert not (tmp_path / "out").exists()


def test_not_an_archive(tmp_path):
    page = tmp_path / "UCF101.rar"
    page.write_text("<html>404 Not Found</html>")
    with pytest.raises(UserError, match="not a zip, tar or RAR archive"):
        extract(page, tmp_path / "out")


def test_missing_rar_tool_names_the_package(tmp_path, monkeypatch):
    archive = write_rar4(tmp_path / "a.rar", {"x": b"x"})
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(UserError, match="apt-get install unar"):
        extract(archive, tmp_path / "out")
    archive = write_rar5(tmp_path / "b.rar", {"x": b"x"})
    with pytest.raises(UserError, match="apt-get install libarchive-tools"):
        extract(archive, tmp_path / "out")


def test_damaged_rar_is_a_user_error_and_leaves_nothing(tmp_path):
    data = bytearray((write_rar4(tmp_path / "a.rar", {"v/x.avi": os.urandom(5000)})).read_bytes())
    data[200] ^= 0xFF  # inside the stored data: the CRC32 check fails
    (tmp_path / "a.rar").write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged"):
        extract(tmp_path / "a.rar", tmp_path / "out" / "t")
    assert list((tmp_path / "out").iterdir()) == []  # no target, no temporary folder


# ---------------------------------------------------------------------------------- across archives

WRITERS = {"zip": write_zip, "tar": write_tar, "rar4": write_rar4, "rar5": write_rar5}


def escape_pair(folder: Path, fmt: str, levels: int) -> tuple[Path, Path]:
    """Archive 1 leaves a folder x/ and p -> q/.../q/x/../..(levels + 1 times); harmless while q is
    a plain folder. Archive 2 holds q -> . (which turns p into a path `levels` folders above the
    target) and p/evil.txt."""
    suffix = ".zip" if fmt == "zip" else ".tar" if fmt == "tar" else ".rar"
    link = "q/" * levels + "x" + "/.." * (levels + 1)
    first = WRITERS[fmt](
        folder / f"first{suffix}",
        [Entry("x", kind="dir"), Entry("p", kind="symlink", link=link)],
    )
    second = WRITERS[fmt](
        folder / f"second{suffix}",
        [Entry("q", kind="symlink", link="."), Entry("p/evil.txt", b"evil")],
    )
    return first, second


@pytest.mark.parametrize("levels", [6, 1], ids=["deep", "one-level"])
@pytest.mark.parametrize("fmt", ["zip", "tar", "rar4", "rar5"])
@pytest.mark.parametrize("order", ["link-first", "escape-first"])
def test_two_archives_cannot_build_an_escape(tmp_path, fmt, levels, order):
    arcs = tmp_path / "archives"
    arcs.mkdir()
    first, second = escape_pair(arcs, fmt, levels)
    target = tmp_path.joinpath(*"abcdefg", "raw", "ucf101")
    target.mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "keep.txt").write_bytes(b"keep")
    if order == "link-first":
        ok, evil, named = first, second, "'p/evil.txt' (written through the symlink 'p'"
    else:
        ok, evil, named = second, first, "'p' (symlink to"
    extract(ok, target)  # harmless alone
    outside = {
        p for p in everything_under(tmp_path) if not p.startswith("a/b/c/d/e/f/g/raw/ucf101")
    }
    with pytest.raises(UserError) as err:
        extract(evil, target)
    assert named in str(err.value) and "Nothing was extracted" in str(err.value)
    assert {
        p for p in everything_under(tmp_path) if not p.startswith("a/b/c/d/e/f/g/raw/ucf101")
    } == outside
    assert not [p for p in tmp_path.rglob("evil.txt") if target not in p.parents]
    assert not marker_path(evil, target).exists()


def test_extract_cli_checks_all_archives_of_a_dataset_together(tmp_path, capsys):
    from iicrepro import cli

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    data = tmp_path / "data"
    downloads = data / "downloads" / "ucf101"
    downloads.mkdir(parents=True)
    link = "q/" * 6 + "x" + "/.." * 7
    write_rar4(
        downloads / "UCF101.rar",
        [
            Entry("UCF-101/A/v.avi", b"v"),
            Entry("x", kind="dir"),
            Entry("p", kind="symlink", link=link),
        ],
    )
    write_zip(
        downloads / "UCF101TrainTestSplits-RecognitionTask.zip",
        [Entry("q", kind="symlink", link="."), Entry("p/evil.txt", b"evil")],
    )
    argv = ["extract", "ucf101", "--params", str(params), "--preset", "demo"]
    assert cli.main([*argv, "--set", f"paths.data={data}"]) == 1
    err = capsys.readouterr().err
    assert "'p/evil.txt' (written through the symlink 'p'" in err
    assert "UCF101.rar and UCF101TrainTestSplits-RecognitionTask.zip" in err
    # Checked before either was extracted: not even the harmless first archive was written.
    assert not (data / "raw").exists()
    assert not list(tmp_path.rglob("evil.txt"))


def test_a_symlink_already_on_disk_is_never_written_through(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = tmp_path / "raw" / "ucf101"
    target.mkdir(parents=True)
    (target / "UCF-101").symlink_to(elsewhere)
    archive = write_rar4(tmp_path / "v.rar", {"UCF-101/A/v.avi": b"v"})
    with pytest.raises(UserError, match="written through the symlink 'UCF-101', already in"):
        extract(archive, target)
    assert list(elsewhere.iterdir()) == []
    # A folder member where a symlink is: refused too (the merge never follows it).
    archive = write_tar(tmp_path / "d.tar", [Entry("UCF-101", kind="dir")])
    with pytest.raises(UserError, match="a folder where a symlink of that name is"):
        extract(archive, target)


def test_subfolder_target_is_checked_against_the_dataset_root(tmp_path):
    """HMDB51: the videos go to raw/hmdb51/videos, the splits to raw/hmdb51; a link that the
    splits archive left in raw/hmdb51 counts when the videos are extracted."""
    root = tmp_path / "raw" / "hmdb51"
    splits = write_zip(tmp_path / "s.zip", [Entry("videos", kind="symlink", link=".")])
    extract(splits, root)
    videos = write_rar4(tmp_path / "v.rar", {"brush_hair/a.avi": b"a"})
    with pytest.raises(UserError, match="passes through 'videos'"):
        extract(videos, root / "videos", root=root)
    assert not (root / "brush_hair").exists()


def test_nested_inner_archives_cannot_build_an_escape(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    link = "q/" * 6 + "x" + "/.." * 7
    one = write_rar4(
        inner / "a.rar", [Entry("x", kind="dir"), Entry("p", kind="symlink", link=link)]
    )
    two = write_rar4(
        inner / "b.rar", [Entry("q", kind="symlink", link="."), Entry("p/evil.txt", b"e")]
    )
    outer = write_rar4(
        tmp_path / "hmdb51_org.rar", {"a.rar": one.read_bytes(), "b.rar": two.read_bytes()}
    )
    target = tmp_path.joinpath(*"abcdefg", "videos")
    with pytest.raises(UserError, match=r"'p/evil\.txt' \(written through the symlink 'p'"):
        extract(outer, target, nested=True)
    assert not list(tmp_path.rglob("evil.txt"))


def test_zip_bomb_is_refused_before_extraction(tmp_path):
    from iicrepro.data.archives import MAX_EXPANSION

    bomb = tmp_path / "UCF101TrainTestSplits-RecognitionTask.zip"
    with (
        zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf,
        zf.open("ucfTrainTestlist/zeros.txt", "w") as member,
    ):
        for _ in range(200):
            member.write(bytes(1 << 20))
    assert bomb.stat().st_size < 300_000
    target = tmp_path / "raw" / "ucf101"
    with pytest.raises(UserError) as err:
        extract(bomb, target)
    message = str(err.value)
    assert "decompression bomb" in message and f"MAX_EXPANSION = {MAX_EXPANSION}" in message
    assert "200.0 MB" in message
    assert not (tmp_path / "raw").exists()
