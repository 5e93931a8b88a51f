"""A real, tiny file system for out-of-space tests: a tmpfs mounted for the test, then filled.

Mounting needs root (or CAP_SYS_ADMIN); where it is refused the tests that need it skip with the
reason. tmpfs allocates in pages, so sizes are rounded up to 4 KiB.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

PAGE = 4096


def mount_tmpfs(folder: Path, size: int) -> str | None:
    """Mount a tmpfs of `size` bytes on `folder`; None on success, else why it failed."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return "no mount command"
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exited {r.returncode}")


def resize(folder: Path, size: int) -> None:
    """Grow or shrink a mounted tmpfs (what a user freeing space achieves)."""
    subprocess.run(
        ["mount", "-o", f"remount,size={size}", str(folder)], check=True, capture_output=True
    )


@contextlib.contextmanager
def small_filesystem(folder: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes at `folder` for the block; pytest.skip if it cannot be mounted."""
    why = mount_tmpfs(folder, size)
    if why is not None:
        pytest.skip(f"cannot mount a small tmpfs for the out-of-space test ({why}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path, leave: int = 0) -> Path:
    """Write a filler file so that only about `leave` bytes stay free; returns it."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free - leave
    with open(filler, "ab") as f:
        block = b"\0" * (1 << 16)
        while free > 0:
            try:
                f.write(block[: min(len(block), free)])
                f.flush()
            except OSError:
                break
            free -= len(block)
    os.sync()
    return filler


def free(folder: Path) -> int:
    return shutil.disk_usage(folder).free
