"""eStargz: a tar+gzip blob whose files start gzip members of their own, with its TOC at the end.

The layout (stargz-snapshotter's ``estargz`` package, which CRFS's stargz grew into)::

    [gzip member: tar headers …][gzip member: a chunk of a file's data …] … 
    [gzip member: a tar holding "stargz.index.json" (the TOC) and the tar's end]
    [51-byte footer: an empty gzip member whose Extra field is SG + "%016xSTARGZ" % toc_offset]

Every chunk starts a member, so inflating from a chunk's ``offset`` needs no earlier byte. The
TOC is the digest that ``containerd.io/snapshot/stargz/toc.digest`` annotates (sha256 of its
JSON). The whole blob is still a valid tar+gzip: a reader that knows none of this unpacks it,
``stargz.index.json`` and the ``.prefetch.landmark``/``.no.prefetch.landmark`` files included —
so they are shown as the tar holds them.
"""

from __future__ import annotations

import io
import tarfile
import zlib

from ..errors import InvalidLayer

FOOTER_SIZE = 51
TOC_NAME = "stargz.index.json"
ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
MAX_TOC = 1 << 30  # uncompressed TOC bytes (a 500,000-file layer's is ~150 MiB)
_HEAD = b"\x1f\x8b\x08\x04"  # gzip magic, deflate, FEXTRA


def toc_offset(footer: bytes, blob_size: int) -> int | None:
    """Where the TOC member starts, if ``footer`` (the last 51 bytes) is an eStargz footer."""
    if len(footer) != FOOTER_SIZE or footer[:4] != _HEAD:
        return None
    if footer[10:16] != b"\x1a\x00SG\x16\x00" or footer[32:38] != b"STARGZ":
        return None
    try:
        offset = int(footer[16:32], 16)
        if zlib.decompress(footer, 31) != b"":  # an empty, well-formed member, or not a footer
            return None
    except (ValueError, zlib.error):
        return None
    return offset if 0 <= offset < blob_size - FOOTER_SIZE else None


def read_toc(member: bytes, label: str) -> tuple[bytes, tarfile.TarInfo]:
    """The TOC JSON from the TOC's gzip member, and its tar header (blocking).

    The header's ``offset_data`` is where the JSON starts in the member's output: the member is
    also the chunk ``stargz.index.json`` is read from.
    """
    try:
        d = zlib.decompressobj(31)
        tar_bytes = d.decompress(member, MAX_TOC + (64 << 10))
        if d.unconsumed_tail:
            raise InvalidLayer(f"{label}: the eStargz TOC is larger than {MAX_TOC} bytes")
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            info = tar.next()
            if info is None or info.name != TOC_NAME or not info.isreg():
                raise InvalidLayer(f"{label}: the eStargz TOC member holds no {TOC_NAME}")
            return tar.extractfile(info).read(), info
    except (zlib.error, tarfile.TarError, EOFError) as exc:
        raise InvalidLayer(f"{label}: the eStargz TOC member is not a gzip'd tar: {exc}") from exc


def inflate(compressed: bytes, inner: int, size: int) -> bytes:
    """Bytes ``[inner, inner + size)`` of what ``compressed`` (whole gzip members) inflates to.

    Never inflates past them, so a hostile member cannot make us hold more than a chunk.
    """
    want, parts, got = inner + size, [], 0
    while compressed and got < want:
        d = zlib.decompressobj(31)
        piece = d.decompress(compressed, want - got)
        parts.append(piece)
        got += len(piece)
        if not d.eof:
            break
        compressed = d.unused_data
    return b"".join(parts)[inner:want]
