"""A RAR 4 writer for the "stored" method (no compression), in pure Python.

RAR compression is proprietary, but a stored RAR 4 archive is a plain container that `unar` (and
every RAR reader) extracts. The rehearsal's stand-ins for UCF101.rar and HMDB51's RAR of RARs are
written with it, so they have the official archives' format; tests use it for hostile archives.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# Archive entries shared by the writers


@dataclass
class Entry:
    """One archive member: a file (`data`), a directory, or a symlink to `link`."""

    name: str
    data: bytes = b""
    kind: str = "file"  # file | dir | symlink
    link: str = ""
    claimed_size: int | None = None  # RAR 4 only: unpacked size to write in the header


def as_entries(items: Iterable[Entry] | dict[str, bytes]) -> list[Entry]:
    if isinstance(items, dict):
        return [Entry(name, data) for name, data in items.items()]
    return list(items)


def _dos_time(t: float) -> int:
    lt = time.localtime(t)
    date = ((lt.tm_year - 1980) << 9) | (lt.tm_mon << 5) | lt.tm_mday
    return (date << 16) | (lt.tm_hour << 11) | (lt.tm_min << 5) | (lt.tm_sec // 2)


# --------------------------------------------------------------------------------------------------
# RAR 4 ("RAR 1.5-4.x" format), stored method
#
# Every block starts with a 7-byte base header, little-endian:
#   HEAD_CRC u16   low 16 bits of CRC32 over the header bytes from HEAD_TYPE to the header's end
#   HEAD_TYPE u8   0x72 marker, 0x73 archive header, 0x74 file header, 0x7B end of archive
#   HEAD_FLAGS u16 0x8000 = ADD_SIZE follows (a data area comes after the header)
#   HEAD_SIZE u16  size of the whole header, base header included
# The marker block is the fixed signature ``Rar!\x1a\x07\x00`` (a block whose "CRC" is 0x6152).
# Archive header: base header + RESERVED1 u16 + RESERVED2 u32 (13 bytes, flags 0: not solid,
# not a volume, no comment, no encryption).
# File header: base header (flags 0x8000, plus 0x00E0 for a directory) then
#   PACK_SIZE u32, UNP_SIZE u32, HOST_OS u8 (3 = Unix), FILE_CRC u32 (CRC32 of the data),
#   FTIME u32 (MS-DOS date/time), UNP_VER u8 (20 = 2.0), METHOD u8 (0x30 = stored),
#   NAME_SIZE u16, ATTR u32 (Unix st_mode for host 3), [HIGH_PACK_SIZE u32, HIGH_UNP_SIZE u32
#   when flag 0x0100 marks sizes over 4 GiB], FILE_NAME (bytes, '\\' separators, as RAR 4
#   writes on every host),
# followed by PACK_SIZE bytes of data. A Unix symlink is a file whose mode is S_IFLNK and whose
# data is the link target.
# End of archive: a base header of type 0x7B with flags 0x4000, size 7.

RAR4_SIGNATURE = b"Rar!\x1a\x07\x00"


def _rar4_block(head_type: int, flags: int, body: bytes) -> bytes:
    rest = struct.pack("<BHH", head_type, flags, 7 + len(body)) + body
    return struct.pack("<H", zlib.crc32(rest) & 0xFFFF) + rest


def rar4_bytes(items: Iterable[Entry] | dict[str, bytes], mtime: float = 1.6e9) -> bytes:
    out = [RAR4_SIGNATURE, _rar4_block(0x73, 0, struct.pack("<HI", 0, 0))]
    for e in as_entries(items):
        if e.kind == "dir":
            data, mode, flags = b"", 0o40755, 0x8000 | 0x00E0
        elif e.kind == "symlink":
            data, mode, flags = e.link.encode(), 0o120777, 0x8000
        else:
            data, mode, flags = e.data, 0o100644, 0x8000
        name = e.name.replace("/", "\\").encode()
        unp = len(data) if e.claimed_size is None else e.claimed_size
        if unp > 0xFFFFFFFF:
            flags |= 0x0100
        header = struct.pack(
            "<IIBIIBBHI",
            len(data),
            unp & 0xFFFFFFFF,
            3,
            zlib.crc32(data),
            _dos_time(mtime),
            20,
            0x30,
            len(name),
            mode,
        )
        if flags & 0x0100:
            header += struct.pack("<II", 0, unp >> 32)
        out += [_rar4_block(0x74, flags, header + name), data]
    out.append(_rar4_block(0x7B, 0x4000, b""))
    return b"".join(out)


def write_rar4(path: Path, items: Iterable[Entry] | dict[str, bytes]) -> Path:
    path.write_bytes(rar4_bytes(items))
    return path
