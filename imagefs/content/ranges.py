"""A set of byte ranges: which parts of a blob are present, or claimed by a fetch in flight."""

from __future__ import annotations

import bisect


class RangeSet:
    """Sorted, disjoint, non-adjacent half-open ranges ``[start, end)``."""

    def __init__(self, ranges: list[tuple[int, int]] | None = None) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for s, e in ranges or ():
            self.add(s, e)

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        # every range touching [start, end] merges into one
        i = bisect.bisect_left(self._ends, start)
        j = bisect.bisect_right(self._starts, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def remove(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect.bisect_right(self._ends, start)
        j = bisect.bisect_left(self._starts, end)
        if i >= j:
            return
        keep: list[tuple[int, int]] = []
        if self._starts[i] < start:
            keep.append((self._starts[i], start))
        if self._ends[j - 1] > end:
            keep.append((end, self._ends[j - 1]))
        self._starts[i:j] = [s for s, _ in keep]
        self._ends[i:j] = [e for _, e in keep]

    def covers(self, start: int, end: int) -> bool:
        if start >= end:
            return True
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any byte of ``[start, end)`` is in the set."""
        i = bisect.bisect_right(self._ends, start)
        return i < len(self._starts) and self._starts[i] < end

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` not in the set, in order."""
        out = []
        pos = start
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while pos < end and i < len(self._starts):
            s, e = self._starts[i], self._ends[i]
            if e <= pos:
                i += 1
                continue
            if s >= end:
                break
            if s > pos:
                out.append((pos, s))
            pos = max(pos, e)
            i += 1
        if pos < end:
            out.append((pos, end))
        return out

    def prefix(self) -> int:
        """Length of the range starting at 0 (bytes present from the start of the blob)."""
        return self._ends[0] if self._starts and self._starts[0] == 0 else 0

    def end_of(self, pos: int) -> int:
        """The end of the range containing ``pos``, or ``pos`` itself."""
        i = bisect.bisect_right(self._starts, pos) - 1
        return self._ends[i] if i >= 0 and self._ends[i] > pos else pos

    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends))

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends))

    def __len__(self) -> int:
        return len(self._starts)

    def __repr__(self) -> str:
        return f"RangeSet({self.ranges()})"
