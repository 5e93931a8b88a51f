"""Atomic writes: out-of-space errors (real ENOSPC from /dev/full and a tiny tmpfs), stale
temporary files of killed writers, and the CLI's one message for a full disk."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from small_fs import fill, small_filesystem

from iicrepro import cli, io
from iicrepro.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src"
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")


@needs_dev_full
def test_a_write_that_hits_a_full_disk_is_one_clear_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    io.write_text(target, "old")
    with pytest.raises(io.OutOfSpace) as info, io.atomic_path(target, needed=5 << 20) as tmp:
        tmp.write_text("partial")
        with open("/dev/full", "wb") as f:  # every write fails with a real ENOSPC
            f.write(b"x" * 10)
            f.flush()
    msg = str(info.value)
    assert isinstance(info.value, UserError) and info.value.path == target
    assert f"no space left on device writing {target}" in msg
    assert "free of" in msg and "about 5.0 MB needed" in msg
    assert "paths.data" in msg and "paths.results" in msg and "run the step again" in msg
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_out_of_space_is_found_behind_wrapping_errors():
    def raised(exc, context=None):
        try:
            try:
                raise context
            finally:
                raise exc
        except BaseException as e:  # noqa: BLE001
            return e

    full = OSError(errno.ENOSPC, "No space left on device")
    assert io.is_out_of_space(full)
    assert io.is_out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert io.is_out_of_space(raised(RuntimeError("file write failed"), full))  # torch.save
    assert not io.is_out_of_space(OSError(errno.EIO, "I/O error"))
    assert not io.is_out_of_space(raised(ValueError("x"), KeyError("y")))
    quota = io.out_of_space("/x/y", exc=OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert "disk quota exceeded writing /x/y" in str(quota) and "within your quota" in str(quota)


def test_out_of_space_survives_the_trip_from_a_worker_process():
    exc = io.out_of_space("/data/videos/a.npy", 1 << 20, OSError(errno.EDQUOT, "quota"))
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is io.OutOfSpace and str(back) == str(exc)
    assert back.path == Path("/data/videos/a.npy") and back.errno == errno.EDQUOT


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path):
    # A writer killed with SIGKILL in the middle of an atomic write leaves its temporary file.
    code = (
        "import sys, time; from iicrepro.io import atomic_path\n"
        "with atomic_path(sys.argv[1], suffix='.pt') as tmp:\n"
        "    tmp.write_bytes(b'half a checkpoint'); print('writing', flush=True); time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC))
    target = tmp_path / "ckpt" / "last.pt"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "writing"
    stale = list(target.parent.glob(".last.pt.*.pt.tmp"))
    assert len(stale) == 1
    assert io.remove_stale_temps(target.parent) == []  # its writer is alive: kept
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert stale[0].exists()  # nothing removes it by itself
    with io.atomic_path(target.parent / "metrics.csv") as live:
        live.write_text("being written")
        removed = io.remove_stale_temps(target.parent)
        assert removed == stale and live.exists()  # ours, locked while being written
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.csv"]


def test_a_tiny_tmpfs_fills_up_and_the_error_names_its_file_system(tmp_path):
    mnt = tmp_path / "mnt"
    with small_filesystem(mnt, 64 << 10):
        fill(mnt, leave=0)
        target = mnt / "out" / "big.bin"
        with pytest.raises(io.OutOfSpace) as info:
            io.write_text(target, "x" * (1 << 20))
        assert f"(file system at {mnt}:" in str(info.value)
        assert not target.exists() and not any(p.name.endswith(".tmp") for p in mnt.rglob("*"))


def test_cli_message_for_an_out_of_space_error_outside_atomic_writes():
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    args = cli.build_parser("report").parse_args(["report", "--params", str(params)])
    named = OSError(errno.ENOSPC, "No space left on device", "/results/metrics.json")
    message = cli.no_space_message(args, named)
    assert "writing /results/metrics.json" in message and "paths.results" in message
    anonymous = cli.no_space_message(args, OSError(errno.ENOSPC, "No space left on device"))
    assert "results (on /" in anonymous and " free" in anonymous  # where the step writes
