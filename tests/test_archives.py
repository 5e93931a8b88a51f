"""Safe extraction of real zip, tar and RAR archives (RAR extracted by the real unar / bsdtar)."""

from __future__ import annotations

import json
import os
import shutil
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
        Member("short/through.avi", "file"),
        Member("copy.avi", "hardlink", "data/real.avi"),
    ]
    assert unsafe_members(members) == []
    assert unsafe_members([*members, Member("short/../../x", "file")]) != []
    assert unsafe_members([Member("loop", "symlink", "loop/x")]) != []


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


def test_contents_larger_than_the_free_space_are_refused(tmp_path):
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
