"""The mount's ``user.imagefs.statistics``: every part's counters in one JSON object.

Each part keeps its own counters and hands out a frozen snapshot from ``statistics()``, as trio's
locks and channels do: the reader (:class:`~imagefs.reader.ReaderStatistics`), the content store
(:class:`~imagefs.content.local.StoreStatistics`), the registry client
(:class:`~imagefs.registry.transport.RegistryStatistics`), the layers
(:class:`~imagefs.layers.service.LayersStatistics`) and FUSE passthrough
(:class:`~imagefs.fs.passthrough.PassthroughStatistics`). The composition root (``fs/mount``)
names the parts; :func:`collect` puts one key per part, so benchmarks and tests read what moved
without knowing the classes behind it. The reader's own keys also stay at the top level, where
they were before the parts (``reads``, ``requests``, ``bytes_fetched``, ``passthrough_opens`` …):
a part's name must not be one of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol


class HasStatistics(Protocol):
    def statistics(self) -> Any:
        """A frozen dataclass of counters."""


def collect(parts: Mapping[str, HasStatistics | None]) -> dict[str, dict[str, Any]]:
    """``{name: counters}`` for every part present (a part that is off, such as passthrough, is None)."""
    return {name: dataclasses.asdict(part.statistics()) for name, part in parts.items() if part is not None}
