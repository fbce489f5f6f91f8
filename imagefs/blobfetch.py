"""One blob being fetched into the store, shared by every reader of it in a mount.

A :class:`BlobFetch` holds the store's writer for the blob's ref key and what is ``claimed`` by a
``Range`` request in flight (the writer knows what is ``present``). Readers claim what no one has
claimed — aligned to spans by :class:`~imagefs.reader.BlobReader` — and wait on the writer; the
requests run in the mount's nursery, land their bytes through the writer, and the moment every
byte is here the blob is verified and committed. Errors are kept with a serial number, so a
reader fails only for a request that failed after it started waiting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import trio

from .content import labels
from .content.ranges import RangeSet
from .content.store import Writer
from .descriptors import Descriptor
from .errors import DigestMismatch, ImagefsError, RegistryError, StorageError
from .handlers import Fetcher

log = logging.getLogger(__name__)

MAX_REQUEST = 64 << 20  # one Range request, at most: registries charge per request
MAX_REQUESTS_PER_BLOB = 3
# A stream's next request starts once this little is left to arrive of those in flight: enough to
# hide a registry's 10-30 ms to a first byte, little enough that what lands ahead of the hashed
# prefix fits the ingest's in-memory hold (content/ingest.py HOLD) instead of being read back.
LEAD = 24 << 20
# A stream's requests end on a MiB (unless at the blob's or a member's end), wherever its reads
# fall: the next one then starts on a page, and its chunks can be written with O_DIRECT.
ALIGN = 1 << 20
RECORD_INTERVAL = 0.5  # seconds: a killed mount loses at most this long's record of landed bytes


@dataclass(eq=False)
class Request:
    start: int
    end: int
    pos: int


class BlobFetch:
    """The shared fetch state of one blob; its requests and its commit run in ``nursery``.

    ``count(name, n)`` adds to the reader's statistics; ``discarded(desc)`` is told when the blob
    failed verification; ``ended(self)`` when it is committed or discarded (no longer in flight).
    """

    def __init__(self, desc: Descriptor, writer: Writer, fetcher: Fetcher, nursery: trio.Nursery, *,
                 count: Callable[..., None], discarded: Callable[[Descriptor], None],
                 ended: Callable[["BlobFetch"], None], hash_after: int) -> None:
        """``hash_after``: hash a prefix that grew past the bytes hashed as they landed once it is
        this far ahead (in a worker thread, reading the ingest back)."""
        self.desc, self.writer, self.fetcher, self.nursery = desc, writer, fetcher, nursery
        self._count, self._discarded, self._ended, self._hash_after = count, discarded, ended, hash_after
        self.claimed = RangeSet()
        self.requests: set[Request] = set()
        self.errors: list[tuple[int, int, int, BaseException]] = []  # (serial, start, end, exc)
        self.serial = 0
        self.failed: ImagefsError | None = None  # a commit the disk refused: not retried by this mount
        self._hashing = self._committing = self._recording = False

    def error_since(self, since: int, start: int, end: int) -> ImagefsError | None:
        """The error of a request for bytes in ``[start, end)`` that failed after ``since``."""
        for serial, s, e, exc in self.errors:
            if serial > since and s < end and start < e:
                return exc if isinstance(exc, ImagefsError) else RegistryError(f"{self.desc.ref_key}: {exc!r}")
        return None

    def last_error(self) -> ImagefsError:
        """The latest failed request's error (a whole-blob fetch gives up on it: one attempt)."""
        exc = self.errors[-1][3]
        return exc if isinstance(exc, ImagefsError) else RegistryError(f"{self.desc.ref_key}: {exc!r}")

    # -- claiming -------------------------------------------------------------------------------

    def readahead(self, end: int, window: int, limit: int | None = None) -> None:
        """Ask for the next stretch while the current one still has half a window to go; never
        past ``limit`` (a member's end). One request at a time, paced by :data:`LEAD`, so the
        bytes of a stream land nearly in order."""
        size = self.desc.size if limit is None else min(limit, self.desc.size)
        horizon = min(size, max(end, (end + window) // ALIGN * ALIGN))
        frontier = self.frontier(end, horizon)
        due = frontier < min(size, end + window // 2) + 1 or frontier < horizon and not self.requests
        if due and self.in_flight() <= LEAD:
            self.claim(frontier, min(horizon, frontier + MAX_REQUEST))

    def next_stretch(self) -> None:
        """Claim the next request of a whole-blob fetch, paced as a stream's readahead is."""
        if self.in_flight() <= LEAD:
            frontier = self.frontier(0, self.desc.size)
            self.claim(frontier, min(self.desc.size, frontier + MAX_REQUEST))

    def in_flight(self) -> int:
        """Bytes still to arrive of the requests in flight."""
        return sum(r.end - r.pos for r in self.requests)

    def frontier(self, pos: int, limit: int) -> int:
        """The first byte at or after ``pos`` that is neither present nor claimed."""
        while pos < limit:
            nxt = max(self.writer.present.end_of(pos), self.claimed.end_of(pos))
            if nxt == pos:
                return pos
            pos = nxt
        return limit

    def claim(self, start: int, end: int) -> None:
        """Fetch the bytes of ``[start, end)`` neither present nor claimed."""
        for s, e in self.writer.present.missing(start, end):
            for gs, ge in self.claimed.missing(s, e):
                if len(self.requests) >= MAX_REQUESTS_PER_BLOB and gs > start:
                    return  # enough in flight; a later read asks again
                for piece in range(gs, ge, MAX_REQUEST):
                    req = Request(piece, min(ge, piece + MAX_REQUEST), piece)
                    self.claimed.add(req.start, req.end)
                    self.requests.add(req)
                    self.nursery.start_soon(self._fetch, req)

    # -- fetching -------------------------------------------------------------------------------

    async def _fetch(self, req: Request) -> None:
        writer = self.writer
        self._count("requests")
        try:
            async with self.fetcher.open(self.desc, req.start, req.end) as stream:
                async for chunk in stream:
                    await writer.write_at(req.pos, chunk)
                    req.pos += len(chunk)
                    self._count("bytes_fetched", len(chunk))
                    self.landed()
            if req.pos < req.end:
                raise RegistryError(f"{self.desc.ref_key}: stream ended at {req.pos} of [{req.start}, {req.end})")
        except Exception as exc:
            if not writer.closed:
                self._count("fetches_failed")
                log.error("fetch of %s bytes %d-%d failed: %s", self.desc.ref_key, req.pos, req.end - 1, exc)
                self.serial += 1
                self.errors = self.errors[-15:] + [(self.serial, req.pos, req.end, exc)]
        finally:
            self.claimed.remove(req.start, req.end)
            self.requests.discard(req)
            writer.notify()  # what landed is recorded by _record, started as it landed

    def landed(self) -> None:
        """Bytes landed (or a resumed ingest was found): hash the prefix that grew out of order in
        the background, record progress, and commit once every byte is here."""
        writer = self.writer
        if writer.closed:
            return
        if writer.complete:
            self.start_commit()
        elif not self._hashing and writer.present.prefix() - writer.hashed >= self._hash_after:
            self._hashing = True
            self.nursery.start_soon(self._hash)
        if not self._recording and not writer.complete:
            self._recording = True
            self.nursery.start_soon(self._record)

    async def _record(self) -> None:
        """Record the landed ranges soon after bytes land, not only when a request ends: a
        request can stall or resume for minutes, and a killed mount should keep what it had."""
        writer = self.writer
        try:
            with trio.move_on_after(RECORD_INTERVAL):
                while not (writer.closed or writer.complete):  # a commit or abort makes it moot
                    await writer.wait_changed()
        finally:
            self._recording = False
        writer.save()

    async def _hash(self) -> None:
        try:
            await self.writer.hash_prefix()
        except Exception as exc:  # the commit will hash again and report
            log.debug("hashing %s: %s", self.desc.ref_key, exc)
        finally:
            self._hashing = False

    # -- ending ---------------------------------------------------------------------------------

    def start_commit(self) -> None:
        """Verify and commit once (every byte is here); readers are served from ``verify`` on."""
        if not self._committing:
            self._committing = True
            self.nursery.start_soon(self._commit)

    async def _commit(self) -> None:
        desc, writer = self.desc, self.writer
        kept = False
        try:
            await writer.verify()  # readers waiting for the last bytes are served from here on
            with trio.CancelScope(shield=True):  # an unmount lets a verified blob finish committing
                await writer.commit({labels.MEDIATYPE: desc.media_type})
            log.info("committed %s (%d bytes)", desc.ref_key, desc.size)
        except DigestMismatch as exc:
            self._count("verify_failures")
            self._discarded(desc)
            log.error("%s discarded: %s", desc.ref_key, exc)
            writer.abort(exc)
        except Exception as exc:
            # The bytes were not found wrong: the disk refused them. Keep the blob (and its writer)
            # for this mount — verified bytes are served from the ingest — and the ingest for the next.
            self.failed = exc if isinstance(exc, ImagefsError) else StorageError(f"{desc.ref_key}: {exc!r}")
            kept = True
            served = "serving it from the ingest, " if writer.verified else ""
            log.error("%s not committed: %s; %skept for a later mount", desc.ref_key, exc, served)
        finally:
            if not kept:
                self._ended(self)
            writer.notify()
