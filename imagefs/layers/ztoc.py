"""The zTOC: soci-snapshotter's per-layer index of a plain gzip layer, a flatbuffer.

What a zTOC holds (soci's ``ztoc/fbs/ztoc.fbs``; ours is ``tests/support/ztoc.fbs``): the tar's
members as soci's toc builder writes them (the raw tar name, ``reg``/``dir``/``symlink``/
``hardlink``/``char``/``block``/``fifo``, the offset of the data in the *uncompressed* tar and its
size, mode, owner, an RFC 3339 mtime, devices, every PAX record) and the compression info: the
inflate checkpoints (:mod:`.zinfo`'s blob) and a sha256 per compressed span.

A zTOC comes from the registry and may be wrong or hostile. :func:`decode` reads it through the
flatbuffers runtime's ``Table`` but checks every offset against the buffer first (the runtime
slices strings and vectors without looking), every count against what the buffer could hold, and
every value against the archive it describes. Anything amiss is one :class:`InvalidZtoc` line;
the caller indexes the layer locally instead. :func:`encode` uses the runtime's ``Builder`` and
adds the fields in the order soci's marshaler does; ``flatc`` reads what it writes.
"""

from __future__ import annotations

import re
import struct
import tarfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .. import __version__
from ..errors import InvalidLayer, InvalidZtoc
from . import tarindex, zinfo
from .entries import Entry
from .zinfo import Checkpoint

__all__ = ["Checkpoint", "Member", "Ztoc", "decode", "encode", "index_spans", "member_of", "span_range",
           "to_entries", "to_gzidx"]

VERSION = "0.9"  # soci's ztoc.Version09: the only version it writes
BUILD_TOOL = f"imagefs {__version__}"  # soci writes "AWS SOCI CLI v0.2"; nothing reads it
GZIP = 1  # CompressionAlgorithm.Gzip, the schema's default
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

#: tar type flags as the zTOC names them (soci's getType), and back
TYPES = {tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.CONTTYPE: "reg", tarfile.DIRTYPE: "dir",
         tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block",
         tarfile.FIFOTYPE: "fifo"}
FLAGS = {"reg": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
         "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}


@dataclass(frozen=True)
class Member:
    """One TOC row, as written (``name`` is the raw tar name: :func:`to_entries` normalises it)."""

    name: str
    type: str
    offset: int  # of the data in the uncompressed tar (past the member's headers)
    size: int
    linkname: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mod_time: str = ""  # RFC 3339, ns precision (Go's time.MarshalText)
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, str], ...] = ()  # the member's raw PAX records, sorted (the schema's name)


@dataclass(frozen=True)
class Ztoc:
    compressed_size: int  # the blob's size
    uncompressed_size: int  # the tar's
    members: tuple[Member, ...]
    span_digests: tuple[str, ...]  # "sha256:<hex>" of span_range(z, i) of the blob
    checkpoints: tuple[Checkpoint, ...]  # one per span; checkpoint 0 just past the gzip header
    span_size: int  # as the checkpoints blob records it
    version: str = VERSION
    build_tool: str = BUILD_TOOL


def span_range(z: Ztoc, i: int) -> tuple[int, int]:
    """Span ``i``'s compressed bytes ``[start, end)``: from its checkpoint (a byte early when it
    starts inside one) to the next checkpoint's ``in`` (the blob's end for the last), as soci hashes
    them. Spans overlap by the byte a checkpoint starts inside."""
    c = z.checkpoints[i]
    start = c.compressed - 1 if c.bits else c.compressed
    end = z.checkpoints[i + 1].compressed if i + 1 < len(z.checkpoints) else z.compressed_size
    return start, end


def index_spans(z: Ztoc) -> list[tuple[int, str, int]]:
    """The spans as a :class:`.entries.LayerIndex` holds them: ``(start, sha256 hex, end)``, led by
    the gzip header (no digest: :class:`.zran.SpanFile` checks its shape) when checkpoint 0 is past it."""
    out: list[tuple[int, str, int]] = []
    first = span_range(z, 0)[0] if z.span_digests else 0
    if first > 0:
        out.append((0, "", first))
    for i, digest in enumerate(z.span_digests):
        start, end = span_range(z, i)
        out.append((start, digest.partition(":")[2], end))
    return out


# -- reading ----------------------------------------------------------------------------------------


class _Table:
    """What :class:`flatbuffers.table.Table` does, read with :mod:`struct` directly: the runtime's
    ``Get`` checks and converts on every call, and decoding the bench's 8,154-member zTOC spent 1.2 s
    there, on the path of a first look inside the layer. Positions are checked by :class:`_View`."""

    __slots__ = ("Bytes", "Pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self.Bytes, self.Pos = data, pos

    def Offset(self, slot: int) -> int:
        vtable = self.Pos - _I32.unpack_from(self.Bytes, self.Pos)[0]
        return _U16.unpack_from(self.Bytes, vtable + slot)[0] if slot < _U16.unpack_from(self.Bytes, vtable)[0] else 0

    def Get(self, flags: struct.Struct, off: int):
        return flags.unpack_from(self.Bytes, off)[0]

    def Indirect(self, off: int) -> int:
        return off + _U32.unpack_from(self.Bytes, off)[0]


_U16, _I32, _U32 = struct.Struct("<H"), struct.Struct("<i"), struct.Struct("<I")


class N:  # noqa: N801 - the runtime's number_types names; the runtime itself is imported only to encode
    # (it pulls numpy in: ~90 ms and BLAS threads in every mount)
    Int8Flags, Int32Flags, Int64Flags, Uint32Flags = (struct.Struct("<" + f) for f in "biqI")
    SOffsetTFlags, UOffsetTFlags, VOffsetTFlags = _I32, _U32, _U16


class _View:
    """One table of the buffer, read like the runtime's ``Table`` once each position is checked."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.t = _Table(data, self._at(pos, 4))
        vtable = self._at(pos - self.t.Get(N.SOffsetTFlags, pos), 4)
        if self.t.Get(N.VOffsetTFlags, vtable) % 2:
            raise InvalidZtoc(f"the table at {pos} has a bad vtable")
        self._at(vtable, self.t.Get(N.VOffsetTFlags, vtable))

    def _at(self, pos: int, width: int) -> int:
        if pos < 0 or pos + width > len(self.data):
            raise InvalidZtoc(f"offset {pos} is outside the {len(self.data)}-byte flatbuffer")
        return pos

    def scalar(self, slot: int, flags, default=0):
        o = self.t.Offset(4 + 2 * slot)
        return self.t.Get(flags, self._at(self.t.Pos + o, flags.size)) if o else default

    def _ref(self, slot: int) -> int | None:
        o = self.t.Offset(4 + 2 * slot)
        return self.t.Indirect(self._at(self.t.Pos + o, 4)) if o else None

    def _vector(self, at: int, width: int) -> tuple[int, int]:
        n = self.t.Get(N.UOffsetTFlags, self._at(at, 4))
        self._at(at + 4, n * width)
        return at + 4, n

    def blob(self, slot: int) -> bytes:
        at = self._ref(slot)
        if at is None:
            return b""
        start, n = self._vector(at, 1)
        return self.data[start:start + n]

    def _text(self, at: int) -> str:
        start, n = self._vector(at, 1)
        if self.data[start + n:start + n + 1] != b"\0":  # as flatbuffers' verifier asks
            raise InvalidZtoc(f"the string at {at} is not terminated")
        return self.data[start:start + n].decode("utf-8", "surrogateescape")  # Go strings are bytes: keep them

    def string(self, slot: int) -> str:
        at = self._ref(slot)
        return "" if at is None else self._text(at)

    def table(self, slot: int) -> _View | None:
        at = self._ref(slot)
        return None if at is None else _View(self.data, at)

    def _elements(self, slot: int) -> list[int]:
        at = self._ref(slot)
        if at is None:
            return []
        start, n = self._vector(at, 4)
        return [self.t.Indirect(start + 4 * j) for j in range(n)]

    def tables(self, slot: int) -> list[_View]:
        return [_View(self.data, p) for p in self._elements(slot)]

    def strings(self, slot: int) -> list[str]:
        return [self._text(p) for p in self._elements(slot)]


def _member(t: _View) -> Member:
    xattrs = tuple((x.string(0), x.string(1)) for x in t.tables(13))
    return Member(t.string(0), t.string(1), t.scalar(2, N.Int64Flags), t.scalar(3, N.Int64Flags), t.string(4),
                  t.scalar(5, N.Int64Flags), t.scalar(6, N.Uint32Flags), t.scalar(7, N.Uint32Flags), t.string(8),
                  t.string(9), t.string(10), t.scalar(11, N.Int64Flags), t.scalar(12, N.Int64Flags), xattrs)


def decode(data: bytes, label: str) -> Ztoc:
    """A zTOC from its bytes, every offset, count and value checked; :class:`InvalidZtoc` otherwise."""
    data = bytes(data)
    try:
        if len(data) < 8:
            raise InvalidZtoc(f"{len(data)} bytes are no flatbuffer")
        root = _View(data, struct.unpack_from("<I", data)[0])
        toc, info = root.table(4), root.table(5)
        if toc is None or info is None:
            raise InvalidZtoc("it has no TOC or no compression info")
        members = tuple(_member(t) for t in toc.tables(0))
        algorithm = info.scalar(0, N.Int8Flags, GZIP)
        max_span = info.scalar(1, N.Int32Flags)
        digests = tuple(info.strings(2))
        blob = info.blob(3)
        sizes = root.scalar(2, N.Int64Flags), root.scalar(3, N.Int64Flags)
        version, tool = root.string(0), root.string(1)
    except InvalidZtoc as exc:
        raise InvalidZtoc(f"{label}: zTOC: {exc}") from None
    except Exception as exc:  # whatever the runtime raises on garbage
        raise InvalidZtoc(f"{label}: zTOC is not a valid flatbuffer ({type(exc).__name__}: {exc})") from None
    try:
        if algorithm != GZIP:
            raise InvalidZtoc(f"compression algorithm {algorithm} is not gzip")
        points, span_size = zinfo.unpack(blob)
        z = Ztoc(*sizes, members, digests, tuple(points), span_size, version, tool)
        _check(z, max_span)
    except InvalidZtoc as exc:
        raise InvalidZtoc(f"{label}: zTOC: {exc}") from None
    return z


def _check(z: Ztoc, max_span: int) -> None:
    if not (len(z.span_digests) == len(z.checkpoints) == max_span + 1):
        raise InvalidZtoc(f"{len(z.span_digests)} span digests, {len(z.checkpoints)} checkpoints and max_span_id "
                          f"{max_span} disagree")
    if z.compressed_size <= 0 or z.uncompressed_size < 0:
        raise InvalidZtoc(f"archive sizes {z.compressed_size} (compressed) and {z.uncompressed_size} are impossible")
    for d in z.span_digests:
        if not _DIGEST.fullmatch(d):
            raise InvalidZtoc(f"span digest {d[:80]!r} is not sha256:<64 hex>")
    last_in = last_out = -1
    for i, c in enumerate(z.checkpoints):
        where = f"checkpoint {i} (in {c.compressed}, out {c.uncompressed}, bits {c.bits})"
        if c.bits > 7:
            raise InvalidZtoc(f"{where}: bits is over 7")
        if len(c.window) != zinfo.WINDOW:
            raise InvalidZtoc(f"{where}: its window is {len(c.window)} bytes, not {zinfo.WINDOW}")
        if c.compressed <= last_in or c.uncompressed < last_out or (i and c.uncompressed == last_out):
            raise InvalidZtoc(f"{where} does not follow the one before")
        if c.compressed >= z.compressed_size or c.uncompressed > z.uncompressed_size:
            raise InvalidZtoc(f"{where} is past the end of the archive")
        if c.compressed - (c.bits > 0) < 0:
            raise InvalidZtoc(f"{where} starts before the blob")
        last_in, last_out = c.compressed, c.uncompressed
    for m in z.members:
        if m.type not in FLAGS:
            raise InvalidZtoc(f"member {m.name[:200]!r} has type {m.type[:20]!r}")
        if m.offset < 0 or m.size < 0 or m.offset + m.size > z.uncompressed_size:
            raise InvalidZtoc(f"member {m.name[:200]!r}: bytes {m.offset}+{m.size} are outside the "
                              f"{z.uncompressed_size}-byte tar")


# -- into the mount's rows ---------------------------------------------------------------------------


def to_entries(z: Ztoc, label: str) -> tuple[list[Entry], int]:
    """The members as :class:`Entry` rows through :mod:`.tarindex`'s member rules (``./``
    normalised, escapes refused, hard links resolved, the last duplicate winning, PAX
    ``SCHILY.xattr.*`` as xattrs), in tar order: (rows, members skipped)."""
    scan = tarindex.Members(label)
    for m in sorted(z.members, key=lambda m: m.offset):  # soci sorts by offset when it reads, too
        path = tarindex.normalise(m.name)
        if path is None:
            scan.skip(m.name, "the name escapes the layer")
            continue
        if path == "" and m.type != "dir":
            scan.skip(m.name, "the layer's root must be a directory")
            continue
        info = tarfile.TarInfo(m.name)
        info.type = FLAGS[m.type]
        info.size = m.size if m.type == "reg" else 0
        info.offset_data = m.offset
        info.mode, info.uid, info.gid = m.mode & 0o7777, m.uid, m.gid
        info.uname, info.gname, info.linkname = m.uname, m.gname, m.linkname
        info.devmajor, info.devminor = m.devmajor, m.devminor
        info.pax_headers = {k: v for k, v in m.xattrs if k.startswith(tarindex.XATTR_PREFIX)}
        info.mtime = tarindex.rfc3339(m.mod_time)  # exact: a PAX mtime record would not outrank it
        entry = tarindex.entry_of(info, path, scan)
        if entry is not None:
            scan.put(entry)
    return list(scan.entries.values()), scan.skipped


# -- writing ----------------------------------------------------------------------------------------


def rfc3339_ns(ns: int) -> str:
    """Integer ns since the epoch as Go's ``time.MarshalText`` writes UTC (trailing zeros dropped);
    "" outside years 0–9999, where Go refuses."""
    seconds, frac = divmod(ns, 10**9)
    try:
        t = _EPOCH + timedelta(seconds=seconds)
    except OverflowError:
        return ""
    text = f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    return text + (f".{frac:09d}".rstrip("0") if frac else "") + "Z"


def member_of(info: tarfile.TarInfo) -> Member:
    """A tar member as soci's toc builder records it (all PAX records kept, sorted)."""
    kind = TYPES.get(info.type)
    if kind is None or info.sparse is not None:
        raise InvalidLayer(f"member {info.name!r} has type {info.type!r}, which a zTOC cannot describe")
    xattrs = tuple(sorted(info.pax_headers.items())) if info.pax_headers else ()
    return Member(info.name, kind, info.offset_data, info.size, info.linkname, info.mode, info.uid, info.gid,
                  info.uname, info.gname, rfc3339_ns(tarindex.mtime_ns(info)), info.devmajor, info.devminor, xattrs)


def encode(z: Ztoc) -> bytes:
    """The zTOC in soci-snapshotter's schema, built in the order its marshaler builds it."""
    import flatbuffers

    b = flatbuffers.Builder(1 << 16)

    def text(value: str) -> int:
        return b.CreateString(value.encode("utf-8", "surrogateescape"))

    def vector(offsets: list[int]) -> int:
        b.StartVector(4, len(offsets), 4)
        for o in reversed(offsets):
            b.PrependUOffsetTRelative(o)
        return b.EndVector()

    version, tool = text(z.version), text(z.build_tool)
    rows = [0] * len(z.members)
    for i in range(len(z.members) - 1, -1, -1):  # as soci does: the last member first
        m = z.members[i]
        name, kind, link, uname, gname, mtime = map(text, (m.name, m.type, m.linkname, m.uname, m.gname, m.mod_time))
        xattrs = []
        for key, value in sorted(m.xattrs):
            k, v = text(key), text(value)
            b.StartObject(2)
            b.PrependUOffsetTRelativeSlot(0, k, 0)
            b.PrependUOffsetTRelativeSlot(1, v, 0)
            xattrs.append(b.EndObject())
        xv = vector(xattrs)
        b.StartObject(14)
        b.PrependUOffsetTRelativeSlot(0, name, 0)
        b.PrependUOffsetTRelativeSlot(1, kind, 0)
        b.PrependInt64Slot(2, m.offset, 0)
        b.PrependInt64Slot(3, m.size, 0)
        b.PrependUOffsetTRelativeSlot(4, link, 0)
        b.PrependInt64Slot(5, m.mode, 0)
        b.PrependUint32Slot(6, m.uid, 0)
        b.PrependUint32Slot(7, m.gid, 0)
        b.PrependUOffsetTRelativeSlot(8, uname, 0)
        b.PrependUOffsetTRelativeSlot(9, gname, 0)
        b.PrependUOffsetTRelativeSlot(10, mtime, 0)
        b.PrependInt64Slot(11, m.devmajor, 0)
        b.PrependInt64Slot(12, m.devminor, 0)
        b.PrependUOffsetTRelativeSlot(13, xv, 0)
        rows[i] = b.EndObject()
    metadata = vector(rows)
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, metadata, 0)
    toc = b.EndObject()

    blob = b.CreateByteVector(zinfo.pack(z.checkpoints, z.span_size))
    digests = vector([text(d) for d in z.span_digests])
    b.StartObject(4)
    b.PrependInt32Slot(1, len(z.checkpoints) - 1, 0)
    b.PrependUOffsetTRelativeSlot(2, digests, 0)
    b.PrependUOffsetTRelativeSlot(3, blob, 0)
    b.PrependInt8Slot(0, GZIP, GZIP)  # the default: not written, as soci does not
    info = b.EndObject()

    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(0, version, 0)
    b.PrependUOffsetTRelativeSlot(1, tool, 0)
    b.PrependUOffsetTRelativeSlot(4, toc, 0)
    b.PrependInt64Slot(2, z.compressed_size, 0)
    b.PrependInt64Slot(3, z.uncompressed_size, 0)
    b.PrependUOffsetTRelativeSlot(5, info, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


def to_gzidx(z: Ztoc) -> bytes:
    """The checkpoints as ``indexed_gzip`` exports an index (zran.c, GZIDX v1), so the gzip read
    path (:class:`.zran.RandomAccess` imports it) inflates from them as from its own."""
    return zinfo.gzidx(z.checkpoints, z.compressed_size, z.uncompressed_size, z.span_size)
