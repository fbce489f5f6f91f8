"""The local content store: committed blobs, in-progress ingests and remembered tags.

It implements every capability of :mod:`.store` on a directory laid out as :mod:`.layout` says:
committed blobs (mode 0444, labels as ``user.`` xattrs or a sidecar file), ingests (data written
sparse at offsets, and a state file of which ranges are present), and a tag's last resolution.

One :class:`LocalWriter` per ref key: in this process by a table, across processes sharing the cache by
an ``flock`` (:mod:`.filelock`); a second caller gets :class:`Unavailable` saying who holds the ref
and for how long, and backs off, as containerd's fetch does.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import trio

from ..errors import AlreadyExists, DigestMismatch, NotFound, StorageError, Unavailable, WriterClosed
from . import filelock, layout
from .labels import now_rfc3339
from .ranges import RangeSet
from .store import Info

log = logging.getLogger(__name__)

XATTR_PREFIX = "user."
HASH_CHUNK = 4 << 20


def default_cache_dir() -> Path:
    """``$IMAGEFS_CACHE_DIR``, else ``$XDG_CACHE_HOME/imagefs``, else ``~/.cache/imagefs``."""
    if os.environ.get("IMAGEFS_CACHE_DIR"):
        return Path(os.environ["IMAGEFS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imagefs"


class LocalStore:
    """A content store on a local directory, outliving any one mount."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = layout.blobs(self.root)
        self.ingests = layout.ingests(self.root)
        for d in (self.blobs, self.ingests, layout.refs(self.root)):
            d.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, LocalWriter] = {}
        self._xattrs_ok: bool | None = None

    # -- Provider -------------------------------------------------------------------------------

    def path(self, digest: str) -> Path | None:
        p = layout.blob(self.root, digest)
        return p if p.exists() else None

    def info(self, digest: str) -> Info | None:
        p = self.path(digest)
        if p is None:
            return None
        return Info(digest, p.stat().st_size, self.labels(digest))

    def read(self, digest: str) -> bytes:
        """A small committed blob, whole (manifests and configs)."""
        p = self.path(digest)
        if p is None:
            raise NotFound(f"{digest} is not in the content store")
        return p.read_bytes()

    # -- Ingester -------------------------------------------------------------------------------

    def writer(self, ref: str, size: int, digest: str) -> "LocalWriter":
        if self.path(digest) is not None:
            raise AlreadyExists(f"content {digest}: already exists")
        holder = self._writers.get(ref)
        if holder is not None:
            raise Unavailable(
                f"ref {ref} locked for {time.monotonic() - holder.started:.1f}s "
                f"(since {holder.started_at}, {holder.present.total()}/{holder.size} bytes present)"
            )
        lock = filelock.try_lock(self.root, ref)  # and one writer per ref across processes
        if lock is None:
            raise filelock.unavailable(self.root, ref)
        if self.path(digest) is not None:  # committed by the holder we just followed
            lock.close()
            raise AlreadyExists(f"content {digest}: already exists")
        try:
            w = LocalWriter(self, ref, size, digest, lock)
        except BaseException:
            lock.close()
            raise
        self._writers[ref] = w
        return w

    def active(self, ref: str) -> "LocalWriter | None":
        return self._writers.get(ref)

    def release(self, w: "LocalWriter") -> None:
        """Forget ``w`` as the holder of its ref (its lock is the writer's to close)."""
        if self._writers.get(w.ref) is w:
            del self._writers[w.ref]

    # -- Manager --------------------------------------------------------------------------------

    def labels(self, digest: str) -> dict[str, str]:
        sidecar = layout.sidecar(self.root, digest)
        if sidecar.exists():
            return json.loads(sidecar.read_text())
        return self._xattr_labels(layout.blob(self.root, digest))

    @staticmethod
    def _xattr_labels(path: Path) -> dict[str, str]:
        out: dict[str, str] = {}
        try:
            for name in os.listxattr(path):
                if name.startswith(XATTR_PREFIX):
                    out[name[len(XATTR_PREFIX) :]] = os.getxattr(path, name).decode()
        except OSError:
            pass
        return out

    def update_labels(self, digest: str, labels: dict[str, str], *, path: Path | None = None) -> None:
        """Record labels on the committed blob (or ``path``, the file about to be committed): as
        ``user.`` xattrs, or in a sidecar file."""
        p = path or layout.blob(self.root, digest)
        sidecar = layout.sidecar(self.root, digest)
        if self._xattrs_ok is not False and not sidecar.exists():
            try:
                for k, v in labels.items():
                    os.setxattr(p, XATTR_PREFIX + k, v.encode())
                self._xattrs_ok = True
                return
            except OSError as exc:
                if exc.errno in (errno.ENOTSUP, errno.EPERM):
                    log.warning("cache filesystem has no user xattrs; keeping labels in sidecar files")
                    self._xattrs_ok = False
                elif exc.errno not in (errno.ENOSPC, errno.E2BIG):
                    raise
                # ext4 holds one block of xattrs per file: a big index's labels go to the sidecar,
                # all of them, so a collector reads one complete set
                labels = {**self._xattr_labels(p), **labels}
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        merged = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        merged.update(labels)
        _atomic_write(sidecar, json.dumps(merged, sort_keys=True).encode())

    def remove_labels(self, digest: str, names: list[str]) -> None:
        """Drop labels from a committed blob (``imagefs rm`` drops ``gc.root``)."""
        sidecar = layout.sidecar(self.root, digest)
        if sidecar.exists():
            kept = {k: v for k, v in json.loads(sidecar.read_text()).items() if k not in names}
            _atomic_write(sidecar, json.dumps(kept, sort_keys=True).encode())
        p = layout.blob(self.root, digest)
        present = [n for n in names if XATTR_PREFIX + n in _listxattr(p)]
        if not present:
            return
        mode = p.stat().st_mode
        os.chmod(p, mode | 0o200)  # a 0444 file refuses xattr changes to anyone but root
        try:
            for n in present:
                os.removexattr(p, XATTR_PREFIX + n)
        finally:
            os.chmod(p, mode)

    def delete(self, digest: str) -> bool:
        """Remove a committed blob and its sidecar labels (a reader with it open keeps its bytes)."""
        try:
            layout.blob(self.root, digest).unlink()
            found = True
        except FileNotFoundError:
            found = False
        try:
            layout.sidecar(self.root, digest).unlink()
        except FileNotFoundError:
            pass
        return found

    # -- tags -----------------------------------------------------------------------------------

    def remember_tag(self, name: str, tag: str, desc_json: dict) -> None:
        """Remember what ``name:tag`` resolved to, so it can be mounted when the registry is away."""
        p = layout.tag(self.root, name, tag)
        p.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(p, json.dumps({"descriptor": desc_json, "resolved": now_rfc3339()}).encode())

    def forget_tag(self, name: str, tag: str) -> bool:
        """Forget what ``name:tag`` resolved to; False if it was not remembered."""
        p = layout.tag(self.root, name, tag)
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        return True

    def recall_tag(self, name: str, tag: str) -> tuple[dict, str] | None:
        p = layout.tag(self.root, name, tag)
        try:
            doc = json.loads(p.read_text())
            return doc["descriptor"], doc["resolved"]
        except (OSError, ValueError, KeyError):
            return None


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
        self.data_path = self.dir / "data"
        self.state_path = self.dir / "state"
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
        self._hash_lock = trio.Lock()
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
        _atomic_write(self.state_path, json.dumps(state).encode())

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
        """Write ``data`` at ``offset``; the disk write runs off the trio thread."""
        if self.closed:
            raise self.error or WriterClosed(f"{self.ref}: writer is closed")
        if offset + len(data) > self.size:
            raise DigestMismatch(f"{self.ref}: registry sent more than the {self.size} bytes the descriptor says")
        self._ops += 1
        try:
            if offset == self.hashed and not self._hash_lock.locked():
                # in order: hash it in the same trip to the worker thread, no read-back later
                async with self._hash_lock:
                    await trio.to_thread.run_sync(_pwrite_and_hash, self.fd, data, offset, self._hash)
                    self.hashed = offset + len(data)
            else:
                await trio.to_thread.run_sync(_pwrite_all, self.fd, data, offset)
        finally:
            self._ops -= 1
            if self.closed:
                self._close_fd()
        if self.closed:
            raise self.error or WriterClosed(f"{self.ref}: writer is closed")
        self.present.add(offset, offset + len(data))
        self.notify()

    def save(self) -> None:
        """Record which ranges are present, so a crash or unmount loses no fetched byte.

        Best effort: on a full disk the record is stale, which costs a refetch, never a wrong byte.
        """
        if not self.closed:
            try:
                self._save_state()
            except OSError as exc:
                log.warning("%s: cannot record progress: %s", self.ref, exc)

    def pread(self, offset: int, size: int) -> bytes:
        """Bytes already written; callers check ``present`` first."""
        return os.pread(self.fd, size, offset)

    async def hash_prefix(self) -> None:
        """Hash the present prefix not hashed yet, reading it back in a worker thread."""
        async with self._hash_lock:
            target = self.present.prefix()
            if target > self.hashed and not self.closed:
                self.hashed = await trio.to_thread.run_sync(_hash_file, self.data_path, self._hash, self.hashed, target)

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
            raise DigestMismatch(f"{self.ref}: got {self.present.total()} bytes, descriptor says {self.size}")
        await self.hash_prefix()
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
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


#: The name copy.py and older callers know; new code types against :class:`.store.Writer`.
Writer = LocalWriter


def _listxattr(path: Path) -> list[str]:
    try:
        return os.listxattr(path)
    except OSError:
        return []


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pwrite_and_hash(fd: int, data: bytes, offset: int, hasher) -> None:
    _pwrite_all(fd, data, offset)
    hasher.update(data)


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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
