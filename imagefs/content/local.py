"""The local content store: committed blobs, in-progress ingests and remembered tags.

It implements every capability of :mod:`.store` on a directory laid out as :mod:`.layout` says:
committed blobs (mode 0444, labels as ``user.`` xattrs or a sidecar file), ingests (one
:class:`~.ingest.LocalWriter` each, resumable), and a tag's last resolution.

One :class:`LocalWriter` per ref key: in this process by a table, across processes sharing the cache by
an ``flock`` (:mod:`.filelock`); a second caller gets :class:`Unavailable` saying who holds the ref
and for how long, and backs off, as containerd's fetch does.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import AlreadyExists, NotFound, Unavailable
from . import filelock, layout
from .diskio import atomic_write
from .held import Budget
from .ingest import KEEP, LocalWriter
from .labels import now_rfc3339
from .store import Info

log = logging.getLogger(__name__)

XATTR_PREFIX = "user."


@dataclass(frozen=True)
class StoreStatistics:
    """What one process's store did (trio's ``statistics()`` style: a snapshot)."""

    blobs_committed: int = 0
    bytes_committed: int = 0
    hits: int = 0  # content asked for (a writer, a whole read) that was committed already
    lock_waits: int = 0  # writers refused because another holder had the ref: the caller backs off
    verify_failures: int = 0  # complete ingests whose size or digest was wrong
    bytes_read_back: int = 0  # ingest bytes read back from disk to be hashed (not hashed as they landed or from memory)
    bytes_written_direct: int = 0  # ingest bytes written past the page cache (O_DIRECT), kept in memory for readers
    bytes_served_from_memory: int = 0  # reads of an ingest answered from chunks in memory
    bytes_served_from_disk: int = 0  # reads of an ingest's bytes that only the disk still had (a worker thread's pread)


class LocalStore:
    """A content store on a local directory, outliving any one mount."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = layout.blobs(self.root)
        self.ingests = layout.ingests(self.root)
        for d in (self.blobs, self.ingests, layout.refs(self.root)):
            d.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, LocalWriter] = {}
        self.kept = Budget(KEEP)  # memory for chunks its ingests wrote past the page cache
        self._xattrs_ok: bool | None = None
        self._counts = dict.fromkeys(StoreStatistics.__dataclass_fields__, 0)

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(**self._counts)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to one :class:`StoreStatistics` counter (the writers report commits and failures)."""
        self._counts[name] += n

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
        self.count("hits")
        return p.read_bytes()

    # -- Ingester -------------------------------------------------------------------------------

    def writer(self, ref: str, size: int, digest: str) -> "LocalWriter":
        if self.path(digest) is not None:
            self.count("hits")
            raise AlreadyExists(f"content {digest}: already exists")
        holder = self._writers.get(ref)
        if holder is not None:
            self.count("lock_waits")
            raise Unavailable(
                f"ref {ref} locked for {time.monotonic() - holder.started:.1f}s "
                f"(since {holder.started_at}, {holder.present.total()}/{holder.size} bytes present)"
            )
        lock = filelock.try_lock(self.root, ref)  # and one writer per ref across processes
        if lock is None:
            self.count("lock_waits")
            raise filelock.unavailable(self.root, ref)
        if self.path(digest) is not None:  # committed by the holder we just followed
            lock.close()
            self.count("hits")
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
        atomic_write(sidecar, json.dumps(merged, sort_keys=True).encode())

    def remove_labels(self, digest: str, names: list[str]) -> None:
        """Drop labels from a committed blob (``imagefs rm`` drops ``gc.root``)."""
        sidecar = layout.sidecar(self.root, digest)
        if sidecar.exists():
            kept = {k: v for k, v in json.loads(sidecar.read_text()).items() if k not in names}
            atomic_write(sidecar, json.dumps(kept, sort_keys=True).encode())
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
        atomic_write(p, json.dumps({"descriptor": desc_json, "resolved": now_rfc3339()}).encode())

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


#: The name copy.py and older callers know; new code types against :class:`.store.Writer`.
Writer = LocalWriter


def _listxattr(path: Path) -> list[str]:
    try:
        return os.listxattr(path)
    except OSError:
        return []
