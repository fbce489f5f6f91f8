"""The chunks of one ingest kept in memory: for its hasher, and for readers of bytes the disk
has but the page cache does not.

A chunk is held for the hasher while it lies ahead of the hashed prefix (up to ``hold`` bytes:
the ingest reads back what it could not hold). A chunk written with ``O_DIRECT`` is also kept for
readers until a read reaches its end (within a :class:`Budget` the process's ingests share): it
never went through the page cache, and on this kind of VM filling fresh page cache is the dearest
part of a cold read (``bench/pages``). A chunk whose write is in flight stays until it ends.
Whatever the disk alone holds is in :attr:`Held.uncached`: a read of it is a disk read, which the
ingest does off the trio thread.
"""

from __future__ import annotations

import bisect

from .ranges import RangeSet


class Budget:
    """Bytes kept for readers by every ingest of a process: memory is the process's, not a
    blob's, and a mount may stream many blobs at once."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0


class Held:
    """Chunks by offset, each held for the hasher, kept for readers, or both."""

    def __init__(self, hold: int, keep: Budget) -> None:
        self.hold, self.keep = hold, keep
        self._chunks: dict[int, bytes | memoryview] = {}
        self._starts: list[int] = []  # sorted offsets of _chunks
        self._unread: set[int] = set()  # offsets of chunks kept for readers
        self._unhashed: set[int] = set()  # offsets of chunks held for the hasher
        self._writing: set[int] = set()  # offsets of chunks whose disk write is in flight: only here
        self.for_hash = 0  # bytes of held chunks the hasher has yet to pass
        self.for_readers = 0  # bytes of chunks kept for readers (this ingest's share of ``keep``)
        self.uncached = RangeSet()  # written past the page cache, no longer in memory

    def may_hold(self, n: int) -> bool:
        return self.for_hash + n <= self.hold

    def may_keep(self, n: int) -> bool:
        return self.keep.used + n <= self.keep.limit

    def add(self, offset: int, chunk: bytes | memoryview, *, hashing: bool, reading: bool, writing: bool = False) -> None:
        """Hold ``chunk`` for the hasher (``hashing``) and/or keep it for readers (``reading``:
        it goes past the page cache), and in any case while its disk write is in flight
        (``writing``: until :meth:`written`)."""
        if not (hashing or reading or writing) or offset in self._chunks:
            return
        self._chunks[offset] = chunk
        bisect.insort(self._starts, offset)
        if hashing:
            self._unhashed.add(offset)
            self.for_hash += len(chunk)
        if reading:
            self._unread.add(offset)
            self.for_readers += len(chunk)
            self.keep.used += len(chunk)
        if writing:
            self._writing.add(offset)

    def written(self, offset: int) -> None:
        """The chunk at ``offset`` is on disk."""
        self._writing.discard(offset)
        self._let_go(offset)

    def forget(self, offset: int) -> None:
        """The chunk at ``offset`` could not be written: let it go, whatever it was kept for."""
        if offset not in self._chunks:
            return
        self._unhold(offset)
        self._unkeep(offset)
        self._writing.discard(offset)
        self._drop(offset)

    def chain(self, pos: int) -> list[bytes | memoryview]:
        """The chunks contiguous from ``pos``, for the hasher (they stay held until :meth:`hashed_to`)."""
        out = []
        while (chunk := self._chunks.get(pos)) is not None:
            out.append(chunk)
            pos += len(chunk)
        return out

    def starts(self, pos: int) -> bool:
        return pos in self._chunks

    def next_start(self, pos: int) -> int | None:
        """The first chunk's offset after ``pos``."""
        i = bisect.bisect_right(self._starts, pos)
        return self._starts[i] if i < len(self._starts) else None

    def hashed_to(self, pos: int) -> None:
        """The hasher passed ``pos``: chunks before it are no longer held for it."""
        for start in [s for s in self._unhashed if s + len(self._chunks[s]) <= pos]:
            self._unhold(start)
            self._let_go(start)

    def pieces(self, offset: int, size: int, *, consume: bool = True) -> list[memoryview | tuple[int, int]]:
        """``[offset, offset + size)`` in order: a view of each chunk in memory that holds a part,
        and ``(pos, n)`` for each part memory does not hold (the disk has it). With ``consume``,
        a chunk whose end the read reaches is no longer kept for readers: a stream reads on, and
        memory is for what it has not read yet. (``pread`` asks from a worker thread, without
        ``consume``, while the trio thread may let chunks go: it reads a copy of the offsets.)"""
        end, pos, out = offset + size, offset, []
        starts = self._starts.copy()  # one snapshot (the GIL makes the copy whole)
        first = max(bisect.bisect_right(starts, offset) - 1, 0)
        for start in starts[first : bisect.bisect_left(starts, end)]:
            chunk = self._chunks.get(start)
            if chunk is None or start + len(chunk) <= pos:
                continue
            if start > pos:
                out.append((pos, start - pos))
                pos = start
            stop = min(end, start + len(chunk))
            out.append(memoryview(chunk)[pos - start : stop - start])
            pos = stop
            if consume and start + len(chunk) <= end:
                self._read(start)
        if pos < end:
            out.append((pos, end - pos))
        return out

    def _read(self, start: int) -> None:
        if start in self._unread:
            self._unkeep(start)
            self.uncached.add(start, start + len(self._chunks[start]))
            self._let_go(start)

    def _unhold(self, start: int) -> None:
        """The chunk at ``start`` is no longer held for the hasher."""
        if start in self._unhashed:
            self._unhashed.discard(start)
            self.for_hash -= len(self._chunks[start])

    def _unkeep(self, start: int) -> None:
        """The chunk at ``start`` is no longer kept for readers."""
        if start in self._unread:
            self._unread.discard(start)
            n = len(self._chunks[start])
            self.for_readers -= n
            self.keep.used -= n

    def _let_go(self, start: int) -> None:
        """Drop the chunk at ``start`` once no one needs it in memory."""
        if start in self._chunks and not (start in self._unread or start in self._unhashed or start in self._writing):
            self._drop(start)

    def _drop(self, start: int) -> None:
        del self._chunks[start]
        del self._starts[bisect.bisect_left(self._starts, start)]

    def clear(self) -> None:
        for start in self._unread:  # a reader of a writer that stopped reads them from the disk
            self.uncached.add(start, start + len(self._chunks[start]))
        self._chunks.clear()
        self._starts.clear()
        self._unread.clear()
        self._unhashed.clear()
        self._writing.clear()
        self.keep.used -= self.for_readers
        self.for_hash = self.for_readers = 0
