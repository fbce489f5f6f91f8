"""One blob's ingest in the local store: the :class:`~.store.Writer` that :class:`~.local.LocalStore` hands out.

::

    CACHE/ingest/<ref key>/data    the blob, written sparse at any offset
    CACHE/ingest/<ref key>/state   ref, digest, size, and which ranges are present: a later process resumes

Every byte is hashed once, from memory, by one hasher working in order in a worker thread of its
own: each chunk is written the same way wherever it lands (in order, or ahead with the next Range
request of a sequential reader) and held in memory, up to :data:`HOLD` bytes, until the hashed
prefix reaches it. A write that would pass the hold waits for the hasher instead; only what could
not be held (ahead of a gap the hasher cannot cross) or a resumed ingest is read back from the file.
Why one hasher: a request whose writes also hashed ran at a third of the speed of the one behind
it, which then raced ahead, overflowed the hold and was read back. The commit checks size and
digest before the blob becomes permanent.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..errors import DigestMismatch, StorageError, WriterClosed
from . import filelock, layout
from .labels import now_rfc3339
from .ranges import RangeSet

if TYPE_CHECKING:
    from .local import LocalStore

log = logging.getLogger(__name__)

HASH_CHUNK = 4 << 20
# Bytes landed ahead of the hashed prefix kept in memory until it reaches them (read back from
# the ingest otherwise): about what a sequential reader's next request lands before the current
# one ends, bounded so a mount stays well under its RSS budget.
HOLD = 32 << 20
RECENT = 4  # chunks just landed that a read is answered from without a pread


class LocalWriter:
    """The single writer of one blob: bytes land at any offset in a sparse ingest file.

    ``present`` records which ranges are on disk and is saved beside the data, so a later process
    resumes a partial blob instead of starting over. The contiguous prefix is hashed off the trio
    thread as it grows (:meth:`hash_prefix`); :meth:`commit` checks size and digest before the blob
    becomes permanent. Readers in the same process follow ``present`` and wake on
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
        self.fd = -1
        try:
            self.present = self._resume() or RangeSet()
            self.fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
            os.ftruncate(self.fd, size)  # sparse: holes cost nothing
            self._save_state()
        except OSError as exc:
            if self.fd >= 0:
                os.close(self.fd)
            shutil.rmtree(self.dir, ignore_errors=True)
            raise StorageError(f"{ref}: cannot make an ingest of {size} bytes in {store.ingests}: {exc.strerror}") from exc
        self.hashed = 0
        self._hash = hashlib.sha256()
        self._hashing = False  # a hash job is running (one at a time: they share the hash object)
        self._hash_done = trio.Event()  # set, and renewed, as each hash job ends
        self._held: dict[int, bytes] = {}  # offset -> bytes landed ahead of the hashed prefix
        self._held_bytes = 0
        self._recent: deque[tuple[int, bytes]] = deque(maxlen=RECENT)
        self._ops = 0  # writes in worker threads; the fd stays open until they end
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
                 "present": self.present.ranges()}
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
        """Write ``data`` at ``offset`` (the disk write off the trio thread) and hold it for the hasher."""
        if self.closed:
            raise self.error or WriterClosed(f"{self.ref}: writer is closed")
        if offset + len(data) > self.size:
            raise DigestMismatch(f"{self.ref}: registry sent more than the {self.size} bytes the descriptor says")
        while self._hashing and offset >= self.hashed and self._held_bytes + len(data) > HOLD:
            await self._hash_done.wait()  # the hasher frees the hold as it goes: wait rather than read back
        self._ops += 1
        try:
            await trio.to_thread.run_sync(_pwrite_all, self.fd, data, offset)
        finally:
            self._ops -= 1
            if self.closed:
                self._close_fd()
        if self.closed:
            raise self.error or WriterClosed(f"{self.ref}: writer is closed")
        if offset >= self.hashed and self._held_bytes + len(data) <= HOLD:
            self._held[offset] = data
            self._held_bytes += len(data)
        self.present.add(offset, offset + len(data))
        self._recent.append((offset, data))
        self.notify()
        self._hash_held()

    def _hash_held(self) -> None:
        """Hash the held chunks that continue the hashed prefix in a worker thread, unless a hash
        job is running (its end calls this again)."""
        if self._hashing or self.closed or self.hashed not in self._held:
            return
        chain = self._take_held(self.hashed)
        self._hashing = True
        token = trio.lowlevel.current_trio_token()

        def deliver(outcome) -> None:  # in the worker thread
            try:
                token.run_sync_soon(self._hashed, outcome)
            except trio.RunFinishedError:
                pass

        trio.lowlevel.start_thread_soon(functools.partial(_hash_all, self._hash, self.hashed, chain), deliver)

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
        """Bytes already written; callers check ``present`` first. A range inside a chunk that just
        landed is answered from that chunk (a view, no copy: readers waiting for it are woken
        by its landing), else by ``pread``."""
        for start, chunk in reversed(self._recent):
            if start <= offset and offset + size <= start + len(chunk):
                return memoryview(chunk)[offset - start : offset - start + size]
        return os.pread(self.fd, size, offset)

    def _take_held(self, pos: int) -> list[bytes]:
        """The held chunks contiguous from ``pos``, removed from the hold (the caller hashes them)."""
        out = []
        while True:
            data = self._held.pop(pos, None)
            if data is None:
                return out
            self._held_bytes -= len(data)
            out.append(data)
            pos += len(data)

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
            if self.hashed in self._held:
                self._hash_held()
                continue
            ahead = [k for k in self._held if k > self.hashed]
            upto = min([target, *ahead])
            self.store.count("bytes_read_back", upto - self.hashed)
            self._hashing = True
            hashed = self.hashed
            try:
                hashed = await trio.to_thread.run_sync(_hash_file, self.data_path, self._hash, self.hashed, upto)
            finally:
                self._end_hash_job(hashed)
        for k in [k for k in self._held if k < self.hashed]:  # hashed meanwhile by a read-back
            self._held_bytes -= len(self._held.pop(k))

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
        self._held.clear()
        self._held_bytes = 0
        self._recent.clear()
        self.store.release(self)
        if self.lock is not None:
            self.lock.close()
        if self._ops == 0:
            self._close_fd()
        self.notify()

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _hash_all(hasher, pos: int, chunks: list[bytes]) -> int:
    for chunk in chunks:
        hasher.update(chunk)
        pos += len(chunk)
    return pos


def _hash_file(path: Path, hasher, start: int, end: int) -> int:
    """Feed ``path[start:end]`` to ``hasher`` in bounded chunks; returns ``end``."""
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        pos = start
        while pos < end:
            chunk = f.read(min(HASH_CHUNK, end - pos))
            if not chunk:
                raise StorageError(f"{path}: ingest shorter than expected at {pos}")
            hasher.update(chunk)
            pos += len(chunk)
    return end


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` whole: a reader (or a crash) sees the old file or the new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
