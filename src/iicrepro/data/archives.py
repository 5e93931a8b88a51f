"""`iicrepro extract DATASET`: safe extraction of zip, tar and RAR archives, nested RARs included.

Safety comes first: every member of an archive is listed before anything is written, and the
archive is refused (with the offending members named) when a member has an absolute path, a `..`
component, is a special file, would be written through a symlink (one the archive makes or one
already on disk, left by an earlier archive), or is a symlink / hardlink that resolves outside the
target. Links are resolved against the tree as it is on disk plus every archive of the dataset
(`extract` checks them all together before extracting any), so a pair of archives cannot build an
escape that neither holds alone. An archive whose declared contents are far larger than itself is
refused as a decompression bomb (`MAX_EXPANSION`). Extraction then happens in an empty temporary
folder beside the target and is merged into place without following any symlink; a marker ``<target>/.extracted-<archive>.json`` holding the
archive's sha256 is written last, so an interrupted extraction never looks complete and a finished
one is skipped next time.

RAR: UCF101 (2013) is RAR 4 and needs `unar` (Debian package `unar`), which handles RAR 2-4
including solid archives; RAR 5 needs `bsdtar` (package `libarchive-tools`). The version is read
from the signature bytes, so each archive goes to the tool that can read it.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from iicrepro.errors import UserError
from iicrepro.io import sha256_file, write_json

RAR4_SIGNATURE = b"Rar!\x1a\x07\x00"
RAR5_SIGNATURE = b"Rar!\x1a\x07\x01\x00"
_TOOLS = {"rar4": (("unar", "lsar"), "unar"), "rar5": (("bsdtar",), "libarchive-tools")}
_MAX_LINK_HOPS = 40


@dataclass(frozen=True)
class Member:
    """One archive entry. `link` is a symlink's target or a hardlink's source."""

    name: str
    kind: str  # file | dir | symlink | hardlink | special
    link: str = ""
    size: int = 0  # bytes once extracted


# ---------------------------------------------------------------------------------- formats


def archive_format(path: Path) -> str:
    """'zip', 'tar', 'rar4' or 'rar5', from the file's contents."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(RAR5_SIGNATURE):
        return "rar5"
    if head.startswith(RAR4_SIGNATURE):
        return "rar4"
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise UserError(
        f"{path} is not a zip, tar or RAR archive (first bytes {head!r}); it may be an error page "
        f"saved by a server: delete {path} and {path.name}.sha256 beside it (if there) and run "
        "`iicrepro fetch` again"
    )


def _need_tools(fmt: str, path: Path) -> None:
    tools, package = _TOOLS[fmt]
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        version = "RAR 4" if fmt == "rar4" else "RAR 5"
        raise UserError(
            f"{path} is a {version} archive and extracting it needs {' and '.join(missing)}: "
            f"install it with `sudo apt-get install {package}`"
        )


def _run(cmd: list[str], path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    done = subprocess.run(cmd, capture_output=True, env=env)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()[-2000:]
        if "No space left" in err:
            raise UserError(f"the disk filled up while extracting {path}: free space and retry")
        raise UserError(
            f"`{cmd[0]}` failed on {path} (exit {done.returncode}): {err}\n"
            f"The archive may be damaged or incomplete: delete {path} and run `iicrepro fetch` again."
        )
    return done


# ---------------------------------------------------------------------------------- listing


def _zip_members(path: Path) -> list[Member]:
    out = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                link = zf.read(info).decode(errors="replace")
                out.append(Member(info.filename, "symlink", link))
            else:
                kind = "dir" if info.is_dir() else "file"
                out.append(Member(info.filename, kind, size=info.file_size))
    return out


def _tar_members(path: Path) -> list[Member]:
    out = []
    with tarfile.open(path) as tf:
        for info in tf.getmembers():
            if info.issym():
                out.append(Member(info.name, "symlink", info.linkname))
            elif info.islnk():
                out.append(Member(info.name, "hardlink", info.linkname))
            elif info.isdir():
                out.append(Member(info.name, "dir"))
            elif info.isfile():
                out.append(Member(info.name, "file", size=info.size))
            else:
                out.append(Member(info.name, "special"))
    return out


def _lsar_members(path: Path) -> list[Member]:
    """RAR 2-4 via `lsar -j`; a symlink's target is read with `unar -o -` (written to stdout)."""
    listing = json.loads(_run(["lsar", "-j", "-nr", str(path)], path).stdout)
    out = []
    for entry in listing.get("lsarContents", []):
        name = entry["XADFileName"]
        if entry.get("XADIsLink"):
            index = str(entry["XADIndex"])
            link = _run(["unar", "-q", "-nr", "-o", "-", "-i", str(path), index], path).stdout
            out.append(Member(name, "symlink", link.decode(errors="replace")))
        elif entry.get("XADIsDirectory"):
            out.append(Member(name, "dir"))
        else:
            mode = entry.get("XADPosixPermissions", 0o100644)
            regular = stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0
            size = int(entry.get("XADFileSize", 0))
            out.append(Member(name, "file" if regular else "special", size=size))
    return out


# `bsdtar -tv` prints `ls -l` style lines: mode links uid gid size month day year|time name.
_BSDTAR_LINE = re.compile(r"^(\S{10})\s+\d+\s+\S+\s+\S+\s+(\d+)\s+\S+\s+\d+\s+\S+\s(.*)$")


def _bsdtar_members(path: Path) -> list[Member]:
    text = _run(["bsdtar", "-tvf", str(path)], path).stdout.decode(errors="replace")
    out = []
    for line in text.splitlines():
        m = _BSDTAR_LINE.match(line)
        if not m:
            raise UserError(f"cannot read the listing of {path}: unexpected line {line!r}")
        mode, size, rest = m.groups()
        if mode[0] == "l":
            name, sep, link = rest.partition(" -> ")
            out.append(Member(name, "symlink" if sep else "special", link))
        elif " link to " in rest:
            name, _, link = rest.partition(" link to ")
            out.append(Member(name, "hardlink", link))
        else:
            kind = {"d": "dir", "-": "file"}.get(mode[0], "special")
            out.append(Member(rest, kind, size=int(size)))
    return out


def list_members(path: Path) -> list[Member]:
    """Every entry of the archive, read without extracting anything."""
    path = Path(path)
    fmt = archive_format(path)
    if fmt in _TOOLS:
        _need_tools(fmt, path)
    reader = {
        "zip": _zip_members,
        "tar": _tar_members,
        "rar4": _lsar_members,
        "rar5": _bsdtar_members,
    }[fmt]
    return reader(path)


# ---------------------------------------------------------------------------------- safety

# Decompression bombs: an archive whose members declare more than MAX_EXPANSION times the
# archive's own size (and more than EXPANSION_FREE_BYTES in all) is refused before anything is
# written. Videos hardly compress (UCF101.rar expands ~1x) and the split lists ~10x, while a zip of
# zeros expands ~1000x.
MAX_EXPANSION = 100
EXPANSION_FREE_BYTES = 64 << 20


def _components(name: str) -> list[str]:
    # Backslashes count as separators too: RAR and Windows-made zips use them.
    return [c for c in re.split(r"[\\/]", name) if c not in ("", ".")]


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None


def _resolve(base: list[str], path: str, links: dict[str, str], hops: int = 0) -> list[str] | None:
    """Follow `path` from folder `base` (components under the root), through the known symlinks
    (the archives' and those on disk); the resolved components, or None when the walk leaves the
    root. Names that are no symlink resolve as plain folders: every later archive is checked
    again with all links together, so a name that becomes a symlink later is caught then."""
    if _is_absolute(path) or hops > _MAX_LINK_HOPS:
        return None
    out = list(base)
    for comp in _components(path):
        if comp == "..":
            if not out:
                return None
            out.pop()
            continue
        out.append(comp)
        target = links.get("/".join(out))
        if target is not None:
            out.pop()
            resolved = _resolve(out, target, links, hops + 1)
            if resolved is None:
                return None
            out = resolved
    return out


def _through_link(parts: list[str], links: dict[str, str]) -> str | None:
    """The first of the folders `parts[:1]`, `parts[:2]`, ... that is a symlink, or None."""
    for i in range(1, len(parts) + 1):
        key = "/".join(parts[:i])
        if key in links:
            return key
    return None


def _links(members: list[Member]) -> dict[str, str]:
    return {
        "/".join(_components(m.name)): m.link
        for m in members
        if m.kind == "symlink" and not _is_absolute(m.name)
    }


def symlinks_on_disk(root: Path) -> dict[str, str]:
    """Every symlink under the folder `root`, never followed: path relative to root -> target."""
    found: dict[str, str] = {}
    if not Path(root).is_dir():
        return found
    for folder, dirs, files in os.walk(root):  # a symlinked folder is listed, never entered
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                rel = "/".join(_components(os.path.relpath(path, root)))
                found[rel] = os.readlink(path)
    return found


def rebase(members: list[Member], prefix: str) -> list[Member]:
    """The members of an archive extracted into the folder `prefix` (relative to the root), named
    from the root: names and hardlink sources get the prefix; symlink targets are relative to
    their own folder and stay as they are."""
    parts = _components(prefix)
    if not parts:
        return list(members)
    out = []
    for m in members:
        name = m.name if _is_absolute(m.name) else "/".join(parts + _components(m.name))
        link = m.link
        if m.kind == "hardlink" and not _is_absolute(link):
            link = "/".join(parts + _components(link))
        out.append(Member(name, m.kind, link, m.size))
    return out


def unsafe_members(members: list[Member], present: dict[str, str] | None = None) -> list[str]:
    """Descriptions of the members that would write outside the root; empty when safe.

    Names are relative to the root. `present` maps the symlinks already on disk under the root
    (see `symlinks_on_disk`) to their targets. No member may be written through a symlink,
    whether an archive made it or it was there before; a symlink's target is resolved through
    every known link and must stay under the root; links already on disk must still do so once
    this archive's links are added.
    """
    present = present or {}
    own = _links(members)
    links = {**present, **own}
    bad = []
    seen: dict[str, str] = {}
    for m in members:
        parts = _components(m.name)
        key = "/".join(parts)
        if _is_absolute(m.name):
            bad.append(f"{m.name!r} (absolute path)")
        elif ".." in parts:
            bad.append(f"{m.name!r} (contains '..')")
        elif not parts:
            bad.append(f"{m.name!r} (empty name)")
        elif m.kind == "special":
            bad.append(f"{m.name!r} (device, fifo or other special file)")
        elif (via := _through_link(parts[:-1], links)) is not None:
            where = (
                "already in the target" if via in present and via not in own else "in the archive"
            )
            bad.append(f"{m.name!r} (written through the symlink {via!r}, {where})")
        elif m.kind == "dir" and key in links:
            bad.append(f"{m.name!r} (a folder where a symlink of that name is)")
        elif m.kind == "symlink" and seen.setdefault(key, m.link) != m.link:
            bad.append(f"{m.name!r} (symlink defined twice, to {seen[key]!r} and {m.link!r})")
        elif m.kind == "symlink" and _resolve(parts[:-1], m.link, links) is None:
            bad.append(f"{m.name!r} (symlink to {m.link!r}, which leads outside the target)")
        elif m.kind == "hardlink" and (
            _is_absolute(m.link)
            or ".." in _components(m.link)
            or _through_link(_components(m.link), links) is not None
        ):
            bad.append(f"{m.name!r} (hardlink to {m.link!r}, outside the target or via a symlink)")
    for name, link in present.items():
        parent = _components(name)[:-1]
        changed = name not in own and _resolve(parent, link, present) is not None
        if changed and _resolve(parent, link, links) is None:
            bad.append(
                f"{name!r} (symlink to {link!r} already in the target: with this archive's "
                "links it would lead outside)"
            )
    return bad


def _refuse(what: str, bad: list[str]) -> UserError:
    on_disk = any("already in the target" in b or "target folder" in b for b in bad)
    return UserError(
        f"refusing to extract {what}: {len(bad)} member(s) would be written outside the target "
        "folder or through a symlink:\n  " + "\n  ".join(bad) + "\nNothing was extracted. The "
        "archive is not what it should be: delete it and download it again from a trusted source."
        + (
            " A symlink already on disk was left by an earlier archive or made by hand: delete "
            "the dataset's extracted folder (data/raw/<dataset>) and extract again; to keep the "
            "data on another disk, point paths.data there instead of linking folders."
            if on_disk
            else ""
        )
    )


def check_expansion(path: Path, members: list[Member]) -> None:
    """Refuse a decompression bomb: far more declared contents than the archive's own size."""
    declared = sum(m.size for m in members)
    packed = max(Path(path).stat().st_size, 1)
    if declared > EXPANSION_FREE_BYTES and declared > MAX_EXPANSION * packed:
        from iicrepro.io import human_bytes as human

        raise UserError(
            f"refusing to extract {path}: its members declare {human(declared)} of contents, "
            f"{declared / packed:.0f} times the archive's own {human(packed)} (the limit is "
            f"MAX_EXPANSION = {MAX_EXPANSION} times, in iicrepro.data.archives). A dataset archive "
            "of videos hardly compresses; this looks like a decompression bomb. Nothing was "
            "extracted: delete it and download it again from a trusted source."
        )


def check_members(
    path: Path, into: Path, present: dict[str, str] | None = None, prefix: str = ""
) -> list[Member]:
    """List the archive; refuse it when a member is unsafe (see `unsafe_members`; `present` and
    the names are relative to the root, the archive is extracted into its folder `prefix`), when
    it expands like a decompression bomb, or when its contents do not fit on the disk that holds
    the folder `into`. Returns the members named as in the archive."""
    from iicrepro.data.fetch import check_space

    members = list_members(path)
    bad = unsafe_members(rebase(members, prefix), present)
    if bad:
        raise _refuse(str(path), bad)
    check_expansion(path, members)
    existing = into
    while not existing.exists():
        existing = existing.parent
    check_space(existing, sum(m.size for m in members), f"the contents of {path.name}")
    return members


def check_together(archives: list[tuple[Path, Path]], root: Path) -> None:
    """Check every archive of a dataset together, as they will be on disk once all are extracted:
    `archives` holds (archive, target folder) pairs, each target inside `root`."""
    root = Path(root)
    combined: list[Member] = []
    for path, target in archives:
        combined += rebase(list_members(path), _prefix(root, target))
    present = symlinks_on_disk(root)
    bad = unsafe_members(combined, present)
    for _, target in archives:
        via = _through_link(_components(_prefix(root, target)), {**present, **_links(combined)})
        if via is not None:
            bad.append(f"the target folder {str(target)!r} (passes through the symlink {via!r})")
    if bad:
        raise _refuse(" and ".join(p.name for p, _ in archives), bad)


def _prefix(root: Path, target: Path) -> str:
    try:
        return Path(target).relative_to(root).as_posix()
    except ValueError:
        raise UserError(f"{target} is not inside {root}") from None


# ---------------------------------------------------------------------------------- extraction


def _unpack_zip(path: Path, into: Path) -> None:
    # Like Info-ZIP's unzip, a symlink member becomes a symlink (zipfile would write a file
    # holding the target), so the tree on disk is the one the safety check reasoned about.
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if stat.S_ISLNK(info.external_attr >> 16):
                where = into.joinpath(*_components(info.filename))
                where.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(zf.read(info).decode(errors="replace"), where)
            else:
                zf.extract(info, into)


def _unpack(path: Path, into: Path) -> None:
    """Write the (already checked) archive's contents into the folder `into`."""
    fmt = archive_format(path)
    try:
        if fmt == "zip":
            _unpack_zip(path, into)
        elif fmt == "tar":
            with tarfile.open(path) as tf:
                tf.extractall(into, filter="data")
        elif fmt == "rar4":
            # -D: no wrapping folder; -nr: inner archives are handled by `extract(nested=True)`.
            _run(["unar", "-q", "-f", "-D", "-nr", "-o", str(into), str(path)], path)
        else:
            _run(["bsdtar", "-xf", str(path), "-C", str(into)], path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UserError(
                f"the disk filled up while extracting {path}: free space and retry"
            ) from exc
        raise


def _merge(src: Path, dst: Path) -> None:
    """Move the contents of folder `src` into the real folder `dst`, replacing files of the same
    name. Never follows a symlink in `dst`: writing a folder where one is is refused."""
    for item in src.iterdir():
        there = dst / item.name
        if item.is_dir() and not item.is_symlink():
            if there.is_symlink():
                raise UserError(
                    f"refusing to write the folder {there}: a symlink of that name is already "
                    "there, and nothing is ever written through a symlink. Delete the extracted "
                    f"folder {dst} and extract again."
                )
            if there.is_dir():
                _merge(item, there)
                continue
            if there.exists():
                there.unlink()
        elif there.is_dir() and not there.is_symlink():
            shutil.rmtree(there)
        os.replace(item, there)


def marker_path(archive: Path, target: Path) -> Path:
    """The completion marker of `archive` extracted into `target`."""
    return Path(target) / f".extracted-{Path(archive).name}.json"


def _archive_sha256(archive: Path) -> str:
    """The archive's sha256, taken from fetch's record when that is at least as new."""
    record = archive.with_name(archive.name + ".sha256")
    if record.is_file() and record.stat().st_mtime >= archive.stat().st_mtime:
        text = record.read_text().split()
        if text:
            return text[0].lower()
    return sha256_file(archive)


def _done(marker: Path, digest: str, target: Path) -> list[Path] | None:
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return None
    files = [target / f for f in info.get("files", [])]
    if info.get("sha256") != digest or not all(f.exists() or f.is_symlink() for f in files):
        return None
    return files


def extract(
    archive: str | Path, target: str | Path, *, nested: bool = False, root: str | Path | None = None
) -> list[Path]:
    """Extract `archive` into `target`; return the extracted files (not folders).

    `root` is the dataset's folder that all its archives are extracted under (default: `target`);
    the archive is checked against every symlink on disk under it, and no member may leave it.
    With `nested`, every ``.rar`` the archive holds is extracted into `target` in turn (its
    members checked like the outer archive's) and then deleted: HMDB51's RAR of per-class RARs.
    Skipped, returning the recorded files, when the completion marker matches the archive.
    """
    archive, target = Path(archive), Path(target)
    root = Path(root) if root is not None else target
    if not archive.is_file():
        raise UserError(f"{archive} does not exist: run `iicrepro fetch` first")
    marker = marker_path(archive, target)
    digest = _archive_sha256(archive)
    if (files := _done(marker, digest, target)) is not None:
        return files

    prefix = _prefix(root, target)
    present = symlinks_on_disk(root)
    if (via := _through_link(_components(prefix), present)) is not None:
        raise _refuse(str(archive), [f"the target folder {str(target)!r} (passes through {via!r})"])
    # Raises before anything is written.
    links = {
        **present,
        **_links(rebase(check_members(archive, target.parent, present, prefix), prefix)),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.extracting-", dir=target.parent) as t:
        staging = Path(t)
        _unpack(archive, staging)
        if nested:
            for inner in sorted(p for p in staging.rglob("*.rar") if p.is_file()):
                inner_members = check_members(inner, staging, links, prefix)
                links.update(_links(rebase(inner_members, prefix)))
                _unpack(inner, staging)
                inner.unlink()
                folder = inner.parent
                while folder != staging and not any(folder.iterdir()):
                    folder.rmdir()
                    folder = folder.parent
        rel = sorted(
            str(p.relative_to(staging))
            for p in staging.rglob("*")
            if p.is_symlink() or not p.is_dir()
        )
        target.mkdir(exist_ok=True)
        _merge(staging, target)
    write_json(marker, {"archive": archive.name, "sha256": digest, "files": rel})
    return [target / f for f in rel]


# ---------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=("ucf101", "hmdb51", "synthetic"))
    parser.add_argument("--only", choices=("videos", "splits"), help="extract one archive only")


def main(args: argparse.Namespace) -> int:
    from iicrepro import layout
    from iicrepro.cli import settings_from_args
    from iicrepro.data import sources

    settings = settings_from_args(args)
    folder = layout.downloads(settings, args.dataset)
    dataset_root = layout.raw(settings, args.dataset)
    found = sources.archives(settings, args.dataset)
    chosen = [arc for arc in found if not args.only or arc.role == args.only]
    for arc in chosen:
        if not (folder / arc.filename).is_file():
            raise UserError(
                f"{folder / arc.filename} is missing: run `iicrepro fetch {args.dataset}` first"
            )
    # All of the dataset's archives that are here are checked together before any is extracted:
    # one archive's symlink may be harmless alone and an escape once another's members join it.
    check_together(
        [
            (folder / arc.filename, sources.extract_target(settings, args.dataset, arc))
            for arc in found
            if (folder / arc.filename).is_file()
        ],
        dataset_root,
    )
    for arc in chosen:
        path = folder / arc.filename
        target = sources.extract_target(settings, args.dataset, arc)
        done = marker_path(path, target).is_file()
        print(f"extract: {path.name} -> {target}" + (" (checking marker)" if done else ""))
        files = extract(path, target, nested=arc.nested, root=dataset_root)
        root = sources.content_root(settings, args.dataset, arc.role)
        if not root.is_dir():
            raise UserError(
                f"{path.name} was extracted into {target} but {root} does not exist: the archive "
                "does not have the expected layout (see src/iicrepro/data/sources.py)"
            )
        print(f"  {arc.role}: {len(files)} files under {root}")
    return 0
