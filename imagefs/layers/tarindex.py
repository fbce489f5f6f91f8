"""One streaming pass over a layer's uncompressed tar: its members, as :class:`Entry`.

Python's :mod:`tarfile` in stream mode (``r|``) does the format work — PAX headers (long names,
``SCHILY.xattr.*``), GNU long names and links, old ustar — and tells where each member's data
starts (a gzip pass hands it the inflated chunks through :class:`Forward`, and
:class:`QuickTarInfo` parses the usual header faster, exactly as tarfile does). What this module
adds is the layer semantics:

- names are normalised as a container runtime sees them: ``./etc/x`` and ``etc/x/`` are ``etc/x``;
- a name that would escape the layer (a ``..`` component, an absolute path) is refused with a
  warning, and so is a hard link whose target would: the rest of the layer works;
- a hard link to a path not in the layer is kept as :data:`HARDLINK`: ``rootfs/`` resolves it
  against the layers below, as extraction onto them does (docker, umoci); ``fs/`` cannot show it;
- a member appearing twice: the last wins (what extraction in tar order leaves on disk);
- a member under a path held by a non-directory turns that path into a directory, as extraction
  would have to;
- mtimes are integer nanoseconds, exactly as written: tarfile turns a PAX ``mtime`` record into a
  float, which is a few hundred ns off at today's dates, so the record itself is parsed.

Memory stays flat: ``TarFile.members`` is cleared as we go, so 500,000 members cost only their
:class:`Entry` rows.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import tarfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import IO, Callable

from ..errors import InvalidLayer
from .entries import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, NO_XATTRS, SYMLINK, Entry, Interner

log = logging.getLogger(__name__)

_KINDS = {
    tarfile.REGTYPE: FILE, tarfile.AREGTYPE: FILE, tarfile.CONTTYPE: FILE, tarfile.GNUTYPE_SPARSE: FILE,
    tarfile.DIRTYPE: DIR, tarfile.SYMTYPE: SYMLINK, tarfile.CHRTYPE: CHAR, tarfile.BLKTYPE: BLOCK, tarfile.FIFOTYPE: FIFO,
}
XATTR_PREFIX = "SCHILY.xattr."
PROGRESS_EVERY = 5.0  # seconds between progress lines in the log


NS = 10**9
#: Seconds held exactly: a TOC's RFC 3339 time as :func:`rfc3339` parses it, in ``TarInfo.mtime``.
Seconds = Decimal
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\d)[Tt ](\d\d:\d\d:\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)?")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def seconds_ns(value) -> int | None:
    """Seconds (an int, a float, a :data:`Seconds`, or a PAX decimal string) as integer ns, or
    None if it is no number. Digits past the ninth are dropped, as Go's archive/tar does."""
    if isinstance(value, int):
        return value * NS
    try:
        exact = Decimal(value.strip() if isinstance(value, str) else value)
        return int((exact * NS).to_integral_value(ROUND_FLOOR)) if exact.is_finite() else None
    except (InvalidOperation, ValueError, TypeError):
        return None


def mtime_ns(info: tarfile.TarInfo) -> int:
    """A member's mtime in ns: its PAX record read exactly, else the header's seconds."""
    text = info.pax_headers.get("mtime") if info.pax_headers else None
    found = seconds_ns(text) if text is not None else None
    return found if found is not None else seconds_ns(info.mtime) or 0


def rfc3339(text: str) -> Seconds:
    """An RFC 3339 time (``2024-01-01T00:00:00.123456789Z``, as Go writes a TOC's ``modtime``)
    as exact seconds since the epoch; 0 if it is not one. No zone means UTC."""
    m = _RFC3339.fullmatch(text.strip())
    if m is None:
        return Decimal(0)
    day, clock, fraction, zone = m.groups()
    try:
        whole = datetime.fromisoformat(f"{day}T{clock}{'+00:00' if zone in (None, 'Z', 'z') else zone}")
    except ValueError:
        return Decimal(0)
    seconds = (whole - _EPOCH) // timedelta(seconds=1)
    return Decimal(seconds) + (Decimal("0." + fraction) if fraction else 0)


def normalise(name: str) -> str | None:
    """A member name as a path inside the layer, or None if it would escape it."""
    if name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return "/".join(parts)


@dataclass
class Members:
    """The members seen so far: path -> Entry in order of their last appearance.

    Public, with :func:`entry_of`, so a layer listed from a TOC (:mod:`.toc`) follows exactly the
    tar rules: names, escapes, hard links, duplicates, a member under a non-directory."""

    label: str
    entries: dict[str, Entry] = field(default_factory=dict)
    skipped: int = 0
    serial: int = 0
    modes: Interner = field(default_factory=Interner)  # few distinct values among many members
    mtimes: Interner = field(default_factory=Interner)

    def skip(self, name: str, why: str) -> None:
        self.skipped += 1
        if self.skipped <= 20:
            log.warning("%s: skipping member %r: %s", self.label, name, why)
        elif self.skipped == 21:
            log.warning("%s: more members skipped; not logging each", self.label)

    def put(self, entry: Entry) -> None:
        old = self.entries.pop(entry.path, None)
        if old is not None and old.kind == DIR and entry.kind != DIR:
            self._drop_below(entry.path)
        head = entry.path.rpartition("/")[0]
        while head:  # a member under a non-directory: the path must have become a directory
            parent = self.entries.get(head)
            if parent is not None and parent.kind != DIR:
                self.entries[head] = Entry(head, DIR, 0o755, mtime=parent.mtime)
            head = head.rpartition("/")[0]
        self.entries[entry.path] = entry

    def _drop_below(self, path: str) -> None:
        prefix = path + "/"
        for p in [p for p in self.entries if p.startswith(prefix)]:
            del self.entries[p]


def entry_of(info: tarfile.TarInfo, path: str, scan: Members) -> Entry | None:
    """The entry for one member (None if it is skipped, with a warning), resolving hard links against ``scan``."""
    if info.type == tarfile.LNKTYPE:
        target = normalise(info.linkname)
        if not target:
            scan.skip(info.name, f"hard link to {info.linkname!r}, which escapes the layer")
            return None
        source = scan.entries.get(target)
        if source is None:
            return Entry(path, HARDLINK, 0, target=target)
        if source.kind != FILE:
            scan.skip(info.name, f"hard link to {info.linkname!r}, which is not a file")
            return None
        if source.link < 0:
            source.link = scan.serial
            scan.serial += 1
        # A hard link is its target's inode: its data, mode and owner.
        return Entry(path, FILE, source.mode, source.uid, source.gid, source.mtime, source.size, source.offset,
                     link=source.link, xattrs=source.xattrs)
    kind = _KINDS.get(info.type)
    if kind is None:
        scan.skip(info.name, f"unsupported member type {info.type!r}")
        return None
    xattrs = {
        k[len(XATTR_PREFIX):]: v.encode("utf-8", "surrogateescape")
        for k, v in info.pax_headers.items() if k.startswith(XATTR_PREFIX)
    } if info.pax_headers else NO_XATTRS
    rdev = os.makedev(info.devmajor, info.devminor) if kind in (CHAR, BLOCK) else 0
    size = info.size if kind == FILE else 0
    return Entry(path, kind, scan.modes(info.mode & 0o7777), info.uid, info.gid, scan.mtimes(mtime_ns(info)), size, info.offset_data,
                 info.linkname if kind == SYMLINK else "", rdev=rdev, xattrs=xattrs or NO_XATTRS)


_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8x32s32s8s8s155s")  # ustar, magic and version skipped
_USUAL = re.compile(rb"([0-7]{7})\0([0-7]{7})\0([0-7]{7})\0([0-7]{11})\0([0-7]{11})\0")
_NO_NUMBER = (bytes(8), b"0000000\0")  # a device field of a member that is no device


class QuickTarInfo(tarfile.TarInfo):
    """:class:`tarfile.TarInfo` whose header parse is quicker for the usual header and exactly
    tarfile's: one ``struct`` unpack, the unsigned checksum first. A header it does not take as
    usual (end-of-archive or empty, a checksum only the signed sum matches, base-256 numbers,
    old GNU sparse, anything that does not parse) goes to tarfile's own ``frombuf``, which
    parses it or raises as it always did. Measured on the 8,154-member bench tar (every member
    behind a PAX header): tarfile's parse was most of the scan's 0.5 s."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        if len(buf) != tarfile.BLOCKSIZE or not buf[0] or buf[156:157] == tarfile.GNUTYPE_SPARSE:
            return super().frombuf(buf, encoding, errors)
        (name, mode, uid, gid, size, mtime, chksum, kind, linkname, uname, gname, major, minor,
         prefix) = _HEADER.unpack_from(buf)
        usual = _USUAL.match(buf, 100)  # mode, uid, gid, size, mtime as most tars write them
        try:
            if chksum[0] in (0o200, 0o377) or major[0] in (0o200, 0o377) or minor[0] in (0o200, 0o377):
                return super().frombuf(buf, encoding, errors)
            checked = tarfile.nti(chksum)
            if checked != 256 + sum(buf) - sum(chksum):
                return super().frombuf(buf, encoding, errors)
            if usual is not None:
                numbers = [int(n, 8) for n in usual.groups()]
            else:
                numbers = [mode, uid, gid, size, mtime]
                if any(f[0] in (0o200, 0o377) for f in numbers):
                    return super().frombuf(buf, encoding, errors)
                numbers = [tarfile.nti(f) for f in numbers]
            devices = [0 if f in _NO_NUMBER else tarfile.nti(f) for f in (major, minor)]
        except (ValueError, tarfile.HeaderError):  # nti: InvalidHeaderError; int(): ValueError
            return super().frombuf(buf, encoding, errors)
        obj = cls()
        obj.name = tarfile.nts(name, encoding, errors)
        obj.mode, obj.uid, obj.gid, obj.size, obj.mtime = numbers
        obj.devmajor, obj.devminor = devices
        obj.chksum = checked
        obj.type = kind
        obj.linkname = tarfile.nts(linkname, encoding, errors)
        obj.uname = tarfile.nts(uname, encoding, errors)
        obj.gname = tarfile.nts(gname, encoding, errors)
        prefix = tarfile.nts(prefix, encoding, errors)
        if obj.type == tarfile.AREGTYPE and obj.name.endswith("/"):  # old V7: a directory
            obj.type = tarfile.DIRTYPE
        if obj.isdir():
            obj.name = obj.name.rstrip("/")
        if prefix and obj.type not in tarfile.GNU_TYPES:
            obj.name = prefix + "/" + obj.name
        return obj


class Forward:
    """A tar stream as chunks (the bytes an inflate made), for :func:`scan`: tarfile reads only
    the headers (a copy of 512 bytes each), and skipping a member's data is a forward
    :meth:`seek` that drops chunks without copying them.

    ``tarfile``'s stream mode reads every byte of the data it skips, 10 KiB at a time, through
    its own buffer: on the 574 MiB bench tar that was 0.5 s of the thread that also inflates it,
    the longest thread of a mount's first look. ``scan`` opens a :class:`Forward` in tarfile's
    seekable mode, whose members and errors are the stream mode's: only where the bytes come
    from differs. ``chunk()`` returns the next bytes, ``b""`` at the end."""

    def __init__(self, chunk: Callable[[], bytes]) -> None:
        self._chunk = chunk
        self._buf = b""
        self._at = 0  # in _buf
        self._base = 0  # the stream offset of _buf[0]

    def tell(self) -> int:
        return self._base + self._at

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 62
        out = self._buf[self._at : self._at + size]
        self._at += len(out)
        if len(out) == size:
            return out
        parts = [out]
        left = size - len(out)
        while left and self._next():
            piece = self._buf[:left]
            self._at = len(piece)
            left -= len(piece)
            parts.append(piece)
        return b"".join(parts)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or pos < self.tell():
            raise OSError("a tar stream only seeks forward")
        while pos > self._base + len(self._buf):
            if not self._next():  # past the end: stay there, as a read there would
                self._at = len(self._buf)
                return self.tell()
        self._at = pos - self._base
        return pos

    def _next(self) -> bool:
        self._base += len(self._buf)
        self._buf, self._at = self._chunk(), 0
        return bool(self._buf)


def scan(fileobj: IO[bytes] | Forward, label: str, progress: Callable[[], int] | None = None,
         on_member: Callable[[tarfile.TarInfo], None] | None = None) -> tuple[list[Entry], int, int]:
    """Read the tar from ``fileobj`` once; return (entries, uncompressed size, members skipped).

    ``progress`` returns how many compressed bytes were consumed, for the log line every few seconds.
    ``on_member`` sees every member as read, skipped ones too (the gzip pass records where file
    data lies, and ``copy --soci`` the zTOC's rows, from this same pass).
    """
    s = Members(label)
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:" if isinstance(fileobj, Forward) else "r|", errorlevel=1,
                           tarinfo=QuickTarInfo)
    except tarfile.ReadError as exc:
        raise InvalidLayer(f"{label} is not a tar archive: {exc}") from exc
    last = time.monotonic()
    count = 0
    try:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, EOFError) as exc:  # a truncated or damaged tail: keep what was read
                log.warning("%s: tar ends badly after %d members: %s", label, count, exc)
                break
            if info is None:
                break
            tar.members.clear()  # stream mode keeps every TarInfo otherwise
            count += 1
            if on_member is not None:
                on_member(info)
            path = normalise(info.name)
            if path is None:
                s.skip(info.name, "the name escapes the layer")
                continue
            if path == "" and info.type != tarfile.DIRTYPE:
                s.skip(info.name, "the layer's root must be a directory")
                continue
            entry = entry_of(info, path, s)
            if entry is not None:
                s.put(entry)
            if progress is not None and time.monotonic() - last > PROGRESS_EVERY:
                last = time.monotonic()
                log.info("indexing %s: %d members, %.0f MiB read", label, count, progress() / 2**20)
        tar_size = tar.offset
    finally:
        tar.close()
    return list(s.entries.values()), tar_size, s.skipped
