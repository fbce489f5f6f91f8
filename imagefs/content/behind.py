"""An ingest's ``O_DIRECT`` writes in flight, each in a worker thread, while their chunks are
served from memory (:mod:`.held` keeps a chunk until its write ends): the fetch never waits for
the disk. Under load here the disk took ``O_DIRECT`` writes at ~700 MB/s, the network gave
1.5-2 GB/s; past :attr:`WriteBehind.limit` bytes in flight a chunk takes the page cache instead.
"""

from __future__ import annotations

import functools
from typing import Callable

import trio

from . import diskio
from .ranges import RangeSet


class WriteBehind:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0  # in flight
        self.unwritten = RangeSet()  # the ranges in flight: present for readers, not on disk yet
        self._ended = trio.Event()  # set, and renewed, as each write ends

    def room(self, n: int) -> bool:
        return self.bytes + n <= self.limit

    def start(self, fd: int, direct_fd: int, offset: int, data, ended: Callable[[int, int, object], None]) -> None:
        """Write ``data`` at ``offset`` (``diskio.land``); ``ended(offset, n, outcome)`` is then
        called in the trio thread."""
        n = len(data)
        self.bytes += n
        self.unwritten.add(offset, offset + n)
        token = trio.lowlevel.current_trio_token()

        def deliver(outcome) -> None:  # in the worker thread
            try:
                token.run_sync_soon(self._end, offset, n, outcome, ended)
            except trio.RunFinishedError:
                pass

        trio.lowlevel.start_thread_soon(functools.partial(diskio.land, fd, direct_fd, data, offset), deliver)

    def _end(self, offset: int, n: int, outcome, ended: Callable[[int, int, object], None]) -> None:
        self.bytes -= n
        self.unwritten.remove(offset, offset + n)
        try:
            ended(offset, n, outcome)
        finally:
            self._ended.set()
            self._ended = trio.Event()

    async def drain(self) -> None:
        """Return once every write in flight has ended."""
        while self.bytes:
            await self._ended.wait()

    def on_disk(self, present: RangeSet) -> RangeSet:
        """``present`` less what is still on its way to the disk: what a state file may record."""
        out = RangeSet(present.ranges())
        for start, end in self.unwritten.ranges():
            out.remove(start, end)
        return out
