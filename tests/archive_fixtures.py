"""Test helpers for downloads and archives.

* `FileServer`: a loopback HTTP server (127.0.0.1, random port, own thread) that serves files from
  a folder with an ETag (from the bytes) and a Last-Modified date, honours ``Range: bytes=N-``
  (206 / 416) and ``If-Range`` (200 with the whole file when the validator no longer matches), and
  injects faults on request: drop the connection part-way through a body, change the file after
  such a drop, answer 500, ignore Range or If-Range, send no validators, or serve other bytes.
* `write_rar4` (from iicrepro.data.rar): a RAR 4 writer for the "stored" method (no compression),
  so tests can feed real RAR archives to the real `unar` without a RAR compressor.
* `write_rar5`: the same for the RAR 5 format, for the `bsdtar` path.
* `write_zip`, `write_tar`: small builders that also allow hostile member names.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.server
import io
import struct
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from iicrepro.data.rar import Entry, as_entries, rar4_bytes, write_rar4  # noqa: F401 (re-exported)

# --------------------------------------------------------------------------------------------------
# HTTP server with Range support and fault injection


@dataclass
class Faults:
    """What the server does wrong; each counter is consumed by one request."""

    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before a drop
    status_once: dict[str, list[int]] = field(default_factory=dict)  # path -> statuses to answer
    ignore_range: set[str] = field(default_factory=set)  # answer 200 with the whole body
    ignore_if_range: set[str] = field(default_factory=set)  # honour Range even if changed
    replace_body: dict[str, bytes] = field(default_factory=dict)  # serve these bytes instead
    change_after_drop: dict[str, bytes] = field(default_factory=dict)  # new bytes once dropped
    no_validators: set[str] = field(default_factory=set)  # send neither ETag nor Last-Modified
    no_etag: set[str] = field(default_factory=set)  # send Last-Modified only
    modified: dict[str, int] = field(default_factory=dict)  # path -> Last-Modified (epoch s)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def _body(self) -> bytes | None:
        path = self.path.split("?", 1)[0]
        faults = self.server.faults
        if path in faults.replace_body:
            return faults.replace_body[path]
        f = self.server.root / path.lstrip("/")
        return f.read_bytes() if f.is_file() and ".." not in path else None

    def _validators(self, path: str, body: bytes) -> dict[str, str]:
        faults = self.server.faults
        if path in faults.no_validators:
            return {}
        when = faults.modified.get(path, 1_600_000_000)
        out = {"Last-Modified": email.utils.formatdate(when, usegmt=True)}
        if path not in faults.no_etag:
            out["ETag"] = '"' + hashlib.sha1(body).hexdigest() + '"'
        return out

    def do_GET(self):  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        faults = self.server.faults
        self.server.requests.append((path, self.headers.get("Range")))
        self.server.if_range.append(self.headers.get("If-Range"))
        statuses = faults.status_once.get(path)
        if statuses:
            self.send_error(statuses.pop(0))
            return
        body = self._body()
        if body is None:
            self.send_error(404)
            return
        validators = self._validators(path, body)
        start = 0
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        unchanged = (
            if_range is None or path in faults.ignore_if_range or if_range in validators.values()
        )
        if rng and unchanged and path not in faults.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        for key, value in validators.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        payload = body[start:]
        drop = faults.drop_after.pop(path, None)
        if drop is not None:
            self.wfile.write(payload[:drop])
            self.wfile.flush()
            self.close_connection = True
            if path in faults.change_after_drop:
                faults.replace_body[path] = faults.change_after_drop.pop(path)
                faults.modified[path] = faults.modified.get(path, 1_600_000_000) + 60
            return
        self.wfile.write(payload)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.faults = Faults()
        self.requests: list[tuple[str, str | None]] = []
        self.if_range: list[str | None] = []


class FileServer:
    """``with FileServer(folder) as srv: srv.url("name")``; `srv.faults` and `srv.requests`."""

    def __init__(self, root: Path):
        self._server = _Server(Path(root))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def faults(self) -> Faults:
        return self._server.faults

    @property
    def requests(self) -> list[tuple[str, str | None]]:
        """(path, Range header or None) per GET, in order."""
        return self._server.requests

    @property
    def if_range(self) -> list[str | None]:
        """The If-Range header (or None) per GET, in order."""
        return self._server.if_range

    def url(self, name: str) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------------------------------
# Archive entries and the RAR 4 writer live in the package (the rehearsal's stand-in archives use
# them too); re-exported here for the tests.


# --------------------------------------------------------------------------------------------------
# RAR 5, stored method
#
# Signature ``Rar!\x1a\x07\x01\x00``. Every header: CRC32 u32 (over the bytes from the size field
# on), HEADER_SIZE vint (bytes from the type field to the header's end), HEADER_TYPE vint
# (1 main, 2 file, 5 end of archive), HEADER_FLAGS vint (0x0002 = a data area follows, with its
# size as a vint after the flags), then the type's fields. vint = 7 bits per byte, low bits
# first, high bit = more bytes follow.
# File header fields: FILE_FLAGS vint (0x0001 directory, 0x0004 data CRC32 present),
# UNPACKED_SIZE vint, ATTRIBUTES vint (Unix mode), [DATA_CRC32 u32], COMPRESSION vint
# (0 = version 0, stored), HOST_OS vint (1 = Unix), NAME_LENGTH vint, NAME (UTF-8, '/').
# A symlink has header flag 0x0001 (an extra area follows, its size as a vint before the data
# size) and an extra record: SIZE vint, TYPE vint (5 = file system redirection), REDIRECTION_TYPE
# vint (1 = Unix symlink), FLAGS vint, NAME_LENGTH vint, target NAME; it has no data.


def _vint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _rar5_block(
    head_type: int, flags: int, fields: bytes, data_size: int | None = None, extra: bytes = b""
) -> bytes:
    body = _vint(head_type) + _vint(flags | (0x0001 if extra else 0))
    if extra:
        body += _vint(len(extra))
    if data_size is not None:
        body += _vint(data_size)
    body += fields + extra
    sized = _vint(len(body)) + body
    return struct.pack("<I", zlib.crc32(sized)) + sized


def rar5_bytes(items: Iterable[Entry] | dict[str, bytes]) -> bytes:
    out = [b"Rar!\x1a\x07\x01\x00", _rar5_block(1, 0, _vint(0))]
    for e in as_entries(items):
        is_dir = e.kind == "dir"
        data = b"" if is_dir or e.kind == "symlink" else e.data
        mode = {"dir": 0o40755, "symlink": 0o120777}.get(e.kind, 0o100644)
        name = e.name.encode()
        fields = (
            _vint(0x0001 if is_dir else 0x0004)
            + _vint(len(data))
            + _vint(mode)
            + (b"" if is_dir else struct.pack("<I", zlib.crc32(data)))
            + _vint(0)
            + _vint(1)
            + _vint(len(name))
            + name
        )
        extra = b""
        if e.kind == "symlink":
            record = _vint(5) + _vint(1) + _vint(0) + _vint(len(e.link)) + e.link.encode()
            extra = _vint(len(record)) + record
        out += [_rar5_block(2, 0x0002, fields, len(data), extra), data]
    out.append(_rar5_block(5, 0, _vint(0)))
    return b"".join(out)


def write_rar5(path: Path, items: Iterable[Entry] | dict[str, bytes]) -> Path:
    path.write_bytes(rar5_bytes(items))
    return path


# --------------------------------------------------------------------------------------------------
# zip and tar builders that accept any member name


def write_zip(path: Path, items: Iterable[Entry] | dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for e in as_entries(items):
            info = zipfile.ZipInfo(e.name + ("/" if e.kind == "dir" else ""))
            if e.kind == "symlink":
                info.external_attr = 0o120777 << 16
                zf.writestr(info, e.link)
            else:
                info.external_attr = (0o40755 if e.kind == "dir" else 0o100644) << 16
                zf.writestr(info, e.data)
    return path


def write_tar(path: Path, items: Iterable[Entry] | dict[str, bytes], mode: str = "w") -> Path:
    """`mode` "w" for plain tar, "w:gz" for tar.gz. `kind` may also be "hardlink"."""
    with tarfile.open(path, mode) as tf:
        for e in as_entries(items):
            info = tarfile.TarInfo(e.name)
            info.mtime = 1_600_000_000
            if e.kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            elif e.kind in ("symlink", "hardlink"):
                info.type = tarfile.SYMTYPE if e.kind == "symlink" else tarfile.LNKTYPE
                info.linkname = e.link
                tf.addfile(info)
            else:
                info.size = len(e.data)
                tf.addfile(info, io.BytesIO(e.data))
    return path
