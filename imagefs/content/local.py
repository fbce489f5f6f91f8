"""The local content store: committed blobs, in-progress ingests and remembered tags.

::

    CACHE/blobs/sha256/<hex>        complete, digest-verified, mode 0444; labels as user. xattrs
    CACHE/labels/sha256/<hex>.json  the labels, where the filesystem has no user xattrs
    CACHE/ingest/<ref key>/         data (written at offsets) and state while a fetch runs
    CACHE/refs/<registry>/<repository>/<tag>.json   a tag's last resolution

Writer locks live in this process (one :class:`Writer` per ref key); a second caller gets
:class:`Unavailable` and backs off, as containerd's fetch does.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import trio

from ..errors import AlreadyExists, DigestMismatch, ImagefsError, Unavailable
from .store import Info

log = logging.getLogger(__name__)

XATTR_PREFIX = "user."


def default_cache_dir() -> Path:
    """``$IMAGEFS_CACHE_DIR``, else ``$XDG_CACHE_HOME/imagefs``, else ``~/.cache/imagefs``."""
    if os.environ.get("IMAGEFS_CACHE_DIR"):
        return Path(os.environ["IMAGEFS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imagefs"


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class LocalStore:
    """A content store on a local directory, outliving any one mount."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.ingests = self.root / "ingest"
        for d in (self.blobs, self.ingests, self.root / "refs"):
            d.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, Writer] = {}
        self._xattrs_ok: bool | None = None

    # -- Provider -------------------------------------------------------------------------------

    def path(self, digest: str) -> Path | None:
        p = self.blobs / digest.split(":", 1)[1]
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
            raise ImagefsError(f"{digest} is not in the content store")
        return p.read_bytes()

    # -- Ingester -------------------------------------------------------------------------------

    def writer(self, ref: str, size: int, digest: str) -> "Writer":
        if self.path(digest) is not None:
            raise AlreadyExists(f"content {digest}: already exists")
        holder = self._writers.get(ref)
        if holder is not None:
            raise Unavailable(
                f"ref {ref} locked for {time.monotonic() - holder.started:.1f}s "
                f"(since {holder.started_at}, {holder.offset}/{holder.size} bytes written)"
            )
        w = Writer(self, ref, size, digest)
        self._writers[ref] = w
        return w

    def active(self, ref: str) -> "Writer | None":
        return self._writers.get(ref)

    def _release(self, w: "Writer") -> None:
        if self._writers.get(w.ref) is w:
            del self._writers[w.ref]

    # -- Manager --------------------------------------------------------------------------------

    def labels(self, digest: str) -> dict[str, str]:
        hex_ = digest.split(":", 1)[1]
        sidecar = self.root / "labels" / "sha256" / f"{hex_}.json"
        if sidecar.exists():
            return json.loads(sidecar.read_text())
        p = self.blobs / hex_
        out: dict[str, str] = {}
        try:
            for name in os.listxattr(p):
                if name.startswith(XATTR_PREFIX):
                    out[name[len(XATTR_PREFIX) :]] = os.getxattr(p, name).decode()
        except OSError:
            pass
        return out

    def update_labels(self, digest: str, labels: dict[str, str]) -> None:
        """Record labels on the committed blob: as ``user.`` xattrs, or in a sidecar file."""
        hex_ = digest.split(":", 1)[1]
        p = self.blobs / hex_
        if self._xattrs_ok is not False:
            try:
                for k, v in labels.items():
                    os.setxattr(p, XATTR_PREFIX + k, v.encode())
                self._xattrs_ok = True
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                log.warning("cache filesystem has no user xattrs; keeping labels in sidecar files")
                self._xattrs_ok = False
        sidecar = self.root / "labels" / "sha256" / f"{hex_}.json"
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        merged = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        merged.update(labels)
        _atomic_write(sidecar, json.dumps(merged, sort_keys=True).encode())

    # -- tags -----------------------------------------------------------------------------------

    def _tag_path(self, name: str, tag: str) -> Path:
        return self.root / "refs" / name / f"{tag}.json"

    def remember_tag(self, name: str, tag: str, desc_json: dict) -> None:
        """Remember what ``name:tag`` resolved to, so it can be mounted when the registry is away."""
        p = self._tag_path(name, tag)
        p.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(p, json.dumps({"descriptor": desc_json, "resolved": now_rfc3339()}).encode())

    def recall_tag(self, name: str, tag: str) -> tuple[dict, str] | None:
        p = self._tag_path(name, tag)
        try:
            doc = json.loads(p.read_text())
            return doc["descriptor"], doc["resolved"]
        except (OSError, ValueError, KeyError):
            return None


class Writer:
    """The single writer of one blob: data goes to the ingest, hashed as it lands.

    Readers in the same process follow ``offset`` and wake on :meth:`wait_changed`, so a layer can
    be served while it streams. Leaving the ``with`` block without :meth:`commit` discards the data.
    """

    def __init__(self, store: LocalStore, ref: str, size: int, digest: str) -> None:
        self.store, self.ref, self.size, self.digest = store, ref, size, digest
        self.started = time.monotonic()
        self.started_at = now_rfc3339()
        self.offset = 0
        self.error: BaseException | None = None
        self.committed = False
        self.dir = store.ingests / ref
        if self.dir.exists():
            shutil.rmtree(self.dir)  # left by a crashed process: start it over
        self.dir.mkdir(parents=True)
        self.data_path = self.dir / "data"
        self.fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        (self.dir / "state").write_text(
            json.dumps({"ref": ref, "digest": digest, "size": size, "started": self.started_at})
        )
        self._hash = hashlib.sha256()
        self._changed = trio.Event()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort(exc or ImagefsError(f"{self.ref}: fetch ended before commit"))

    async def write(self, data: bytes) -> None:
        """Append ``data``; the disk write and hashing run off the trio thread."""
        if self.offset + len(data) > self.size:
            raise DigestMismatch(f"{self.ref}: registry sent more than the {self.size} bytes the descriptor says")
        await trio.to_thread.run_sync(self._write_sync, data, self.offset)
        self.offset += len(data)
        self._notify()

    def _write_sync(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        self._hash.update(data)

    def pread(self, offset: int, size: int) -> bytes:
        """Bytes already written; callers check ``offset`` first."""
        return os.pread(self.fd, size, offset)

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def commit(self, labels: dict[str, str] | None = None) -> Path:
        """Check size and digest, then make the blob permanent; a mismatch discards it and raises."""
        if self.offset != self.size:
            raise DigestMismatch(f"{self.ref}: got {self.offset} bytes, descriptor says {self.size}")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            raise DigestMismatch(f"{self.ref}: content has digest {actual}, expected {self.digest}")
        target = self.store.blobs / self.digest.split(":", 1)[1]
        await trio.to_thread.run_sync(os.fsync, self.fd)
        os.chmod(self.data_path, 0o444)
        os.rename(self.data_path, target)
        self.committed = True
        if labels:
            self.store.update_labels(self.digest, labels)
        self._close()
        shutil.rmtree(self.dir, ignore_errors=True)
        self._notify()
        return target

    def abort(self, error: BaseException) -> None:
        """Discard the partial data and wake every reader with ``error``."""
        if self.committed or self.fd < 0:
            return
        self.error = error
        self._close()
        shutil.rmtree(self.dir, ignore_errors=True)
        self._notify()

    def _close(self) -> None:
        self.store._release(self)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
