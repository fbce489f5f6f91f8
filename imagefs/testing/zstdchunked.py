"""Write zstd:chunked layers ourselves, to containers/storage's format.

The same TOC rows as eStargz (:class:`.estargz.TocWriter`), with zstd frames for streams: tar
headers go into the open frame; each chunk of a file's data is a frame of its own, its row saying
where it starts (``offset``) and ends (``endOffset``). Then the tar's end in a frame; the TOC
("manifest"), zstd-compressed, in a skippable frame; and the footer, a skippable frame of 64 bytes:
little-endian u64 manifest offset, compressed length, uncompressed length, manifest type (1), three
zero tar-split fields, and the magic ``GNUlInUx``. The layer descriptor carries
``io.github.containers.zstd-chunked.manifest-checksum`` (sha256 of the *compressed* manifest) and
``…manifest-position`` (``offset:compressed:uncompressed:1``).
"""

from __future__ import annotations

import struct
from typing import Any

import zstandard

from . import images as im
from .estargz import CHUNK_SIZE, TocWriter

PREFIX = "io.github.containers.zstd-chunked."
CHECKSUM_ANNOTATION = PREFIX + "manifest-checksum"
POSITION_ANNOTATION = PREFIX + "manifest-position"
MAGIC = b"GNUlInUx"
SKIPPABLE = b"\x50\x2a\x4d\x18"


class _Zstd(TocWriter):
    def new_stream(self):
        return zstandard.ZstdCompressor(level=3).compressobj()

    def end_chunk(self, row: dict[str, Any]) -> None:
        self.close()  # a file's data frames hold nothing else
        row["endOffset"] = len(self.out)


def skippable(payload: bytes) -> bytes:
    return SKIPPABLE + len(payload).to_bytes(4, "little") + payload


def build(tar: bytes, *, chunk_size: int = CHUNK_SIZE) -> tuple[bytes, dict[str, str]]:
    """The zstd:chunked blob of the uncompressed ``tar``, and its layer annotations."""
    w = _Zstd(chunk_size, 0)
    w.add_tar(tar)
    w.write(b"\0" * 1024)  # the tar's end
    w.close()
    raw = w.toc_json()
    compressed = zstandard.ZstdCompressor(level=3).compress(raw)
    offset = len(w.out) + 8  # past the skippable frame's own header
    w.out += skippable(compressed)
    w.out += skippable(struct.pack("<7Q", offset, len(compressed), len(raw), 1, 0, 0, 0) + MAGIC)
    annotations = {CHECKSUM_ANNOTATION: im.digest_of(compressed),
                   POSITION_ANNOTATION: f"{offset}:{len(compressed)}:{len(raw)}:1"}
    return bytes(w.out), annotations


def layer(tar: bytes, *, annotations: dict[str, str] | None = None, annotate: bool = True, **options: Any) -> im.Blob:
    """A zstd:chunked layer blob (OCI tar+zstd) with its annotations (``annotations`` overrides them)."""
    blob, own = build(tar, **options)
    own.update(annotations or {})
    return im.Blob(im.OCI_LAYER_ZSTD, blob, annotations=tuple(sorted(own.items())) if annotate else ())
