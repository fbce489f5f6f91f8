"""A gzip layer's inflate checkpoints, in the two binary forms they travel in, and a zTOC built from a blob.

A *checkpoint* is where inflating can resume: the compressed offset of the first whole byte
(``in``), the uncompressed offset there (``out``), how many bits of the byte before ``in`` still
belong to the next deflate block (``bits``, 0–7) and the 32 KiB of output before ``out`` (the
dictionary a back-reference may reach into).

- SOCI keeps them in the zTOC's ``checkpoints`` blob (soci-snapshotter's ``gzip_zinfo.h``,
  version 2): a 4-byte count, an 8-byte span size, then per checkpoint ``in``, ``out`` (8 bytes
  each), ``bits`` (1 byte) and the window, all little-endian. Checkpoint 0 is included: it sits
  just past the gzip header (``in`` = the header's length, ``out`` = 0, a window of zeros).
- indexed_gzip imports and exports them as ``GZIDX`` (zran.c, file version 1): the same fields
  plus a per-point "has a window" flag, the windows after all the offsets. ``zran.RandomAccess``
  imports one, so a zTOC's checkpoints become a random-access reader without inflating the layer.

:func:`build` makes a zTOC from a committed gzip blob in one inflate: indexed_gzip inflates the
blob sequentially (recording a point at a deflate block boundary every ``span_size // 4``
uncompressed bytes) while :mod:`tarfile` reads the tar from that same stream; its exported points
are then thinned to one every ``span_size`` *compressed* bytes (what a span fetch costs). Upstream's
zinfo builder spaces checkpoints by *uncompressed* bytes instead (``totout - last > span``); the
zTOC format does not record which rule made it, and readers only follow the checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import struct
import tarfile
import zlib
from dataclasses import dataclass

import indexed_gzip

from ..errors import InvalidLayer, InvalidZtoc
from .zran import header_length

WINDOW = 32768
_HEAD = struct.Struct("<iq")  # count, span size
_POINT = struct.Struct("<qqB")  # in, out, bits
_GZIDX_HEAD = struct.Struct("<5sBBQQIII")  # id, version, flags, compressed, uncompressed, spacing, window, points
_GZIDX_POINT = struct.Struct("<QQBB")  # cmp, uncmp, bits, has data
ZERO_WINDOW = bytes(WINDOW)
MAX_SPACING = 0xFFFFFFFF


@dataclass(frozen=True)
class Checkpoint:
    """Resume inflating at blob byte ``compressed`` (less ``bits`` bits of the byte before) = tar byte ``uncompressed``."""

    compressed: int
    uncompressed: int
    bits: int
    window: bytes


def pack(checkpoints: list[Checkpoint] | tuple[Checkpoint, ...], span_size: int) -> bytes:
    """The zTOC ``checkpoints`` blob (gzip_zinfo v2, checkpoint 0 included)."""
    out = [_HEAD.pack(len(checkpoints), span_size)]
    for c in checkpoints:
        if len(c.window) != WINDOW:
            raise ValueError(f"a checkpoint window is {len(c.window)} bytes, not {WINDOW}")
        out += (_POINT.pack(c.compressed, c.uncompressed, c.bits), c.window)
    return b"".join(out)


def unpack(blob: bytes) -> tuple[list[Checkpoint], int]:
    """(checkpoints, span size) from the blob; :class:`InvalidZtoc` unless its length is its count's.

    A v1 blob (from soci before checkpoint 0 was stored: one checkpoint fewer than its count) is
    read as upstream reads it, with checkpoint 0 at byte 10."""
    if len(blob) < _HEAD.size:
        raise InvalidZtoc(f"the checkpoints blob is {len(blob)} bytes, shorter than its header")
    count, span_size = _HEAD.unpack_from(blob)
    each = _POINT.size + WINDOW
    if count < 0 or len(blob) not in (_HEAD.size + count * each, _HEAD.size + (count - 1) * each):
        raise InvalidZtoc(f"the checkpoints blob is {len(blob)} bytes, which does not hold the {count} checkpoints it counts")
    points = [] if len(blob) == _HEAD.size + count * each else [Checkpoint(10, 0, 0, ZERO_WINDOW)]
    view = memoryview(blob)
    for pos in range(_HEAD.size, len(blob), each):
        cin, cout, bits = _POINT.unpack_from(blob, pos)
        points.append(Checkpoint(cin, cout, bits, bytes(view[pos + _POINT.size : pos + each])))
    return points, span_size


def gzidx(points: list[Checkpoint] | tuple[Checkpoint, ...], compressed_size: int, uncompressed_size: int,
          spacing: int) -> bytes:
    """The points as indexed_gzip's ``export_index`` writes them (GZIDX v1), every one with its window.

    A point at the end of both streams closes the list, as indexed_gzip's own index ends: without
    auto-build it refuses to seek past its last point, and this one is never inflated from (it
    is the end of the data)."""
    spacing = min(max(spacing, 2 * WINDOW), MAX_SPACING)  # indexed_gzip refuses one not over the window
    points = [*points, Checkpoint(compressed_size, uncompressed_size, 0, ZERO_WINDOW)]
    head = _GZIDX_HEAD.pack(b"GZIDX", 1, 0, compressed_size, uncompressed_size, spacing, WINDOW, len(points))
    offsets = b"".join(_GZIDX_POINT.pack(p.compressed, p.uncompressed, p.bits, 1) for p in points)
    return b"".join([head, offsets, *(p.window for p in points)])


def parse_gzidx(data: bytes) -> list[Checkpoint]:
    """The points of an indexed_gzip export; a point with no window (the stream's start, a
    gzip member boundary) is left out: it cannot be a zTOC checkpoint."""
    try:
        ident, version, _, _, _, _, window, n = _GZIDX_HEAD.unpack_from(data)
        if ident != b"GZIDX" or version != 1 or window != WINDOW:
            raise ValueError(f"not a GZIDX v1 index with {WINDOW}-byte windows")
        pos = _GZIDX_HEAD.size
        rows = [_GZIDX_POINT.unpack_from(data, pos + i * _GZIDX_POINT.size) for i in range(n)]
        pos += n * _GZIDX_POINT.size
        points = []
        for cmp, uncmp, bits, has in rows:
            if has:
                if pos + WINDOW > len(data):
                    raise ValueError("truncated")
                points.append(Checkpoint(cmp, uncmp, bits, data[pos : pos + WINDOW]))
                pos += WINDOW
        return points
    except (struct.error, ValueError) as exc:
        raise InvalidLayer(f"indexed_gzip exported an index we cannot read: {exc}") from exc


def choose(points: list[Checkpoint], first: Checkpoint, span_size: int) -> list[Checkpoint]:
    """``first`` and then each point at least ``span_size`` compressed bytes past the last chosen."""
    chosen = [first]
    for p in points:
        if p.uncompressed > chosen[-1].uncompressed and p.compressed - chosen[-1].compressed >= span_size:
            chosen.append(p)
    return chosen


def digests(path: str, starts_ends: list[tuple[int, int]]) -> list[str]:
    """``sha256:<hex>`` of each byte range of the file at ``path``."""
    out = []
    with open(path, "rb") as f:
        for start, end in starts_ends:
            f.seek(start)
            h, left = hashlib.sha256(), end - start
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    raise InvalidLayer(f"{path} ends before byte {end}")
                h.update(chunk)
                left -= len(chunk)
            out.append("sha256:" + h.hexdigest())
    return out


def build(path: str, span_size: int, label: str, build_tool: str = ""):
    """The zTOC of the gzip'd tar at ``path`` (committed: whole and verified), in one inflate.

    Memory: indexed_gzip keeps a 32 KiB window for every point it records, one per
    ``span_size // 4`` uncompressed bytes (a 400 MiB tar at the 4 MiB default: ~13 MiB).
    """
    from . import ztoc  # ztoc imports this module for the checkpoint formats

    with open(path, "rb") as f:
        head = f.read(65536)
        f.seek(0, io.SEEK_END)
        size = f.tell()
    first = header_length(head)
    if first < 0:
        raise InvalidLayer(f"{label} does not start with a gzip header")
    spacing = max(2 * WINDOW, span_size // 4)  # indexed_gzip wants it over the window size
    members: list[ztoc.Member] = []
    try:
        gz = indexed_gzip.IndexedGzipFile(path, spacing=spacing, readbuf_size=1 << 20, buffer_size=4 << 20)
    except (indexed_gzip.ZranError, OSError, ValueError) as exc:
        raise InvalidLayer(f"{label} is not gzip: {exc}") from exc
    try:
        try:
            tar = tarfile.open(fileobj=gz, mode="r|", errorlevel=1)
            for info in tar:
                tar.members.clear()  # stream mode keeps every TarInfo otherwise
                members.append(ztoc.member_of(info))
            while gz.read(4 << 20):  # the rest of the stream: its checkpoints and its true length
                pass
            tar_size = gz.tell()
        except (tarfile.TarError, EOFError, indexed_gzip.ZranError, OSError, zlib.error) as exc:
            raise InvalidLayer(f"{label} is not a gzip'd tar we can read: {exc}") from exc
        out = io.BytesIO()
        gz.export_index(fileobj=out)
    finally:
        gz.close()
    inside = [p for p in parse_gzidx(out.getvalue()) if p.compressed < size and p.uncompressed < tar_size]
    points = choose(inside, Checkpoint(first, 0, 0, ZERO_WINDOW), span_size)
    z = ztoc.Ztoc(size, tar_size, tuple(members), (), tuple(points), span_size, build_tool=build_tool or ztoc.BUILD_TOOL)
    ranges = [ztoc.span_range(z, i) for i in range(len(points))]
    return dataclasses.replace(z, span_digests=tuple(digests(path, ranges)))
