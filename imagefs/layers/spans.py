"""Where a gzip layer's checkpoints go: the rule shared by a zTOC (``copy --soci``) and the local index.

A read of one file fetches, and checks against its digest, every compressed *span* its bytes
touch: from the checkpoint before the file to the one after. So a span bounds what a small read
costs, and every checkpoint costs a 32 KiB window in the index (a zTOC stores them raw). With
spans of one size the two targets of issue 11 cannot both hold: a small file costing <= 512 KiB
needs spans that small, and then the windows alone are 32 KiB / 512 KiB = 6.25 % of the layer,
over the 3 % a zTOC may cost. Measured with ``bench/soci --spans`` on a 419 MiB layer (SOCI's
uniform spans): 512 KiB, zTOC 6.6 %; 1 MiB, 3.5 %; 4 MiB (soci's default), 1.2 % but 4.7 MiB
fetched for a 73-byte file.

What resolves it is that small files do not sit in big files. A span is at most:

- ``dense`` compressed bytes (512 KiB by default) if it holds bytes of a file of at most
  :data:`SMALL` — a small file costs one such span;
- :data:`MEDIUM` (4 MiB, soci's size) if it holds several members, none of them small: a read of
  a bigger file costs what it costs under soci;
- a quarter of the file, between :data:`MEDIUM` and :data:`SPARSE` (16 MiB), if it lies inside the
  data of one file: only a read of that file fetches it, and big files hold most of a layer's bytes
  (on the bench layer, 16 MiB instead of 4 MiB spans inside its two big files took first contact
  from 2.2 % towards 2 % of the image); a quarter, so a read anywhere in a file never costs it whole.

A span never starts inside a file of at most :data:`SMALL` if a candidate that does not is
available, so such a file is rarely split across two spans. If the checkpoints would still cost
over :data:`BUDGET` of the layer (a layer of nothing but small files), ``dense`` doubles until
they fit. The candidates are the points one inflate recorded (deflate block boundaries, each with
its window); this module only picks among their offsets, so it is pure and cheap to test.
"""

from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass

DENSE = 512 << 10
MEDIUM = 4 << 20
SPARSE = 16 << 20
SMALL = 16 << 10
BUDGET = 0.03
#: what one checkpoint adds to a zTOC: its window, offsets and bits, and its span digest string
CHECKPOINT_BYTES = 32768 + 17 + 4 + 4 + 71 + 1


@dataclass(frozen=True)
class Point:
    """A candidate checkpoint: blob byte ``compressed`` (``bits`` of the byte before) = tar byte ``uncompressed``."""

    compressed: int
    uncompressed: int
    bits: int = 0


class DataRanges:
    """The uncompressed byte ranges holding file data, in tar order (they never overlap)."""

    def __init__(self) -> None:
        self.starts = array("q")
        self.ends = array("q")
        self._small = array("q", [0])  # how many of the first i ranges are small files

    def add(self, start: int, size: int) -> None:
        if size > 0:
            self.starts.append(start)
            self.ends.append(start + size)
            self._small.append(self._small[-1] + (size <= SMALL))

    def _at(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos) - 1

    def inside_one(self, a: int, b: int) -> int:
        """The size of the file whose data holds all of tar bytes ``[a, b)``; 0 if none does."""
        i = self._at(a)
        return self.ends[i] - self.starts[i] if i >= 0 and b <= self.ends[i] else 0

    def touches_small(self, a: int, b: int) -> bool:
        """Whether tar bytes ``[a, b)`` hold any byte of a file of at most :data:`SMALL`."""
        i = self._at(a)
        if i < 0 or self.ends[i] <= a:
            i += 1
        j = bisect.bisect_left(self.starts, b)
        return j > i and self._small[j] > self._small[i]

    def splits_small(self, pos: int) -> bool:
        """Whether a span starting at tar byte ``pos`` would cut the data of a file of at most :data:`SMALL`."""
        i = self._at(pos - 1)
        return i >= 0 and self.starts[i] < pos < self.ends[i] and self.ends[i] - self.starts[i] <= SMALL


def limit(ranges: DataRanges, a: int, b: int, dense: int, sparse: int = SPARSE) -> int:
    """The most compressed bytes a span over tar bytes ``[a, b)`` may have."""
    medium = max(dense, min(MEDIUM, sparse))
    size = ranges.inside_one(a, b)
    if size:
        return min(max(size // 4, medium), sparse)
    return dense if ranges.touches_small(a, b) else medium


def choose(points: list[Point], first: Point, ranges: DataRanges, dense: int, sparse: int = SPARSE) -> list[Point]:
    """``first`` and then, greedily, the last candidate that keeps each span within its limit —
    the last one that cuts no small file if there is one since the last cut, else the last."""
    chosen = [first]
    clean = last_any = None  # the candidates the current span could end at
    for p in points:
        last = chosen[-1]
        if p.uncompressed <= last.uncompressed or p.compressed <= last.compressed:
            continue
        if p.compressed - last.compressed > limit(ranges, last.uncompressed, p.uncompressed, dense, sparse) \
                and last_any is not None:
            chosen.append(clean or last_any)
            clean = last_any = None
            if p.uncompressed <= chosen[-1].uncompressed:
                continue
        last_any = p
        if not ranges.splits_small(p.uncompressed):
            clean = p
    return chosen


def fit(points: list[Point], first: Point, ranges: DataRanges, compressed_size: int, toc_bytes: int,
        dense: int = DENSE, sparse: int = SPARSE, budget: float | None = BUDGET) -> tuple[list[Point], int]:
    """(the chosen checkpoints, the dense span size they were chosen with): :func:`choose` with
    ``dense`` doubled until the index would cost at most ``budget`` of the layer (None: no limit)."""
    while True:
        chosen = choose(points, first, ranges, dense, max(sparse, dense))
        if budget is None or dense >= sparse or toc_bytes + len(chosen) * CHECKPOINT_BYTES <= budget * compressed_size:
            return chosen, dense
        dense *= 2
