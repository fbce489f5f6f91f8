"""File-like views of a layer blob that :mod:`.service` builds indexes and reads from.

- :class:`Counting`: the committed blob, counting bytes consumed (the index build's progress log);
- :class:`Arriving`: the blob as the mount's reader fetches it, read from a worker thread;
- :class:`ZstdCursor`: one forward-only decompressor per zstd layer (zstd has no checkpoints).
"""

from __future__ import annotations

import io
import threading

import trio

from ..blobranges import BlobRanges
from ..descriptors import Descriptor


class Counting(io.RawIOBase):
    """A blob as a raw stream, counting bytes consumed for the progress log, and keeping what a
    read raised (a library reading through it may report only that it failed)."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f, self.consumed = f, 0
        self.error: BaseException | None = None  # what a read raised: indexed_gzip says only ZRAN_READ_FAIL

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        try:
            n = self.f.readinto(buf)
        except BaseException as exc:
            self.error = exc
            raise
        self.consumed += n
        return n

    def read(self, size: int = -1) -> bytes:
        """What the stream below returns, counted: no copy through a buffer of our own."""
        try:
            data = self.f.read(size)
        except BaseException as exc:
            self.error = exc
            raise
        self.consumed += len(data)
        return data

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.consumed = self.f.seek(offset, whence)
        return self.consumed

    def tell(self) -> int:
        return self.f.tell()


class Arriving(io.RawIOBase):
    """A blob as the mount's reader fetches it, read from a worker thread: each read waits in trio
    for its bytes. They are not verified yet: what is built from them is kept only once the whole
    blob has matched its digest (a mismatch fails these reads, or the commit after them)."""

    def __init__(self, reader: BlobRanges, desc: Descriptor) -> None:
        super().__init__()
        self.reader, self.desc, self.pos = reader, desc, 0
        self.handle = reader.open(desc, 0)  # one handle: the reader sees a sequential stream and fetches ahead
        self.token = trio.lowlevel.current_trio_token()  # read from any thread, not only trio's workers

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.desc.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes as the reader returns them (one copy fewer than :meth:`readinto`)."""
        n = min(size if size >= 0 else self.desc.size, self.desc.size - self.pos)
        if n <= 0:
            return b""
        data = trio.from_thread.run(self.reader.read, self.desc, self.pos, n, self.handle, trio_token=self.token)
        self.pos += len(data)
        return data if isinstance(data, bytes) else bytes(data)


class ZstdCursor:
    """One forward-only decompressor per zstd layer; a read behind it starts again from the top."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self._f = None
        self._z = None

    def pread(self, offset: int, size: int) -> bytes:
        import zstandard

        with self.lock:
            if self._z is None or self._z.tell() > offset:
                if self._f is not None:
                    self._f.close()
                self._f = open(self.path, "rb")
                self._z = zstandard.ZstdDecompressor().stream_reader(self._f, read_size=1 << 20)
            self._z.seek(offset)
            parts, left = [], size
            while left:
                chunk = self._z.read(left)
                if not chunk:
                    break
                parts.append(chunk)
                left -= len(chunk)
            return b"".join(parts)
