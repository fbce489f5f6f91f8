"""One blob's ingest in the local store: the :class:`~.store.Writer` that :class:`~.local.LocalStore` hands out.

::

    CACHE/ingest/<ref key>/data    the blob, written sparse at any offset
    CACHE/ingest/<ref key>/state   ref, digest, size, and which ranges are present: a later process resumes

Every byte is hashed once, from memory, by one hasher working in order in a worker thread of its
own: each chunk is held in memory, up to :data:`HOLD` bytes, until the hashed prefix reaches it; a
write that would pass the hold waits for the hasher (a request that also hashed ran at a third of
the speed of the one behind it, which overflowed the hold). Only what could not be held, or a
resumed ingest, is read back. The commit checks size and digest before the blob is permanent.

A page-aligned chunk (the direct path's pooled maps) is written behind, with ``O_DIRECT`` in a
worker thread: it is present, and served from memory, at once, and kept (:data:`KEEP`) until a
read reaches its end. No fresh page cache is filled for it — on this VM the dearest part of a cold
read (``bench/pages``) — and the fetch never waits for the disk. See :mod:`.held`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..errors import DigestMismatch, StorageError, WriterClosed
from . import diskio, filelock, layout
from .diskio import atomic_write, hash_chunks
from .behind import WriteBehind
from .held import Held
from .labels import now_rfc3339
from .ranges import RangeSet

if TYPE_CHECKING:
    from .local import LocalStore

log = logging.getLogger(__name__)

# Bytes landed ahead of the hashed prefix kept in memory until it reaches them (read back from
# the ingest otherwise): about what a sequential reader's next request lands before the current
# one ends, bounded so a mount stays well under its RSS budget.
HOLD = 32 << 20
# Bytes written past the page cache kept for readers until read, by all of a process's ingests
# together (LocalStore.kept): what a stream's readahead lands ahead of its reader (a chunk past it
# goes through the page cache instead).
KEEP = 32 << 20
# O_DIRECT writes of one ingest in flight, at most: the chunks are served from memory meanwhile, so
# the fetch never waits for the disk; past this (the disk is behind) a chunk takes the page cache.
WRITING = 16 << 20


class LocalWriter:
    """The single writer of one blob: bytes land at any offset in a sparse ingest file.

    ``present`` records which ranges readers may read (on disk, or in memory on their way there);
    what is on disk is saved beside the data, so a later process resumes a partial blob. The
    contiguous prefix is hashed off the trio thread as it grows (:meth:`hash_prefix`);
    :meth:`commit` checks size and digest before the blob becomes permanent. Readers in the same process follow ``present`` and wake on
    :meth:`wait_changed`. Leaving the ``with`` block without :meth:`commit` discards the data —
    unless it was verified: then it is kept for a later process, as :meth:`suspend` keeps it.
    """

    def __init__(self, store: LocalStore, ref: str, size: int, digest: str, lock: filelock.Lock | None = None) -> None:
        self.store, self.ref, self.size, self.digest = store, ref, size, digest
        self.lock = lock
        self.started = time.monotonic()
        self.started_at = now_rfc3339()
        self.error: BaseException | None = None
        self.verified = False
        self.committed = False
        self.closed = False
        self.dir = layout.ingest(store.root, ref)
        self.data_path = layout.ingest_data(store.root, ref)
        self.state_path = layout.ingest_state(store.root, ref)
        self.fd = self.direct_fd = -1
        self.behind = WriteBehind(WRITING)  # O_DIRECT writes in flight
        try:
            self.present = self._resume() or RangeSet()
            self.fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
            os.ftruncate(self.fd, size)  # sparse: holes cost nothing
            self.direct_fd = diskio.open_direct(self.data_path)
            self._save_state()
        except OSError as exc:
            self._close_fd()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise StorageError(f"{ref}: cannot make an ingest of {size} bytes in {store.ingests}: {exc.strerror}") from exc
        self.hashed = 0
        self._hash = hashlib.sha256()
        self._hashing = False  # a hash job is running (one at a time: they share the hash object)
        self._hash_done = trio.Event()  # set, and renewed, as each hash job ends
        self.held = Held(HOLD, store.kept)  # chunks in memory, for the hasher and for readers
        self._lost: Exception | None = None  # the last write that failed: bytes present no more
        self._refused: Exception | None = None  # ...not yet raised by a write_at (its fetch fails)
        self._ops = 0  # writes and reads in worker threads; the fds stay open until the last one ends
        self._changed = trio.Event()

    def _resume(self) -> RangeSet | None:
        """The ranges a previous process left, if its ingest is for the same blob."""
        try:
            state = json.loads(self.state_path.read_text())
            if state["digest"] == self.digest and state["size"] == self.size and self.data_path.stat().st_size == self.size:
                present = RangeSet([(int(a), int(b)) for a, b in state.get("present", [])])
                if present.total():
                    log.info("%s: resuming with %d of %d bytes present", self.ref, present.total(), self.size)
                return present
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if self.dir.exists():
            shutil.rmtree(self.dir)  # not ours to resume: start over
        self.dir.mkdir(parents=True)
        return None

    def _save_state(self) -> None:
        state = {"ref": self.ref, "digest": self.digest, "size": self.size, "started": self.started_at,
                 "present": self.behind.on_disk(self.present).ranges()}
        atomic_write(self.state_path, json.dumps(state).encode())

    def __enter__(self) -> "LocalWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.committed:
            return
        if self.verified and not isinstance(exc, DigestMismatch):
            self.suspend()  # right bytes the disk would not commit (ENOSPC): a later try resumes
        else:
            self.abort(exc or WriterClosed(f"{self.ref}: fetch ended before commit"))

    @property
    def offset(self) -> int:
        """Bytes present from the start: where a sequential :meth:`write` continues."""
        return self.present.prefix()

    @property
    def complete(self) -> bool:
        return self.present.covers(0, self.size)

    async def write(self, data: bytes) -> None:
        """Append ``data`` after the present prefix (a whole-blob fetch)."""
        await self.write_at(self.offset, data)

    async def write_at(self, offset: int, data: bytes) -> None:
        """Land ``data`` at ``offset`` (the disk write off the trio thread, or behind it) for readers and the hasher."""
        if self.closed:
            raise self.error or WriterClosed(f"{self.ref}: writer is closed")
        if offset + len(data) > self.size:
            raise DigestMismatch(f"{self.ref}: registry sent more than the {self.size} bytes the descriptor says")
        if self._refused is not None:  # a write behind failed: this fetch fails, as if it were this one
            exc, self._refused = self._refused, None
            raise _unwritable(self.ref, exc) from exc
        held, n = self.held, len(data)
        while self._hashing and offset >= self.hashed and not held.may_hold(n):
            await self._hash_done.wait()  # the hasher frees the hold as it goes: wait rather than read back
        hashing = offset >= self.hashed and held.may_hold(n)
        self._ops += 1  # ended by _op_done: here, or in _wrote for a write behind
        if self.direct_fd >= 0 and self.behind.room(n) and held.may_keep(n) and diskio.aligned(data, offset):
            held.add(offset, data, hashing=hashing, reading=True, writing=True)
            self.behind.start(self.fd, self.direct_fd, offset, data, self._wrote)
        else:
            try:
                await trio.to_thread.run_sync(diskio.land, self.fd, -1, data, offset)
            finally:
                self._op_done()
            if self.closed:
                raise self.error or WriterClosed(f"{self.ref}: writer is closed")
            held.add(offset, data, hashing=hashing, reading=False)
        self.present.add(offset, offset + n)
        self.notify()
        self._hash_held()

    def _wrote(self, offset: int, n: int, outcome) -> None:
        try:
            if outcome.unwrap():
                self.store.count("bytes_written_direct", n)
            self.held.written(offset)
        except Exception as exc:  # not on disk after all: no longer present, a read fetches it again
            log.error("%s: cannot write bytes %d-%d of the ingest: %s", self.ref, offset, offset + n - 1, exc)
            self.held.forget(offset)
            self.present.remove(offset, offset + n)
            self._lost = self._refused = exc
            self.notify()  # readers waiting on those bytes claim them again
        self._op_done()

    async def drain(self) -> None:
        """Wait until every write in flight has reached the disk (or failed)."""
        await self.behind.drain()

    def _hash_held(self) -> None:
        """Hash the held chunks that continue the hashed prefix in a worker thread, unless a hash
        job is running (its end calls this again)."""
        if self._hashing or self.closed or not self.held.starts(self.hashed):
            return
        chain = self.held.chain(self.hashed)
        self._hashing = True
        token = trio.lowlevel.current_trio_token()

        def deliver(outcome) -> None:  # in the worker thread
            try:
                token.run_sync_soon(self._hashed, outcome)
            except trio.RunFinishedError:
                pass

        trio.lowlevel.start_thread_soon(functools.partial(hash_chunks, self._hash, self.hashed, chain), deliver)

    def _hashed(self, outcome) -> None:
        try:
            hashed = outcome.unwrap()
        except Exception as exc:  # not seen; the chain is no longer held, so the commit reads it back
            log.error("%s: hashing from memory failed: %r", self.ref, exc)
            self._end_hash_job(self.hashed)
            return
        self._end_hash_job(hashed)
        self._hash_held()

    def _end_hash_job(self, hashed: int) -> None:
        self.hashed = hashed
        self.held.hashed_to(hashed)
        self._hashing = False
        self._hash_done.set()
        self._hash_done = trio.Event()

    def save(self) -> None:
        """Record which ranges are present, so a crash or unmount loses no fetched byte.

        Best effort: on a full disk the record is stale, which costs a refetch, never a wrong byte.
        """
        if not self.closed:
            try:
                self._save_state()
            except OSError as exc:
                log.warning("%s: cannot record progress: %s", self.ref, exc)

    def pread(self, offset: int, size: int) -> bytes | memoryview:
        """Bytes already present (callers check ``present`` first): from the chunks in memory,
        the rest by ``pread`` (blocking: it may read the disk)."""
        return diskio.joined(self.held.pieces(offset, size, consume=False), self.fd)

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        """What a reader is served: from memory (a view, no copy, when one chunk holds it; a
        chunk is let go once a read reaches its end), the rest by an inline ``pread`` of the page
        cache, or in a worker thread where only the disk has the bytes."""
        parts = self.held.pieces(offset, size)
        gaps = [p for p in parts if isinstance(p, tuple)]
        from_disk = sum(n for _, n in gaps)
        self.store.count("bytes_served_from_memory", size - from_disk)
        if not any(self.held.uncached.overlaps(pos, pos + n) for pos, n in gaps):
            return diskio.joined(parts, self.fd)  # all in memory (one chunk: its view), or the page cache
        self.store.count("bytes_served_from_disk", from_disk)
        self._ops += 1
        try:
            return await trio.to_thread.run_sync(diskio.joined, parts, self.fd)
        finally:
            self._op_done()

    async def hash_prefix(self) -> None:
        """Hash the whole present prefix: held chunks by the hasher, the rest read back from the
        ingest in a worker thread."""
        while not self.closed:
            if self._hashing:
                await self._hash_done.wait()
                continue
            target = self.present.prefix()
            if self.hashed >= target:
                break
            if self.held.starts(self.hashed):
                self._hash_held()
                continue
            ahead = self.held.next_start(self.hashed)
            upto = target if ahead is None else min(target, ahead)
            self.store.count("bytes_read_back", upto - self.hashed)
            self._hashing = True
            hashed = self.hashed
            try:
                hashed = await trio.to_thread.run_sync(diskio.hash_file, self.data_path, self._hash, self.hashed, upto)
            finally:
                self._end_hash_job(hashed)

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def notify(self) -> None:
        """Wake every reader waiting on this blob (bytes landed, or a claim on them ended)."""
        self._changed.set()
        self._changed = trio.Event()

    async def verify(self) -> None:
        """Check size and digest of the complete ingest; raise :class:`DigestMismatch` if wrong.

        Readers may be served from the ingest once this passes, before :meth:`commit` has paid
        for the fsync.
        """
        if self.verified:
            return
        await self.drain()
        if not self.complete and self._lost is not None:  # the disk, not the bytes: not a mismatch
            raise _unwritable(self.ref, self._lost)
        if not self.complete:
            self.store.count("verify_failures")
            raise DigestMismatch(f"{self.ref}: got {self.present.total()} bytes, descriptor says {self.size}")
        await self.hash_prefix()
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            self.store.count("verify_failures")
            raise DigestMismatch(f"{self.ref}: content has digest {actual}, expected {self.digest}")
        self.verified = True
        self.notify()

    async def commit(self, labels: dict[str, str] | None = None) -> Path:
        """Verify, then make the blob permanent.

        A mismatch raises :class:`DigestMismatch` (the caller aborts). A disk that refuses the
        fsync, the labels or the rename raises :class:`StorageError` and leaves the writer open
        and verified: its bytes may still be served, and a later commit may succeed.
        """
        await self.verify()
        target = layout.blob(self.store.root, self.digest)
        try:
            await trio.to_thread.run_sync(os.fsync, self.fd)
            if labels:  # while the file is still ours to write: a 0444 file refuses xattrs to non-root
                self.store.update_labels(self.digest, labels, path=self.data_path)
            os.chmod(self.data_path, 0o444)
            os.rename(self.data_path, target)
        except OSError as exc:
            raise StorageError(f"{self.ref}: verified, but cannot be committed: {exc.strerror or exc}") from exc
        self.committed = True
        self.store.count("blobs_committed")
        self.store.count("bytes_committed", self.size)
        shutil.rmtree(self.dir, ignore_errors=True)
        self._close()
        return target

    def abort(self, error: BaseException) -> None:
        """Discard the partial data and wake every reader with ``error``."""
        if self.committed or self.closed:
            return
        self.error = error
        shutil.rmtree(self.dir, ignore_errors=True)  # before the lock goes: no one sees half of it
        self._close()

    def suspend(self) -> None:
        """Stop writing but keep what is present, for the next process to resume."""
        if self.committed or self.closed:
            return
        self.save()
        self.error = WriterClosed(f"{self.ref}: fetch suspended")
        self._close()

    def _close(self) -> None:
        self.closed = True
        self.held.clear()
        self.store.release(self)
        if self.lock is not None:
            self.lock.close()
        if self._ops == 0:
            self._close_fd()
        self.notify()

    def _op_done(self) -> None:
        """A write or read in a worker thread ended: the last one out of a closed writer closes the
        fds (one closing under another's read was an EBADF)."""
        self._ops -= 1
        if self.closed and self._ops == 0:
            self._close_fd()

    def _close_fd(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1


def _unwritable(ref: str, exc: Exception) -> StorageError:
    return StorageError(f"{ref}: cannot write the ingest: {getattr(exc, 'strerror', None) or exc}")
