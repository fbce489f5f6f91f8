"""Where a copied blob's bytes come from: the committed cache file, else SRC teed into the cache.

Split from :mod:`.copy` so the rules that keep a corrupt blob from reaching DEST sit in one place.
Every stream :meth:`BlobSource.open` hands out is *verified*: it holds its last chunk until the
whole blob (from byte 0, whatever offset it was opened at) hashed to the digest, and raises
:class:`~.errors.DigestMismatch` instead. So a destination may send the bytes without hashing
them again (the Pusher does not: each byte is hashed once, on the way in). A committed blob is
also offered as a file (:meth:`BlobSource.committed`), which a registry destination sends with
``sendfile`` while hashing it itself.

From SRC, a blob is asked for as two ranges: a first short one through httpx, which settles auth,
redirects and mirrors and teaches the client the request (:mod:`.registry.direct`), then the rest,
which the client reads on a plain socket in worker threads. Same bytes, one request more, and the
trio thread is left free to feed the upload.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Callable

import trio

from .content.store import Store, Writer
from .descriptors import Descriptor
from .errors import AlreadyExists, DigestMismatch, Unavailable
from .handlers import Fetcher, commit_labels

__all__ = ["BlobSource", "CommittedBlob", "READ_CHUNK", "FIRST_RANGE"]

log = logging.getLogger(__name__)

#: Bytes per read of a committed blob or an ingest.
READ_CHUNK = 1 << 20
#: The first range of a blob from SRC, through httpx; the rest goes on the direct path, which takes
#: ranges of at least ``registry.tuning.DIRECT_MIN`` (1 MiB) — smaller blobs are one request.
FIRST_RANGE = 1 << 20


@dataclasses.dataclass(frozen=True)
class CommittedBlob:
    """A blob committed in the cache, which a destination may read itself (a registry sends it with
    ``sendfile``) instead of through ``open_source``, calling ``read(n)`` for what it read."""

    path: Path
    read: Callable[[int], None]


class BlobSource:
    """One blob's bytes from ``offset``: the committed cache file, else SRC teed into an ingest.

    ``open(offset)`` may be called again after a cut upload: what the ingest already holds is read
    back, the rest comes from SRC. The last chunk is held until the whole blob hashed right, so a
    destination never receives all of a corrupt blob. A writer held by another process leaves
    the cache out: the bytes are hashed here instead.
    """

    def __init__(self, store: Store, fetcher: Fetcher, desc: Descriptor, on_bytes: Callable[[int], None]) -> None:
        self.store, self.fetcher, self.desc, self.on_bytes = store, fetcher, desc, on_bytes
        self.writer: Writer | None = None
        self.uncached = False
        self.from_source = 0  # bytes read from SRC
        self.from_cache = 0
        self.verified = trio.Event()  # the writer's blob hashed right: it may be committed
        self._keeping = False  # upload_to is committing it
        self._kept = trio.Event()  # ... and that commit is over (or failed)

    async def upload_to(self, dest) -> None:
        """``dest.upload_blob`` from this source. What streams through the cache is committed (fsync,
        rename) as soon as it verified, while the destination still takes the last segment and the
        final ``PUT``; a failed upload keeps good bytes for a re-run, never wrong ones."""
        async def keep() -> None:
            await self.verified.wait()
            self._keeping = True
            try:
                await self.finish()
            finally:
                self._kept.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep)
                try:
                    await dest.upload_blob(self.desc, self.open, file=self.committed(), verified=True)
                finally:
                    if not self.verified.is_set():
                        nursery.cancel_scope.cancel()
        except BaseException as exc:
            self.close(exc)
            raise
        await self.finish()

    @asynccontextmanager
    async def open(self, offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        if self._keeping:  # a resume while the ingest is being committed: read the blob it becomes
            await self._kept.wait()
        path = self.store.path(self.desc.digest)
        if path is not None and (self.writer is None or self.writer.closed):  # closed: committed, a resume
            gen = self._file(path, offset)
        else:
            if self.writer is None and not self.uncached:
                try:
                    self.writer = self.store.writer(self.desc.ref_key, self.desc.size, self.desc.digest)
                except AlreadyExists:  # committed by someone else a moment ago
                    path = self.store.path(self.desc.digest)
                except Unavailable as exc:
                    log.info("%s; copying without caching it", exc)
                    self.uncached = True
            if self.writer is not None:
                gen = self._held(self._tee(offset))
            elif path is not None:
                gen = self._file(path, offset)
            else:
                gen = self._direct(offset)
        try:
            yield gen
        finally:
            await gen.aclose()

    def committed(self) -> CommittedBlob | None:
        """The committed cache file, when the bytes come from it rather than SRC."""
        path = self.store.path(self.desc.digest)
        if path is None or self.writer is not None:
            return None
        return CommittedBlob(path, self._read_from_file)

    def _read_from_file(self, n: int) -> None:
        self.from_cache += n
        self.on_bytes(n)

    async def _file(self, path: Path, offset: int) -> AsyncIterator[bytes]:
        """The committed file from ``offset``, hashed from its start: a file corrupted on disk since
        its commit raises before its last byte."""
        hasher = hashlib.sha256()

        async def chunks() -> AsyncIterator[bytes]:
            pos = 0
            with open(path, "rb", buffering=0) as f:
                while pos < self.desc.size:
                    chunk = await trio.to_thread.run_sync(_read_hashed, f, READ_CHUNK, hasher)
                    if not chunk:
                        return
                    pos += len(chunk)
                    yield chunk

        wrong = f"the cached {path} holds {{n}} bytes with digest {{actual}}"
        async for part in self._checked(chunks(), offset, hasher, self._read_from_file, wrong, " (imagefs fsck --repair)"):
            yield part

    async def _fetch(self, at: int) -> AsyncIterator[bytes]:
        """SRC's bytes ``[at, size)``: a first short range through httpx, the rest as a second one
        (which the client sends on its direct path once the first taught it the request)."""
        size = self.desc.size
        cut = at + FIRST_RANGE if size - at >= 2 * FIRST_RANGE else size
        for start, end in ((at, cut), (cut, size)):
            if start >= end:
                continue
            async with self.fetcher.open(self.desc, start, end) as stream:
                async for chunk in stream:
                    self.from_source += len(chunk)
                    yield chunk

    async def _tee(self, offset: int) -> AsyncIterator[bytes]:
        w = self.writer
        assert w is not None
        pos = offset
        while pos < w.offset:  # landed earlier (this process or a suspended one)
            chunk = await trio.to_thread.run_sync(w.pread, pos, min(READ_CHUNK, w.offset - pos))
            pos += len(chunk)
            self.on_bytes(len(chunk))
            yield chunk
        at = w.offset  # == pos, or below it when the destination already had more than we kept
        async for chunk in self._fetch(at):
            await w.write_at(at, chunk)
            if at + len(chunk) > pos:
                part = chunk[pos - at:] if pos > at else chunk
                pos += len(part)
                self.on_bytes(len(part))
                yield part
            at += len(chunk)

    async def _held(self, gen: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``gen``'s chunks, the last one only once the writer's blob verified."""
        last = None
        async for chunk in gen:
            if last is not None:
                yield last
            last = chunk
        assert self.writer is not None
        await self.writer.verify()
        self.verified.set()
        if last is not None:
            yield last

    async def _direct(self, offset: int) -> AsyncIterator[bytes]:
        """From SRC with no cache: hashed here, from the start even when resuming at ``offset``."""
        hasher = hashlib.sha256()

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in self._fetch(0):
                await trio.to_thread.run_sync(hasher.update, chunk)
                yield chunk

        async for part in self._checked(chunks(), offset, hasher, self.on_bytes, "source sent {n} bytes with digest {actual}"):
            yield part

    async def _checked(self, chunks: AsyncIterator[bytes], offset: int, hasher, on_part: Callable[[int], None],
                       wrong: str, hint: str = "") -> AsyncIterator[bytes]:
        """The blob's bytes from ``offset``, out of ``chunks`` (the whole blob from its start, each
        chunk already fed to ``hasher``); the last part only once the whole blob hashed right, so a
        wrong blob is never handed over complete. ``wrong`` names what was got (``{n}``, ``{actual}``)."""
        pos, last = 0, None
        async with aclosing(chunks) as each:
            async for chunk in each:
                end = pos + len(chunk)
                if end > offset:
                    part = chunk[offset - pos:] if offset > pos else chunk
                    if last is not None:
                        yield last
                    last = part
                    on_part(len(part))
                pos = end
        actual = "sha256:" + hasher.hexdigest()
        if pos != self.desc.size or actual != self.desc.digest:
            got = wrong.format(n=pos, actual=actual)
            raise DigestMismatch(f"{self.desc.ref_key}: {got}, expected {self.desc.size} bytes, {self.desc.digest}{hint}")
        if last is not None:
            yield last

    async def finish(self) -> None:
        """The upload succeeded: keep what streamed through the cache."""
        w = self.writer
        if w is not None and not w.closed:
            if w.complete:
                await w.commit(commit_labels(self.desc, [], False))
            else:
                w.suspend()

    def close(self, error: BaseException) -> None:
        """The upload failed: keep good bytes for a re-run, never wrong ones."""
        w = self.writer
        if w is not None and not w.closed:
            if isinstance(error, DigestMismatch):
                w.abort(error)
            else:
                w.suspend()


def _read_hashed(f, n: int, hasher) -> bytes:
    """Worker thread: one read, hashed in the same trip."""
    chunk = f.read(n)
    hasher.update(chunk)
    return chunk
