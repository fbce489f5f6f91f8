"""zstd:chunked (containers/storage): a tar+zstd blob with each file's data in zstd frames of its own.

The layout::

    [zstd frames: tar headers, file data — a new frame where each file's data starts] …
    [skippable frame: the TOC ("manifest"), zstd-compressed JSON]  (then, in newer writers, tar-split)
    [skippable frame: the footer — LE u64 offset, compressed length, uncompressed length,
     manifest type (1), … and the magic "GNUlInUx" last; 40 bytes (v1) or 64 (with tar-split)]

Skippable frames are ignored by any zstd reader, so the blob unpacks as a plain tar+zstd. The
TOC's rows are eStargz's plus ``endOffset`` (where a file's frames end). The layer descriptor's
``…zstd-chunked.manifest-checksum`` annotation is the sha256 of the *compressed* TOC, and
``…manifest-position`` (``offset:compressed:uncompressed:type``) saves reading the footer.
"""

from __future__ import annotations

import io
import struct

import zstandard

from ..errors import InvalidLayer

MAGIC = b"GNUlInUx"
SKIPPABLE = b"\x50\x2a\x4d\x18"  # 0x184D2A50, little-endian
TAIL = 8 + 64  # enough of the blob's end for either footer
MANIFEST_TYPE = 1  # the TOC is the CRFS/eStargz-style JSON
_PREFIXES = ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked.")  # containers/storage, stargz-snapshotter
MAX_TOC = 1 << 30


def annotation(annotations: dict[str, str], name: str) -> str | None:
    """``manifest-checksum`` or ``manifest-position``, under either project's prefix."""
    for prefix in _PREFIXES:
        if prefix + name in annotations:
            return annotations[prefix + name]
    return None


def position(value: str | None) -> tuple[int, int, int] | None:
    """(offset, compressed length, uncompressed length) of the TOC from the position annotation."""
    try:
        offset, clen, ulen, kind = (int(x) for x in (value or "").split(":"))
    except ValueError:
        return None
    return (offset, clen, ulen) if kind == MANIFEST_TYPE and offset >= 8 and clen > 0 else None


def footer(tail: bytes, blob_size: int) -> tuple[int, int, int] | None:
    """(offset, compressed length, uncompressed length) of the TOC, if ``tail`` ends in the footer."""
    if tail[-8:] != MAGIC:
        return None
    for n in (64, 40):
        frame = tail[-n - 8:]
        if len(frame) == n + 8 and frame[:4] == SKIPPABLE and int.from_bytes(frame[4:8], "little") == n:
            offset, clen, ulen, kind = struct.unpack("<4Q", frame[8:40])
            if kind == MANIFEST_TYPE and 8 <= offset and offset + clen <= blob_size - n - 8:
                return offset, clen, ulen
    return None


def read_toc(compressed: bytes, ulen: int, label: str) -> bytes:
    """The TOC JSON (blocking); its length must be what the footer or annotation said."""
    if ulen > MAX_TOC:
        raise InvalidLayer(f"{label}: the zstd:chunked TOC claims {ulen} bytes")
    try:
        raw = _decompress(compressed, ulen + 1)
    except zstandard.ZstdError as exc:
        raise InvalidLayer(f"{label}: the zstd:chunked TOC does not decompress: {exc}") from exc
    if len(raw) != ulen:
        raise InvalidLayer(f"{label}: the zstd:chunked TOC is {len(raw)} bytes, not {ulen}")
    return raw


def inflate(compressed: bytes, inner: int, size: int) -> bytes:
    """Bytes ``[inner, inner + size)`` of what the zstd frames in ``compressed`` decompress to."""
    return _decompress(compressed, inner + size)[inner:]


def _decompress(compressed: bytes, limit: int) -> bytes:
    """At most ``limit`` bytes of what the frames in ``compressed`` decompress to: never more."""
    parts, got = [], 0
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed), read_across_frames=True) as z:
        while got < limit:
            piece = z.read(limit - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
    return b"".join(parts)
