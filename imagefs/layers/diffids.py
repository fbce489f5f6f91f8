"""A layer's uncompressed digest against the ``rootfs.diff_ids`` its image's config lists.

containerd refuses to unpack a layer that inflates to anything but its diff_id. imagefs serves
what the registry holds (the layer digest is verified), so a mismatch is a warning, not a
refusal — said wherever a layer is inflated whole anyway, hashing the bytes of that one pass:

- a mount's first index pass of a layer (:func:`.service.build` scans the tar through
  :class:`Hashing`); the digest is kept in the layer's index, so a later mount says it again;
- ``pull``, for each layer it holds: :func:`digests` of the committed blob in a worker thread,
  once — the result is the blob's ``containerd.io/uncompressed`` label (containerd's name for it),
  which later pulls read instead;
- ``fsck``, in the pass that re-hashes a cached layer (:func:`digests` gives both).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zlib

import zstandard

from ..content import labels
from .entries import GZIP, ZSTD, sniff

#: containerd's label for a compressed layer's diff_id, set once imagefs has inflated it.
LABEL = labels.UNCOMPRESSED
BUFFER = 1 << 20
#: what a stream that does not inflate raises (gzip's BadGzipFile is an OSError)
INFLATE_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)


class Hashing:
    """A readable stream that hashes what is read through it; :meth:`finish` reads the rest.

    The tar scan stops at the archive's end marker, but a diff_id covers every byte of the
    stream, the padding after that marker too."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.h = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.h.update(data)  # hashlib releases the GIL for all but tiny updates
        return data

    def finish(self) -> str | None:
        """``sha256:…`` of the whole stream, or None if its tail cannot be inflated."""
        try:
            while self.read(BUFFER):
                pass
        except INFLATE_ERRORS:
            return None
        return "sha256:" + self.h.hexdigest()


class _Tee(io.RawIOBase):
    """A file descriptor read once, front to back, hashing every byte read."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.h = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = os.readv(self.fd, [buf])
        self.h.update(memoryview(buf)[:n])
        return n


def digests(fd: int) -> tuple[str, str | None]:
    """(digest of the bytes, digest of them inflated) of an open layer file, in one read.

    Blocking: run it in a worker thread (zlib, zstandard and hashlib release the GIL). The
    uncompressed digest is None when the bytes do not inflate."""
    head = os.pread(fd, 4, 0)
    tee = _Tee(fd)
    inner = hashlib.sha256()
    kind = sniff(head)
    ok = True
    try:
        if kind == GZIP:
            stream = gzip.GzipFile(fileobj=io.BufferedReader(tee, BUFFER))
        elif kind == ZSTD:
            stream = zstandard.ZstdDecompressor().stream_reader(tee, read_size=BUFFER, read_across_frames=True)
        else:
            stream = None
        if stream is not None:
            with stream:
                while chunk := stream.read(BUFFER):
                    inner.update(chunk)
    except INFLATE_ERRORS:  # a layer that does not inflate: no diff_id to compare, the blob still hashed
        ok = False
    buf = bytearray(BUFFER)
    while tee.readinto(buf):  # what the decompressor left: the blob digest covers every byte
        pass
    digest = "sha256:" + tee.h.hexdigest()
    if kind not in (GZIP, ZSTD):
        return digest, digest  # a plain tar is its own uncompressed stream
    return digest, "sha256:" + inner.hexdigest() if ok else None


def diff_ids(config: bytes) -> list[str]:
    """The config's ``rootfs.diff_ids``, or ``[]`` if it has none (not an image config)."""
    try:
        doc = json.loads(config)
        found = doc["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        return []
    return [d if isinstance(d, str) else "" for d in found] if isinstance(found, list) else []


def mismatch(layer: str, actual: str, listed: str, image: str) -> str:
    """The warning line: the layer, both digests, and the image whose config lists the other."""
    return (f"{layer} inflates to {actual}, but the config of {image} lists diff_id {listed} for it "
            "(containerd would refuse to unpack it; the bytes are the registry's: the layer digest matched)")
