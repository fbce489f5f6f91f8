"""Capabilities of a content store, after containerd's ``core/content/content.go``.

A store is split into small capabilities, and code takes the narrowest it needs, so another store
(a test's, a remote one) can stand in for :class:`~.local.LocalStore`:

- :class:`Provider` reads committed content: complete and digest-verified, never changing.
- :class:`Ingester` hands out the one :class:`Writer` of a ref key; a second caller gets
  ``Unavailable``, a caller whose blob is committed gets ``AlreadyExists``.
- :class:`Writer` lands bytes at any offset, verifies, and commits (or discards, or suspends).
- :class:`Manager` reads and changes what the store knows about committed blobs: info, labels,
  deletion.
- :class:`Tags` remembers what a tag last resolved to, for a mount when the registry is away.

:class:`Store` is all of them, what the filesystem's reader and an :class:`~imagefs.image.Image`
take. Only ``content/`` and the composition roots (cli, fs/mount, pull, gc, fsck, status, rm, copy,
run) name ``LocalStore``; ``tests/test_store_conformance.py`` checks these promises on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .ranges import RangeSet


@dataclass(frozen=True)
class Info:
    """A committed blob: its digest, size and labels (``containerd.io/gc.*``, ``imagefs.*``)."""

    digest: str
    size: int
    labels: dict[str, str] = field(default_factory=dict)


class Provider(Protocol):
    def path(self, digest: str) -> Path | None:
        """The committed, verified file for ``digest``, or None: read it with ``pread``, or let
        the kernel read it (FUSE passthrough)."""

    def read(self, digest: str) -> bytes:
        """A small committed blob, whole (manifests and configs); ``NotFound`` if absent."""

    def info(self, digest: str) -> Info | None:
        """Digest, size and labels of a committed blob, or None."""


class Writer(Protocol):
    """The single writer of one blob, as an :class:`Ingester` hands it out.

    Bytes land at any offset (a lazy reader fetches ranges out of order); ``present`` says which
    are on disk and is what readers of a partial blob follow. Leaving the ``with`` block without
    :meth:`commit` discards unverified data and keeps verified data for a later process.
    """

    ref: str
    size: int
    digest: str

    def __enter__(self) -> "Writer": ...

    def __exit__(self, exc_type, exc, tb) -> None: ...

    # -- progress: what readers of a partial blob follow ----------------------------------------

    @property
    def present(self) -> RangeSet:
        """The byte ranges on disk (read-only for callers)."""

    @property
    def offset(self) -> int:
        """Bytes present from the start: where a sequential fetch continues (a resume)."""

    @property
    def complete(self) -> bool:
        """Every byte is present (not yet verified)."""

    @property
    def hashed(self) -> int:
        """Bytes of the prefix already fed to the digest."""

    async def wait_changed(self) -> None:
        """Return once bytes land, the writer ends, or :meth:`notify` is called."""

    def notify(self) -> None:
        """Wake every :meth:`wait_changed` (a reader's claim on the bytes changed)."""

    # -- writing --------------------------------------------------------------------------------

    async def write_at(self, offset: int, data: bytes) -> None:
        """Land ``data`` at ``offset``; more than ``size`` is a ``DigestMismatch``."""

    def pread(self, offset: int, size: int) -> bytes | memoryview:
        """Bytes already present (callers check :attr:`present` first); a view of a chunk still in
        memory is as good (FUSE replies take any buffer). Blocking: it may read the disk."""

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        """:meth:`pread` for a reader being served: a chunk in memory is let go once a read
        reaches its end, and a disk read happens off the trio thread."""

    def save(self) -> None:
        """Record which ranges are present, so a later process resumes (best effort)."""

    async def hash_prefix(self) -> None:
        """Hash the present prefix not hashed yet, off the trio thread."""

    # -- ending ---------------------------------------------------------------------------------

    @property
    def verified(self) -> bool:
        """Size and digest matched: the bytes may be served before the commit."""

    @property
    def committed(self) -> bool: ...

    @property
    def closed(self) -> bool:
        """Committed, aborted or suspended: no more writes."""

    async def verify(self) -> None:
        """Check size and digest of the complete data; ``DigestMismatch`` if wrong."""

    async def commit(self, labels: dict[str, str] | None = None) -> Path:
        """Verify, then make the blob permanent with ``labels``. ``DigestMismatch`` if the bytes
        are wrong; ``StoreError`` if the disk refuses (the verified data is kept)."""

    def abort(self, error: BaseException) -> None:
        """Discard the data and wake every reader with ``error``."""

    def suspend(self) -> None:
        """Stop, keeping what is present for the next process to resume."""


class Ingester(Protocol):
    def writer(self, ref: str, size: int, digest: str) -> Writer:
        """The one writer for ``ref``; raises ``AlreadyExists`` or ``Unavailable`` (saying who holds
        the ref and for how long)."""

    def active(self, ref: str) -> Writer | None:
        """The writer now holding ``ref`` in this process, so readers can follow its progress."""


class Manager(Protocol):
    def info(self, digest: str) -> Info | None: ...

    def labels(self, digest: str) -> dict[str, str]:
        """The labels of a committed blob (``{}`` if it has none)."""

    def update_labels(self, digest: str, labels: dict[str, str]) -> None:
        """Add or replace labels of a committed blob."""

    def remove_labels(self, digest: str, names: list[str]) -> None:
        """Drop labels from a committed blob (``imagefs rm`` drops ``gc.root``)."""

    def delete(self, digest: str) -> bool:
        """Remove a committed blob and its labels; False if it was not there."""


class Tags(Protocol):
    def remember_tag(self, name: str, tag: str, desc_json: dict) -> None: ...

    def recall_tag(self, name: str, tag: str) -> tuple[dict, str] | None:
        """The descriptor ``name:tag`` last resolved to and when (RFC 3339), or None."""

    def forget_tag(self, name: str, tag: str) -> bool: ...


class Store(Provider, Ingester, Manager, Tags, Protocol):
    """Every capability: what a mount's reader and image take."""
