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
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import trio

from .content import labels
from .content.ranges import RangeSet
from .content.store import Store, Writer
from .descriptors import Descriptor
from .errors import AlreadyExists, DigestMismatch, ImagefsError, NotFound, RegistryError, StorageError, Unavailable
from .handlers import Backoff, Fetcher

log = logging.getLogger(__name__)

MAX_OPEN_BLOBS = 256
SPAN = 256 << 10  # what a random read costs; chosen by bench/run (see bench/RESULTS.md)
MAX_WINDOW = 128 << 20  # a sequential reader's readahead, at most
MAX_REQUEST = 64 << 20  # one Range request, at most: registries charge per request
MAX_REQUESTS_PER_BLOB = 3
# The kernel's async readahead reaches us reordered by several MiB (4 MiB readahead, up to 32
# reads in flight): a read this close to where a handle left off still continues its stream.
SEQUENTIAL_SLACK = 16 << 20
CONTENDED_PATIENCE = 3.0  # seconds a read waits for another process's writer before reading around it
FIRST_WINDOW = 4 << 20  # a registry answers in 10-30 ms: start a stream with more than a span
RECORD_INTERVAL = 0.5  # seconds: a killed mount loses at most this long's record of landed bytes


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


@dataclass
class Handle:
    """One open file: its own sequential-read detector, and the failures it has seen."""

    inode: int
    failures: int
    next_offset: int = 0
    window: int = 0
    streamed: int = 0  # bytes read since the current sequential stream began


@dataclass(eq=False)
class _Request:
    start: int
    end: int
    pos: int


@dataclass(eq=False)
class _Blob:
    desc: Descriptor
    writer: Writer
    claimed: RangeSet = field(default_factory=RangeSet)
    requests: set[_Request] = field(default_factory=set)
    errors: list[tuple[int, int, int, BaseException]] = field(default_factory=list)  # (serial, start, end, exc)
    serial: int = 0
    hashing: bool = False
    committing: bool = False
    recording: bool = False
    failed: ImagefsError | None = None  # a commit the disk refused: not retried by this mount


class BlobReader:
    """Reads of layer blobs for one mount; fetches run in the mount's nursery."""

    def __init__(self, store: Store, fetcher: Fetcher, nursery: trio.Nursery, *, strict: bool = False, span: int = SPAN) -> None:
        self.store = store
        self.fetcher = fetcher
        self.nursery = nursery
        self.strict = strict
        self.span = span
        self._blobs: dict[str, _Blob] = {}
        self._failures: dict[str, int] = {}
        self._fds: dict[str, int] = {}
        self._warned: set[str] = set()
        self._known: set[str] = set()  # digests seen committed (blobs are never removed under a mount)
        self._s = dict.fromkeys(ReaderStatistics.__dataclass_fields__, 0)

    def statistics(self) -> ReaderStatistics:
        return ReaderStatistics(**self._s)

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

    def open(self, desc: Descriptor, inode: int) -> Handle:
        return Handle(inode, self._failures.get(desc.digest, 0))

    def read_committed(self, desc: Descriptor, offset: int, size: int) -> bytes:
        """A range of a committed blob: an inline ``pread`` (a page-cache copy), cheaper than any
        thread hop — measured, a hop per request cost a third of cached-read throughput."""
        fd = self._fds.get(desc.digest)
        if fd is None:
            path = self.store.path(desc.digest)
            if path is None:
                raise NotFound(f"{desc.ref_key} is not committed")
            if len(self._fds) >= MAX_OPEN_BLOBS:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[desc.digest] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, size, offset)
        self._count(data)
        return data

    def _count(self, data: bytes, hit: str = "cache_hits") -> None:
        self._s["reads"] += 1
        self._s["bytes_served"] += len(data)
        self._s[hit] += 1

    # -- reading --------------------------------------------------------------------------------

    async def read(self, desc: Descriptor, offset: int, size: int, handle: Handle | None = None) -> bytes:
        """``size`` bytes at ``offset``, fetching what is missing."""
        end = min(offset + size, desc.size)
        if offset >= end:
            return b""
        handle = handle or self.open(desc, 0)
        sequential = self._track(handle, offset, end)
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
            for serial, s, e, exc in blob.errors:
                if serial > since and s < end and offset < e:
                    raise exc if isinstance(exc, ImagefsError) else RegistryError(f"{desc.ref_key}: {exc!r}")
            writer = blob.writer
            if writer.present.covers(offset, end) and (writer.verified or not (self.strict or writer.complete)):
                if sequential and not writer.complete:
                    self._readahead(blob, end, handle.window)  # a stream served from landed bytes keeps fetching ahead
                data = writer.pread(offset, end - offset)
                self._count(data, "ingest_hits")
                return data
            if writer.complete:
                if blob.failed is not None:
                    raise blob.failed  # complete, yet neither verified nor committed: waiting cannot help
                self._start_commit(blob)
            else:
                self._schedule(blob, offset, end, handle.window if sequential else 0)
            self._s["lock_waits"] += 1
            with trio.move_on_after(backoff.next_delay()):
                await blob.writer.wait_changed()

    def _track(self, handle: Handle, offset: int, end: int) -> bool:
        """Whether this read continues the handle's stream; widens or resets its window."""
        if handle.next_offset == 0:  # a first read starts a stream only at the start of the blob
            sequential = offset < self.span
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

    async def _acquire(self, desc: Descriptor, patience: bool = False) -> _Blob | None:
        """The shared state of a blob being fetched: take the store's writer, backing off while
        another holder (another process, or a whole-blob fetch) has it. With ``patience``, give up
        after :data:`CONTENDED_PATIENCE` seconds by raising :class:`_Contended`."""
        # Not handlers.acquire: while we back off, another task of this mount may take the writer,
        # and then we join its _Blob instead of waiting for the commit.
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
            blob = self._blobs[desc.digest] = _Blob(desc, writer)
            if self.strict:
                self._schedule(blob, 0, desc.size, MAX_WINDOW)
            self._after_write(blob)  # a resumed ingest may be complete already
            return blob

    async def _read_around(self, desc: Descriptor, offset: int, end: int, why: _Contended) -> bytes:
        """Serve a read straight from the registry, caching nothing: another process holds the
        blob's ingest (containerd allows one writer) and a reader must not wait on it forever."""
        if desc.digest not in self._warned:
            self._warned.add(desc.digest)
            log.info("%s; reading around it without caching", why)
        buf = bytearray()
        async with self.fetcher.open(desc, offset, end) as stream:
            async for chunk in stream:
                buf += chunk
        self._s["requests"] += 1
        self._s["bytes_fetched"] += len(buf)
        self._count(bytes(buf), "passthrough")
        return bytes(buf)

    # -- fetching -------------------------------------------------------------------------------

    def _schedule(self, blob: _Blob, offset: int, end: int, window: int) -> None:
        """Claim and fetch the missing bytes of ``[offset, end)``, and readahead after it."""
        size = blob.desc.size
        lo = offset - offset % self.span
        hi = min(size, -(-end // self.span) * self.span)
        self._claim(blob, lo, hi)
        if window:
            self._readahead(blob, end, window)

    def _readahead(self, blob: _Blob, end: int, window: int) -> None:
        """Ask for the next stretch while the current one still has half a window to go."""
        size = blob.desc.size
        horizon = min(size, end + window)
        frontier = self._frontier(blob, end, horizon)
        if frontier < min(size, end + window // 2) + 1 or frontier < horizon and not blob.requests:
            self._claim(blob, frontier, horizon)

    def _frontier(self, blob: _Blob, pos: int, limit: int) -> int:
        """The first byte at or after ``pos`` that is neither present nor claimed."""
        while pos < limit:
            nxt = max(blob.writer.present.end_of(pos), blob.claimed.end_of(pos))
            if nxt == pos:
                return pos
            pos = nxt
        return limit

    def _claim(self, blob: _Blob, start: int, end: int) -> None:
        for s, e in blob.writer.present.missing(start, end):
            for gs, ge in blob.claimed.missing(s, e):
                if len(blob.requests) >= MAX_REQUESTS_PER_BLOB and gs > start:
                    return  # enough in flight; a later read asks again
                for piece in range(gs, ge, MAX_REQUEST):
                    req = _Request(piece, min(ge, piece + MAX_REQUEST), piece)
                    blob.claimed.add(req.start, req.end)
                    blob.requests.add(req)
                    self.nursery.start_soon(self._fetch, blob, req)

    async def _fetch(self, blob: _Blob, req: _Request) -> None:
        writer = blob.writer
        self._s["requests"] += 1
        try:
            async with self.fetcher.open(blob.desc, req.start, req.end) as stream:
                async for chunk in stream:
                    await writer.write_at(req.pos, chunk)
                    req.pos += len(chunk)
                    self._s["bytes_fetched"] += len(chunk)
                    self._after_write(blob)
            if req.pos < req.end:
                raise RegistryError(f"{blob.desc.ref_key}: stream ended at {req.pos} of [{req.start}, {req.end})")
        except Exception as exc:
            if not writer.closed:
                self._s["fetches_failed"] += 1
                log.error("fetch of %s bytes %d-%d failed: %s", blob.desc.ref_key, req.pos, req.end - 1, exc)
                blob.serial += 1
                blob.errors = blob.errors[-15:] + [(blob.serial, req.pos, req.end, exc)]
        finally:
            blob.claimed.remove(req.start, req.end)
            blob.requests.discard(req)
            writer.notify()  # what landed is recorded by _record, started as it landed

    def _after_write(self, blob: _Blob) -> None:
        """Hash the growing prefix in the background; commit once every byte is here."""
        writer = blob.writer
        if writer.closed:
            return
        if writer.complete:
            self._start_commit(blob)
        elif not blob.hashing and writer.present.prefix() - writer.hashed >= 16 * self.span:
            blob.hashing = True
            self.nursery.start_soon(self._hash, blob)
        if not blob.recording and not writer.complete:
            blob.recording = True
            self.nursery.start_soon(self._record, blob)

    async def _record(self, blob: _Blob) -> None:
        """Record the landed ranges soon after bytes land, not only when a request ends: a
        request can stall or resume for minutes, and a killed mount should keep what it had."""
        writer = blob.writer
        try:
            with trio.move_on_after(RECORD_INTERVAL):
                while not (writer.closed or writer.complete):  # a commit or abort makes it moot
                    await writer.wait_changed()
        finally:
            blob.recording = False
        writer.save()

    async def _hash(self, blob: _Blob) -> None:
        try:
            await blob.writer.hash_prefix()
        except Exception as exc:  # the commit will hash again and report
            log.debug("hashing %s: %s", blob.desc.ref_key, exc)
        finally:
            blob.hashing = False

    def _start_commit(self, blob: _Blob) -> None:
        if not blob.committing:
            blob.committing = True
            self.nursery.start_soon(self._commit, blob)

    async def _commit(self, blob: _Blob) -> None:
        desc, writer = blob.desc, blob.writer
        kept = False
        try:
            await writer.verify()  # readers waiting for the last bytes are served from here on
            with trio.CancelScope(shield=True):  # an unmount lets a verified blob finish committing
                await writer.commit({labels.MEDIATYPE: desc.media_type})
            log.info("committed %s (%d bytes)", desc.ref_key, desc.size)
        except DigestMismatch as exc:
            self._s["verify_failures"] += 1
            self._failures[desc.digest] = self._failures.get(desc.digest, 0) + 1
            log.error("%s discarded: %s", desc.ref_key, exc)
            writer.abort(exc)
        except Exception as exc:
            # The bytes were not found wrong: the disk refused them. Keep the blob (and its writer)
            # for this mount — verified bytes are served from the ingest — and the ingest for the next.
            blob.failed = exc if isinstance(exc, ImagefsError) else StorageError(f"{desc.ref_key}: {exc!r}")
            kept = True
            served = "serving it from the ingest, " if writer.verified else ""
            log.error("%s not committed: %s; %skept for a later mount", desc.ref_key, exc, served)
        finally:
            if not kept and self._blobs.get(desc.digest) is blob:
                del self._blobs[desc.digest]
            writer.notify()

    async def prefetch(self, desc: Descriptor) -> None:
        """Fetch the whole blob and commit it (``--prefetch``, layer indexes); raise why if it fails.

        One attempt: a failed request (after the client's own retries) or a failed verification
        ends it with that error, rather than claiming the same bytes again forever.
        """
        failures = self._failures.get(desc.digest, 0)
        seen: tuple[_Blob, int] | None = None
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
                exc = blob.errors[-1][3]
                raise exc if isinstance(exc, ImagefsError) else RegistryError(f"{desc.ref_key}: {exc!r}")
            if blob.writer.complete:
                self._start_commit(blob)
            else:
                self._claim(blob, self._frontier(blob, 0, desc.size), desc.size)
            await blob.writer.wait_changed()

    def close(self) -> None:
        """Keep partial blobs for the next mount; close cached descriptors."""
        for blob in list(self._blobs.values()):
            blob.writer.suspend()
        self._blobs.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
