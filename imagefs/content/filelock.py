"""Cross-process locks on ref keys, so two imagefs processes never write one ingest at once.

The in-process writer table (:meth:`LocalStore.writer`) stops two tasks of one process from
writing the same ref; this stops two processes sharing a cache directory. A lock is an
``flock(LOCK_EX|LOCK_NB)`` on ``CACHE/locks/<ref key>.lock``:

- the kernel drops it when its holder dies, even by ``kill -9``, so a crash never leaves a ref
  locked (a lock *file* may stay behind; an unlocked file means nothing);
- the file records the holder's pid and start time, so the loser's error can say
  "ref layer-sha256:… locked by pid 4242 for 3.2s", as containerd's ``locks.go`` does — the
  message you want when a mount seems stuck.

A holder unlinks the file before closing it. Because another process may have opened the old
file just before, :func:`try_lock` checks after ``flock`` that the path still names the inode it
locked, and starts over if not; without that check two processes could each lock a different
inode under the same name.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import Unavailable
from . import layout


@dataclass(frozen=True)
class Holder:
    """Who holds a ref's lock, as the lock file says (fields may be unknown while it is written)."""

    ref: str
    pid: int | None
    since: float | None  # time.time() when the lock was taken

    def describe(self) -> str:
        who = f"pid {self.pid}" if self.pid else "another process"
        if self.since is None:
            return f"ref {self.ref} locked by {who}"
        return f"ref {self.ref} locked by {who} for {max(time.time() - self.since, 0.0):.1f}s"


class Lock:
    """A held lock on one ref key; :meth:`close` (or the ``with`` block's end) releases it."""

    def __init__(self, path: Path, fd: int, ref: str) -> None:
        self.path, self.fd, self.ref = path, fd, ref
        self.pid = os.getpid()
        self.since = time.time()

    @property
    def held(self) -> bool:
        return self.fd >= 0

    def close(self) -> None:
        """Release: unlink first (no one may lock this inode by name afterwards), then unlock."""
        if self.fd < 0:
            return
        if self.pid == os.getpid():  # a forked child must not remove its parent's lock
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    os.unlink(self.path)
            except OSError:
                pass
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        return f"<Lock {self.ref} fd={self.fd}>"


def lock_path(store_root: Path, ref: str) -> Path:
    if not ref or "/" in ref or ref.startswith("."):
        raise ValueError(f"not a ref key: {ref!r}")
    return layout.lock(store_root, ref)


def try_lock(store_root: Path, ref: str) -> Lock | None:
    """Lock ``ref`` for this process, or return None at once if another holder has it."""
    path = lock_path(store_root, ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder we waited out unlinked it: lock the file now at the path
            os.close(fd)
            continue
        lock = Lock(path, fd, ref)
        record = json.dumps({"ref": ref, "pid": lock.pid, "since": lock.since}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        return lock


def holder(store_root: Path, ref: str) -> Holder | None:
    """Who holds ``ref`` now, or None if no one does (probing never takes the lock for long)."""
    path = lock_path(store_root, ref)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        else:
            return None  # we could share it: nobody holds it exclusively
        try:
            doc = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            doc = {}
        pid = doc.get("pid") if isinstance(doc.get("pid"), int) else None
        since = doc.get("since") if isinstance(doc.get("since"), (int, float)) else None
        return Holder(ref, pid, since)
    finally:
        os.close(fd)


def unavailable(store_root: Path, ref: str) -> Unavailable:
    """The error a loser raises: who holds the ref and for how long."""
    h = holder(store_root, ref)
    return Unavailable(h.describe() if h else f"ref {ref} locked by another process")
