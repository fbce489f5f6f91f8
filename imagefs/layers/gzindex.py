"""What one gzip pass (:mod:`.gzpass`) becomes: the local index of a layer, or ``copy --soci``'s zTOC.

Both choose checkpoints among the pass's candidates by :mod:`.spans`' rule and then hash each
compressed span (a *read* of the committed blob, never a third inflate): a later reader that has
only the spans it fetched checks each against its digest. That hashing needs the chosen
checkpoints, so it can only follow the pass, and on a mount's first look inside a layer it cost
0.3-0.45 s of the 419 MiB bench layer before ``cat`` was answered. A mount does not need the
digests to read the layer it has just fetched whole and committed (verified against the blob's
digest), so :func:`unhashed` gives it the index without them, and :meth:`Unhashed.hash` adds them
later, off that path, before the index is kept for the next mount.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import zlib
from dataclasses import dataclass

from ..errors import InvalidLayer
from . import spans, ztoc
from .entries import GZIP, LayerIndex
from .gzpass import Pass, inflate
from .zinfo import Checkpoint


def span_digests(path: str, ranges: list[tuple[int, int]], threads: int = 2) -> list[str]:
    """``sha256:<hex>`` of each byte range of the file (a read, not an inflate), ``threads``
    ranges at a time: hashlib releases the GIL, so on two cores two threads halve the wall time."""
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()

        def digest(r: tuple[int, int]) -> str:
            start, end = r
            h = hashlib.sha256()
            pos = start
            while pos < end:
                chunk = os.pread(fd, min(end - pos, 4 << 20), pos)
                if not chunk:
                    raise InvalidLayer(f"{path} ends before byte {end}")
                h.update(chunk)
                pos += len(chunk)
            return "sha256:" + h.hexdigest()

        if len(ranges) < 2 or threads < 2:
            return [digest(r) for r in ranges]
        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="imagefs-spans") as pool:
            return list(pool.map(digest, ranges))


def toc_estimate(names: int, name_bytes: int) -> int:
    """What a zTOC's rows cost, roughly (a flatbuffer table of 14 fields, type and mtime strings,
    the name): measured 150-190 bytes a member plus the name's length."""
    return names * 180 + name_bytes


def _choose(p: Pass, names: int, name_bytes: int, dense: int, sparse: int,
            budget: float | None) -> tuple[list[Checkpoint], int]:
    chosen, used = spans.fit(p.candidates, p.first, p.ranges, p.size, toc_estimate(names, name_bytes), dense,
                             sparse, budget)
    return p.checkpoints(chosen), used


def _hashed(z: ztoc.Ztoc, path: str, threads: int = 2) -> ztoc.Ztoc:
    digests = span_digests(path, [ztoc.span_range(z, i) for i in range(len(z.checkpoints))], threads)
    return dataclasses.replace(z, span_digests=tuple(digests))


def build_ztoc(path: str, dense: int, label: str, build_tool: str = "", *, sparse: int = spans.SPARSE,
               budget: float | None = spans.BUDGET) -> ztoc.Ztoc:
    """The zTOC of the committed gzip'd tar at ``path``, in one inflate (``copy --soci``).
    ``sparse``/``budget``: :func:`.spans.fit` (``sparse=dense, budget=None``: spans of one size)."""
    members: list = []

    def row(info) -> None:
        members.append(ztoc.member_of(info))

    # One thread, as before the split pass, so a zTOC is what it was: indexed_gzip alone offers no
    # candidate in the stream's last read (its index expands only up to where a read starts), and
    # with them the span rule adds a checkpoint there (bench/soci: +32 KiB, (e) from 1.99 % to 2.00 %)
    with inflate(path, label, dense=dense, on_member=row, progress=False, split=False) as p:
        points, used = _choose(p, len(members), sum(len(m.name) + len(m.linkname) for m in members), dense,
                               sparse, budget)
    z = ztoc.Ztoc(p.size, p.tar_size, tuple(members), (), tuple(points), used,
                  build_tool=build_tool or ztoc.BUILD_TOOL)
    return _hashed(z, path)


@dataclass
class Unhashed:
    """A local index whose checkpoints are chosen and whose spans are not hashed yet.

    ``index`` reads the layer only from its committed blob (its ``spans`` stay empty until
    :meth:`hash`); a span fetched alone has nothing to be checked against, so it must never be
    kept or used before then."""

    index: LayerIndex
    checkpoints: ztoc.Ztoc  # the chosen checkpoints, without span digests

    def hash(self, path: str, threads: int = 2) -> LayerIndex:
        """Hash the spans of the committed blob at ``path`` into ``index`` (blocking), and return it
        with its checkpoints compressed as they are kept."""
        self.index.spans = ztoc.index_spans(_hashed(self.checkpoints, path, threads))
        self.index.zran = zlib.compress(ztoc.to_gzidx(self.checkpoints), 1)
        return self.index


def unhashed(p: Pass, digest: str) -> Unhashed:
    """The local index from a pass (closed here), its spans to be hashed later."""
    with p:
        points, used = _choose(p, len(p.entries), sum(len(e.path) + len(e.target) for e in p.entries), spans.DENSE,
                               spans.SPARSE, spans.BUDGET)
    z = ztoc.Ztoc(p.size, p.tar_size, (), (), tuple(points), used)
    # stored, not compressed, until hash(): level 1 took 0.09 s of the bench layer's 6 MiB of windows
    index = LayerIndex(digest, GZIP, p.entries, p.tar_size, [], zlib.compress(ztoc.to_gzidx(z), 0), p.skipped,
                       p.uncompressed)
    return Unhashed(index, z)


def index_of(p: Pass, path: str, digest: str) -> LayerIndex:
    """The local index from a pass (closed here) and the committed blob at ``path`` (its span digests)."""
    return unhashed(p, digest).hash(path)


def build_index(path: str, digest: str, label: str) -> LayerIndex:
    """A committed gzip layer's local index, in one inflate, its checkpoints placed as a zTOC's would be."""
    return index_of(inflate(path, label), path, digest)
