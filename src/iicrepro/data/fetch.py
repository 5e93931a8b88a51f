"""`iicrepro fetch DATASET`: resumable, verified downloads of a dataset's archives.

A download goes to ``<dest>.part``. An interrupted or truncated transfer is resumed with an HTTP
Range request; a server that ignores Range (answers 200) restarts the file from zero. Connection
errors, 5xx answers and truncated bodies are retried with exponential backoff. Once complete the
file is checked against its known size and sha256 and only then renamed to ``<dest>``, so a file
at ``<dest>`` is always complete and verified.

Checksums: a known sha256 (from the registry) is authoritative. Without one, the sha256 of the first
verified download is recorded in ``<dest>.sha256`` (trust on first use) and later downloads must
match it. A file that fails verification is moved to ``<dest>.corrupt`` (kept for inspection,
replaced by the next failure) and the next run downloads from zero. A finished ``<dest>`` that no
longer matches (changed on disk, or its known checksum changed) is deleted and downloaded again.
"""

from __future__ import annotations

import argparse
import errno
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
from iicrepro.io import sha256_file, write_text

USER_AGENT = f"iicrepro/{__version__} (dataset fetch; urllib)"


class _Retry(Exception):
    """A transient failure: the attempt may succeed when repeated."""


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


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
        raise UserError(
            f"not enough disk space for {what}: {human(needed)} more are needed but only "
            f"{human(free)} are free on the file system of {folder}. Free some space, or point "
            "paths.data in params.yaml (or --set paths.data=...) at a larger disk."
        )


def _no_space(part: Path, exc: OSError) -> UserError:
    return UserError(
        f"the disk filled up while writing {part} ({exc.strerror}). The partial file is kept: "
        "free some space (or move paths.data to a larger disk) and run the command again to resume."
    )


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
                if exc.errno == errno.ENOSPC:
                    raise _no_space(part, exc) from exc
                raise
            written += len(block)
            bar.update(len(block))


def _fetch_file_url(url: str, part: Path, size: int | None, chunk_bytes: int, progress: bool):
    src = Path(unquote(urlparse(url).path))
    if not src.is_file():
        raise UserError(f"{url}: no such file {src}")
    total = src.stat().st_size
    offset = part.stat().st_size if part.exists() else 0
    if offset > total:
        offset = 0
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
    if size is not None and offset > size:
        offset = 0  # longer than the file can be: start again
    if size is not None and offset == size:
        return  # complete already; verification decides
    if size is not None:
        check_space(part.parent, size - offset, part.name)
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s, context=context)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            _, total = _content_range(exc.headers.get("Content-Range"))
            if total == offset:
                return  # the partial file already holds every byte
            part.unlink()  # the partial file does not fit this server's file
            raise _Retry(f"HTTP 416 for a {human(offset)} partial file; restarting") from exc
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Retry(f"HTTP {exc.code} {exc.reason}") from exc
        raise UserError(
            f"HTTP {exc.code} {exc.reason} for {url}: the server refused the file. Check the URL "
            "(the dataset may have moved) or list a mirror under download.mirrors in params.yaml."
        ) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise UserError(
                f"TLS certificate check failed for {url}: {exc.reason.verify_message}. Use a mirror "
                "(download.mirrors in params.yaml) or --set download.verify_tls=false (files are "
                "still checked against their sha256)."
            ) from exc
        raise _Retry(f"cannot connect: {exc.reason}") from exc
    except (http.client.HTTPException, OSError) as exc:
        raise _Retry(f"request failed: {exc!r}") from exc

    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if offset and response.status == 206:
            first, _ = _content_range(response.headers.get("Content-Range"))
            if first != offset:
                response.close()
                part.unlink()
                raise _Retry(f"server resumed at byte {first}, not {offset}; restarting")
        elif offset:
            offset = 0  # the server ignored Range and sends the whole file (200)
        total = offset + length if length is not None else None
        if size is not None and total is not None and total != size:
            raise UserError(
                f"{url} serves {total} bytes but {part.name[:-5]} is known to have {size} bytes: "
                "the server holds a different file. Try a mirror (download.mirrors in params.yaml)."
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


def _verify(dest: Path, part: Path, url: str, size: int | None, expected: str | None) -> str:
    """Check size and sha256 of `part`; move it to <dest>.corrupt on failure."""
    actual_size = part.stat().st_size
    digest = sha256_file(part)
    problem = None
    if size is not None and actual_size != size:
        problem = f"size {actual_size} bytes, expected {size} bytes"
    elif expected is not None and digest != expected.lower():
        problem = "sha256 mismatch"
    if problem is None:
        return digest
    corrupt = _suffixed(dest, ".corrupt")
    os.replace(part, corrupt)
    record = _suffixed(dest, ".sha256")
    raise UserError(
        f"{dest.name} downloaded from {url} failed verification ({problem}).\n"
        f"  expected sha256: {expected or 'unknown'}\n"
        f"  actual sha256:   {digest}\n"
        f"The bad file was moved to {corrupt}. To fix: run the command again to download it anew "
        "(or from a mirror listed under download.mirrors in params.yaml); if the source has "
        "really changed, update the checksum in src/iicrepro/data/sources.py, or delete "
        f"{record} when the expected value was recorded on first download."
    )


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    retries: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 60,
    chunk_bytes: int = 1 << 20,
    progress: bool = True,
    verify_tls: bool = True,
) -> Path:
    """Download `url` (http, https or file) to `dest`, resumably, and verify it.

    `retries` is the number of attempts; the wait after attempt k is ``backoff_s * 2**(k-1)``.
    An existing `dest` that verifies is kept without any transfer.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _suffixed(dest, ".part")
    expected = sha256.lower() if sha256 else recorded_sha256(dest)

    if dest.is_file():
        digest = sha256_file(dest) if size is None or dest.stat().st_size == size else None
        if digest is not None and expected in (None, digest):
            if expected is None:  # a file placed by hand: trust it from now on
                write_text(_suffixed(dest, ".sha256"), f"{digest}  {dest.name}\n")
            return dest
        # Changed on disk since it was verified, or the known checksum changed: fetch it anew.
        dest.unlink()

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
                    f"downloading {url} failed after {retries} attempt(s): {exc}.{kept} Check the "
                    "network and run the command again, or list a mirror under download.mirrors "
                    "in params.yaml."
                ) from exc
            time.sleep(backoff_s * 2 ** (attempt - 1))

    digest = _verify(dest, part, url, size, expected)
    write_text(_suffixed(dest, ".sha256"), f"{digest}  {dest.name}\n")
    os.replace(part, dest)
    return dest


# ---------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=("ucf101", "hmdb51", "synthetic"))
    parser.add_argument("--only", choices=("videos", "splits"), help="fetch one archive only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


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
        before = dest.stat().st_ino if dest.is_file() else None
        failures = []
        for url in archive.urls():
            try:
                download(
                    url,
                    dest,
                    sha256=archive.sha256,
                    size=archive.size,
                    retries=opts["retries"],
                    backoff_s=opts["backoff_s"],
                    timeout_s=opts["timeout_s"],
                    chunk_bytes=opts["chunk_bytes"],
                    progress=not args.no_progress,
                    verify_tls=opts["verify_tls"],
                )
                source = "kept" if before == dest.stat().st_ino else f"from {url}"
                break
            except UserError as exc:
                failures.append(f"  {url}:\n    {exc}")
                if url != archive.url:
                    print(f"fetch: {archive.filename} from {url} failed; trying the next source")
        else:
            raise UserError(
                f"could not fetch {archive.filename} from any source:\n" + "\n".join(failures)
            )
        digest = recorded_sha256(dest) or "?"
        summary.append(
            f"  {archive.role:6s} {dest}  {human(dest.stat().st_size)}  sha256 {digest[:16]}"
            + ("" if archive.sha256 else " (recorded on first download)")
            + f", {source}"
        )
    print(f"fetch {args.dataset}: {len(summary)} archive(s) ready\n" + "\n".join(summary))
    return 0
