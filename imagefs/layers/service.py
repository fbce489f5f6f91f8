"""Layer indexes for one mount: built or loaded once per layer, and file bytes read through them.

The first look inside a layer's ``fs/`` or a manifest's ``rootfs/`` asks :meth:`Layers.index`.
A persisted index (``CACHE/indexes/``) is loaded; else a remote zTOC (SOCI) is used; else the
layer is fetched whole and one pass in a worker thread inflates it as its bytes land (gzip:
:mod:`.gzpass`, the tar rows, diff_id and checkpoints at once), and the index is kept only once the
whole blob matched its digest. Many lookups of one layer wait for one build.

Reading a file (:meth:`Layers.read`):

- plain tar: the member's bytes are a range of the blob, served by :meth:`BlobRanges.read
  <imagefs.blobranges.BlobRanges.read>` through a handle per open file (or per layer), so a file
  read in order gets readahead, stopped at the member's end;
- gzip: inflate from the checkpoint before the offset; the compressed spans are whole pieces
  (:meth:`BlobRanges.span <imagefs.blobranges.BlobRanges.span>`): from the committed blob if it is
  here, else kept by an earlier read (``CACHE/pieces``), else one Range request per span, each
  verified against the index (an evicted blob costs only the spans read) and kept;
- zstd: no checkpoints: the blob is completed and inflated from its start; a reader continues
  from where the last read of that layer stopped;
- eStargz and zstd:chunked (:mod:`.lazy`): listed from their verified TOC without fetching the
  blob, and read chunk by chunk, each chunk checked against its digest.
"""

from __future__ import annotations

import functools
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..blobranges import KEPT, REGISTRY, BlobRanges, Handle, Piece
from ..content import labels
from ..content.pieces import Pieces
from ..descriptors import Descriptor, is_manifest
from ..errors import ImagefsError, InvalidLayer, RegistryError
from . import diffids, entries, gzindex, gzpass, lazy, remote, tarindex, zran
from .entries import GZIP, PLAIN, ZSTD, Entry, LayerIndex, sniff
from .streams import Arriving, Counting, ZstdCursor

log = logging.getLogger(__name__)


@dataclass
class LayerStatistics:
    built: int = 0
    loaded: int = 0
    spans_fetched: int = 0
    span_bytes_fetched: int = 0
    spans_kept: int = 0  # verified spans read back from CACHE/pieces instead of the registry
    bytes_inflated: int = 0  # member bytes read out of gzip, zstd and TOC-chunked layers
    toc: lazy.TocStatistics = field(default_factory=lazy.TocStatistics)  # eStargz / zstd:chunked
    remote: remote.RemoteStatistics = field(default_factory=remote.RemoteStatistics)  # SOCI zTOCs


@dataclass(frozen=True)
class LayersStatistics:
    """A snapshot of :class:`LayerStatistics` (the tally :class:`Layers` keeps as it works), flat."""

    indexes_built: int
    indexes_loaded: int
    bytes_inflated: int
    spans_fetched: int
    span_bytes_fetched: int
    spans_kept: int
    tocs_fetched: int
    tocs_loaded: int
    toc_chunks_fetched: int
    toc_chunks_kept: int
    toc_bytes_fetched: int
    ztocs: int  # SOCI zTOCs fetched and used
    ztoc_bytes: int
    remote_refused: int  # TOCs, zTOCs or SOCI indexes found wrong


def build(path: str, desc: Descriptor) -> LayerIndex:
    """The index of the committed blob at ``path`` (blocking: run it in a thread)."""
    start = time.monotonic()
    label = desc.ref_key
    with open(path, "rb") as f:
        compression = sniff(f.read(4))
    if compression == GZIP:  # one inflate: tar, diff_id, checkpoints (gzpass), then the spans hashed
        index = gzindex.build_index(path, desc.digest, label)
        log.info("indexed %s: %d entries (%d skipped), gzip, %.0f MiB uncompressed, %d spans, in %.2f s",
                 label, len(index.entries), index.skipped, index.tar_size / 2**20, len(index.spans),
                 time.monotonic() - start)
        return index
    with open(path, "rb", buffering=0) as f:
        raw = Counting(f)
        if compression == ZSTD:
            import zstandard

            try:
                with zstandard.ZstdDecompressor().stream_reader(raw, read_size=1 << 20, read_across_frames=True) as z:
                    tar = diffids.Hashing(z)
                    found, tar_size, skipped = tarindex.scan(tar, label, lambda: raw.consumed)
                    uncompressed = tar.finish()
            except zstandard.ZstdError as exc:
                raise InvalidLayer(f"{label}: not a zstd'd tar: {exc}") from exc
        else:
            found, tar_size, skipped = tarindex.scan(io.BufferedReader(raw, 1 << 20), label, lambda: raw.consumed)
            uncompressed = desc.digest  # verified: a plain tar is its own uncompressed stream
    log.info("indexed %s: %d entries (%d skipped), %s, %.0f MiB uncompressed, in %.2f s",
             label, len(found), skipped, compression, tar_size / 2**20, time.monotonic() - start)
    return LayerIndex(desc.digest, compression, found, tar_size, [], b"", skipped, uncompressed or "")


class Layers:
    """Indexes and file reads for the layers of one mount."""

    def __init__(self, reader: BlobRanges, remote_indexes: remote.RemoteIndexes | None = None, *,
                 cache_dir: Path) -> None:
        """``remote_indexes``: where zTOCs published in the registry are found (None: never looked for);
        ``cache_dir``: where layer indexes and verified pieces are kept beside the store."""
        self.reader = reader
        self.root = Path(cache_dir)
        self._indexes: dict[str, LayerIndex] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._gz: dict[str, zran.RandomAccess] = {}
        self._zstd: dict[str, ZstdCursor] = {}
        self.stats = LayerStatistics()
        self.toc = lazy.TocLayers(reader, self.root, self.stats.toc)
        self._handles: dict[str, Handle] = {}  # plain-tar reads without a handle of their own: one per layer
        self.remote = remote_indexes
        if remote_indexes is not None:
            remote_indexes.stats = self.stats.remote
        self._inflated: set[str] = set()  # layers this process inflated whole: worth a config fetch to check
        self._keeping: dict[str, trio.Event] = {}  # set once a built index is complete (spans hashed)
        self._checked: set[str] = set()

    def statistics(self) -> LayersStatistics:
        s, toc, soci = self.stats, self.stats.toc, self.stats.remote
        return LayersStatistics(s.built, s.loaded, s.bytes_inflated, s.spans_fetched, s.span_bytes_fetched, s.spans_kept,
                                toc.tocs_fetched, toc.tocs_loaded, toc.chunks_fetched, toc.chunks_kept, toc.bytes_fetched,
                                soci.ztocs, soci.ztoc_bytes, toc.refused + soci.refused)

    def cached(self, desc: Descriptor) -> LayerIndex | None:
        return self._indexes.get(desc.digest)

    async def index(self, desc: Descriptor) -> LayerIndex:
        """The index of ``desc``: from memory, from the cache, or built now (once, however many ask)."""
        found = self._indexes.get(desc.digest)
        if found is not None:
            return found
        async with self._locks.setdefault(desc.digest, trio.Lock()):
            if desc.digest not in self._indexes:
                lazily = await self.toc.load(desc)  # a cached TOC first: it reads without the blob
                if lazily is not None:
                    found = lazily.index
                else:
                    found = await trio.to_thread.run_sync(entries.load, self.root, desc.digest)
                if found is not None:
                    self.stats.loaded += 1
                else:
                    found = await self._build(desc)
                self._indexes[desc.digest] = found
        return self._indexes[desc.digest]

    async def _build(self, desc: Descriptor) -> LayerIndex:
        lazily = await self.toc.open(desc)  # an annotated TOC: no whole fetch
        if lazily is not None:
            self.stats.built += 1
            return lazily.index
        if self.remote is not None and "zstd" not in desc.media_type:
            found = await self.remote.index(desc)  # a zTOC in the registry (SOCI): no whole fetch
            if found is not None:
                # kept for the next mount in the background: the first look inside waits for no disk
                # write (0.25-0.5 s for the bench's 8,154 members)
                self.reader.nursery.start_soon(trio.to_thread.run_sync, entries.save, self.root, found)
                self.stats.built += 1
                return found
        log.info("indexing %s (%d bytes): fetching it whole, inflating it as it arrives", desc.ref_key, desc.size)
        start = time.monotonic()
        streamed = await self._inflate_arriving(desc)
        passed = time.monotonic()
        try:
            await self._complete(desc)  # only now, verified, may what the pass found be kept
            lazily = await self.toc.open_committed(desc)  # verified with the blob: its own TOC lists it
            if lazily is not None:
                self.stats.built += 1
                return lazily.index
        except BaseException:
            if streamed is not None:
                streamed.close()
            raise
        path = str(self.reader.store.path(desc.digest))
        unhashed = None
        if streamed is not None:
            committed = time.monotonic()
            unhashed = await trio.to_thread.run_sync(gzindex.unhashed, streamed, desc.digest)
            built = unhashed.index
            log.info("indexed %s: %d entries (%d skipped), gzip, %.0f MiB uncompressed, in %.2f s (fetch and "
                     "inflate overlapped: the pass %.2f s, then the commit %.2f s, the checkpoints %.2f s; "
                     "the spans are hashed next, in the background)",
                     desc.ref_key, len(built.entries), built.skipped, built.tar_size / 2**20,
                     time.monotonic() - start, passed - start, committed - passed, time.monotonic() - committed)
        else:
            built = await trio.to_thread.run_sync(build, path, desc)
        if built.uncompressed:
            self._inflated.add(desc.digest)
        # kept (and the blob labelled) in the background, as a zTOC's index is: the first look
        # inside waits for no disk write (0.2-0.25 s for the bench's 8,154 members), nor for the
        # span digests (0.3-0.45 s): until they are hashed, reads inflate the committed blob itself
        done = self._keeping[desc.digest] = trio.Event()
        self.reader.nursery.start_soon(self._keep, built, unhashed, path, done)
        self.stats.built += 1
        return built

    async def _keep(self, built: LayerIndex, unhashed: gzindex.Unhashed | None, path: str, done: trio.Event) -> None:
        with trio.CancelScope(shield=True):  # an unmount right after the first look still keeps it
            try:
                if unhashed is not None:
                    start = time.monotonic()
                    # one thread: the other core serves the reads that first look started
                    await trio.to_thread.run_sync(unhashed.hash, path, 1)
                    log.info("%s: %d spans hashed in %.2f s", built.digest, len(built.spans), time.monotonic() - start)
            except (OSError, InvalidLayer) as exc:  # gone or unreadable: the next look builds it again
                log.warning("%s: spans not hashed, so the index is not kept: %s", built.digest, exc)
                if self._indexes.get(built.digest) is built:
                    del self._indexes[built.digest]
                return
            finally:
                done.set()
            await trio.to_thread.run_sync(self._save, built)

    async def settled(self) -> None:
        """Wait until every index built so far is complete (its spans hashed) and kept, or given up."""
        for done in list(self._keeping.values()):
            await done.wait()

    def _save(self, built: LayerIndex) -> None:
        """Persist a verified layer's index (a worker thread, in the background: a full disk costs
        the next mount a rebuild, never this one its answer)."""
        try:
            entries.save(self.root, built)
        except OSError as exc:
            log.warning("%s: index not kept for the next mount: %s", built.digest, exc)
        if built.uncompressed:
            self._label(built.digest, built.uncompressed)

    async def _inflate_arriving(self, desc: Descriptor) -> gzpass.Pass | None:
        """The one inflate of a gzip layer, fed as its bytes land (the reader fetches ahead of a
        sequential stream), so fetching and inflating overlap; None for other layers and under
        ``--strict`` (which serves no byte before the whole blob is verified)."""
        if self.reader.strict or self.reader.committed(desc) or desc.size < 18:
            return None
        if sniff(await self.reader.read(desc, 0, 4)) != GZIP:
            return None
        tail = await self.reader.read(desc, desc.size - 4, 4)  # ISIZE: the tar's size, mod 4 GiB
        estimate = max(desc.size, int.from_bytes(tail, "little"))
        stream = Arriving(self.reader, desc)  # the tar side reads it 4 MiB at a time, unbuffered
        # a second reader of the same bytes for the checkpoint thread (gzpass): two cores, one inflate each
        second = io.BufferedReader(Arriving(self.reader, desc), 4 << 20)
        return await trio.to_thread.run_sync(
            functools.partial(gzpass.inflate_stream, stream, desc.size, desc.ref_key, estimate=estimate,
                              index_stream=second))

    def _label(self, digest: str, uncompressed: str) -> None:
        """Tell later pulls what the layer inflates to (containerd's label), so they need not inflate it."""
        try:
            self.reader.store.update_labels(digest, {labels.UNCOMPRESSED: uncompressed})
        except OSError as exc:
            log.debug("could not label %s with its uncompressed digest: %s", digest, exc)

    async def check_diff_id(self, image, desc: Descriptor) -> None:
        """Warn, once a mount, when a layer whose tar was scanned (its index knows the digest of
        that stream) is not what the ``rootfs.diff_ids`` of a config listing it says.

        The config is fetched for a layer inflated by this process (the whole blob came anyway);
        for an index loaded from the cache, only a config already cached is read: a mount that
        needs no registry must not start needing one."""
        index = self._indexes.get(desc.digest)
        if index is None or not index.uncompressed or desc.digest in self._checked:
            return
        self._checked.add(desc.digest)
        root = image.root
        for manifest, kids in list(image.children.items()):
            positions = [i for i, kid in enumerate(kids[1:]) if kid.digest == desc.digest]
            if not positions or not is_manifest(image.descriptors[manifest]):
                continue
            config = kids[0]
            try:
                if desc.digest in self._inflated:
                    await image.ensure(config)
                elif self.reader.store.path(config.digest) is None:
                    continue
                listed = diffids.diff_ids(await trio.to_thread.run_sync(self.reader.store.read, config.digest))
            except (ImagefsError, OSError) as exc:
                log.info("%s: config %s not read, so its diff_id is not checked: %s", desc.ref_key, config.digest, exc)
                continue
            for i in positions:
                if i < len(listed) and listed[i] != index.uncompressed:
                    named = manifest if manifest == root.ref_key else f"{manifest} (in {root.ref_key})"
                    log.warning("%s", diffids.mismatch(desc.ref_key, index.uncompressed, listed[i], named))

    async def _complete(self, desc: Descriptor) -> None:
        """Make the blob committed (fetched whole, digest checked)."""
        await self.reader.prefetch(desc)
        if self.reader.store.path(desc.digest) is None:
            raise RegistryError(f"{desc.ref_key} could not be fetched and verified; see the log")

    # -- reading --------------------------------------------------------------------------------

    def open(self, desc: Descriptor, entry: Entry, inode: int) -> Handle:
        """A handle for one open member file: a plain-tar member read in order gets readahead
        (stopped at its end); other layers ignore it."""
        return self.reader.open(desc, inode, start=entry.offset, end=entry.offset + entry.size)

    async def read(self, desc: Descriptor, entry: Entry, offset: int, size: int,
                   handle: Handle | None = None) -> bytes | memoryview:
        """``size`` bytes of ``entry``'s data at ``offset``; ``handle`` from :meth:`open`."""
        size = min(size, entry.size - offset)
        if size <= 0:
            return b""
        index = await self.index(desc)
        if index.compression in lazy.FORMATS:
            data = await self.toc.read(desc, entry, offset, size)
            self.stats.bytes_inflated += len(data)
            if len(data) != size:
                raise InvalidLayer(f"{desc.ref_key}: {entry.path} ends early ({len(data)} of {size} bytes at {offset})")
            return data
        pos = entry.offset + offset
        if index.compression == PLAIN:
            if handle is None:
                handle = self._handles.get(desc.digest) or self._handles.setdefault(desc.digest, self.reader.open(desc, 0))
                handle.end = entry.offset + entry.size  # readahead stops at the member being read
            return await self.reader.read(desc, pos, size, handle)
        if index.compression == GZIP:
            ra = self._gz.get(desc.digest)
            if ra is None:
                ra = self._gz[desc.digest] = await self._random_access(desc, index)
            try:
                data = await trio.to_thread.run_sync(ra.pread, pos, size)
            except BaseException:
                self._gz.pop(desc.digest, None)  # its inflate state is unknown now: start afresh next time
                raise
        else:
            await self._complete(desc)
            cursor = self._zstd.setdefault(desc.digest, ZstdCursor(str(self.reader.store.path(desc.digest))))
            data = await trio.to_thread.run_sync(cursor.pread, pos, size)
        self.stats.bytes_inflated += len(data)
        if len(data) != size:
            raise InvalidLayer(f"{desc.ref_key}: {entry.path} ends early ({len(data)} of {size} bytes at {offset})")
        return data

    async def _random_access(self, desc: Descriptor, index: LayerIndex) -> zran.RandomAccess:
        """Reads of a gzip layer through its checkpoints: span by span, each checked against its
        digest — or, while the digests of an index built here are still being hashed, from the
        committed blob itself (verified whole; an open file stays readable if it is evicted)."""
        done = self._keeping.get(desc.digest)
        if not index.spans and done is not None and not done.is_set():
            blob = await trio.to_thread.run_sync(self._open_committed, desc)
            if blob is not None:
                return await trio.to_thread.run_sync(zran.RandomAccess, blob, index.zran)
            await done.wait()
        if not index.spans:  # hashing failed: the index was dropped, a new look builds it again
            raise InvalidLayer(f"{desc.ref_key}: the index has no span digests; read it again")
        raw = zran.SpanFile(desc.size, index.spans, self._span_fetcher(desc, index), desc.ref_key)
        return await trio.to_thread.run_sync(zran.RandomAccess, raw, index.zran)

    def _open_committed(self, desc: Descriptor) -> Counting | None:
        path = self.reader.store.path(desc.digest)
        try:
            return Counting(open(path, "rb", buffering=0)) if path is not None else None
        except FileNotFoundError:
            return None

    def _span_fetcher(self, desc: Descriptor, index: LayerIndex):
        """Compressed bytes for a worker thread, each span a whole piece checked against the index
        (:meth:`BlobRanges.span <imagefs.blobranges.BlobRanges.span>`: the committed blob, else a
        kept piece, else one Range request, kept once checked)."""
        ranges, stats = self.reader, self.stats
        digests = {s[0]: s[1] for s in index.spans}  # start -> sha256 of the span: SpanFile asks whole spans
        pieces = Pieces(self.root, desc.digest)

        def get(start: int, end: int) -> tuple[bytes, bool]:
            digest = digests.get(start) or ""  # none: a zTOC's gzip header, SpanFile's to check
            piece = Piece(digest, f"{desc.ref_key}: compressed bytes {start}-{end - 1} do not match the digest in the index")
            got = trio.from_thread.run(ranges.span, desc, start, end, piece, pieces)
            if got.source == KEPT:
                stats.spans_kept += 1
            elif got.source == REGISTRY:
                stats.spans_fetched += 1
                stats.span_bytes_fetched += end - start
            return got.data, bool(digest)

        return get
