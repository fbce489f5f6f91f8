"""A gzip layer's inflate checkpoints, in the two binary forms they travel in.

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

Building one (the inflate, which checkpoints to keep, the span digests) is :mod:`.gzpass` and
:mod:`.spans`: the local index of a layer is built the same way.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from ..errors import InvalidLayer, InvalidZtoc

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


def gzidx_points(f) -> list[tuple[int, int, int, int]]:
    """``(compressed, uncompressed, bits, where its window starts in f)`` of each point of an
    indexed_gzip export in the seekable file ``f``; -1 for a point with no window (the stream's
    start, a gzip member boundary: it cannot be a zTOC checkpoint). Windows are not read, so an
    export of thousands of points costs no memory."""
    try:
        f.seek(0)
        ident, version, _, _, _, _, window, n = _GZIDX_HEAD.unpack(f.read(_GZIDX_HEAD.size))
        if ident != b"GZIDX" or version != 1 or window != WINDOW:
            raise ValueError(f"not a GZIDX v1 index with {WINDOW}-byte windows")
        rows = f.read(n * _GZIDX_POINT.size)
        pos = _GZIDX_HEAD.size + len(rows)
        out = []
        for i in range(n):
            cmp, uncmp, bits, has = _GZIDX_POINT.unpack_from(rows, i * _GZIDX_POINT.size)
            out.append((cmp, uncmp, bits, pos if has else -1))
            pos += WINDOW if has else 0
        return out
    except (struct.error, ValueError) as exc:
        raise InvalidLayer(f"indexed_gzip exported an index we cannot read: {exc}") from exc


def gzip_isize(path: str) -> int:
    """The gzip trailer's ISIZE: the uncompressed size mod 4 GiB of the (last) member; 0 if unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(-4, io.SEEK_END)
            return int.from_bytes(f.read(4), "little")
    except OSError:
        return 0
