"""The one inflate of a gzip layer: everything its index needs, from a single pass.

First contact with a plain gzip image (no zTOC in the registry) and ``copy --soci`` both need,
per layer: the tar's members, the uncompressed digest (``rootfs.diff_ids``), inflate checkpoints
and a sha256 per compressed span. Until issue 11 the local pass inflated the layer twice (once
through indexed_gzip for the checkpoints, once through zlib for the tar). Here one inflate feeds
the tar scan (:func:`.tarindex.scan`, through :class:`.diffids.Hashing`) while indexed_gzip records
a candidate checkpoint at a deflate block boundary every ``spacing`` uncompressed bytes; the
candidates are then thinned by :mod:`.spans`' rule, and only the chosen ones' 32 KiB windows are
read back (indexed_gzip's export goes to a temporary file, not memory). A mount feeds the pass
with the blob as it arrives (:func:`inflate_stream`), so fetching and inflating overlap; ``copy
--soci`` reads the committed file. The span digests need the chosen checkpoints, so they are a
second *read* of the committed blob (page-cached), never a second inflate.

indexed_gzip against rapidgzip (parallel inflate) for this pass is measured in ``bench/RESULTS.md``
(Issue 11): at the candidate spacing the span rule needs, indexed_gzip is the faster here.

:func:`statistics` counts the passes and the tar bytes they produced, so a test can check that a
layer was inflated once and benchmarks can say so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
import threading
import zlib
from dataclasses import dataclass, field
from typing import Callable

import indexed_gzip

from ..errors import InvalidLayer
from . import diffids, spans, tarindex, zinfo, ztoc
from .entries import GZIP, Entry, LayerIndex
from .zinfo import WINDOW, Checkpoint, gzip_isize
from .zran import header_length

#: at most this many candidates are held (indexed_gzip keeps each window in memory until the export)
MAX_CANDIDATES = 4096


@dataclass(frozen=True)
class PassStatistics:
    passes: int = 0  # whole-layer inflates
    inflated: int = 0  # tar bytes they produced: a layer inflated once adds its tar's size


_stats = PassStatistics()
_stats_lock = threading.Lock()


def statistics() -> PassStatistics:
    """Totals for this process (a frozen record, as trio's ``statistics()``)."""
    return _stats


def _count(inflated: int) -> None:
    global _stats
    with _stats_lock:
        _stats = PassStatistics(_stats.passes + 1, _stats.inflated + inflated)


class _Counting(io.RawIOBase):
    """The blob as indexed_gzip reads it, counting bytes read (the progress log)."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f, self.consumed = f, 0
        self.error: BaseException | None = None  # what a read raised: indexed_gzip says only ZRAN_READ_FAIL

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        try:
            n = self.f.readinto(buf)
        except BaseException as exc:
            self.error = exc
            raise
        self.consumed += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()


@dataclass
class Pass:
    """What one inflate found. ``candidates`` are offsets only; :meth:`checkpoints` reads the
    windows of the ones chosen from the export, which :meth:`close` removes."""

    size: int  # the blob's
    first: spans.Point  # just past the gzip header: inflating starts there with an empty window
    entries: list[Entry]
    skipped: int
    tar_size: int
    uncompressed: str  # "sha256:…" of the whole stream ("" if its tail would not inflate)
    ranges: spans.DataRanges
    candidates: list[spans.Point]
    _export: io.BufferedReader | None = None
    _window_at: dict[tuple[int, int], int] = field(default_factory=dict)

    def checkpoints(self, chosen: list[spans.Point]) -> list[Checkpoint]:
        out = []
        for p in chosen:
            if p == self.first:
                out.append(Checkpoint(p.compressed, 0, 0, bytes(WINDOW)))
                continue
            pos = self._window_at[(p.compressed, p.uncompressed)]
            self._export.seek(pos)
            window = self._export.read(WINDOW)
            if len(window) != WINDOW:
                raise InvalidLayer("indexed_gzip's exported index ends inside a window")
            out.append(Checkpoint(p.compressed, p.uncompressed, p.bits, window))
        return out

    def close(self) -> None:
        if self._export is not None:
            self._export.close()
            self._export = None

    def __enter__(self) -> "Pass":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spacing_for(estimate: int, dense: int = spans.DENSE) -> int:
    """Uncompressed bytes between candidates: a quarter of a dense span (several candidates per span
    where the data compresses), yet few enough that the windows held stay under ``MAX_CANDIDATES``
    for a tar of about ``estimate`` bytes (a gzip trailer's size, mod 4 GiB, or the blob's)."""
    return max(dense // 4, 2 * WINDOW, -(-estimate // MAX_CANDIDATES))


def inflate(path: str, label: str, *, dense: int = spans.DENSE, on_member: Callable | None = None,
            progress: bool = True) -> Pass:
    """One inflate of the committed gzip blob at ``path`` (blocking: run it in a thread).

    ``on_member(info)`` sees every :class:`tarfile.TarInfo` (``copy --soci`` records zTOC rows)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        return inflate_stream(f, size, label, estimate=max(size, gzip_isize(path)), dense=dense,
                              on_member=on_member, progress=progress)


def inflate_stream(f, size: int, label: str, *, estimate: int, dense: int = spans.DENSE,
                   on_member: Callable | None = None, progress: bool = True) -> Pass:
    """One inflate of the ``size``-byte gzip blob read from ``f`` (a seekable binary stream at its
    start: the committed file, or the blob as it arrives). ``estimate``: the tar's size, roughly
    (it spaces the candidates)."""
    head = f.read(65536)
    f.seek(0)
    first = header_length(head)
    if first < 0:
        raise InvalidLayer(f"{label} does not start with a gzip header")
    raw = _Counting(f)
    ranges = spans.DataRanges()

    def member(info) -> None:
        if info.isreg():
            ranges.add(info.offset_data, info.size)
        if on_member is not None:
            on_member(info)

    every = spacing_for(estimate, dense)
    fd, name = tempfile.mkstemp(prefix="imagefs-gzidx-")
    os.close(fd)
    export = None
    try:
        try:
            # 64 KiB reads, 4 MiB out per call: zran re-reads its input buffer from the last
            # stop at each call (measured: 1 MiB / 1 MiB read the 419 MiB blob 4.6 times, 5.0 s;
            # 64 KiB / 4 MiB 2.1 times, 2.4 s)
            gz = indexed_gzip.IndexedGzipFile(fileobj=raw, spacing=max(every, 2 * WINDOW), window_size=WINDOW,
                                              readbuf_size=64 << 10, buffer_size=4 << 20)
        except (indexed_gzip.ZranError, OSError, ValueError) as exc:
            raise InvalidLayer(f"{label} is not gzip: {exc}") from exc
        try:
            tar = diffids.Hashing(gz)
            found, _, skipped = tarindex.scan(tar, label, (lambda: raw.consumed) if progress else None,
                                              on_member=member)
            uncompressed = tar.finish() or ""
            tar_size = gz.tell()  # the whole stream, the padding after the end marker too
            gz.export_index(filename=name)  # by name: indexed_gzip refuses a file whose mode is not "w…"
        except (EOFError, indexed_gzip.ZranError, OSError, zlib.error) as exc:
            if raw.error is not None:  # the blob could not be read (a digest mismatch, the registry)
                raise raw.error from None
            raise InvalidLayer(f"{label}: not a gzip'd tar we can read: {exc}") from exc
        finally:
            gz.close()
        _count(tar_size)
        export = open(name, "rb")
        candidates, at = _read_points(export, size, tar_size)
    except BaseException:
        if export is not None:
            export.close()
        raise
    finally:
        os.unlink(name)  # an open export stays readable until closed
    return Pass(size, spans.Point(first, 0, 0), found, skipped, tar_size, uncompressed, ranges, candidates, export, at)


def _read_points(export, size: int, tar_size: int) -> tuple[list[spans.Point], dict[tuple[int, int], int]]:
    """The exported points that have a window and lie inside the stream, and where each window is."""
    points, at = [], {}
    for cmp, uncmp, bits, pos in zinfo.gzidx_points(export):
        if pos >= 0 and cmp < size and uncmp < tar_size:
            points.append(spans.Point(cmp, uncmp, bits))
            at[(cmp, uncmp)] = pos
    return points, at


def span_digests(path: str, ranges: list[tuple[int, int]]) -> list[str]:
    """``sha256:<hex>`` of each byte range of the file (a read, not an inflate)."""
    out = []
    with open(path, "rb", buffering=0) as f:
        for start, end in ranges:
            h = hashlib.sha256()
            pos = start
            while pos < end:
                chunk = os.pread(f.fileno(), min(end - pos, 4 << 20), pos)
                if not chunk:
                    raise InvalidLayer(f"{path} ends before byte {end}")
                h.update(chunk)
                pos += len(chunk)
            out.append("sha256:" + h.hexdigest())
    return out


def toc_estimate(names: int, name_bytes: int) -> int:
    """What a zTOC's rows cost, roughly (a flatbuffer table of 14 fields, type and mtime strings,
    the name): measured 150-190 bytes a member plus the name's length."""
    return names * 180 + name_bytes


def _choose(p: Pass, names: int, name_bytes: int, dense: int, sparse: int,
            budget: float | None) -> tuple[list[Checkpoint], int]:
    chosen, used = spans.fit(p.candidates, p.first, p.ranges, p.size, toc_estimate(names, name_bytes), dense,
                             sparse, budget)
    return p.checkpoints(chosen), used


def build_ztoc(path: str, dense: int, label: str, build_tool: str = "", *, sparse: int = spans.SPARSE,
               budget: float | None = spans.BUDGET) -> ztoc.Ztoc:
    """The zTOC of the committed gzip'd tar at ``path``, in one inflate (``copy --soci``).
    ``sparse``/``budget``: :func:`.spans.fit` (``sparse=dense, budget=None``: spans of one size)."""
    members: list = []

    def row(info) -> None:
        members.append(ztoc.member_of(info))

    with inflate(path, label, dense=dense, on_member=row, progress=False) as p:
        points, used = _choose(p, len(members), sum(len(m.name) + len(m.linkname) for m in members), dense,
                               sparse, budget)
    z = ztoc.Ztoc(p.size, p.tar_size, tuple(members), (), tuple(points), used,
                  build_tool=build_tool or ztoc.BUILD_TOOL)
    digests = span_digests(path, [ztoc.span_range(z, i) for i in range(len(points))])
    return dataclasses.replace(z, span_digests=tuple(digests))


def build_index(path: str, digest: str, label: str) -> LayerIndex:
    """A committed gzip layer's local index, in one inflate, its checkpoints placed as a zTOC's would be."""
    return index_of(inflate(path, label), path, digest)


def index_of(p: Pass, path: str, digest: str) -> LayerIndex:
    """The local index from a pass (closed here) and the committed blob at ``path`` (its span digests)."""
    with p:
        points, used = _choose(p, len(p.entries), sum(len(e.path) + len(e.target) for e in p.entries), spans.DENSE,
                               spans.SPARSE, spans.BUDGET)
    z = ztoc.Ztoc(p.size, p.tar_size, (), (), tuple(points), used)
    digests = span_digests(path, [ztoc.span_range(z, i) for i in range(len(points))])
    z = dataclasses.replace(z, span_digests=tuple(digests))
    return LayerIndex(digest, GZIP, p.entries, p.tar_size, ztoc.index_spans(z), zlib.compress(ztoc.to_gzidx(z), 1),
                      p.skipped, p.uncompressed)
