"""Atomic writes, out-of-space errors and provenance records shared by every pipeline step.

Every output is written to a temporary sibling and renamed into place, so an interrupted step never
leaves a file that looks complete. The writer holds an exclusive lock on its temporary file, so the
next run of a step can tell a stale one (left by a killed process) from one still being written and
remove it (`remove_stale_temps`). A write that fails for lack of space (ENOSPC) or quota (EDQUOT)
becomes `OutOfSpace`, a UserError naming the file, its file system, the free space and the fix:
a full disk is a fault of the environment, never of the item being written. Result files carry a
provenance block: the settings they were made with, the code version and the hashes of their inputs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from iicrepro import __version__
from iicrepro.errors import UserError

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
TEMP_SUFFIX = ".tmp"
SHORT_WRITE_SLACK = 1 << 20  # a write that fails short with less free space than this: disk full


class OutOfSpace(UserError):
    """A write failed because its file system is full (or the user's quota is used up).

    Never a per-item failure: steps that tolerate bad items re-raise it, and the CLI prints it."""

    def __init__(self, message: str, path: str | Path | None = None, code: int = errno.ENOSPC):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.errno = code

    def __reduce__(self):  # survives the trip back from a worker process
        return type(self), (str(self), self.path, self.errno)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or while handling."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _no_space_errno(exc: BaseException | None) -> int | None:
    for e in _chain(exc):
        if isinstance(e, OSError | OutOfSpace) and e.errno in NO_SPACE_ERRNOS:
            return e.errno
    return None


def is_out_of_space(exc: BaseException | None) -> bool:
    """True if `exc`, or an exception it was raised from or while handling, is OutOfSpace or an
    OSError with ENOSPC/EDQUOT (libraries such as torch wrap the OSError in their own error)."""
    return _no_space_errno(exc) is not None


def no_space_filename(exc: BaseException | None) -> str | None:
    """The file named by the out-of-space OSError behind `exc`, if it names one."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS and e.filename:
            return str(e.filename)
    return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def mount_point(path: str | Path) -> Path:
    """The mount point of the file system holding `path` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def out_of_space(
    path: str | Path,
    needed: int | None = None,
    exc: BaseException | None = None,
    needed_for: str = "",
) -> OutOfSpace:
    """The error for a write to `path` that ran out of space: which file, which file system, how
    much is free (and how much was `needed`, for what, when known), and what to do."""
    path = Path(path)
    mount = mount_point(path)
    try:
        usage = shutil.disk_usage(mount)
        room = f"{human_bytes(usage.free)} free of {human_bytes(usage.total)}"
    except OSError:
        room = "free space unknown"
    code = _no_space_errno(exc) or errno.ENOSPC
    quota = code == errno.EDQUOT
    what = "disk quota exceeded" if quota else "no space left on device"
    need = f"; about {human_bytes(needed)} needed {needed_for}".rstrip() if needed else ""
    fix = "free space within your quota" if quota else "free space there"
    return OutOfSpace(
        f"{what} writing {path} (file system at {mount}: {room}{need}). "
        f"{fix.capitalize()}, or point paths.data (datasets, frame stores) or paths.results "
        "(checkpoints, metrics) in params.yaml (or --set paths.data=...) at a file system with "
        "room, then run the step again: what it finished before is kept.",
        path,
        code,
    )


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "", needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    The temporary file is locked while the block runs (see `remove_stale_temps`). A block that
    fails for lack of space raises OutOfSpace for `path` (`needed`: its expected size, if known).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=suffix + TEMP_SUFFIX, dir=path.parent
        )
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise out_of_space(path, needed, exc) from exc
        raise
    tmp_path = Path(tmp)
    with contextlib.suppress(OSError):  # "being written": not stale (where the file system locks)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        yield tmp_path
        if tmp_path.is_file():  # mkstemp creates 0600; give the final file the usual mode
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except Exception as exc:
        full = _short_write_on_full_disk(exc, tmp_path, needed)
        tmp_path.unlink(missing_ok=True)  # first: the message reports the free space without it
        if (full or is_out_of_space(exc)) and not isinstance(exc, OutOfSpace):
            raise out_of_space(path, needed, exc) from exc
        raise
    finally:
        tmp_path.unlink(missing_ok=True)
        os.close(fd)


def _short_write_on_full_disk(exc: BaseException, tmp: Path, needed: int | None) -> bool:
    """Some writers (numpy's tofile, C libraries) report a full disk as a short write without
    errno: count it as one when the file system has less room left than the write needed."""
    if not isinstance(exc, OSError) or exc.errno is not None:
        return False
    try:
        room = shutil.disk_usage(tmp.parent).free
    except OSError:
        return False
    return room < max(needed or 0, SHORT_WRITE_SLACK)


def remove_stale_temps(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Remove the temporary files `atomic_path` left in `folder` when its process was killed.

    A temporary file still locked belongs to a live writer and is kept. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".*{TEMP_SUFFIX}"
    removed = []
    for tmp in folder.rglob(pattern) if recursive else folder.glob(pattern):
        if tmp.is_symlink() or not tmp.is_file():
            continue
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone already, or not a plain file
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: a live writer
            continue
        else:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        finally:
            os.close(fd)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@cache
def code_version() -> str:
    """Package version plus the git commit (and '-dirty') when run from a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        return f"{__version__}+g{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__


LIBRARIES = {  # what the numbers also depend on: distribution names to look each one up by
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "av": ("av",),
    "opencv": (
        "opencv-contrib-python-headless",
        "opencv-python-headless",
        "opencv-contrib-python",
        "opencv-python",
    ),
}


@cache
def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that compute the numbers (None: not installed)."""
    from importlib import metadata

    found: dict[str, str | None] = {}
    for name, dists in LIBRARIES.items():
        found[name] = None
        for dist in dists:
            try:
                found[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def provenance(
    settings: Any = None, inputs: Iterable[str | Path] = (), step: str | None = None
) -> dict:
    """Where a result came from: settings, code version, input file hashes, time; for a step
    (`iicrepro <step>`), the fingerprint of the code it runs and the library versions."""
    hashes = {}
    for p in inputs:
        p = Path(p)
        if p.is_file():
            hashes[str(p)] = sha256_file(p)
    record = {
        "code_version": code_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings,
        "inputs": hashes,
    }
    if step is not None:
        from iicrepro import fingerprint

        record |= {
            "step": step,
            "code_fingerprint": fingerprint.of_step(step),
            "libraries": library_versions(),
        }
    return record
