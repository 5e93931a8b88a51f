"""`iicrepro fetch DATASET`: resumable, verified downloads of a dataset's archives.

A download goes to ``<dest>.part``; the server's validators (ETag, Last-Modified) and the file's
total size are recorded beside it in ``<dest>.part.json`` when the transfer starts. An interrupted
or truncated transfer is resumed with ``Range`` and ``If-Range``, and the answer's
``Content-Range`` total (and ETag, when sent) must match the record; a server that cannot prove the
file unchanged (no validator, a different total, a 200 answer) gets the file from zero, so a
transfer is never spliced from two versions. Connection errors, 5xx answers and truncated bodies
are retried with exponential backoff. Once complete the file is checked (the archive format's magic
bytes, never an HTML page; a size far below the archive's documented order of magnitude; its known
size and sha256) and only then renamed to ``<dest>``, so a file at ``<dest>`` is always complete and
verified.

Checksums: a known sha256 (from the registry) is authoritative. Without one, the sha256 of the first
download that passes the checks above is recorded in ``<dest>.sha256`` (trust on first use) and
later downloads must match it. A file that fails verification is moved to ``<dest>.corrupt`` (kept
for inspection, replaced by the next failure) and the next run downloads from zero. A finished
``<dest>`` that no longer matches (changed on disk, or its known checksum changed) is moved aside
and downloaded again.

A file put at ``<dest>`` by hand (the official server is down, or there is no network) is checked
the same way and used without any network access.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

from iicrepro import __version__, layout
from iicrepro.errors import UserError
from iicrepro.io import (
    NO_SPACE_ERRNOS,
    OutOfSpace,
    read_json,
    sha256_file,
    write_json,
    write_text,
)
from iicrepro.io import human_bytes as human

USER_AGENT = f"iicrepro/{__version__} (dataset fetch; urllib)"


class _Retry(Exception):
    """A transient failure: the attempt may succeed when repeated."""


def _suffixed(dest: Path, suffix: str) -> Path:
    return dest.with_name(dest.name + suffix)


def recorded_sha256(dest: Path) -> str | None:
    """The sha256 recorded for `dest` by an earlier verified download, if any."""
    record = _suffixed(dest, ".sha256")
    if not record.is_file():
        return None
    text = record.read_text().split()
    return text[0].lower() if text else None


def check_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start writing `needed` more bytes where the disk has less free space."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OutOfSpace(
            f"not enough disk space for {what}: {human(needed)} more are needed but only "
            f"{human(free)} are free on the file system of {folder}. Free some space, or point "
            "paths.data in params.yaml (or --set paths.data=...) at a larger disk.",
            folder,
        )


def _no_space(part: Path, exc: OSError) -> UserError:
    return OutOfSpace(
        f"the disk filled up while writing {part} ({exc.strerror}). The partial file is kept: "
        "free some space (or move paths.data to a larger disk) and run the command again to resume.",
        part,
        exc.errno,
    )


# Magic bytes per archive file name ending (what `iicrepro extract` reads).
_MAGIC = {
    ".rar": (b"Rar!\x1a\x07\x00", b"Rar!\x1a\x07\x01\x00"),
    ".zip": (b"PK\x03\x04", b"PK\x05\x06"),
    ".tar.gz": (b"\x1f\x8b",),
    ".tgz": (b"\x1f\x8b",),
}
# An archive smaller than its documented size divided by this is not the archive (an error page,
# a truncated or placeholder file).
SIZE_FLOOR_DIVISOR = 10


def format_problem(path: Path, name: str, approx_size: int | None = None) -> str | None:
    """Why the file at `path` cannot be the archive called `name`, or None: an HTML page, other
    magic bytes than the format's, or a size far below the documented order of magnitude."""
    with open(path, "rb") as f:
        head = f.read(512)
    size = path.stat().st_size
    text = head.lstrip().lower()
    tags = (b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"<title")
    if text.startswith(b"<") and any(tag in text for tag in tags):
        return f"it is an HTML/XML page of {size} bytes (an error page saved by a server)"
    magic = next((m for end, m in _MAGIC.items() if name.lower().endswith(end)), None)
    if magic is not None and not head.startswith(magic):
        return f"its first bytes {head[:8]!r} are not those of a {name.rsplit('.', 1)[-1]} file"
    if name.lower().endswith(".tar"):
        import tarfile

        if not tarfile.is_tarfile(path):
            return "it is not a tar file"
    if approx_size and size * SIZE_FLOOR_DIVISOR < approx_size:
        return f"it has {human(size)}, far less than the archive's documented ~{human(approx_size)}"
    return None


def _part_record(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_record(part: Path) -> dict:
    try:
        record = read_json(_part_record(part))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _drop_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    _part_record(part).unlink(missing_ok=True)


def _if_range(record: dict) -> str | None:
    """The validator to send with If-Range: a strong ETag, else Last-Modified."""
    etag = record.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return record.get("last_modified")


class _Progress:
    """A tqdm bar when wanted (imported lazily: it is only needed while bytes flow)."""

    def __init__(self, enabled: bool, total: int | None, initial: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                leave=False,
            )

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _copy_body(source, part: Path, mode: str, chunk_bytes: int, bar: _Progress) -> int:
    """Append (mode "ab") or write ("wb") `source` into `part`; return the bytes written."""
    written = 0
    with open(part, mode) as out:
        while True:
            try:
                block = source.read(chunk_bytes)
            except (http.client.HTTPException, OSError) as exc:
                raise _Retry(f"connection lost after {human(written)}: {exc!r}") from exc
            if not block:
                return written
            try:
                out.write(block)
            except OSError as exc:
                if exc.errno in NO_SPACE_ERRNOS:  # full disk or quota
                    raise _no_space(part, exc) from exc
                raise
            written += len(block)
            bar.update(len(block))


def _fetch_file_url(url: str, part: Path, size: int | None, chunk_bytes: int, progress: bool):
    src = Path(unquote(urlparse(url).path))
    if not src.is_file():
        raise UserError(f"{url}: no such file {src}")
    info = src.stat()
    total = info.st_size
    source = {"url": url, "total": total, "mtime_ns": info.st_mtime_ns}
    offset = part.stat().st_size if part.exists() else 0
    if offset and (offset > total or _read_record(part) != source):
        _drop_part(part)  # another file, or the source changed since: start again
        offset = 0
    write_json(_part_record(part), source)
    check_space(part.parent, total - offset, part.name)
    bar = _Progress(progress, total, offset, part.name.removesuffix(".part"))
    try:
        with open(src, "rb") as f:
            f.seek(offset)
            _copy_body(f, part, "ab" if offset else "wb", chunk_bytes, bar)
    finally:
        bar.close()


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) from 'bytes A-B/N' or 'bytes */N'; None where absent."""
    if not header or not header.startswith("bytes "):
        return None, None
    span, _, total = header[6:].partition("/")
    first = int(span.split("-")[0]) if span and span != "*" else None
    return first, int(total) if total.isdigit() else None


def _fetch_http(
    url: str,
    part: Path,
    size: int | None,
    timeout_s: float,
    chunk_bytes: int,
    progress: bool,
    context: ssl.SSLContext | None,
) -> None:
    """One attempt: resume or start `part`. Raises _Retry on transient failures."""
    offset = part.stat().st_size if part.exists() else 0
    record = _read_record(part)
    validator = _if_range(record) if record.get("url") == url else None
    if offset and (validator is None or (size is not None and offset > size)):
        # Nothing proves the server still holds the file these bytes came from: start again.
        _drop_part(part)
        offset, record = 0, {}
    if offset and size is not None and offset == size == record.get("total"):
        return  # complete already; verification decides
    if size is not None:
        check_space(part.parent, size - offset, part.name)
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = validator
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s, context=context)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            _, total = _content_range(exc.headers.get("Content-Range"))
            if total == offset == record.get("total"):
                return  # the partial file already holds every byte
            _drop_part(part)  # the partial file does not fit this server's file
            raise _Retry(f"HTTP 416 for a {human(offset)} partial file; restarting") from exc
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Retry(f"HTTP {exc.code} {exc.reason}") from exc
        raise UserError(
            f"HTTP {exc.code} {exc.reason} for {url}: the server refused the file"
        ) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise UserError(
                f"TLS certificate check failed for {url}: {exc.reason.verify_message}. Use a mirror (download.mirrors in params.yaml) "
                "or --set download.verify_tls=false (files are still checked against their sha256)."
            ) from exc
        raise _Retry(f"cannot connect: {exc.reason}") from exc
    except (http.client.HTTPException, OSError) as exc:
        raise _Retry(f"request failed: {exc!r}") from exc

    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        etag = response.headers.get("ETag")
        if offset and response.status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            same = (
                first == offset
                and total is not None
                and total == record.get("total", total)
                and (etag is None or record.get("etag") in (None, etag))
            )
            if not same:
                response.close()
                _drop_part(part)
                raise _Retry(
                    f"the server's answer to the resume (bytes {first}- of {total}, ETag {etag}) "
                    f"does not match the file begun (total {record.get('total')}, ETag "
                    f"{record.get('etag')}); restarting from zero"
                )
        else:
            # A full answer: the server ignored Range, or If-Range found the file changed.
            offset = 0
            record = {
                "url": url,
                "etag": etag,
                "last_modified": response.headers.get("Last-Modified"),
                "total": length,
            }
            write_json(_part_record(part), record)  # the body below truncates the part
        total = offset + length if length is not None else None
        if size is not None and total is not None and total != size:
            raise UserError(
                f"{url} serves {total} bytes but {part.name[:-5]} is known to have {size} bytes: "
                "the server holds a different file"
            )
        if length is not None:
            check_space(part.parent, length, part.name)
        bar = _Progress(progress, total, offset, part.name.removesuffix(".part"))
        try:
            written = _copy_body(response, part, "ab" if offset else "wb", chunk_bytes, bar)
        finally:
            bar.close()
        if length is not None and written < length:
            raise _Retry(f"connection closed after {written} of {length} bytes")


def _verify(
    dest: Path,
    part: Path,
    url: str,
    size: int | None,
    expected: str | None,
    approx_size: int | None,
) -> str:
    """Check format, size and sha256 of `part`; move it to <dest>.corrupt on failure."""
    actual_size = part.stat().st_size
    problem = format_problem(part, dest.name, approx_size)
    digest = sha256_file(part)
    if problem is None and size is not None and actual_size != size:
        problem = f"size {actual_size} bytes, expected {size} bytes"
    elif problem is None and expected is not None and digest != expected.lower():
        problem = "sha256 mismatch"
    if problem is None:
        _part_record(part).unlink(missing_ok=True)
        return digest
    corrupt = _suffixed(dest, ".corrupt")
    os.replace(part, corrupt)
    _part_record(part).unlink(missing_ok=True)
    record = _suffixed(dest, ".sha256")
    if problem == "sha256 mismatch":
        advice = (
            "To fix: run the command again to download it anew (or from a mirror listed under "
            "download.mirrors in params.yaml); if the source has really changed, "
            + (
                f"delete {record} (the sum recorded on the first download) and run it again."
                if expected == recorded_sha256(dest)
                else "update the checksum in src/iicrepro/data/sources.py."
            )
        )
    else:
        advice = (
            "Nothing was trusted or recorded. To fix: run the command again, or get the file "
            "from a mirror (download.mirrors in params.yaml) or put it at "
            f"{dest} by hand; {corrupt} may be deleted."
        )
    raise UserError(
        f"{dest.name} downloaded from {url} failed verification ({problem}).\n"
        f"  expected sha256: {expected or 'unknown'}\n"
        f"  actual sha256:   {digest}\n"
        f"The bad file was moved to {corrupt}. {advice}"
    )


def check_local(
    dest: Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    approx_size: int | None = None,
) -> str | None:
    """Verify a finished `dest` (downloaded earlier or put there by hand) without any network
    access: its sha256, or None with the file moved to ``<dest>.corrupt`` when it fails the format,
    size or checksum check (a sum recorded for an HTML page is dropped with it)."""
    expected = sha256.lower() if sha256 else recorded_sha256(dest)
    problem = format_problem(dest, dest.name)
    if problem is None and size is not None and dest.stat().st_size != size:
        problem = f"size {dest.stat().st_size} bytes, expected {size} bytes"
    digest = sha256_file(dest) if problem is None else None
    if problem is None and expected not in (None, digest):
        problem = f"sha256 {digest} is not the expected {expected}"
    if problem is None:
        if approx_size and dest.stat().st_size * SIZE_FLOOR_DIVISOR < approx_size:
            print(
                f"fetch: note: {dest} has {human(dest.stat().st_size)}, far less than the "
                f"official archive's ~{human(approx_size)}; used as it is (a stand-in or a subset?)"
            )
        if expected is None:  # a file placed by hand: trust it from now on
            write_text(_suffixed(dest, ".sha256"), f"{digest}  {dest.name}\n")
        return digest
    corrupt = _suffixed(dest, ".corrupt")
    os.replace(dest, corrupt)
    if not sha256 and expected is not None and sha256_file(corrupt) == expected:
        _suffixed(dest, ".sha256").unlink()  # the recorded sum was the bad file's own
    print(f"fetch: {dest} is not usable ({problem}); moved to {corrupt}, fetching it anew")
    return None


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    approx_size: int | None = None,
    retries: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 60,
    chunk_bytes: int = 1 << 20,
    progress: bool = True,
    verify_tls: bool = True,
) -> Path:
    """Download `url` (http, https or file) to `dest`, resumably, and verify it.

    `retries` is the number of attempts; the wait after attempt k is ``backoff_s * 2**(k-1)``.
    An existing `dest` that verifies is kept without any transfer. `approx_size` is the archive's
    documented size: a download far smaller than it is refused (see `format_problem`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _suffixed(dest, ".part")
    if dest.is_file() and check_local(dest, sha256=sha256, size=size) is not None:
        return dest
    expected = sha256.lower() if sha256 else recorded_sha256(dest)

    scheme = urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise UserError(f"unsupported URL {url!r}: use http://, https:// or file://")
    context = None
    if scheme == "https" and not verify_tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

    for attempt in range(1, retries + 1):
        try:
            if scheme == "file":
                _fetch_file_url(url, part, size, chunk_bytes, progress)
            else:
                _fetch_http(url, part, size, timeout_s, chunk_bytes, progress, context)
            break
        except _Retry as exc:
            if attempt == retries:
                kept = f" The partial file {part} is kept for resuming." if part.exists() else ""
                raise UserError(
                    f"downloading {url} failed after {retries} attempt(s): {exc}.{kept}"
                ) from exc
            time.sleep(backoff_s * 2 ** (attempt - 1))

    digest = _verify(dest, part, url, size, expected, approx_size)
    write_text(_suffixed(dest, ".sha256"), f"{digest}  {dest.name}\n")
    os.replace(part, dest)
    return dest


# ---------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=("ucf101", "hmdb51", "synthetic"))
    parser.add_argument("--only", choices=("videos", "splits"), help="fetch one archive only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _unreachable(dataset: str, archive, dest: Path, failures: list[str]) -> UserError:
    """The error when no source gave the archive: what was tried and how to proceed."""
    from iicrepro.data import sources

    notes = [
        f"  note: {url} is on {why}" for url in archive.urls() if (why := sources.known_down(url))
    ]
    return UserError(
        f"could not fetch {archive.filename} ({dataset} {archive.role}) from any source. Tried:\n"
        + "\n".join(failures)
        + ("\n" + "\n".join(notes) if notes else "")
        + "\nTo proceed, either:\n"
        f"  * put the file there by hand: {dest} (exactly this name; it is checked: archive format"
        + (f", size {archive.size} bytes" if archive.size else "")
        + (", sha256" if archive.sha256 else ", its sha256 is recorded")
        + ") and run the command again, which then needs no network; or\n"
        f"  * list a mirror that holds {archive.filename}: --set "
        f"'download.mirrors.{dataset}=[\"https://host/folder/\"]' (or in params.yaml), where an "
        "entry may also be a local folder (file:///path/to/folder/ or /path/to/folder)."
    )


def main(args: argparse.Namespace) -> int:
    from iicrepro.cli import settings_from_args
    from iicrepro.data import sources

    settings = settings_from_args(args)
    opts = settings["download"]
    folder = layout.downloads(settings, args.dataset)
    summary = []
    for archive in sources.archives(settings, args.dataset):
        if args.only and archive.role != args.only:
            continue
        dest = folder / archive.filename
        local = dest.is_file() and check_local(
            dest, sha256=archive.sha256, size=archive.size, approx_size=archive.approx_size
        )
        source = "kept (already here, verified; no network used)"
        failures = []
        for url in [] if local else archive.urls():
            official = url == archive.url
            try:
                download(
                    url,
                    dest,
                    sha256=archive.sha256,
                    size=archive.size,
                    approx_size=archive.approx_size if official else None,
                    retries=opts["retries"],
                    backoff_s=opts["backoff_s"],
                    timeout_s=opts["timeout_s"],
                    chunk_bytes=opts["chunk_bytes"],
                    progress=not args.no_progress,
                    verify_tls=opts["verify_tls"],
                )
                source = f"from {url}"
                break
            except OutOfSpace:  # no other source can help: one error, not a list of sources
                raise
            except UserError as exc:
                failures.append(f"  {url}:\n    {exc}")
                if url != archive.urls()[-1]:
                    print(f"fetch: {archive.filename} from {url} failed; trying the next source")
        else:
            if not local:
                raise _unreachable(args.dataset, archive, dest, failures)
        digest = recorded_sha256(dest) or "?"
        summary.append(
            f"  {archive.role:6s} {dest}  {human(dest.stat().st_size)}  sha256 {digest[:16]}"
            + ("" if archive.sha256 else " (recorded on first use)")
            + f", {source}"
        )
    print(f"fetch {args.dataset}: {len(summary)} archive(s) ready\n" + "\n".join(summary))
    return 0
