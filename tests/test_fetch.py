"""Downloads against a real loopback HTTP server: resume, retry, errors, verification, the CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from archive_fixtures import FileServer, write_rar4, write_zip

from iicrepro import cli, config
from iicrepro.data import sources
from iicrepro.data.fetch import download, recorded_sha256
from iicrepro.errors import UserError

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
FAST = {"backoff_s": 0.0, "timeout_s": 10, "chunk_bytes": 16 << 10, "progress": False}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def served(tmp_path):
    """A 300 KB file behind a fresh server: (server, name, bytes, download folder)."""
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(300_000)
    (root / "blob.bin").write_bytes(data)
    with FileServer(root) as srv:
        yield srv, "blob.bin", data, tmp_path / "dl"


def test_plain_download_verifies_and_records(served):
    srv, name, data, out = served
    dest = download(srv.url(name), out / name, sha256=sha(data), size=len(data), **FAST)
    assert dest.read_bytes() == data
    assert recorded_sha256(dest) == sha(data)
    assert not (out / f"{name}.part").exists()


def test_dropped_connection_resumes_with_range(served):
    srv, name, data, out = served
    srv.faults.drop_after[f"/{name}"] = 100_000
    dest = download(srv.url(name), out / name, sha256=sha(data), **FAST)
    assert dest.read_bytes() == data
    assert [r for _, r in srv.requests] == [None, "bytes=100000-"]


def test_server_ignoring_range_restarts_from_zero(served):
    srv, name, data, out = served
    srv.faults.drop_after[f"/{name}"] = 100_000
    srv.faults.ignore_range.add(f"/{name}")
    dest = download(srv.url(name), out / name, sha256=sha(data), **FAST)
    assert dest.read_bytes() == data
    assert srv.requests == [(f"/{name}", None), (f"/{name}", "bytes=100000-")]


def test_partial_file_without_a_record_is_not_resumed(served):
    """Bytes of unknown origin (no ETag / Last-Modified recorded): nothing proves they belong to
    the file the server holds now, so the download starts from zero."""
    srv, name, data, out = served
    out.mkdir()
    (out / f"{name}.part").write_bytes(data[:50_000])
    assert download(srv.url(name), out / name, **FAST).read_bytes() == data
    assert srv.requests == [(f"/{name}", None)]


def test_complete_partial_file_gets_416_and_is_kept(served):
    srv, name, data, out = served
    srv.faults.drop_after[f"/{name}"] = 100_000
    with pytest.raises(UserError, match="kept for resuming"):
        download(srv.url(name), out / name, retries=1, **FAST)
    part = out / f"{name}.part"
    with open(part, "ab") as f:  # the rest arrived, then the process died before verifying
        f.write(data[100_000:])
    dest = download(srv.url(name), out / name, **FAST)  # size unknown: must ask the server
    assert dest.read_bytes() == data
    assert srv.requests[-1] == (f"/{name}", f"bytes={len(data)}-")
    assert srv.if_range[-1] == '"' + hashlib.sha1(data).hexdigest() + '"'


@pytest.mark.parametrize("validator", ["etag", "last-modified"])
def test_file_changed_between_break_and_resume_is_fetched_whole(served, validator):
    """The resume carries If-Range; the server sees the file changed and sends all of it (200),
    which replaces the partial bytes instead of being spliced onto them."""
    srv, name, data, out = served
    changed = bytes(reversed(data))  # same size: only the validator tells them apart
    srv.faults.drop_after[f"/{name}"] = 100_000
    srv.faults.change_after_drop[f"/{name}"] = changed
    if validator == "last-modified":
        srv.faults.no_etag.add(f"/{name}")
    dest = download(srv.url(name), out / name, **FAST)
    assert dest.read_bytes() == changed
    assert recorded_sha256(dest) == sha(changed)
    assert [r for _, r in srv.requests] == [None, "bytes=100000-"]
    sent = srv.if_range[1]
    assert sent.startswith('"') if validator == "etag" else sent.endswith("GMT")


@pytest.mark.parametrize("change", ["same-size-new-etag", "new-size-no-etag"])
def test_resume_answer_that_does_not_match_restarts_from_zero(served, change):
    """A server that honours Range but not If-Range: its 206 is checked against the file begun
    (the ETag it sends, the Content-Range total) and a mismatch starts the file again."""
    srv, name, data, out = served
    changed = bytes(reversed(data)) if change == "same-size-new-etag" else data + b"more"
    srv.faults.drop_after[f"/{name}"] = 100_000
    srv.faults.change_after_drop[f"/{name}"] = changed
    srv.faults.ignore_if_range.add(f"/{name}")
    if change == "new-size-no-etag":
        srv.faults.no_etag.add(f"/{name}")
    dest = download(srv.url(name), out / name, **FAST)
    assert dest.read_bytes() == changed
    assert [r for _, r in srv.requests] == [None, "bytes=100000-", None]


def test_server_without_validators_is_never_resumed(served):
    srv, name, data, out = served
    srv.faults.drop_after[f"/{name}"] = 100_000
    srv.faults.no_validators.add(f"/{name}")
    assert download(srv.url(name), out / name, **FAST).read_bytes() == data
    assert [r for _, r in srv.requests] == [None, None]


def test_html_page_is_refused_before_anything_is_trusted(served):
    srv, _, _, out = served
    name = "UCF101TrainTestSplits-RecognitionTask.zip"
    genuine = write_zip(out.parent / "www" / name, {"ucfTrainTestlist/classInd.txt": b"1 A\r\n"})
    page = b"<html>Not Found</html>\n"
    assert len(page) == 23
    srv.faults.replace_body[f"/{name}"] = page
    with pytest.raises(UserError) as err:
        download(srv.url(name), out / name, **FAST)
    message = str(err.value)
    assert "HTML" in message and "Nothing was trusted" in message
    assert not (out / f"{name}.sha256").exists() and not (out / name).exists()
    assert (out / f"{name}.corrupt").read_bytes() == page
    # The genuine file is accepted afterwards (the page's sum was never recorded).
    del srv.faults.replace_body[f"/{name}"]
    dest = download(srv.url(name), out / name, **FAST)
    assert recorded_sha256(dest) == sha(genuine.read_bytes())


def test_wrong_magic_and_far_too_small_are_refused(served):
    srv, name, data, out = served
    (out.parent / "www" / "UCF101.rar").write_bytes(data)
    with pytest.raises(UserError, match=r"are not those of a rar file"):
        download(srv.url("UCF101.rar"), out / "UCF101.rar", **FAST)
    write_rar4(out.parent / "www" / "UCF101.rar", {"UCF-101/A/v.avi": b"v"})
    with pytest.raises(UserError, match=r"far less than the archive's documented ~6\.1 GB"):
        download(srv.url("UCF101.rar"), out / "UCF101.rar", approx_size=6_500_000_000, **FAST)
    assert not (out / "UCF101.rar.sha256").exists()


def test_a_trusted_error_page_is_replaced_by_the_genuine_file(served):
    """An HTML page recorded on first use (as older versions did) no longer blocks the genuine
    file: the page and its recorded sum are set aside and the file is fetched."""
    srv, _, _, out = served
    name = "test_train_splits.rar"
    genuine = write_rar4(out.parent / "www" / name, {"testTrainMulti_7030_splits/a.txt": b"a"})
    out.mkdir()
    page = b"<html>Not Found</html>\n"
    (out / name).write_bytes(page)
    (out / f"{name}.sha256").write_text(f"{sha(page)}  {name}\n")
    dest = download(srv.url(name), out / name, **FAST)
    assert dest.read_bytes() == genuine.read_bytes()
    assert recorded_sha256(dest) == sha(genuine.read_bytes())
    assert (out / f"{name}.corrupt").read_bytes() == page


def test_mismatch_against_a_recorded_sum_names_the_file_to_delete(served):
    srv, _, _, out = served
    name = "hmdb51_org.rar"
    write_rar4(out.parent / "www" / name, {"a.rar": b"x"})
    out.mkdir()
    (out / f"{name}.sha256").write_text(f"{'0' * 64}  {name}\n")
    with pytest.raises(UserError) as err:
        download(srv.url(name), out / name, **FAST)
    assert f"delete {out / name}.sha256 (the sum recorded on the first download)" in str(err.value)


def test_500_is_retried(served):
    srv, name, data, out = served
    srv.faults.status_once[f"/{name}"] = [500, 503]
    dest = download(srv.url(name), out / name, size=len(data), **FAST)
    assert dest.read_bytes() == data
    assert len(srv.requests) == 3


def test_retries_run_out_with_a_clear_error(served):
    srv, name, data, out = served
    srv.faults.status_once[f"/{name}"] = [502, 502, 502]
    with pytest.raises(UserError, match=r"failed after 2 attempt\(s\): HTTP 502"):
        download(srv.url(name), out / name, retries=2, **FAST)
    assert len(srv.requests) == 2
    assert not (out / name).exists()


def test_404_names_status_and_url_without_retrying(served):
    srv, _, _, out = served
    url = srv.url("missing.rar")
    with pytest.raises(UserError) as err:
        download(url, out / "missing.rar", **FAST)
    assert "HTTP 404" in str(err.value) and url in str(err.value)
    assert len(srv.requests) == 1


def test_connection_refused_is_retried_then_reported(tmp_path):
    with FileServer(tmp_path) as srv:
        url = srv.url("x.bin")
    with pytest.raises(UserError, match=r"failed after 2 attempt\(s\): cannot connect"):
        download(url, tmp_path / "x.bin", retries=2, **FAST)


def test_wrong_bytes_fail_checksum_and_leave_no_dest(served):
    srv, name, data, out = served
    wrong = bytes(reversed(data))
    srv.faults.replace_body[f"/{name}"] = wrong
    with pytest.raises(UserError) as err:
        download(srv.url(name), out / name, sha256=sha(data), size=len(data), **FAST)
    message = str(err.value)
    assert sha(data) in message and sha(wrong) in message
    assert not (out / name).exists() and not (out / f"{name}.part").exists()
    assert (out / f"{name}.corrupt").read_bytes() == wrong
    # Once the server is right again, the next run succeeds from zero.
    del srv.faults.replace_body[f"/{name}"]
    assert download(srv.url(name), out / name, sha256=sha(data), **FAST).read_bytes() == data


def test_size_mismatch_is_reported_before_download(served):
    srv, name, data, out = served
    with pytest.raises(UserError, match=f"serves {len(data)} bytes"):
        download(srv.url(name), out / name, size=len(data) + 1, **FAST)
    assert not (out / name).exists()


def test_trust_on_first_use(served):
    srv, name, data, out = served
    dest = download(srv.url(name), out / name, **FAST)
    assert recorded_sha256(dest) == sha(data)
    # Complete and verified: no request at all the second time.
    n = len(srv.requests)
    assert download(srv.url(name), dest, **FAST) == dest
    assert len(srv.requests) == n
    # The server now sends other bytes: they must match the first-seen checksum.
    dest.unlink()
    srv.faults.replace_body[f"/{name}"] = b"changed" * 1000
    with pytest.raises(UserError) as err:
        download(srv.url(name), dest, **FAST)
    assert sha(data) in str(err.value) and ".sha256" in str(err.value)
    assert not dest.exists()


def test_damaged_dest_is_fetched_again(served):
    srv, name, data, out = served
    dest = download(srv.url(name), out / name, **FAST)
    dest.write_bytes(b"x" + data[1:])
    assert download(srv.url(name), dest, **FAST).read_bytes() == data
    assert len(srv.requests) == 2
    # A changed known checksum (e.g. a regenerated synthetic archive) also means a new download.
    srv.faults.replace_body[f"/{name}"] = b"new version"
    assert download(srv.url(name), dest, sha256=sha(b"new version"), **FAST).read_bytes() == (
        b"new version"
    )
    assert (out / f"{name}.corrupt").read_bytes() == data  # the old file is set aside, not lost


def test_not_enough_space_is_refused_before_downloading(served):
    srv, name, _, out = served
    out.mkdir()
    too_big = shutil.disk_usage(out).free + (1 << 30)
    with pytest.raises(UserError, match="not enough disk space"):
        download(srv.url(name), out / name, size=too_big, **FAST)
    assert srv.requests == [] and list(out.iterdir()) == []


def test_disk_full_while_writing_is_a_user_error(served):
    srv, name, _, out = served
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    out.mkdir()
    (out / f"{name}.part").symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(UserError, match="disk filled up"):
        download(srv.url(name), out / name, **FAST)
    assert not (out / name).exists()


def test_file_url(tmp_path):
    src = tmp_path / "src dir" / "a.zip"
    src.parent.mkdir()
    data = write_zip(src, {"x.bin": os.urandom(70_000)}).read_bytes()
    dest = download(src.as_uri(), tmp_path / "dl" / "a.zip", sha256=sha(data), **FAST)
    assert dest.read_bytes() == data
    with pytest.raises(UserError, match="no such file"):
        download((tmp_path / "nope.zip").as_uri(), tmp_path / "dl" / "nope.zip", **FAST)


# ---------------------------------------------------------------------------------- registry + CLI


def settings_for(tmp_path: Path, *overrides: str):
    return config.load(PARAMS, "demo", [f"paths.data={tmp_path / 'data'}", *overrides])


def test_registry_layout_and_mirrors(tmp_path):
    s = settings_for(tmp_path, "download.mirrors.ucf101=['http://m.example/ucf/']")
    raw = tmp_path / "data" / "raw"
    assert sources.video_root(s, "ucf101") == raw / "ucf101" / "UCF-101"
    assert sources.splits_root(s, "hmdb51") == raw / "hmdb51" / "testTrainMulti_7030_splits"
    assert sources.video_root(s, "hmdb51") == raw / "hmdb51" / "videos"
    assert sources.video_root(s, "synthetic") == raw / "synthetic" / "SyntheticMotion"
    videos, splits = sources.archives(s, "ucf101")
    assert videos.urls() == [
        "http://m.example/ucf/UCF101.rar",
        "https://www.crcv.ucf.edu/data/UCF101/UCF101.rar",
    ]
    assert splits.role == "splits" and splits.filename.endswith(".zip")
    hmdb = {a.role: a for a in sources.archives(s, "hmdb51")}
    assert hmdb["videos"].nested and not hmdb["splits"].nested
    assert sources.extract_target(s, "hmdb51", hmdb["videos"]) == raw / "hmdb51" / "videos"


def test_synthetic_archives_need_synthesize(tmp_path):
    with pytest.raises(UserError, match="iicrepro synthesize"):
        sources.archives(settings_for(tmp_path), "synthetic")


def run_cli(*argv: str) -> int:
    return cli.main([*argv, "--params", str(PARAMS), "--preset", "demo"])


def test_fetch_and_extract_synthetic_from_file_urls(tmp_path, capsys):
    s = settings_for(tmp_path)
    src = Path(s.paths.data) / "synthetic-source"
    src.mkdir(parents=True)
    write_zip(src / sources.SYNTHETIC_VIDEOS_ZIP, {"SyntheticMotion/left/v_left_g01_c01.avi": b"a"})
    write_zip(src / sources.SYNTHETIC_SPLITS_ZIP, {"synthTrainTestlist/classInd.txt": b"1 left\n"})
    sums = {n: f"{sha((src / n).read_bytes())}  {n}\n" for n in os.listdir(src)}
    (src / "SHA256SUMS").write_text("".join(sums.values()))
    data = f"paths.data={s.paths.data}"
    assert run_cli("fetch", "synthetic", "--set", data, "--no-progress") == 0
    assert run_cli("extract", "synthetic", "--set", data) == 0
    assert (sources.video_root(s, "synthetic") / "left" / "v_left_g01_c01.avi").read_bytes() == b"a"
    assert (sources.splits_root(s, "synthetic") / "classInd.txt").is_file()
    # A wrong SHA256SUMS entry is caught by fetch.
    (Path(s.paths.data) / "downloads" / "synthetic" / sources.SYNTHETIC_SPLITS_ZIP).unlink()
    wrong = f"{'0' * 64}  {sources.SYNTHETIC_SPLITS_ZIP}\n"
    (src / "SHA256SUMS").write_text(sums[sources.SYNTHETIC_VIDEOS_ZIP] + wrong)
    assert run_cli("fetch", "synthetic", "--set", data, "--only", "splits", "--no-progress") == 1
    err = capsys.readouterr().err
    assert "failed verification" in err and "0" * 64 in err


def test_fetch_ucf101_from_mirror_then_extract(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    write_rar4(www / "UCF101.rar", {"UCF-101/YoYo/v_YoYo_g01_c01.avi": b"video"})
    write_zip(
        www / "UCF101TrainTestSplits-RecognitionTask.zip",
        {"ucfTrainTestlist/classInd.txt": b"1 YoYo\r\n"},
    )
    with FileServer(www) as srv:
        mirror = f"download.mirrors.ucf101=['{srv.url('')}']"
        data = f"paths.data={tmp_path / 'data'}"
        assert run_cli("fetch", "ucf101", "--set", data, "--set", mirror, "--no-progress") == 0
        assert {p for p, _ in srv.requests} == {
            "/UCF101.rar",
            "/UCF101TrainTestSplits-RecognitionTask.zip",
        }
    assert run_cli("extract", "ucf101", "--set", data) == 0
    s = settings_for(tmp_path)
    assert (
        sources.video_root(s, "ucf101") / "YoYo" / "v_YoYo_g01_c01.avi"
    ).read_bytes() == b"video"
    assert (sources.splits_root(s, "ucf101") / "classInd.txt").read_bytes() == b"1 YoYo\r\n"


def test_file_url_resume_restarts_when_the_source_changed(tmp_path):
    src = write_zip(tmp_path / "a.zip", {"x.bin": os.urandom(50_000)})
    dest = tmp_path / "dl" / "a.zip"
    dest.parent.mkdir()
    (tmp_path / "dl" / "a.zip.part").write_bytes(src.read_bytes()[:1000])
    (tmp_path / "dl" / "a.zip.part.json").write_text('{"url": "elsewhere"}')
    assert download(src.as_uri(), dest, **FAST).read_bytes() == src.read_bytes()


# ---------------------------------------------------------------------- reaching the data offline


def official(dataset: str) -> dict[str, sources.Archive]:
    return {a.role: a for a in sources._OFFICIAL[dataset]}


def ucf101_archives(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    videos = write_rar4(folder / "UCF101.rar", {"UCF-101/YoYo/v_YoYo_g01_c01.avi": b"video"})
    splits = write_zip(
        folder / "UCF101TrainTestSplits-RecognitionTask.zip",
        {"ucfTrainTestlist/classInd.txt": b"1 YoYo\r\n"},
    )
    return {p.name: p.read_bytes() for p in (videos, splits)}


def test_files_put_there_by_hand_are_verified_and_used_offline(tmp_path, capsys):
    """No server runs at all: the archives dropped into the downloads folder are checked and used;
    not even the configured mirror is contacted."""
    downloads = tmp_path / "data" / "downloads" / "ucf101"
    files = ucf101_archives(downloads)
    with FileServer(tmp_path) as srv:
        dead = srv.url("")  # a loopback port nothing listens on once the server is closed
    argv = [
        "--set",
        f"paths.data={tmp_path / 'data'}",
        "--set",
        f"download.mirrors.ucf101=['{dead}']",
    ]
    assert run_cli("fetch", "ucf101", *argv, "--no-progress") == 0
    out = capsys.readouterr().out
    assert out.count("kept (already here, verified; no network used)") == 2
    for name, data in files.items():
        assert recorded_sha256(downloads / name) == sha(data)
    assert run_cli("extract", "ucf101", "--set", f"paths.data={tmp_path / 'data'}") == 0
    # A page saved under the expected name is set aside, not trusted; with no source reachable
    # the error says where to put the real file.
    page = downloads / "UCF101TrainTestSplits-RecognitionTask.zip"
    page.write_bytes(b"<html>Not Found</html>\n")
    (downloads / f"{page.name}.sha256").unlink()
    fast = ["--set", "download.retries=1", "--set", "download.backoff_s=0"]
    assert run_cli("fetch", "ucf101", *argv, *fast, "--only", "splits", "--no-progress") == 1
    captured = capsys.readouterr()
    assert "moved to" in captured.out and (downloads / f"{page.name}.corrupt").is_file()
    assert f"put the file there by hand: {page}" in captured.err


@pytest.mark.parametrize("form", ["file-url", "folder"])
def test_a_local_folder_serves_as_a_mirror(tmp_path, form):
    folder = tmp_path / "my mirror"
    files = ucf101_archives(folder)
    base = folder.as_uri() + "/" if form == "file-url" else str(folder)
    s = settings_for(tmp_path, f"download.mirrors.ucf101=['{base}']")
    videos = {a.role: a for a in sources.archives(s, "ucf101")}["videos"]
    assert videos.urls()[0] == (folder / "UCF101.rar").as_uri()
    data = f"paths.data={tmp_path / 'data'}"
    assert (
        run_cli(
            "fetch",
            "ucf101",
            "--set",
            data,
            "--set",
            f"download.mirrors.ucf101=['{base}']",
            "--no-progress",
        )
        == 0
    )
    for name, content in files.items():
        assert (tmp_path / "data" / "downloads" / "ucf101" / name).read_bytes() == content


def test_unreachable_sources_name_the_archive_urls_and_the_fix(tmp_path, monkeypatch, capsys):
    www = tmp_path / "www"
    www.mkdir()
    with FileServer(www) as srv:  # answers 404 for everything
        moved = {
            role: replace(a, url=srv.url(a.filename)) for role, a in official("hmdb51").items()
        }
        monkeypatch.setitem(sources._OFFICIAL, "hmdb51", tuple(moved.values()))
        empty = tmp_path / "empty mirror"
        empty.mkdir()
        data = f"paths.data={tmp_path / 'data'}"
        mirror = f"download.mirrors.hmdb51=['{empty.as_uri()}/']"
        argv = ["fetch", "hmdb51", "--set", data, "--set", mirror, "--only", "videos"]
        assert run_cli(*argv, "--no-progress") == 1
    err = capsys.readouterr().err
    dest = tmp_path / "data" / "downloads" / "hmdb51" / "hmdb51_org.rar"
    assert "could not fetch hmdb51_org.rar (hmdb51 videos)" in err
    assert srv.url("hmdb51_org.rar") in err and "HTTP 404" in err
    assert (empty / "hmdb51_org.rar").as_uri() in err and "no such file" in err
    assert f"put the file there by hand: {dest}" in err
    assert "download.mirrors.hmdb51" in err and "file:///path/to/folder/" in err


def test_known_down_servers_are_named():
    from iicrepro.data.fetch import _unreachable

    videos = official("hmdb51")["videos"]
    assert "defunct since 2025" in sources.known_down(videos.url)
    assert sources.known_down(official("ucf101")["videos"].url) is None
    message = str(_unreachable("hmdb51", videos, Path("/d/hmdb51_org.rar"), ["  (failures)"]))
    assert f"note: {videos.url} is on HMDB51's official server, reported defunct" in message
