"""Write eStargz layers ourselves, to the published format (stargz-snapshotter's ``estargz``).

Why our own writer: a test must know every byte the registry serves, and must be able to write
what no well-behaved tool would (a wrong annotation, a hostile TOC). The layout, from a plain tar:

- each member's tar header goes into the current gzip member; a regular file's data is cut into
  chunks (``chunk_size``) and each chunk starts a gzip member of its own, recorded in the TOC with
  its blob ``offset``, ``chunkOffset``/``chunkSize`` and ``chunkDigest`` — or, with
  ``min_chunk_size``, a small file shares the current member (``innerOffset``);
- then a gzip member holding a tar of ``stargz.index.json`` (the TOC JSON) and the tar's end;
- then the 51-byte footer: an empty gzip member whose Extra field is ``SG`` + ``%016xSTARGZ``.

Like ``estargz.Build``, a ``.no.prefetch.landmark`` file (one byte, 0x0f) comes first unless
``landmark=None``. The TOC digest is what the layer descriptor's ``toc.digest`` annotation says.
:class:`TocWriter` is shared with :mod:`.zstdchunked`, which differs in its streams and tail.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
import zlib
from datetime import datetime, timezone
from typing import Any, Callable

from . import images as im

TOC_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
TOC_NAME = "stargz.index.json"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
PREFETCH_LANDMARK = ".prefetch.landmark"
CHUNK_SIZE = 4 << 20  # estargz's default
_TYPES = {tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
          tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


class TocWriter:
    """A blob of independently decompressible streams and the TOC rows that point into it."""

    def __init__(self, chunk_size: int, min_chunk_size: int) -> None:
        self.out = bytearray()
        self.rows: list[dict[str, Any]] = []
        self.chunk_size, self.min_chunk_size = chunk_size, min_chunk_size
        self._z = None
        self.stream_start = 0  # where the open stream starts in the blob
        self.stream_raw = 0  # bytes written into it so far (uncompressed)

    # a format supplies its streams
    def new_stream(self):
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        if self._z is None:
            self._z = self.new_stream()
            self.stream_start, self.stream_raw = len(self.out), 0
        self.out += self._z.compress(data)
        self.stream_raw += len(data)

    def close(self) -> None:
        if self._z is not None:
            self.out += self._z.flush()
            self._z = None

    def add_tar(self, tar: bytes) -> None:
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as t:
            for info in t:
                data = t.extractfile(info).read() if info.isreg() else b""
                self.add(info, data)

    def add(self, info: tarfile.TarInfo, data: bytes) -> None:
        """One member: its header into the open stream, its data chunk by chunk, as the format says."""
        row: dict[str, Any] = {"name": info.name, "type": _TYPES[info.type]}
        if info.mtime:
            row["modtime"] = datetime.fromtimestamp(info.mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        if info.linkname:
            row["linkName"] = info.linkname
        for key, value in (("mode", info.mode), ("uid", info.uid), ("gid", info.gid)):
            if value:
                row[key] = value
        if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            row["devMajor"], row["devMinor"] = info.devmajor, info.devminor
        xattrs = {k[len("SCHILY.xattr."):]: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
                  for k, v in info.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        if xattrs:
            row["xattrs"] = xattrs
        self.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if not (info.isreg() and data):
            if info.isreg():
                row["digest"] = im.digest_of(b"")
            self.rows.append(row)
            return
        row["size"] = len(data)
        row["digest"] = im.digest_of(data)
        written = 0
        while written < len(data):
            n = min(self.chunk_size, len(data) - written)
            share = written == 0 and len(data) < self.min_chunk_size and self._z is not None
            if not share:
                self.close()
                self.write(b"")  # opens the chunk's own stream
            row["offset"] = self.stream_start
            if self.stream_raw:
                row["innerOffset"] = self.stream_raw
            if written:
                row["chunkOffset"] = written
            if n == self.chunk_size:
                row["chunkSize"] = n
            piece = data[written:written + n]
            row["chunkDigest"] = im.digest_of(piece)
            self.write(piece)
            self.end_chunk(row)
            self.rows.append(row)
            written += n
            row = {"name": info.name, "type": "chunk"}
        self.write(b"\0" * (-len(data) % 512))

    def end_chunk(self, row: dict[str, Any]) -> None:
        """After a chunk's data: a format may end its stream here (zstd:chunked does)."""

    def toc_json(self) -> bytes:
        return json.dumps({"version": 1, "entries": self.rows}, indent="\t").encode()


class _Gzip(TocWriter):
    def new_stream(self):
        return zlib.compressobj(6, zlib.DEFLATED, 31)


def footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer: an empty gzip member carrying the TOC's offset in its Extra field."""
    extra = b"SG" + (22).to_bytes(2, "little") + b"%016xSTARGZ" % toc_offset
    head = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\0\xff" + len(extra).to_bytes(2, "little") + extra
    return head + b"\x01\x00\x00\xff\xff" + b"\0" * 8


def _landmark(name: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime, info.size = 0o644, im.EPOCH, 1
    return info, b"\x0f"


def build(tar: bytes, *, chunk_size: int = CHUNK_SIZE, min_chunk_size: int = 0,
          landmark: str | None = NO_PREFETCH_LANDMARK,
          edit: Callable[[list[dict[str, Any]]], None] | None = None) -> tuple[bytes, str]:
    """The eStargz blob of the uncompressed ``tar``, and its TOC digest (``sha256:…``).

    ``edit`` may change the TOC rows before they are written: a hostile TOC, correctly digested.
    """
    w = _Gzip(chunk_size, min_chunk_size)
    if landmark:
        w.add(*_landmark(landmark))
    w.add_tar(tar)
    w.close()
    if edit is not None:
        edit(w.rows)
    toc_offset = len(w.out)
    toc = w.toc_json()
    info = tarfile.TarInfo(TOC_NAME)
    info.size = len(toc)
    w.write(info.tobuf(tarfile.USTAR_FORMAT) + toc + b"\0" * (-len(toc) % 512) + b"\0" * 1024)
    w.close()
    return bytes(w.out) + footer(toc_offset), im.digest_of(toc)


def layer(tar: bytes, *, toc_digest: str | None = None, annotate: bool = True, **options: Any) -> im.Blob:
    """An eStargz layer blob (OCI tar+gzip) annotated with its TOC digest (``toc_digest`` overrides it)."""
    blob, digest = build(tar, **options)
    annotations = ((TOC_ANNOTATION, toc_digest or digest),) if annotate else ()
    return im.Blob(im.OCI_LAYER_GZIP, blob, annotations=annotations)
