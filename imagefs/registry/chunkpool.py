"""The direct path's chunk buffers: pooled private maps, each reused once no view of it is held.

Why maps: the ingest writes a chunk with ``O_DIRECT`` only if it is page-aligned. Why a pool, and
why private maps in huge pages: a fresh buffer costs page faults, and a cold ``cat`` fills some 30
of 4 MiB before the first comes back. A private map in huge pages faults twice, not a thousand
times; a shared anonymous map (``mmap``'s default) is shmem, dearer again to fault and to unmap.
"""

from __future__ import annotations

import mmap
import sys
import threading

import trio

POOLED_MIN = 64 << 10  # smaller chunks (a short body's) are fresh bytearrays
IDLE = 2.0  # seconds with no body open before the pool is let go


class ChunkPool:
    """Up to ``keep`` maps of ``size`` bytes, and the bodies open now (worker threads take buffers;
    bodies open and close in the trio thread)."""

    def __init__(self, size: int, keep: int) -> None:
        self.size, self.keep = size, keep
        self.buffers: list[mmap.mmap] = []
        self.bodies = 0  # open now: each holds up to two chunks, so their number bounds memory
        self._lock = threading.Lock()
        self._idle_since: float | None = None  # no body open since then (trio time)

    def buffer(self, n: int) -> bytearray | memoryview:
        """A buffer of ``n`` bytes: a view of a pooled map no one holds a view of (the ingest lets
        a chunk go when it is hashed, written and read), else of a fresh one."""
        if not POOLED_MIN <= n <= self.size:
            return bytearray(n)
        with self._lock:
            for buf in self.buffers:
                if sys.getrefcount(buf) == 3:  # the list, this loop, the call's argument: no view alive
                    return memoryview(buf)[:n]
            buf = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            try:
                buf.madvise(mmap.MADV_HUGEPAGE)
            except (AttributeError, OSError):  # no transparent huge pages here: 4 KiB pages
                pass
            if len(self.buffers) < self.keep:
                self.buffers.append(buf)
            return memoryview(buf)[:n]

    def release(self) -> None:
        with self._lock:
            self.buffers.clear()

    def opened(self) -> None:
        self.bodies += 1

    def closed(self) -> None:
        """A body ended: once none has been open for :data:`IDLE` seconds, the maps go. An idle
        mount keeps no chunk memory; a stream between two requests keeps its maps."""
        self.bodies -= 1
        if self.bodies:
            return
        if self._idle_since is None:
            try:
                trio.lowlevel.spawn_system_task(self._release_when_idle)
            except RuntimeError:  # the run is ending: let go now
                self.release()
                return
        self._idle_since = trio.current_time()

    async def _release_when_idle(self) -> None:
        while self._idle_since is not None:
            if self.bodies:
                self._idle_since = None  # the next close starts the wait again
                return
            wait = self._idle_since + IDLE - trio.current_time()
            if wait <= 0:
                self._idle_since = None
                self.release()
                return
            await trio.sleep(wait)
