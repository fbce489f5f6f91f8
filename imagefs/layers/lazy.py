"""Layers that carry their own TOC (eStargz, zstd:chunked): listed and read without the whole blob.

:class:`TocLayers` is what :class:`~imagefs.layers.service.Layers` asks first:

- :meth:`~TocLayers.load`: a TOC cached by an earlier mount (no registry request at all);
- :meth:`~TocLayers.open`: a layer whose descriptor annotates its TOC digest — eStargz's
  ``containerd.io/snapshot/stargz/toc.digest``, zstd:chunked's ``manifest-checksum``. Two small
  Range requests (the footer, then the TOC; zstd:chunked's ``manifest-position`` saves the first)
  and the TOC is hashed against the annotation: a mismatch refuses the layer (EIO, a log line),
  nothing of it is used or cached. A blob whose footer is not the format's is not refused: it is
  indexed as the plain tar+gzip / tar+zstd it also is.
- :meth:`~TocLayers.open_committed`: a blob fetched whole and verified anyway (no annotation) whose
  footer says it has a TOC — the TOC is then as trusted as the blob, and is used the same way.

Reading (:meth:`~TocLayers.read`) fetches only the chunks a read touches, each a whole piece
(:meth:`BlobRanges.span <imagefs.blobranges.BlobRanges.span>`: from the committed blob if it is
here, else kept by an earlier mount, else one Range request), inflated in a worker thread and
checked against its ``chunkDigest`` before a byte is served; a few verified chunks stay in memory,
and those fetched from the registry are kept in ``CACHE/pieces`` (:mod:`..content.pieces`, named
by their ``chunkDigest``) so the next mount reads them again without a request. Footers and TOCs
are whole pieces too, checked here against their annotations.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import trio
import zstandard

from ..blobranges import KEPT, REGISTRY, BlobRanges, Piece
from ..content.pieces import Pieces
from ..descriptors import Descriptor
from ..errors import DigestMismatch, InvalidLayer
from . import estargz, toc, zstdchunked
from .entries import Entry
from .toc import ESTARGZ, ZSTD_CHUNKED, Chunk, Saved, TocIndex

log = logging.getLogger(__name__)

FORMATS = toc.FORMATS  # the ``LayerIndex.compression`` of a TOC-indexed layer

KEEP_BYTES = 32 << 20  # verified chunks kept in memory, all layers together
MAX_TOC_FETCH = 512 << 20  # compressed TOC bytes we are willing to fetch


@dataclass
class TocStatistics:
    tocs_fetched: int = 0
    tocs_loaded: int = 0
    chunks_fetched: int = 0
    chunks_kept: int = 0  # verified chunks read back from CACHE/pieces instead of the registry
    bytes_fetched: int = 0
    refused: int = 0


def expected(desc: Descriptor) -> tuple[str, str | None] | None:
    """(format, annotated checksum) when the descriptor says its layer has a verifiable TOC.

    The layer's compression chooses the format, not which annotation is present: stargz-snapshotter's
    zstd:chunked converter writes the eStargz ``toc.digest`` *and* zstd:chunked's
    ``manifest-checksum`` on one zstd layer. A zstd layer is read as zstd:chunked and checked against
    whichever of the two it carries (:meth:`TocLayers._zstd`); the checksum is None when it has only
    ``toc.digest`` (the sha256 of the uncompressed TOC JSON, checked once it is inflated).
    """
    ann = dict(desc.annotations)
    stargz = ann.get(estargz.ANNOTATION)
    checksum = zstdchunked.annotation(ann, "manifest-checksum")
    if desc.media_type.endswith("zstd"):
        return (ZSTD_CHUNKED, checksum) if checksum or stargz else None
    if stargz:
        return ESTARGZ, stargz
    if checksum:
        return ZSTD_CHUNKED, checksum
    return None


class _NotThisFormat(Exception):
    """The blob's footer is not the format's: index it as the plain tar+gzip/zstd it is."""


class TocLayers:
    """TOC-indexed layers of one mount: their indexes, and their files' bytes chunk by chunk."""

    def __init__(self, ranges: BlobRanges, cache_dir: Path, stats: TocStatistics | None = None) -> None:
        """``ranges``: where blob bytes come from (chunk read-ahead runs in its nursery);
        ``cache_dir``: where verified TOCs and chunks are kept beside the store (:mod:`..content.layout`)."""
        self.ranges, self.nursery = ranges, ranges.nursery
        self.root = Path(cache_dir)
        self.tocs: dict[str, TocIndex] = {}
        self.stats = stats or TocStatistics()
        self._kept: OrderedDict[tuple, bytes] = OrderedDict()
        self._kept_bytes = 0
        self._locks: dict[tuple, trio.Lock] = {}
        self._pieces: dict[str, Pieces] = {}

    # -- indexes ------------------------------------------------------------------------------

    async def load(self, desc: Descriptor) -> TocIndex | None:
        """The TOC an earlier mount verified and cached, if it still agrees with ``desc``."""
        saved = await trio.to_thread.run_sync(toc.load, self.root, desc.digest)
        if saved is None:
            return None
        want = expected(desc)
        if want is not None and (want[0] != saved.fmt or want[1] not in (None, saved.checksum)):
            log.warning("%s: the cached TOC does not match the layer's annotation: checking the registry's",
                        desc.ref_key)
            return None
        try:
            found = await self._parse(desc, saved)
        except InvalidLayer as exc:  # cached by a version with other rules: ask the registry again
            log.warning("%s: the cached TOC is unusable (%s): checking the registry's", desc.ref_key, exc)
            return None
        self.stats.tocs_loaded += 1
        return found

    async def open(self, desc: Descriptor) -> TocIndex | None:
        """The index of an annotated layer from its footer and TOC alone, or None if it has none."""
        want = expected(desc)
        if want is None:
            return None
        fmt, checksum = want
        try:
            saved = await (self._estargz(desc, checksum) if fmt == ESTARGZ else self._zstd(desc, checksum))
        except _NotThisFormat as exc:
            log.warning("%s: annotated as %s but %s: indexing it as a plain layer", desc.ref_key, fmt, exc)
            return None
        self.stats.tocs_fetched += 1
        return await self._keep(desc, saved)

    async def open_committed(self, desc: Descriptor) -> TocIndex | None:
        """The index of a committed (digest-verified) blob from its own TOC, if its footer has one."""
        size = desc.size
        tail = await self._get(desc, max(0, size - zstdchunked.TAIL), size)
        try:
            if estargz.toc_offset(tail[-estargz.FOOTER_SIZE:], size) is not None:
                saved = await self._estargz(desc, None)
            elif zstdchunked.footer(tail, size) is not None:
                saved = await self._zstd(desc, None)
            else:
                return None
        except (_NotThisFormat, InvalidLayer) as exc:
            log.warning("%s: its TOC is unusable (%s): indexing it as a plain layer", desc.ref_key, exc)
            return None
        return await self._keep(desc, saved)

    async def _estargz(self, desc: Descriptor, checksum: str | None) -> Saved:
        size, label = desc.size, desc.ref_key
        footer_at = size - estargz.FOOTER_SIZE
        if footer_at <= 0:
            raise _NotThisFormat("it is too small for a footer")
        start = estargz.toc_offset(await self._get(desc, footer_at, size), size)
        if start is None:
            raise _NotThisFormat("its last 51 bytes are no eStargz footer")
        if footer_at - start > MAX_TOC_FETCH:
            raise InvalidLayer(f"{label}: the eStargz TOC would be {footer_at - start} bytes")
        member = await self._get(desc, start, footer_at)
        raw, info = await trio.to_thread.run_sync(estargz.read_toc, member, label)
        digest = "sha256:" + await trio.to_thread.run_sync(lambda: hashlib.sha256(raw).hexdigest())
        self._check(desc, "eStargz TOC", digest, checksum, estargz.ANNOTATION)
        # stargz.index.json is a member of the tar too (what any unpacker shows): its data is the TOC.
        chunk = Chunk(0, len(raw), start, footer_at, info.offset_data, digest[7:])
        return Saved(ESTARGZ, raw, checksum or digest, start, toc.extra_member(info, chunk))

    async def _zstd(self, desc: Descriptor, checksum: str | None) -> Saved:
        size, label = desc.size, desc.ref_key
        where = zstdchunked.position(zstdchunked.annotation(dict(desc.annotations), "manifest-position"))
        if where is None or where[0] + where[1] > size:
            where = zstdchunked.footer(await self._get(desc, max(0, size - zstdchunked.TAIL), size), size)
            if where is None:
                raise _NotThisFormat("its end is no zstd:chunked footer")
        offset, clen, ulen = where
        if clen > MAX_TOC_FETCH:
            raise InvalidLayer(f"{label}: the zstd:chunked TOC would be {clen} bytes")
        compressed = await self._get(desc, offset, offset + clen)
        digest = "sha256:" + await trio.to_thread.run_sync(lambda: hashlib.sha256(compressed).hexdigest())
        self._check(desc, "zstd:chunked TOC", digest, checksum, "manifest-checksum")
        raw = await trio.to_thread.run_sync(zstdchunked.read_toc, compressed, ulen, label)
        json_digest = dict(desc.annotations).get(estargz.ANNOTATION)
        if json_digest is not None:  # stargz's converter: the uncompressed TOC's digest, beside the checksum
            got = "sha256:" + await trio.to_thread.run_sync(lambda: hashlib.sha256(raw).hexdigest())
            self._check(desc, "zstd:chunked TOC JSON", got, json_digest, estargz.ANNOTATION)
        return Saved(ZSTD_CHUNKED, raw, checksum or digest, offset - 8)

    def _check(self, desc: Descriptor, what: str, got: str, want: str | None, annotation: str) -> None:
        if want is not None and got != want:
            self.stats.refused += 1
            log.error("refusing %s: its %s hashes to %s but the %s annotation says %s; nothing of it is used",
                      desc.ref_key, what, got, annotation, want)
            raise DigestMismatch(f"{desc.ref_key}: {what} does not match the {annotation} annotation")

    async def _keep(self, desc: Descriptor, saved: Saved) -> TocIndex:
        found = await self._parse(desc, saved)
        await trio.to_thread.run_sync(toc.save, self.root, desc.digest, saved)
        log.info("indexed %s from its %s TOC: %d entries (%d skipped), %d chunks",
                 desc.ref_key, saved.fmt, len(found.index.entries), found.index.skipped, len(found.chunks.start))
        return found

    async def _parse(self, desc: Descriptor, saved: Saved) -> TocIndex:
        found = await trio.to_thread.run_sync(
            lambda: toc.parse(saved.raw, saved.fmt, desc.digest, desc.ref_key, saved.data_end,
                              checksum=saved.checksum, extra=saved.extra))
        self.tocs[desc.digest] = found
        return found

    # -- bytes ----------------------------------------------------------------------------------

    async def _get(self, desc: Descriptor, start: int, end: int) -> bytes:
        """Blob bytes ``[start, end)`` whole (a footer, a TOC: the caller checks them)."""
        got = await self.ranges.span(desc, start, end)
        if got.source == REGISTRY:
            self.stats.bytes_fetched += len(got.data)
        return got.data

    async def read(self, desc: Descriptor, entry: Entry, offset: int, size: int) -> bytes:
        """``size`` bytes of ``entry`` at ``offset``, from verified chunks only."""
        found = self.tocs[desc.digest]
        end, parts = offset + size, []
        last = None
        for c in found.find(entry.offset, offset):
            if c.start >= end:
                if last is not None and c.start - end < last.size // 2:
                    self._read_ahead(desc, found.fmt, c, entry.path)
                break
            data = await self._chunk(desc, found.fmt, c, entry.path)
            parts.append(data[max(offset - c.start, 0):min(end, c.start + c.size) - c.start])
            last = c
        return b"".join(parts)

    def _read_ahead(self, desc: Descriptor, fmt: str, c: Chunk, path: str) -> None:
        """A read in the last half of a chunk starts fetching the next one: a file read through
        overlaps one chunk's fetch and inflate with the use of the one before (measured: a 64 MiB
        cat from 1.0-1.3 s to 0.65-0.7 s)."""
        if self.nursery is None or c.zeros or self._key(desc, c) in self._kept:
            return

        async def fetch() -> None:
            try:
                await self._chunk(desc, fmt, c, path)
            except Exception as exc:  # a reader that gets there will fetch again and see the error
                log.debug("read-ahead of %s: %s", path, exc)

        self.nursery.start_soon(fetch)

    @staticmethod
    def _key(desc: Descriptor, c: Chunk) -> tuple:
        return (desc.digest, c.begin, c.inner, c.size)

    async def _chunk(self, desc: Descriptor, fmt: str, c: Chunk, path: str) -> bytes:
        if c.zeros:
            return bytes(c.size)
        key = self._key(desc, c)
        data = self._kept.get(key)
        if data is not None:
            self._kept.move_to_end(key)
            return data
        lock = self._locks.setdefault(key, trio.Lock())
        try:
            async with lock:  # one fetch however many readers wait for it
                data = self._kept.get(key)
                if data is None:
                    pieces = self._pieces.get(desc.digest) or self._pieces.setdefault(desc.digest, Pieces(self.root, desc.digest))
                    got = await self.ranges.span(desc, c.begin, c.end, _piece(fmt, c, f"{desc.ref_key}: {path}"), pieces)
                    data = got.data
                    if got.source == KEPT:
                        self.stats.chunks_kept += 1
                    else:
                        self.stats.chunks_fetched += 1
                        if got.source == REGISTRY:
                            self.stats.bytes_fetched += c.end - c.begin
                    self._remember(key, data)
        finally:
            if not lock.statistics().tasks_waiting and not lock.locked():
                self._locks.pop(key, None)
        return data

    def _remember(self, key: tuple, data: bytes) -> None:
        self._kept[key] = data
        self._kept_bytes += len(data)
        while self._kept_bytes > KEEP_BYTES and len(self._kept) > 1:
            self._kept_bytes -= len(self._kept.popitem(last=False)[1])


def _piece(fmt: str, c: Chunk, label: str) -> Piece:
    """A TOC chunk as a whole piece: inflated, then checked against its ``chunkDigest``."""
    inflate = estargz.inflate if fmt == ESTARGZ else zstdchunked.inflate

    def decode(compressed: bytes) -> bytes:  # blocking: a worker thread
        try:
            return inflate(compressed, c.inner, c.size)
        except (zlib.error, zstandard.ZstdError) as exc:
            raise DigestMismatch(f"{label}: the chunk at byte {c.start} does not inflate ({exc}); "
                                 f"blob bytes {c.begin}-{c.end - 1}") from exc

    return Piece(c.digest, f"{label}: the chunk at byte {c.start} does not match its chunkDigest "
                           f"(blob bytes {c.begin}-{c.end - 1})", decode)
