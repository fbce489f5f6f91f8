"""Random access into gzip layers, zran-style, with every fetched byte verified.

The index pass (:mod:`.gzpass`) or a zTOC gives inflate checkpoints (the compressed offset, the
bit position and the 32 KiB window), placed by :mod:`.spans`' rule, as an ``indexed_gzip`` export.
Pure-Python zlib cannot resume there: ``Decompress.copy()`` snapshots cannot be saved, and without
``inflatePrime`` a raw stream cannot resume mid-byte; indexed_gzip imports them.

The compressed blob is cut into *spans* at the checkpoints (one byte early: a checkpoint may
start inside a byte), and the index records each span's sha256. A later read — after a remount,
with the blob evicted — fetches only the spans it touches with one Range request each, checks
each against its digest before inflating a byte of it, and keeps the last few in memory.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import threading
import zlib
from collections import OrderedDict
from typing import Callable

import indexed_gzip

from ..errors import DigestMismatch

ZranError = indexed_gzip.ZranError
SPACING = 4 << 20  # what indexed_gzip is told (it only reads imported points here: auto_build is off)
READ_BUFFER = 64 << 10  # what indexed_gzip asks of a span at a time; small, so a read rarely spills into the next span
KEEP_SPANS = 4
#: uncompressed read-ahead per layer. Small: a 73-byte file read with 256 KiB of read-ahead (the
#: old value) inflated on past its end into the next 512 KiB span and fetched it too (bench/soci:
#: 1097 KiB for one file); sequential reads of big files come 128 KiB+ at a time and skip it.
BUFFER = 4 << 10


def header_length(data: bytes) -> int:
    """The length of the gzip member header at the start of ``data`` (RFC 1952), or -1."""
    if len(data) < 10 or data[:3] != b"\x1f\x8b\x08":
        return -1
    flags, pos = data[3], 10
    if flags & 4:  # FEXTRA
        if len(data) < pos + 2:
            return -1
        pos += 2 + int.from_bytes(data[pos:pos + 2], "little")
    for bit in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flags & bit:
            end = data.find(b"\0", pos)
            if end < 0:
                return -1
            pos = end + 1
    if flags & 2:  # FHCRC
        pos += 2
    return pos if pos <= len(data) else -1


def span_ends(spans: list[tuple], size: int) -> list[int]:
    """Where each span ends: as a zTOC says (``(start, sha256, end)``: SOCI's spans overlap by the
    byte a checkpoint starts inside), else where the next begins (a local index's)."""
    return [s[2] if len(s) > 2 else (spans[i + 1][0] if i + 1 < len(spans) else size) for i, s in enumerate(spans)]


class SpanFile(io.RawIOBase):
    """The compressed blob as indexed_gzip reads it: any byte range, served span by span.

    ``fetch(start, end)`` returns those bytes of the blob from wherever they are (the committed
    file, kept pieces, the registry) and whether it already checked them against the span's sha256
    (so a span is hashed once); every span is checked before use, by the fetcher or here.
    """

    def __init__(self, size: int, spans: list[tuple], fetch: Callable[[int, int], tuple[bytes, bool]],
                 label: str) -> None:
        super().__init__()
        self.size, self.label, self._fetch = size, label, fetch
        self.starts = [s[0] for s in spans]
        self.digests = [s[1] for s in spans]
        self.ends = span_ends(spans, size)
        self.pos = 0
        self.error: BaseException | None = None  # what failed inside indexed_gzip (it reports only ZRAN_READ_FAIL)
        self._spans: OrderedDict[int, bytes] = OrderedDict()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def span(self, i: int) -> bytes:
        data = self._spans.get(i)
        if data is not None:
            self._spans.move_to_end(i)
            return data
        start, end = self.starts[i], self.ends[i]
        data, checked = self._fetch(start, end)
        if not self.digests[i]:  # a zTOC's first checkpoint is past the gzip header, which has no digest
            if header_length(data) != len(data):
                raise DigestMismatch(f"{self.label}: bytes 0-{end - 1} are not a gzip header ending at the first checkpoint")
        elif not checked and hashlib.sha256(data).hexdigest() != self.digests[i]:
            raise DigestMismatch(f"{self.label}: compressed bytes {start}-{end - 1} do not match the digest in the index")
        self._spans[i] = data
        while len(self._spans) > KEEP_SPANS:
            self._spans.popitem(last=False)
        return data

    def readinto(self, buf) -> int:
        if self.pos >= self.size:
            return 0
        i = bisect.bisect_right(self.starts, self.pos) - 1
        try:
            data = self.span(i)
        except BaseException as exc:
            self.error = exc
            raise
        lo = self.pos - self.starts[i]
        n = min(len(buf), len(data) - lo)
        buf[:n] = data[lo : lo + n]
        self.pos += n
        return n


class RandomAccess:
    """Seek-and-read of one gzip layer's uncompressed tar; one reader, used by one thread at a time.

    Kept per layer so a file read sequentially (the kernel asks 128 KiB at a time) continues the
    inflate where the last read stopped instead of starting again from a checkpoint.
    """

    def __init__(self, raw: io.RawIOBase, zran: bytes) -> None:
        """``raw``: the compressed blob, a :class:`SpanFile` (each span checked) or the committed
        file (:class:`.streams.Counting`); either keeps in ``error`` what a failed read raised."""
        self.raw = raw
        self.lock = threading.Lock()
        self.gz = indexed_gzip.IndexedGzipFile(fileobj=raw, spacing=SPACING, readbuf_size=READ_BUFFER,
                                                 buffer_size=BUFFER, auto_build=False)
        self.gz.import_index(fileobj=io.BytesIO(zlib.decompress(zran)))

    def pread(self, offset: int, size: int) -> bytes:
        with self.lock:
            try:
                self.gz.seek(offset)
                return self.gz.read(size)
            except Exception:
                error, self.raw.error = self.raw.error, None
                if error is not None:
                    raise error from None
                raise
