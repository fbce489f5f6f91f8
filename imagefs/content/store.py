"""Capabilities of a content store, after containerd's ``core/content/content.go``.

Functions take the narrowest one they need (``fetch`` needs an :class:`Ingester`, the filesystem
a :class:`Provider`), so another store can stand in for the local one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .local import Writer


@dataclass(frozen=True)
class Info:
    """A committed blob: its digest, size and labels (``containerd.io/gc.*``, ``imagefs.*``)."""

    digest: str
    size: int
    labels: dict[str, str] = field(default_factory=dict)


class Provider(Protocol):
    def path(self, digest: str) -> Path | None:
        """The committed, verified file for ``digest``, or None."""

    def info(self, digest: str) -> Info | None: ...


class Ingester(Protocol):
    def writer(self, ref: str, size: int, digest: str) -> "Writer":
        """The one writer for ``ref``; raises ``AlreadyExists`` or ``Unavailable``."""

    def active(self, ref: str) -> "Writer | None":
        """The writer now holding ``ref``, so readers can follow its progress."""


class Manager(Protocol):
    def labels(self, digest: str) -> dict[str, str]: ...

    def update_labels(self, digest: str, labels: dict[str, str]) -> None: ...
