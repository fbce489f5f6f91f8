"""Serving byte ranges of blobs, fetching them on first read.

A committed blob is read straight from the store. A layer that is not yet committed is streamed
into the store by one background task, the holder of the ref key's writer; every reader asks for
the writer too, and those who lose follow the holder's progress, waking at once when bytes land
and otherwise backing off with containerd's jitter. A range is served as soon as its bytes are on
disk, except the one that ends the blob: it waits for the digest check, so a reader that reaches
the end of a corrupted blob gets an error, never a clean EOF.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import trio

from .content.local import LocalStore, Writer
from .descriptors import Descriptor
from .errors import AlreadyExists, ImagefsError, RegistryError, Unavailable
from .handlers import Backoff, Fetcher, copy

log = logging.getLogger(__name__)

MAX_OPEN_BLOBS = 256


@dataclass(frozen=True)
class ReaderStatistics:
    """What a mount did: enough to make benchmarks and ``user.imagefs.*`` xattrs honest."""

    reads: int
    bytes_served: int
    cache_hits: int
    lock_waits: int
    fetches_started: int
    fetches_failed: int


class BlobReader:
    """Reads of layer blobs for one mount; fetch tasks run in the mount's nursery."""

    def __init__(self, store: LocalStore, fetcher: Fetcher, nursery: trio.Nursery) -> None:
        self.store = store
        self.fetcher = fetcher
        self.nursery = nursery
        self._fds: dict[str, int] = {}
        self._reads = self._bytes = self._hits = self._waits = self._started = self._failed = 0

    def statistics(self) -> ReaderStatistics:
        return ReaderStatistics(self._reads, self._bytes, self._hits, self._waits, self._started, self._failed)

    def fetched(self, desc: Descriptor) -> int:
        """Bytes of ``desc`` held locally now."""
        if self.store.path(desc.digest) is not None:
            return desc.size
        w = self.store.active(desc.ref_key)
        return w.offset if w is not None else 0

    def committed(self, desc: Descriptor) -> bool:
        return desc.digest in self._fds or self.store.path(desc.digest) is not None

    def read_committed(self, desc: Descriptor, offset: int, size: int) -> bytes:
        """A range of a committed blob: an inline ``pread``, cheaper than any thread hop."""
        fd = self._fds.get(desc.digest)
        if fd is None:
            path = self.store.path(desc.digest)
            if path is None:
                raise ImagefsError(f"{desc.ref_key} is not committed")
            if len(self._fds) >= MAX_OPEN_BLOBS:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[desc.digest] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, size, offset)
        self._reads += 1
        self._bytes += len(data)
        return data

    async def read(self, desc: Descriptor, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset``, fetching the blob if no one has yet."""
        end = min(offset + size, desc.size)
        if offset >= end:
            return b""
        backoff = Backoff()
        watched: Writer | None = None
        while True:
            if self.committed(desc):
                if watched is None:
                    self._hits += 1
                return self.read_committed(desc, offset, end - offset)
            writer = self.store.active(desc.ref_key)
            if writer is None:
                if watched is not None and watched.error is not None:
                    # The fetch we were following failed: report it; a later read starts anew.
                    raise _as_read_error(desc, watched.error)
                try:
                    writer = self.store.writer(desc.ref_key, desc.size, desc.digest)
                except (AlreadyExists, Unavailable):
                    continue
                self._started += 1
                self.nursery.start_soon(self._stream, desc, writer)
            watched = writer
            if end < desc.size and writer.offset >= end:
                data = writer.pread(offset, end - offset)
                self._reads += 1
                self._bytes += len(data)
                return data
            self._waits += 1
            with trio.move_on_after(backoff.next_delay()):
                await writer.wait_changed()

    async def _stream(self, desc: Descriptor, writer: Writer) -> None:
        try:
            with writer:
                await copy(writer, self.fetcher, desc)
        except Exception as exc:  # readers learn of it through writer.error
            self._failed += 1
            log.error("fetch of %s failed: %s", desc.ref_key, exc)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _as_read_error(desc: Descriptor, error: BaseException) -> ImagefsError:
    if isinstance(error, ImagefsError):
        return error
    return RegistryError(f"{desc.ref_key}: fetch failed: {error!r}")
