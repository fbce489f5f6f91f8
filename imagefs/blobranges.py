"""The one way the filesystem reads bytes of a blob: :class:`BlobRanges`.

Every byte a reader of the mount gets from a blob comes through one of its two calls, whatever
lies behind the file being read:

- :meth:`BlobRanges.read` — *served* bytes of a blob file or of a plain-tar member: an inline
  ``pread`` of the committed blob; else bytes of the shared ingest, fetched span-aligned as they
  are read, with readahead for a handle that reads in order, verified before the last byte is
  served; else (another process holds the ingest) read around it straight from the registry.
- :meth:`BlobRanges.span` — a *whole piece* of a blob, checked before it is returned: a gzip span
  of a layer read through its index, a TOC chunk of an eStargz / zstd:chunked layer, a footer or
  a TOC. From the committed blob if it is here, else a piece kept by an earlier read
  (``CACHE/pieces``, re-hashed as it loads), else one ``Range`` request; a piece that fails its
  digest is a :class:`~imagefs.errors.DigestMismatch` (EIO) and is never kept.

:class:`~imagefs.reader.BlobReader` implements it; ``layers/`` takes it and never opens a registry
stream itself, so there is one place where "pread if committed, else fetch and join" is decided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import trio

from .content.store import Store
from .descriptors import Descriptor

BLOB, KEPT, REGISTRY = "blob", "kept", "registry"  # where a Span's bytes came from


@dataclass
class Handle:
    """One open file's sequential-read detector, and the verification failures it has seen.

    A plain-tar member's handle lives in ``[start, end)`` of its layer blob: its readahead stops
    at the member's end, so reading a small file costs no more than the file.
    """

    inode: int
    failures: int
    next_offset: int = 0
    window: int = 0
    streamed: int = 0  # bytes read since the current sequential stream began
    end: int | None = None  # readahead stops here (a member's end); None: the blob's


@dataclass(frozen=True)
class Piece:
    """How to check a whole piece, and what to say when it is wrong.

    ``sha256`` (hex) is the digest of ``decode(bytes)`` — the compressed bytes themselves for a gzip
    span (``decode`` None), the inflated chunk for a TOC chunk — and the name the piece is kept
    under. An empty ``sha256`` means the piece has no digest of its own (a zTOC's gzip header): it
    is returned unchecked and never kept, for the caller to check.
    """

    sha256: str
    refused: str  # the DigestMismatch message
    decode: Callable[[bytes], bytes] | None = None  # blocking: runs in a worker thread


@dataclass(frozen=True)
class Span:
    """A whole piece, checked (and decoded) as its :class:`Piece` said, and where it came from."""

    data: bytes
    source: str  # BLOB, KEPT or REGISTRY: callers count what a read cost


class Keeper(Protocol):
    """Verified pieces of one layer kept on disk (:class:`~imagefs.content.pieces.Pieces`)."""

    def get(self, sha256_hex: str) -> bytes | None:
        """The piece, re-hashed now; None if it is not here or was wrong."""

    def put(self, sha256_hex: str, data: bytes) -> None:
        """Keep a piece the caller has checked (best effort)."""


class BlobRanges(Protocol):
    """Bytes of blobs for one mount; see the module docstring."""

    store: Store
    nursery: trio.Nursery
    strict: bool  # nothing is served before the whole blob is verified (containerd's rule)

    def committed(self, desc: Descriptor) -> bool:
        """Whether the whole blob is committed (verified) in the store."""

    def open(self, desc: Descriptor, inode: int, *, start: int = 0, end: int | None = None) -> Handle:
        """A handle for one open file; ``[start, end)``: the part of the blob it reads (a member)."""

    async def read(self, desc: Descriptor, offset: int, size: int, handle: Handle | None = None) -> bytes | memoryview:
        """Up to ``size`` served bytes at ``offset``, fetching what is missing; bytes-like."""

    async def span(self, desc: Descriptor, start: int, end: int, piece: Piece | None = None,
                   keep: Keeper | None = None) -> Span:
        """Bytes ``[start, end)`` whole, checked against ``piece`` (then decoded), kept in ``keep``
        when they came from the registry; without ``piece`` the caller checks them."""

    async def prefetch(self, desc: Descriptor) -> None:
        """Fetch the whole blob, verify and commit it; raise why if that fails."""
