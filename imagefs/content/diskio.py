"""How an ingest's bytes reach the disk and come back: through the page cache, or past it.

A chunk in a page-aligned buffer (the direct path's pooled maps) at a page offset is written with
``O_DIRECT``: no page cache is filled for it, which on this kind of VM is the dearest part of a
cold read (``bench/pages``: 0.2-2.4 CPU s/GiB buffered, 0.05 with ``O_DIRECT``). The ingest keeps
such a chunk in memory for its readers (:mod:`.held`); anything else takes the usual buffered
write. Blocking functions: callers run them in worker threads.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from ..errors import StorageError

HASH_CHUNK = 4 << 20
DIRECT_ALIGN = 4096  # O_DIRECT's offset, length and memory alignment (a page: safe on any device)


def open_direct(path: Path) -> int:
    """A second descriptor of the ingest that bypasses the page cache, or -1 where the filesystem
    has no ``O_DIRECT`` (tmpfs)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return -1


def aligned(data, offset: int) -> bool:
    """Whether ``data`` may be written with ``O_DIRECT`` at ``offset``: a page-aligned buffer
    (a pooled map's view; a ``bytearray``'s data is not aligned) of whole pages at a page offset."""
    if offset % DIRECT_ALIGN or len(data) % DIRECT_ALIGN or not isinstance(data, memoryview):
        return False
    return _address(data) % DIRECT_ALIGN == 0


def _address(view: memoryview) -> int:
    """Where a writable buffer's bytes start (a read-only one is never written direct: 1)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return 1


def land(fd: int, direct_fd: int, data, offset: int) -> bool:
    """Write a chunk (worker thread): with ``O_DIRECT`` on ``direct_fd`` if given, which fills no
    page cache, else through it; True if it went direct. A device that refuses the alignment
    (EINVAL, before a byte is written) gets the buffered write."""
    if direct_fd >= 0:
        try:
            if os.pwrite(direct_fd, data, offset) == len(data):
                return True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    _pwrite_all(fd, data, offset)
    return False


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def hash_chunks(hasher, pos: int, chunks: list[bytes]) -> int:
    for chunk in chunks:
        hasher.update(chunk)
        pos += len(chunk)
    return pos


def hash_file(path: Path, hasher, start: int, end: int) -> int:
    """Feed ``path[start:end]`` to ``hasher`` in bounded chunks; returns ``end``."""
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        pos = start
        while pos < end:
            chunk = f.read(min(HASH_CHUNK, end - pos))
            if not chunk:
                raise StorageError(f"{path}: ingest shorter than expected at {pos}")
            hasher.update(chunk)
            pos += len(chunk)
    return end


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` whole: a reader (or a crash) sees the old file or the new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def joined(parts: list, fd: int) -> bytes | memoryview:
    """The bytes of :meth:`.held.Held.pieces`: views as they are, ``(pos, n)`` read from ``fd``."""
    if len(parts) == 1 and not isinstance(parts[0], tuple):
        return parts[0]
    return b"".join(os.pread(fd, p[1], p[0]) if isinstance(p, tuple) else p for p in parts)
