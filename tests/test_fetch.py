"""Downloads against a real loopback HTTP server: resume, retry, errors, verification, the CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
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
    out.mkdir()
    (out / f"{name}.part").write_bytes(data[:50_000])
    srv.faults.ignore_range.add(f"/{name}")
    dest = download(srv.url(name), out / name, sha256=sha(data), **FAST)
    assert dest.read_bytes() == data
    assert srv.requests == [(f"/{name}", "bytes=50000-")]


def test_complete_partial_file_gets_416_and_is_kept(served):
    srv, name, data, out = served
    out.mkdir()
    (out / f"{name}.part").write_bytes(data)
    dest = download(srv.url(name), out / name, **FAST)  # size unknown: must ask the server
    assert dest.read_bytes() == data
    assert srv.requests == [(f"/{name}", f"bytes={len(data)}-")]


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
    assert not (out / f"{name}.corrupt").exists()


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
    data = os.urandom(70_000)
    src.write_bytes(data)
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
