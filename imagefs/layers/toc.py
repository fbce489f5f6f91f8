"""A layer listed from its own table of contents (eStargz, zstd:chunked), and that TOC in the cache.

Both formats end their blob with a JSON TOC of the same shape (stargz-snapshotter's ``JTOC``; the
containers/storage manifest adds ``endOffset`` and ``chunkType``): one row per tar member, and for a
regular file one row per *chunk* of its data — where its compressed stream starts in the blob
(``offset``), where in that stream's output it begins (``innerOffset``), which bytes of the file it
holds (``chunkOffset``/``chunkSize``) and their sha256 (``chunkDigest``). Listing needs only the
TOC; reading a file needs only its chunks, each checked against its digest before a byte is served.

The rows become ordinary :class:`Entry` rows through :mod:`.tarindex`'s member rules (names
normalised, escapes refused, hard links resolved, the last duplicate wins), so ``fs/`` and
``rootfs/`` treat the layer exactly as its tar. Per-file chunk lists live here, not in the Entry:
an entry's ``offset`` is its row in :attr:`TocIndex.chunks`.

Only a *verified* TOC is used or cached: one whose digest matched the layer's annotation, or one
read from the committed (digest-checked) blob. It is cached as the TOC bytes themselves, in
``CACHE/indexes/sha256/<hex>.toc.v1`` with a one-line header; loading re-hashes it.
"""

from __future__ import annotations

import base64
import bisect
import gzip
import hashlib
import json
import logging
import os
import re
import tarfile
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..content import layout
from ..errors import InvalidLayer
from . import tarindex
from .entries import LayerIndex

log = logging.getLogger(__name__)

VERSION = 1
ESTARGZ, ZSTD_CHUNKED = "estargz", "zstd:chunked"
FORMATS = (ESTARGZ, ZSTD_CHUNKED)
MAX_CHUNK = 64 << 20  # uncompressed bytes of one chunk: more is refused (memory), writers use 4 MiB
MAX_EXTENT = 128 << 20  # compressed bytes fetched for one chunk

_TYPES = {
    "reg": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE,
}


@dataclass(frozen=True)
class Chunk:
    """Bytes ``[start, start + size)`` of a file: inflate blob bytes ``[begin, end)``, skip ``inner``."""

    start: int
    size: int
    begin: int
    end: int
    inner: int
    digest: str  # sha256 hex of the chunk's bytes; "" for zeros
    zeros: bool = False  # containers/storage: a hole, stored as nothing


@dataclass
class ChunkTable:
    """Every file's chunks in flat arrays, ~80 bytes a chunk (objects would be ~300).

    A file's chunks are consecutive (a TOC lists them right after the file): ``first[n]`` is
    file ``n``'s first chunk and ``first[n + 1]`` ends them.
    """

    first: array = field(default_factory=lambda: array("q"))
    start: array = field(default_factory=lambda: array("q"))
    size: array = field(default_factory=lambda: array("q"))
    begin: array = field(default_factory=lambda: array("q"))
    end: array = field(default_factory=lambda: array("q"))  # 0 until known: the next stream's start
    inner: array = field(default_factory=lambda: array("q"))
    digests: bytearray = field(default_factory=bytearray)  # 32 bytes a chunk
    zeros: set[int] = field(default_factory=set)

    def add(self, start: int, size: int, begin: int, end: int, inner: int, digest: bytes, zeros: bool) -> None:
        if zeros:
            self.zeros.add(len(self.start))
        for column, value in ((self.start, start), (self.size, size), (self.begin, begin), (self.end, end), (self.inner, inner)):
            column.append(value)
        self.digests += digest

    def chunk(self, i: int) -> Chunk:
        zeros = i in self.zeros
        return Chunk(self.start[i], self.size[i], self.begin[i], self.end[i], self.inner[i],
                     "" if zeros else self.digests[32 * i:32 * i + 32].hex(), zeros)


@dataclass
class TocIndex:
    """A layer's index built from its verified TOC, and where each file's chunks are."""

    fmt: str
    index: LayerIndex
    chunks: ChunkTable  # file n (an Entry's offset) has chunks first[n] .. first[n + 1]
    toc_sha256: str  # of the TOC JSON bytes
    checksum: str  # what the layer's annotation must say ("sha256:…"): the TOC's, or its compressed form's

    def find(self, key: int, pos: int) -> Iterator[Chunk]:
        """The chunks of file ``key`` from the one holding ``pos`` on."""
        t = self.chunks
        lo, hi = t.first[key], t.first[key + 1]
        i = max(bisect.bisect_right(t.start, pos, lo, hi) - 1, lo)
        return (t.chunk(j) for j in range(i, hi))


_WS = re.compile(r"[ \t\n\r]*")


def rows(raw: bytes, label: str) -> Iterator[dict]:
    """The TOC's entries one at a time: as one Python document a TOC is ~4x its JSON in memory."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidLayer(f"{label}: the TOC is not UTF-8 JSON: {exc}") from exc
    dec = json.JSONDecoder()

    def skip(i: int) -> int:
        return _WS.match(text, i).end()

    def expect(i: int, chars: str) -> tuple[str, int]:
        i = skip(i)
        if i >= len(text) or text[i] not in chars:
            raise InvalidLayer(f"{label}: the TOC is not a JSON table of contents (at character {i})")
        return text[i], i + 1

    seen = False
    try:
        _, i = expect(0, "{")
        while text[skip(i):skip(i) + 1] != "}":
            key, i = dec.raw_decode(text, skip(i))
            _, i = expect(i, ":")
            if key == "entries" and not seen:
                seen = True
                _, i = expect(i, "[")
                while text[skip(i):skip(i) + 1] != "]":
                    row, i = dec.raw_decode(text, skip(i))
                    if not isinstance(row, dict):
                        raise InvalidLayer(f"{label}: a TOC entry is not a JSON object")
                    yield row
                    if expect(i, ",]")[0] == ",":
                        i = expect(i, ",")[1]
                i = expect(i, "]")[1]
            else:
                _, i = dec.raw_decode(text, skip(i))
            if expect(i, ",}")[0] == ",":
                i = expect(i, ",")[1]
    except ValueError as exc:
        raise InvalidLayer(f"{label}: the TOC is not valid JSON: {exc}") from exc
    if not seen:
        raise InvalidLayer(f"{label}: the TOC has no entries")


@dataclass
class _Builder:
    label: str
    scan: tarindex.Members
    table: ChunkTable = field(default_factory=ChunkTable)
    sizes: array = field(default_factory=lambda: array("q"))
    mtimes: dict[str, tarindex.Seconds] = field(default_factory=dict)  # most rows share a few modtimes
    outside: int = -1  # the chunk from here on is the TOC member itself: after data_end, bounded by the footer


def _mtime(b: _Builder, text) -> tarindex.Seconds | int:
    """Exact seconds (Go writes nanoseconds: a float would lose the last few hundred)."""
    if not isinstance(text, str) or not text:
        return 0
    found = b.mtimes.get(text)
    if found is None:
        found = tarindex.rfc3339(text)
        if len(b.mtimes) < 4096:
            b.mtimes[text] = found
    return found


def _digest(value, label: str, name: str) -> bytes:
    if isinstance(value, str) and value.startswith("sha256:") and len(value) == 71:
        try:
            return bytes.fromhex(value[7:])
        except ValueError:
            pass
    raise InvalidLayer(f"{label}: TOC entry {name!r} has no usable sha256 chunk digest ({value!r})")


def _info(b: _Builder, row: dict, serial: int) -> tarfile.TarInfo:
    """The tar header the TOC row describes: tarindex's rules then apply to it as to any member."""
    info = tarfile.TarInfo(str(row.get("name", "")))
    info.type = _TYPES[row["type"]]
    info.mode = int(row.get("mode") or 0)
    info.uid, info.gid = int(row.get("uid") or 0), int(row.get("gid") or 0)
    info.mtime = _mtime(b, row.get("modtime"))
    info.size = int(row.get("size") or 0) if row["type"] == "reg" else 0
    info.linkname = str(row.get("linkName") or "")
    info.devmajor, info.devminor = int(row.get("devMajor") or 0), int(row.get("devMinor") or 0)
    xattrs = row.get("xattrs")
    if xattrs:
        info.pax_headers = {tarindex.XATTR_PREFIX + k: base64.b64decode(v).decode("utf-8", "surrogateescape")
                            for k, v in xattrs.items()}
    info.offset_data = serial
    return info


def parse(raw: bytes, fmt: str, digest: str, label: str, data_end: int, *, checksum: str,
          extra: dict | None = None) -> TocIndex:
    """A :class:`TocIndex` from TOC JSON bytes (blocking: run it in a thread).

    ``data_end`` is where file data stops in the blob (the TOC's start): the end of the last
    compressed stream when a row does not say its own. ``extra`` is a member the tar holds but
    the TOC does not list (eStargz's own ``stargz.index.json``, last in the tar), as
    :func:`extra_member` describes it.
    Raises :class:`InvalidLayer` when the TOC cannot be used to read files safely.
    """
    b = _Builder(label, tarindex.Members(label))
    current: tuple[str, int] | None = None  # (name, serial) of the regular file chunks attach to
    last = time.monotonic()
    try:
        for n, row in enumerate(rows(raw, label)):
            if not n % 4096 and time.monotonic() - last > tarindex.PROGRESS_EVERY:
                last = time.monotonic()
                log.info("indexing %s from its TOC: %d entries", label, n)
            kind = row.get("type")
            if kind == "chunk":
                if current is None or row.get("name") != current[0]:
                    raise InvalidLayer(f"{label}: TOC chunk of {row.get('name')!r} follows no such file")
                _add_chunk(b, current[1], row)
                continue
            if kind not in _TYPES:
                b.scan.skip(str(row.get("name")), f"unsupported TOC entry type {kind!r}")
                current = None
                continue
            serial = len(b.sizes)
            b.table.first.append(len(b.table.start))
            b.sizes.append(int(row.get("size") or 0) if kind == "reg" else 0)
            current = (row.get("name"), serial) if kind == "reg" else None
            _member(b, _info(b, row, serial))
            if kind == "reg" and b.sizes[serial]:
                _add_chunk(b, serial, row)
        if extra:
            info, c = _extra_member(extra)
            info.offset_data = len(b.sizes)
            b.table.first.append(len(b.table.start))
            b.sizes.append(c.size)
            b.outside = len(b.table.start)
            b.table.add(c.start, c.size, c.begin, c.end, c.inner, bytes.fromhex(c.digest), False)
            _member(b, info)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise InvalidLayer(f"{label}: malformed TOC entry: {exc!r}") from exc
    b.table.first.append(len(b.table.start))
    _finish(b, data_end)
    index = LayerIndex(digest, fmt, list(b.scan.entries.values()), 0, skipped=b.scan.skipped)
    return TocIndex(fmt, index, b.table, hashlib.sha256(raw).hexdigest(), checksum)


def extra_member(info: tarfile.TarInfo, chunk: Chunk) -> dict:
    """A tar member outside the TOC, as JSON (it is cached with the TOC)."""
    return {"name": info.name, "mode": info.mode, "uid": info.uid, "gid": info.gid, "mtime": info.mtime,
            "chunk": [chunk.start, chunk.size, chunk.begin, chunk.end, chunk.inner, chunk.digest]}


def _extra_member(d: dict) -> tuple[tarfile.TarInfo, Chunk]:
    chunk = Chunk(*d["chunk"])
    info = tarfile.TarInfo(d["name"])
    info.mode, info.uid, info.gid, info.mtime, info.size = d["mode"], d["uid"], d["gid"], d["mtime"], chunk.size
    return info, chunk


def _member(b: _Builder, info: tarfile.TarInfo) -> None:
    path = tarindex.normalise(info.name)
    if path is None:
        b.scan.skip(info.name, "the name escapes the layer")
    elif path == "" and info.type != tarfile.DIRTYPE:
        b.scan.skip(info.name, "the layer's root must be a directory")
    else:
        entry = tarindex.entry_of(info, path, b.scan)
        if entry is not None:
            b.scan.put(entry)


def _add_chunk(b: _Builder, serial: int, row: dict) -> None:
    name = row.get("name")
    size = b.sizes[serial]
    start = int(row.get("chunkOffset") or 0)
    length = int(row.get("chunkSize") or 0) or size - start  # 0: to the end of the file
    begin, inner, end = int(row.get("offset") or 0), int(row.get("innerOffset") or 0), int(row.get("endOffset") or 0)
    t = b.table
    expected = t.start[-1] + t.size[-1] if len(t.start) > t.first[serial] else 0
    if start != expected:  # chunks must tile the file in order: no byte served from nowhere
        raise InvalidLayer(f"{b.label}: TOC chunks of {name!r} leave a gap or overlap at byte {expected}")
    if not (0 < length <= MAX_CHUNK and start + length <= size and inner >= 0 and begin >= 0 and end >= 0):
        raise InvalidLayer(f"{b.label}: TOC chunk of {name!r} at {start} has an impossible size {length}")
    zeros = row.get("chunkType") == "zeros"
    value = row.get("chunkDigest")
    if value is None and start == 0 and length == size:
        value = row.get("digest")  # one chunk: the file's own digest is the chunk's
    t.add(start, length, begin, end, inner, bytes(32) if zeros else _digest(value, b.label, name), zeros)


def _finish(b: _Builder, data_end: int) -> None:
    """Check every file is covered, and end each stream where the next one starts."""
    t = b.table
    for serial, size in enumerate(b.sizes):
        lo, hi = t.first[serial], t.first[serial + 1]
        covered = t.start[hi - 1] + t.size[hi - 1] if hi > lo else 0
        if covered != size:
            raise InvalidLayer(f"{b.label}: TOC chunks cover {covered} of a file's {size} bytes")
    starts = sorted(set(t.begin))
    for i in range(len(t.start)):
        if i in t.zeros or i == b.outside:
            continue
        begin, end = t.begin[i], t.end[i]
        # A chunk ends where the next stream begins, as containers/storage reads it: its writer puts
        # the *whole file's* end in a multi-chunk file's first row. A smaller recorded end stands.
        j = bisect.bisect_right(starts, begin)
        following = starts[j] if j < len(starts) else data_end
        end = t.end[i] = min(end, following) if end else following
        if not (0 <= begin < end <= data_end and end - begin <= MAX_EXTENT):
            raise InvalidLayer(f"{b.label}: a TOC chunk points outside the layer's data ({begin}-{end})")


# -- the cache ---------------------------------------------------------------------------------

def toc_path(root: Path, digest: str) -> Path:
    return layout.layer_index(root, digest, f"toc.v{VERSION}")


@dataclass(frozen=True)
class Saved:
    """What is needed to rebuild a :class:`TocIndex` with no registry: the verified TOC and its place."""

    fmt: str
    raw: bytes
    checksum: str
    data_end: int
    extra: dict | None = None  # eStargz: the TOC's own tar member (header fields, chunk)


def save(root: Path, digest: str, saved: Saved) -> None:
    """Write atomically (blocking): a reader sees the whole TOC or none."""
    path = toc_path(root, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = {"version": VERSION, "digest": digest, "format": saved.fmt, "checksum": saved.checksum,
            "sha256": hashlib.sha256(saved.raw).hexdigest(), "data_end": saved.data_end, "extra": saved.extra}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with gzip.open(tmp, "wb", compresslevel=6) as out:
        out.write(json.dumps(head).encode() + b"\n")
        out.write(saved.raw)
    os.replace(tmp, path)


def load(root: Path, digest: str) -> Saved | None:
    """The cached TOC of ``digest`` if it is whole and still hashes right (blocking); else None."""
    path = toc_path(root, digest)
    try:
        with gzip.open(path, "rb") as f:
            head = json.loads(f.readline())
            raw = f.read()
        if head.get("version") != VERSION or head.get("digest") != digest or head.get("format") not in FORMATS:
            return None
        if hashlib.sha256(raw).hexdigest() != head["sha256"]:
            log.warning("cached TOC %s does not match its own digest: fetching it again", path)
            return None
        return Saved(head["format"], raw, head["checksum"], int(head["data_end"]), head.get("extra"))
    except FileNotFoundError:
        return None
    except (OSError, EOFError, ValueError, TypeError, KeyError) as exc:
        log.warning("cached TOC %s is unreadable (%s): fetching it again", path, exc)
        return None
