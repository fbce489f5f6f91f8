"""Serving byte ranges of layer blobs, fetching only what is read.

All readers of one blob share a :class:`_Blob`: the store's writer for its ref key (one per
process; a loser backs off with containerd's jitter), which byte ranges are ``present`` on disk
and which are ``claimed`` by a request in flight. A read whose bytes are missing claims what no
one has claimed — aligned to spans — and fetches it with one closed ``Range`` request; readers of
claimed bytes wait, woken the moment bytes land. So 64 readers of one cold blob make the registry
send it about once.

Each open file follows its own access pattern: a random read fetches one span; a sequential reader
grows a readahead window (4 → 128 MiB, never more than twice what it has read) and issues the next
request before the current one runs dry — also while it is served from bytes that landed early — so
``cat`` streams at close to download speed while ``dd skip=…`` costs a span.

Bytes are served as they land, unverified — except that a complete blob is served only after its
digest is checked: the read that finishes a blob waits for the commit. A blob that fails that
check is discarded; files opened before the failure get EIO from then on, and a new open fetches
the blob again. A commit the disk refuses (ENOSPC at fsync, labels it cannot write) is no such
failure: the verified bytes are served from the ingest and kept there for a later mount.
``strict`` serves nothing before the whole blob is verified (containerd's rule).

This is the filesystem's one entry for blob bytes (:class:`~imagefs.blobranges.BlobRanges`):
:meth:`BlobReader.read` for served bytes, :meth:`BlobReader.span` for whole, verified pieces (gzip
spans, TOC chunks, footers) that ``layers/`` asks for. The fetching itself — claims, requests,
the commit — is :class:`~imagefs.blobfetch.BlobFetch`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import trio

from .blobfetch import BlobFetch
from .blobranges import BLOB, KEPT, REGISTRY, Handle, Keeper, Piece, Span
from .content.store import Store
from .descriptors import Descriptor
from .errors import AlreadyExists, DigestMismatch, InvalidLayer, NotFound, Unavailable
from .handlers import Backoff, Fetcher

log = logging.getLogger(__name__)

__all__ = ["BlobReader", "Handle", "ReaderStatistics", "SPAN"]

MAX_OPEN_BLOBS = 256
SPAN = 256 << 10  # what a random read costs; chosen by bench/run (see bench/RESULTS.md)
MAX_WINDOW = 128 << 20  # a sequential reader's readahead, at most
# The kernel's async readahead reaches us reordered by several MiB (4 MiB readahead, up to 32
# reads in flight): a read this close to where a handle left off still continues its stream.
SEQUENTIAL_SLACK = 16 << 20
CONTENDED_PATIENCE = 3.0  # seconds a read waits for another process's writer before reading around it
FIRST_WINDOW = 4 << 20  # a registry answers in 10-30 ms: start a stream with more than a span


class _Contended(Exception):
    """Another process has held the blob's writer longer than a reader should wait."""


@dataclass(frozen=True)
class ReaderStatistics:
    """What a mount did: enough to make benchmarks and ``user.imagefs.*`` xattrs honest."""

    reads: int
    bytes_served: int
    cache_hits: int  # reads served from committed blobs
    ingest_hits: int  # reads served from partial blobs
    passthrough: int  # reads served straight from the registry while another process held the blob
    lock_waits: int  # waits for bytes someone else is fetching
    requests: int  # Range requests sent
    bytes_fetched: int
    fetches_failed: int
    verify_failures: int


class BlobReader:
    """Reads of blobs for one mount (:class:`~imagefs.blobranges.BlobRanges`); fetches run in the
    mount's nursery."""

    def __init__(self, store: Store, fetcher: Fetcher, nursery: trio.Nursery, *, strict: bool = False, span: int = SPAN) -> None:
        self.store = store
        self.fetcher = fetcher
        self.nursery = nursery
        self.strict = strict
        self.span_size = span
        self._blobs: dict[str, BlobFetch] = {}
        self._failures: dict[str, int] = {}
        self._fds: dict[str, int] = {}
        self._warned: set[str] = set()
        self._known: set[str] = set()  # digests seen committed (blobs are never removed under a mount)
        self._s = dict.fromkeys(ReaderStatistics.__dataclass_fields__, 0)

    def statistics(self) -> ReaderStatistics:
        return ReaderStatistics(**self._s)

    def _add(self, name: str, n: int = 1) -> None:
        self._s[name] += n

    # -- what is here ---------------------------------------------------------------------------

    def fetched(self, desc: Descriptor) -> int:
        """Bytes of ``desc`` held locally now."""
        if self.committed(desc):
            return desc.size
        blob = self._blobs.get(desc.digest)
        if blob is not None:
            return blob.writer.present.total()
        w = self.store.active(desc.ref_key)
        return w.present.total() if w is not None else 0

    def committed(self, desc: Descriptor) -> bool:
        # Hot path: no stat while this mount is the one fetching the blob, and none once it is known.
        if desc.digest in self._fds or desc.digest in self._known:
            return True
        blob = self._blobs.get(desc.digest)
        if blob is not None and not blob.writer.committed:
            return False
        if self.store.path(desc.digest) is not None:
            self._known.add(desc.digest)
            return True
        return False

    def open(self, desc: Descriptor, inode: int, *, start: int = 0, end: int | None = None) -> Handle:
        # A handle that starts inside the blob (a member) continues a stream from its start.
        return Handle(inode, self._failures.get(desc.digest, 0), next_offset=start, end=end)

    def read_committed(self, desc: Descriptor, offset: int, size: int) -> bytes:
        """A range of a committed blob: an inline ``pread`` (a page-cache copy), cheaper than any
        thread hop — measured, a hop per request cost a third of cached-read throughput."""
        data = os.pread(self._fd(desc), size, offset)
        self._count(data)
        return data

    def _fd(self, desc: Descriptor) -> int:
        fd = self._fds.get(desc.digest)
        if fd is None:
            path = self.store.path(desc.digest)
            if path is None:
                raise NotFound(f"{desc.ref_key} is not committed")
            if len(self._fds) >= MAX_OPEN_BLOBS:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[desc.digest] = os.open(path, os.O_RDONLY)
        return fd

    def _count(self, data: bytes, hit: str = "cache_hits") -> None:
        self._s["reads"] += 1
        self._s["bytes_served"] += len(data)
        self._s[hit] += 1

    # -- served bytes ---------------------------------------------------------------------------

    async def read(self, desc: Descriptor, offset: int, size: int, handle: Handle | None = None) -> bytes | memoryview:
        """``size`` bytes at ``offset``, fetching what is missing (a view of a chunk that just landed
        when it holds them: FUSE replies take any buffer)."""
        end = min(offset + size, desc.size)
        if offset >= end:
            return b""
        handle = handle or self.open(desc, 0)
        sequential = self._track(handle, offset, end)
        window = handle.window if sequential else 0
        backoff = Backoff()
        since = None
        while True:
            if self._failures.get(desc.digest, 0) != handle.failures:
                raise DigestMismatch(f"{desc.ref_key} failed verification after this file was opened; open it again to refetch")
            if self.committed(desc):
                return self.read_committed(desc, offset, end - offset)
            try:
                blob = self._blobs.get(desc.digest) or await self._acquire(desc, patience=not self.strict)
            except _Contended as exc:
                return await self._read_around(desc, offset, end, exc)
            if blob is None:
                continue  # committed meanwhile
            if since is None:
                since = blob.serial
            error = blob.error_since(since, offset, end)
            if error is not None:
                raise error
            writer = blob.writer
            if writer.present.covers(offset, end) and (writer.verified or not (self.strict or writer.complete)):
                if sequential and not writer.complete:
                    blob.readahead(end, window, handle.end)  # a stream served from landed bytes keeps fetching ahead
                data = await writer.read(offset, end - offset)
                self._count(data, "ingest_hits")
                return data
            if writer.complete:
                if blob.failed is not None:
                    raise blob.failed  # complete, yet neither verified nor committed: waiting cannot help
                blob.start_commit()
            else:
                self._schedule(blob, offset, end, window, handle.end)
            self._s["lock_waits"] += 1
            with trio.move_on_after(backoff.next_delay()):
                await blob.writer.wait_changed()

    def _track(self, handle: Handle, offset: int, end: int) -> bool:
        """Whether this read continues the handle's stream; widens or resets its window."""
        if handle.next_offset == 0:  # a first read starts a stream only at the start of the blob
            sequential = offset < self.span_size
        else:
            slack = max(SEQUENTIAL_SLACK, handle.window)
            sequential = handle.next_offset - slack <= offset <= handle.next_offset + slack
        if sequential:
            # Readahead runs on reads of landed bytes too, so it must stay in proportion to the
            # stream: at most twice what it has read (``head -c 3M`` costs a few MiB, ``cat``
            # reaches the full window after 64 MiB).
            handle.streamed += end - offset
            handle.window = min(handle.window * 2, MAX_WINDOW, 2 * handle.streamed)
            handle.window = max(handle.window, FIRST_WINDOW)
        else:
            handle.window = handle.streamed = 0
        handle.next_offset = max(handle.next_offset, end) if sequential else end
        return sequential

    def _schedule(self, blob: BlobFetch, offset: int, end: int, window: int, limit: int | None) -> None:
        """Claim and fetch the missing bytes of ``[offset, end)`` span-aligned, and readahead after it."""
        lo = offset - offset % self.span_size
        hi = min(blob.desc.size, -(-end // self.span_size) * self.span_size)
        blob.claim(lo, hi)
        if window:
            blob.readahead(end, window, limit)

    async def _acquire(self, desc: Descriptor, patience: bool = False) -> BlobFetch | None:
        """The shared state of a blob being fetched: take the store's writer, backing off while
        another holder (another process, or a whole-blob fetch) has it. With ``patience``, give up
        after :data:`CONTENDED_PATIENCE` seconds by raising :class:`_Contended`."""
        # Not handlers.acquire: while we back off, another task of this mount may take the writer,
        # and then we join its BlobFetch instead of waiting for the commit.
        backoff = Backoff()
        give_up = trio.current_time() + CONTENDED_PATIENCE
        while True:
            if desc.digest in self._blobs:
                return self._blobs[desc.digest]
            try:
                writer = self.store.writer(desc.ref_key, desc.size, desc.digest)
            except AlreadyExists:
                return None
            except Unavailable as exc:
                self._s["lock_waits"] += 1
                if backoff.waits == 0:
                    log.debug("waiting: %s", exc)
                if patience and trio.current_time() > give_up:
                    raise _Contended(str(exc)) from exc
                await backoff.wait()
                continue
            blob = self._blobs[desc.digest] = BlobFetch(
                desc, writer, self.fetcher, self.nursery, count=self._add, discarded=self._discarded,
                ended=self._ended, hash_after=16 * self.span_size)
            if self.strict:
                self._schedule(blob, 0, desc.size, MAX_WINDOW, None)
            blob.landed()  # a resumed ingest may be complete already
            return blob

    def _discarded(self, desc: Descriptor) -> None:
        self._failures[desc.digest] = self._failures.get(desc.digest, 0) + 1

    def _ended(self, blob: BlobFetch) -> None:
        if self._blobs.get(blob.desc.digest) is blob:
            del self._blobs[blob.desc.digest]

    async def _read_around(self, desc: Descriptor, offset: int, end: int, why: _Contended) -> bytes:
        """Serve a read straight from the registry, caching nothing: another process holds the
        blob's ingest (containerd allows one writer) and a reader must not wait on it forever."""
        if desc.digest not in self._warned:
            self._warned.add(desc.digest)
            log.info("%s; reading around it without caching", why)
        data = await self._get(desc, offset, end)
        self._s["requests"] += 1
        self._s["bytes_fetched"] += len(data)
        self._count(data, "passthrough")
        return data

    async def _get(self, desc: Descriptor, start: int, end: int) -> bytes:
        """One closed ``Range`` request, whole: the only registry stream outside a BlobFetch."""
        parts = []
        async with self.fetcher.open(desc, start, end) as stream:
            async for chunk in stream:
                parts.append(chunk)
        return b"".join(parts)

    # -- whole pieces ---------------------------------------------------------------------------

    async def span(self, desc: Descriptor, start: int, end: int, piece: Piece | None = None,
                   keep: Keeper | None = None) -> Span:
        """Bytes ``[start, end)`` whole (:meth:`~imagefs.blobranges.BlobRanges.span`): from the
        committed blob, else a kept piece, else one Range request; checked against ``piece`` and
        decoded by it, and kept only once checked. Not counted as served: ``layers/`` counts them."""
        checked = piece is not None and bool(piece.sha256)
        data = await trio.to_thread.run_sync(self._pread_committed, desc, start, end) if self.committed(desc) else None
        if data is not None:
            source = BLOB
            keep = None  # the blob is all the cache it needs
        else:
            if checked and keep is not None:
                kept = await trio.to_thread.run_sync(keep.get, piece.sha256)  # re-hashed as it loads
                if kept is not None:
                    return Span(kept, KEPT)
            data = await self._get(desc, start, end)
            source = REGISTRY
            if len(data) != end - start:
                raise InvalidLayer(f"{desc.ref_key}: asked for bytes {start}-{end - 1}, got {len(data)}")
        if checked:
            data = await trio.to_thread.run_sync(_checked, data, piece, keep)
        return Span(data, source)

    def _pread_committed(self, desc: Descriptor, start: int, end: int) -> bytes | None:
        path = self.store.path(desc.digest)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:  # not the cached fd: this runs in a worker thread
                return os.pread(f.fileno(), end - start, start)
        except FileNotFoundError:  # evicted just now: the registry still has it
            return None

    # -- whole blobs ----------------------------------------------------------------------------

    async def prefetch(self, desc: Descriptor) -> None:
        """Fetch the whole blob and commit it (``--prefetch``, layer indexes); raise why if it fails.

        One attempt: a failed request (after the client's own retries) or a failed verification
        ends it with that error, rather than claiming the same bytes again forever.
        """
        failures = self._failures.get(desc.digest, 0)
        seen: tuple[BlobFetch, int] | None = None
        while not self.committed(desc):
            if self._failures.get(desc.digest, 0) > failures:
                raise DigestMismatch(f"{desc.ref_key} failed verification (see the log)")
            blob = self._blobs.get(desc.digest) or await self._acquire(desc)
            if blob is None:
                return
            if blob.failed is not None:
                raise blob.failed
            if seen is None or seen[0] is not blob:
                seen = (blob, blob.serial)
            elif blob.serial > seen[1]:
                raise blob.last_error()
            if blob.writer.complete:
                blob.start_commit()
            else:
                blob.next_stretch()
            await blob.writer.wait_changed()

    def close(self) -> None:
        """Keep partial blobs for the next mount; close cached descriptors."""
        for blob in list(self._blobs.values()):
            blob.writer.suspend()
        self._blobs.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _checked(data: bytes, piece: Piece, keep: Keeper | None) -> bytes:
    """Decode ``data`` as ``piece`` says and check its digest, then keep it (blocking: a worker
    thread). A piece that fails is a DigestMismatch and is never kept."""
    if piece.decode is not None:
        data = piece.decode(data)
    if hashlib.sha256(data).hexdigest() != piece.sha256:
        raise DigestMismatch(piece.refused)
    if keep is not None:
        keep.put(piece.sha256, data)
    return data
